"""Pretrain a base model in one direction: forward, backward or bidirectional.

    python -m scripts.base_train --direction=backward --depth=4 --max_seq_len=128 \
        --device_batch_size=2 --total_batch_size=512 --num_iterations=10 --model_tag=test_backward
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --direction=bidirectional --depth=20

Every flag has an underscore spelling and a kebab-case alias (--num_iterations / --num-iterations).
Checkpoints go to base_checkpoints/<model_tag> (default d<depth>, plus _<direction> when not
forward), or to experiments/<model_tag>/checkpoints when <model_tag> is an experiment id.
"""

import argparse
import json
import os
import sys
from datetime import datetime, timezone

import torch

from nanochat.checkpoint_manager import (artifact_dirs, build_model, load_checkpoint, load_meta, list_steps,
                                         save_checkpoint)
from nanochat.common import (UserError, add_flag, compute_cleanup, compute_init, print0, run_main)
from nanochat.direction import DirectionSpec, concrete_directions, validate_direction, validate_p_backward
from nanochat.direction_dataloader import direction_aware_dataloader
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb, select_documents
from nanochat.prefetch import prefetching
from nanochat.research_logger import ResearchLogger
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import Trainer, autocast_context, grad_accum_steps_for, run_loop
from nanochat import wandb_log

# Text fragments used for samples: a beginning for forward generation, an ending for backward.
SAMPLE_BEGINNINGS = ["def ", "import ", "class Parser:\n    def "]
SAMPLE_ENDINGS = ["\n    return result\n", "raise ValueError(msg)\n"]


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a forward, backward or bidirectional base model")
    add_flag(p, "direction", default=None,
             help="forward | backward | bidirectional (default: forward; when resuming, the checkpoint's)")
    add_flag(p, "p_backward", type=float, default=0.5, help="bidirectional: probability a document is drawn backward")
    add_flag(p, "depth", type=int, default=20, help="number of layers; width and heads follow")
    add_flag(p, "max_seq_len", type=int, default=2048, help="context length T")
    add_flag(p, "device_batch_size", type=int, default=32, help="rows per micro-batch per device (B)")
    add_flag(p, "total_batch_size", type=int, default=524288, help="tokens per optimizer step (-1 = B*T*world)")
    add_flag(p, "num_iterations", type=int, default=-1, help="optimizer steps (-1 = from --target_param_data_ratio)")
    add_flag(p, "target_param_data_ratio", type=float, default=20.0, help="tokens per parameter when num_iterations=-1")
    add_flag(p, "embedding_lr", type=float, default=0.2)
    add_flag(p, "unembedding_lr", type=float, default=0.004)
    add_flag(p, "matrix_lr", type=float, default=0.02, help="Muon learning rate")
    add_flag(p, "weight_decay", type=float, default=0.0)
    add_flag(p, "init_lr_frac", type=float, default=1.0, help="scale all learning rates")
    add_flag(p, "warmup_ratio", type=float, default=0.0)
    add_flag(p, "warmdown_ratio", type=float, default=0.2)
    add_flag(p, "final_lr_frac", type=float, default=0.0)
    add_flag(p, "grad_clip", type=float, default=0.0, help="max gradient norm (0 = off; the norm is logged anyway)")
    add_flag(p, "seed", type=int, default=42, help="model init and bidirectional draw")
    add_flag(p, "eval_every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    add_flag(p, "eval_tokens", type=int, default=-1,
             help="validation tokens per bpb evaluation (-1 = 20 steps' worth, at most 10,485,760)")
    add_flag(p, "sample_every", type=int, default=2000, help="print samples every N steps (-1 = off)")
    add_flag(p, "save_every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    add_flag(p, "core_metric_every", type=int, default=-1, help="CORE evaluation (not available yet: keep -1)")
    add_flag(p, "model_tag", default=None, help="checkpoint tag (default d<depth>[_<direction>]) or experiment id")
    add_flag(p, "run", default="dummy", help="wandb run name ('dummy' = no wandb, no research log)")
    add_flag(p, "research_log", type=int, default=-1, help="HDF5 research log: 1 on, 0 off, -1 = on when --run is named")
    add_flag(p, "log_every", type=int, default=1, help="print a progress line every N steps")
    add_flag(p, "log_flush_every", type=int, default=100, help="research log: steps buffered per HDF5 write")
    add_flag(p, "snapshot_every", type=int, default=100, help="record per-token losses, per-layer stats every N steps")
    add_flag(p, "device_type", default="", help="cuda | mps | cpu (empty = autodetect)")
    add_flag(p, "compile", type=int, default=-1, help="torch.compile the model (-1 = on for cuda)")
    add_flag(p, "resume_from_step", type=int, default=-1, help="continue from this saved step")
    add_flag(p, "tokenizer_threads", type=int, default=4)
    add_flag(p, "prefetch", type=int, default=2, help="batches prepared ahead on a background thread (0 = off)")
    return p


def default_model_tag(depth, direction):
    return f"d{depth}" if direction == "forward" else f"d{depth}_{direction}"


def validate_args(args):
    if args.direction is not None:
        validate_direction(args.direction)
    validate_p_backward(args.p_backward)
    if args.core_metric_every != -1:
        raise UserError("--core_metric_every: the CORE metric arrives with the evaluation suite; keep -1 for now")
    for name in ("depth", "max_seq_len", "device_batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError("--num_iterations must be positive (or -1 to derive it from --target_param_data_ratio)")


def sample_texts(model, tokenizer, spec, device, max_tokens=48):
    """A few greedy generations in each direction the model supports, shown in reading order."""
    lines = []
    stop = (tokenizer.get_bos_token_id(),)
    for direction in concrete_directions(spec.direction):
        prompts = SAMPLE_BEGINNINGS if direction == "forward" else SAMPLE_ENDINGS
        for text in prompts:
            given = tokenizer.encode(text)
            prompt = spec.generation_prompt(given, direction)
            generated = list(model.generate(prompt, max_tokens, temperature=0.0, stop_tokens=stop))
            full = spec.join_in_reading_order(given, spec.restore_generation(generated, direction), direction)
            lines.append(f"[{direction}] {tokenizer.decode(full)!r}")
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        train(args, ddp, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, ddp, rank, world_size, device):
    master = rank == 0
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    B, T = args.device_batch_size, args.max_seq_len
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    model_tag = args.model_tag or default_model_tag(args.depth, args.direction or "forward")
    dirs = artifact_dirs("base", model_tag)
    checkpoint_dir = dirs["checkpoints"]

    # Never overwrite an existing run silently: resume it explicitly or pick another tag.
    existing = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    resuming = args.resume_from_step >= 0
    if resuming and args.resume_from_step not in existing:
        raise UserError(f"--resume_from_step={args.resume_from_step}: {checkpoint_dir} has checkpoints at steps "
                        f"{existing or 'none'}")
    if existing and not resuming:
        raise UserError(f"{checkpoint_dir} already holds checkpoints (steps {existing}); resume with "
                        f"--resume_from_step={existing[-1]} or choose another --model_tag")

    if args.direction is None:  # a resumed run continues in its own direction
        args.direction = load_meta(checkpoint_dir, args.resume_from_step)["direction"] if resuming else "forward"
    spec = DirectionSpec.from_tokenizer(args.direction, tokenizer, seed=args.seed, p_backward=args.p_backward)

    torch.manual_seed(args.seed)
    if resuming:
        model, meta = build_model(checkpoint_dir, args.resume_from_step, device, phase="train")
        if meta["direction"] != args.direction:
            raise UserError(f"--direction={args.direction} contradicts the checkpoint being resumed "
                            f"(trained {meta['direction']})")
        config = model.config
    else:
        config = config_for_depth(args.depth, tokenizer.get_vocab_size(), T)
        model = GPT.build(config, device)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    num_iterations = args.num_iterations
    if num_iterations == -1:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / tokens_per_step))
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr,
                                        weight_decay=args.weight_decay)
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    print0(f"direction={args.direction} depth={config.n_layer} width={config.n_embd} heads={config.n_head} "
           f"params={num_params:,} flops/token={flops_per_token:.3e}")
    print0(f"B={B} T={T} world={world_size} grad_accum={grad_accum} tokens/step={tokens_per_step:,} "
           f"steps={num_iterations} tokens={tokens_per_step * num_iterations:,} ({tokens_per_step * num_iterations / num_params:.2f}/param)")
    print0(f"checkpoints: {checkpoint_dir}")

    if args.prefetch < 0:
        raise UserError(f"--prefetch must be >= 0 (0 = off), got {args.prefetch}")
    # With --prefetch the loader builds batches on the CPU and the prefetcher moves them (pinned,
    # non-blocking); its state_dict is that of the last batch consumed (nanochat/prefetch.py).
    loader = direction_aware_dataloader(B, T, "train", args.direction, tokenizer_threads=args.tokenizer_threads,
                                        device="cpu" if args.prefetch else device, seed=args.seed,
                                        p_backward=args.p_backward, tokenizer=tokenizer, rank=rank,
                                        world_size=world_size, grad_accum_steps=grad_accum)
    loader = prefetching(loader, args.prefetch, device)
    trainer = Trainer(train_model, optimizers, loader, grad_accum, num_iterations, tokens_per_step, device,
                      world_size=world_size, grad_clip=args.grad_clip, flops_per_token=flops_per_token,
                      init_lr_frac=args.init_lr_frac,
                      schedule=dict(warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio,
                                    final_lr_frac=args.final_lr_frac))
    start_step = 0
    if resuming:
        _, optim_state, _ = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=rank)
        trainer.load_optimizer_state(optim_state["optimizers"])
        loader.load_state_dict(optim_state["dataloader"])
        start_step = args.resume_from_step
        print0(f"resumed from step {start_step}")

    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else min(20 * tokens_per_step, 20 * 524288)
    eval_docs = select_documents(tokenizer, eval_tokens, "val", rank, world_size)
    eval_directions = concrete_directions(args.direction)
    autocast = autocast_context(device.type)

    def evaluate(step):
        model.eval()
        res = evaluate_bpb(model, tokenizer, token_bytes, eval_docs, eval_directions, args.direction, T, B, device, autocast)
        model.train()
        print0(f"step {step:05d} | " + " | ".join(f"val bpb {d}: {r['bpb']:.4f}" for d, r in res.items()))
        return {f"val_bpb_{d}": r["bpb"] for d, r in res.items()}

    user_config = {k: v for k, v in vars(args).items()}
    base_meta = {"phase": "base", "direction": args.direction, "model_tag": model_tag,
                 "model_config": config.to_dict(), "vocab_size": tokenizer.get_vocab_size(),
                 "bos_id": tokenizer.get_bos_token_id(),
                 "marker_ids": ({"forward": spec.forward_id, "backward": spec.backward_id}
                                if args.direction == "bidirectional" else None),
                 "direction_spec": spec.describe(), "user_config": user_config, "parent": None,
                 "num_iterations": num_iterations, "tokens_per_step": tokens_per_step, "world_size": world_size,
                 "grad_accum_steps": grad_accum, "num_params": num_params}
    def save(step, last):
        meta = dict(base_meta, step=step, saved_at=datetime.now(timezone.utc).isoformat(),
                    tokens_seen=step * tokens_per_step, **last)
        save_checkpoint(checkpoint_dir, step, model.state_dict(),
                        {"optimizers": trainer.optimizer_state(), "dataloader": loader.state_dict()}, meta, rank=rank)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    def sample(step):
        if master:
            model.eval()
            for line in sample_texts(model, tokenizer, spec, device):
                print0(line)
            model.train()

    research_on = args.research_log == 1 or (args.research_log == -1 and args.run != "dummy")
    logger = None
    if research_on and master:
        logger = ResearchLogger(dirs["run"], phase="base_training", flush_every=args.log_flush_every,
                                snapshot_every=args.snapshot_every,
                                resume=resuming, resume_from_step=start_step if resuming else None,
                                metadata={"direction": args.direction, "model_tag": model_tag, **user_config})
    wb = wandb_log.init(args.run, config=dict(user_config, num_params=num_params), master=master)
    try:
        last = run_loop(trainer, start_step, num_iterations, log_every=args.log_every, eval_every=args.eval_every,
                        evaluate=evaluate, save=save, save_every=args.save_every, sample=sample,
                        sample_every=args.sample_every, logger=logger,
                        snapshot=lambda step, grads: research_snapshot(model, trainer, spec, grads),
                        wandb_run=wb, print_fn=print0)
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))
    finally:
        if logger is not None:
            logger.close()
        wb.finish()


@torch.no_grad()
def research_snapshot(model, trainer, spec, layer_grads):
    """Per-token losses of the last batch (with each row's direction), per-layer gradient norms
    and residual-stream statistics: the large arrays recorded every --snapshot_every steps."""
    x, y = trainer.last_batch
    was_training = model.training
    model.eval()
    per_token = model(x, y, loss_reduction="none").float().cpu().numpy()
    stats = model.residual_stats(x)
    model.train(was_training)
    # Rows pack several documents; in a bidirectional run each has its own drawn direction.
    position_dirs = [spec.position_directions(row) for row in x.cpu().tolist()]
    return {
        "per_token_loss": per_token,
        "targets": y.cpu().numpy(),
        "row_direction": [dirs[0] for dirs in position_dirs],
        "position_is_backward": [[d == "backward" for d in dirs] for dirs in position_dirs],
        "layer_grad_norm": layer_grads or {},
        "activation_mean": {k: v[0] for k, v in stats.items()},
        "activation_rms": {k: v[1] for k, v in stats.items()},
        "activation_max": {k: v[2] for k, v in stats.items()},
    }


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
