"""Pretrain a base model in one direction: forward, backward or bidirectional.

    python -m scripts.base_train --direction=backward --depth=4 --max_seq_len=128 \
        --device_batch_size=2 --total_batch_size=512 --num_iterations=10 --model_tag=test_backward
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --direction=bidirectional --depth=20

Every flag has an underscore spelling and a kebab-case alias (--num_iterations / --num-iterations).
Checkpoints go to base_checkpoints/<model_tag> (default d<depth>, plus _<direction> when not
forward), or to experiments/<model_tag>/checkpoints when <model_tag> is an experiment id.
What a run guarantees (lock, no silent overwrite, exact resume, divergence stops): docs/SAFETY.md.
"""

import argparse
import contextlib
import json
import math
import sys

import torch

from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0, run_main
from nanochat.direction import DirectionSpec, by_direction, is_two_way, validate_direction, validate_p_backward
from nanochat.direction_dataloader import direction_aware_dataloader
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb, select_documents
from nanochat.muon import ADJUST_LR_FNS
from nanochat.phase_run import PhaseRun
from nanochat.prefetch import prefetching
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (Every, LossMonitor, StepLog, Trainer, autocast_context, grad_accum_steps_for,
                               run_loop)
from scripts.phase_flags import check_batch_flags, check_flags, flag_values, resolve_model_data_flags, run_options

# Text fragments used for samples: a beginning for forward generation, an ending for backward.
SAMPLE_BEGINNINGS = ["def ", "import ", "class Parser:\n    def "]
SAMPLE_ENDINGS = ["\n    return result\n", "raise ValueError(msg)\n"]


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain a forward, backward or bidirectional base model")
    add_flag(p, "direction", default=None,
             help="forward | backward | bidirectional (default: forward; when resuming, the checkpoint's)")
    add_flag(p, "p_backward", type=float, default=None,
             help="bidirectional: probability a document is drawn backward (default 0.5; resuming: the checkpoint's)")
    add_flag(p, "depth", type=int, default=None, help="number of layers; width and heads follow (default 20)")
    add_flag(p, "max_seq_len", type=int, default=None, help="context length T (default 2048)")
    add_flag(p, "device_batch_size", type=int, default=None, help="rows per micro-batch per device (B, default 32)")
    add_flag(p, "total_batch_size", type=int, default=None,
             help="tokens per optimizer step (default 524288; -1 = B*T*world)")
    add_flag(p, "num_iterations", type=int, default=-1, help="optimizer steps (-1 = from --target_param_data_ratio)")
    add_flag(p, "target_param_data_ratio", type=float, default=20.0, help="tokens per parameter when num_iterations=-1")
    add_flag(p, "embedding_lr", type=float, default=0.2)
    add_flag(p, "unembedding_lr", type=float, default=0.004)
    add_flag(p, "matrix_lr", type=float, default=0.02, help="Muon learning rate")
    add_flag(p, "matrix_lr_scaling", default=None, choices=ADJUST_LR_FNS,
             help="Muon's adjust_lr_fn: original | match_rms_adamw (see docs/LR_SWEEP.md)")
    add_flag(p, "shuffle", type=int, default=None, choices=(0, 1),
             help="1: each epoch reads the documents in a fresh order drawn from --seed (default); 0: storage order")
    add_flag(p, "context_tokens", type=int, default=None,
             help="preceding text a continuation row of a long document carries (-1 = T/8; docs/DIRECTIONS.md)")
    add_flag(p, "weight_decay", type=float, default=0.0)
    add_flag(p, "init_lr_frac", type=float, default=1.0, help="scale all learning rates")
    add_flag(p, "warmup_ratio", type=float, default=0.0)
    add_flag(p, "warmdown_ratio", type=float, default=0.2)
    add_flag(p, "final_lr_frac", type=float, default=0.0)
    add_flag(p, "grad_clip", type=float, default=0.0, help="max gradient norm (0 = off; the norm is logged anyway)")
    add_flag(p, "seed", type=int, default=None, help="model init and bidirectional draw (default 42)")
    add_flag(p, "eval_every", type=int, default=250, help="val bpb every N steps (-1 = only at the end)")
    add_flag(p, "eval_tokens", type=int, default=-1,
             help="validation tokens per bpb evaluation (-1 = 20 steps' worth, at most 10,485,760)")
    add_flag(p, "sample_every", type=int, default=2000, help="print samples every N steps (-1 = off)")
    add_flag(p, "save_every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    add_flag(p, "core_metric_every", type=int, default=-1,
             help="CORE benchmark (nanochat/core_eval.py) at evaluation steps that are multiples of N, and at the "
                  "end (-1 = off); the bundle is read from $NANOCHAT_BASE_DIR/eval_bundle, downloaded on first use")
    add_flag(p, "model_tag", default=None, help="checkpoint tag (default d<depth>[_<direction>]) or experiment id")
    add_flag(p, "run", default="dummy", help="wandb run name ('dummy' = no wandb, no research log)")
    add_flag(p, "research_log", type=int, default=-1, help="HDF5 research log: 1 on, 0 off, -1 = on when --run is named")
    add_flag(p, "log_every", type=int, default=1, help="print a progress line every N steps")
    add_flag(p, "log_flush_every", type=int, default=100, help="research log: steps buffered per HDF5 write")
    add_flag(p, "snapshot_every", type=int, default=100, help="record per-token losses, per-layer stats every N steps")
    add_flag(p, "device_type", default="", help="cuda | mps | cpu (empty = autodetect)")
    add_flag(p, "compile", type=int, default=-1, help="torch.compile the model (-1 = on for cuda)")
    add_flag(p, "resume_from_step", type=int, default=-1,
             help="continue from this saved step (flags that define the model and the data order default to "
                  "the checkpoint's and must not differ; learning-rate and schedule flags apply from this step)")
    add_flag(p, "overwrite", action="store_true",
             help="delete the checkpoints (and their evaluations) this run would otherwise refuse to overwrite: "
                  "steps after --resume_from_step, or every step of the tag when not resuming")
    add_flag(p, "tokenizer_threads", type=int, default=4)
    add_flag(p, "prefetch", type=int, default=2, help="batches prepared ahead on a background thread (0 = off)")
    return p


# Flags that define the model or the order of the data: a fresh run takes these defaults, a resumed
# run the checkpoint's values (an explicit different value is refused).
MODEL_DATA_DEFAULTS = {"depth": 20, "max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
                       "seed": 42, "p_backward": 0.5, "context_tokens": -1, "matrix_lr_scaling": "original",
                       "shuffle": 1}
# Optimizer and schedule flags: on resume they apply from the resume step (recorded in the metadata).
SCHEDULE_FLAGS = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "init_lr_frac", "warmup_ratio",
                  "warmdown_ratio", "final_lr_frac", "grad_clip")


def validate_args(args):
    if args.direction is not None:
        validate_direction(args.direction)
    if args.p_backward is not None:
        validate_p_backward(args.p_backward)
    if args.core_metric_every > 0 and args.eval_every > 0 and args.core_metric_every % args.eval_every:
        raise UserError(f"--core_metric_every={args.core_metric_every} must be a multiple of --eval_every="
                        f"{args.eval_every}: CORE runs at evaluation steps")
    check_batch_flags(args)
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError("--num_iterations must be positive (or -1 to derive it from --target_param_data_ratio)")
    check_flags(args, nonnegative=("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip",
                                   "prefetch"),
                positive=("depth", "max_seq_len", "init_lr_frac", "target_param_data_ratio", "log_every",
                          "tokenizer_threads", "log_flush_every"),
                fraction=("warmup_ratio", "warmdown_ratio", "final_lr_frac"),
                positive_or_off=("eval_every", "sample_every", "save_every", "snapshot_every", "core_metric_every"))
    if args.eval_tokens != -1 and not args.eval_tokens >= 1:  # -1 is "automatic", not "off"
        raise UserError(f"--eval_tokens={args.eval_tokens}: give at least 1 validation token, or -1 for the "
                        "default (20 steps' worth, at most 10,485,760)")
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError(f"--warmup_ratio={args.warmup_ratio} plus --warmdown_ratio={args.warmdown_ratio} exceed 1: "
                        "the warmup and the warmdown would overlap")


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Base training's schedule (step counts from 0), a trapezoid: linear warmup over the first
    warmup_ratio of the steps, the full rate, then a linear warmdown over the last warmdown_ratio
    of the steps to final_lr_frac, the multiplier of the last step."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step < num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - 1 - step) / max(1, warmdown)
    return progress + (1 - progress) * final_lr_frac


def resolve_base_flags(args, meta, run, world_size=1):
    """Fill the model/data flags left unset; on resume check the ones given against the checkpoint."""
    defaults = dict(MODEL_DATA_DEFAULTS, direction="forward")
    if meta is None:
        return resolve_model_data_flags(args, defaults, None, run)
    saved = dict(meta.get("user_config") or {})
    config = meta.get("model_config") or {}
    spec = DirectionSpec.from_meta(meta)
    saved.update({"depth": config.get("n_layer", saved.get("depth")),
                  "max_seq_len": config.get("sequence_len", saved.get("max_seq_len")),
                  "direction": spec.direction,
                  "p_backward": spec.p_backward if is_two_way(spec.direction) else saved.get("p_backward")})

    def same(name, given, old, values):  # -1 and its explicit value B*T*world are the same batch
        if name != "total_batch_size":
            return False
        tokens = values["device_batch_size"] * values["max_seq_len"] * world_size if given == -1 else given
        return tokens == meta.get("tokens_per_step")
    resolve_model_data_flags(args, defaults, saved, run, same)


def main(argv=None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    try:
        depth, direction = args.depth or MODEL_DATA_DEFAULTS["depth"], args.direction or "forward"
        model_tag = args.model_tag or (f"d{depth}" if direction == "forward" else f"d{depth}_{direction}")
        with PhaseRun("base", model_tag, rank, device, **run_options(args)) as run:
            train(args, run, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, run, rank, world_size, device):
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    run.prepare()
    resolve_base_flags(args, run.resume_meta(), run, world_size)
    run.refuse_overwrite()
    B, T = args.device_batch_size, args.max_seq_len
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    spec = DirectionSpec.from_tokenizer(args.direction, tokenizer, seed=args.seed, p_backward=args.p_backward)

    torch.manual_seed(args.seed)
    if run.resuming:
        model, _ = run.load_resumed_model(tokenizer)
    else:
        model = GPT.build(config_for_depth(args.depth, tokenizer.get_vocab_size(), T), device)
    config = model.config
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    num_iterations = args.num_iterations
    if num_iterations == -1:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / tokens_per_step))
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr,
                                        weight_decay=args.weight_decay, matrix_lr_scaling=args.matrix_lr_scaling)
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    print0(f"direction={args.direction} depth={config.n_layer} width={config.n_embd} heads={config.n_head} "
           f"params={num_params:,} flops/token={flops_per_token:.3e}")
    print0(f"B={B} T={T} world={world_size} grad_accum={grad_accum} tokens/step={tokens_per_step:,} "
           f"steps={num_iterations} tokens={tokens_per_step * num_iterations:,} ({tokens_per_step * num_iterations / num_params:.2f}/param)")
    print0(f"checkpoints: {run.checkpoint_dir}")

    # With --prefetch the loader builds batches on the CPU and the prefetcher moves them (pinned,
    # non-blocking); its state_dict is that of the last batch consumed (nanochat/prefetch.py).
    loader = direction_aware_dataloader(B, T, "train", args.direction, tokenizer_threads=args.tokenizer_threads,
                                        device="cpu" if args.prefetch else device, seed=args.seed,
                                        p_backward=args.p_backward, tokenizer=tokenizer, rank=rank,
                                        world_size=world_size, grad_accum_steps=grad_accum,
                                        context_tokens=None if args.context_tokens == -1 else args.context_tokens,
                                        shuffle=args.shuffle)
    loader = prefetching(loader, args.prefetch, device)
    trainer = Trainer(train_model, optimizers, loader, grad_accum, tokens_per_step, device, world_size=world_size,
                      lr_schedule=lambda step: lr_multiplier(step, num_iterations, args.warmup_ratio,
                                                             args.warmdown_ratio, args.final_lr_frac),
                      lr_scale=args.init_lr_frac, grad_clip=args.grad_clip, flops_per_token=flops_per_token)
    start_step = run.restore(trainer, loader, num_iterations, flag_values(args, SCHEDULE_FLAGS))

    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else min(20 * tokens_per_step, 20 * 524288)
    eval_docs = select_documents(tokenizer, eval_tokens, "val", rank, world_size)
    eval_directions = spec.generation_directions()
    autocast = autocast_context(device.type)
    from nanochat.core_eval import CORE_TRAINING_MAX_PER_TASK, CoreBenchmark
    core = (CoreBenchmark.prepare(max_per_task=CORE_TRAINING_MAX_PER_TASK, needed_by="--core_metric_every")
            if args.core_metric_every > 0 else None)

    def evaluate(step):
        model.eval()
        res = evaluate_bpb(model, tokenizer, token_bytes, eval_docs, eval_directions, args.direction, T, B, device, autocast)
        print0(f"step {step:05d} | " + " | ".join(f"val bpb {d}: {r['bpb']:.4f}" for d, r in res.items()))
        metrics = {f"val_bpb_{d}": r["bpb"] for d, r in res.items()}
        if core is not None and (step % args.core_metric_every == 0 or step == num_iterations):
            metrics.update(core.evaluate_during_training(model, tokenizer, args.direction, device, T, B, autocast, step,
                                                         run.dirs["evaluations"], rank, world_size,
                                                         {"model_tag": run.tag}))
        model.train()
        return metrics

    user_config = dict(vars(args))
    meta = run.meta(spec, model, tokenizer, user_config, parent=None, num_iterations=num_iterations,
                    tokens_per_step=tokens_per_step, world_size=world_size, grad_accum_steps=grad_accum,
                    num_params=num_params)

    def save(step, last):
        run.save(step, model, trainer.optimizer_state(), loader.state_dict(),
                 dict(meta, tokens_seen=step * tokens_per_step, **last))

    engine = Engine(model, tokenizer, spec=spec)

    def sample(step):  # a few greedy generations in each direction, shown in reading order
        if rank == 0:
            model.eval()
            for direction in eval_directions:
                for text in by_direction(direction, forward=SAMPLE_BEGINNINGS, backward=SAMPLE_ENDINGS):
                    out = engine.complete(text, direction, max_tokens=48, temperature=0.0)[0]
                    print0(f"[{direction}] {out['text']!r}")
            model.train()

    run.clear()
    # The prefetch worker is stopped before the process ends: a daemon thread still inside torch
    # at interpreter exit aborts the process ("terminate called without an active exception").
    with run.logs(args.direction, user_config, wandb_config=dict(user_config, num_params=num_params),
                  snapshot_every=args.snapshot_every) as (logger, wb), contextlib.closing(loader):
        log = StepLog(print0, args.log_every, logger=logger, wandb_run=wb,
                      snapshot=lambda step, grads: research_snapshot(model, trainer, spec, grads))
        last = run_loop(trainer, start_step, num_iterations, log,
                        LossMonitor(blowup_loss=10 * math.log(tokenizer.get_vocab_size())),
                        evaluate=Every(args.eval_every, evaluate), save=Every(args.save_every, save),
                        sample=Every(args.sample_every, sample))
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))


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
