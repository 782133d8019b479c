"""Pretrain a base model in one direction: forward, backward or bidirectional.

    python -m scripts.base_train --direction=backward --depth=4 --max_seq_len=128 \
        --device_batch_size=2 --total_batch_size=512 --num_iterations=10 --model_tag=test_backward
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --direction=bidirectional --depth=20

Every flag has an underscore spelling and a kebab-case alias (--num_iterations / --num-iterations).
Checkpoints go to base_checkpoints/<model_tag> (default d<depth>, plus _<direction> when not
forward), or to experiments/<model_tag>/checkpoints when <model_tag> is an experiment id.

Nothing is lost silently:
- one process per run (an OS lock on the run directory, nanochat.locking); the directory must
  be writable before training starts; what a killed save left (temporary files, a step without
  meta) is removed;
- existing checkpoints are never overwritten: a fresh run on a used tag, or a resume from a step
  with later checkpoints, is refused unless --overwrite says to delete them (their evaluations go
  with them, and the deletion is printed);
- resuming (--resume_from_step) continues the same model on the same data: --depth, --max_seq_len,
  --device_batch_size, --total_batch_size, --seed, --p_backward and --direction default to the
  checkpoint's values and a different explicit value is refused; learning-rate and schedule flags
  (and --num_iterations) apply from the resume step and the metadata records the change
  (schedule_history); the tokenizer must be the one the checkpoint was trained with (fingerprint);
- a non-finite loss, validation bpb or weight, or a loss above 10 x ln(vocab size), stops the run
  (exit 2) naming the last good checkpoint; SIGTERM/SIGINT stop it after the current step with
  the research log flushed (exit 128 + signal).
"""

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone

import torch

from nanochat.phases import PHASES
from nanochat.checkpoint_manager import (artifact_dirs, build_model, check_tokenizer_matches, clean_checkpoint_dir,
                                         load_checkpoint, load_meta, list_steps, remove_evaluations, remove_steps,
                                         save_checkpoint, tokenizer_fingerprint)
from nanochat.common import (UserError, add_flag, compute_cleanup, compute_init, print0, run_main)
from nanochat.locking import acquire_run_lock
from nanochat.paths import check_writable, move_aside, remove_stale_temporaries
from nanochat.direction import DirectionSpec, concrete_directions, validate_direction, validate_p_backward
from nanochat.direction_dataloader import direction_aware_dataloader
from nanochat.gpt import GPT, MATRIX_LR_SCALINGS, config_for_depth
from nanochat.loss_eval import evaluate_bpb, select_documents
from nanochat.prefetch import prefetching
from nanochat.research_logger import ResearchLogger
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.research_logger import log_path
from nanochat.training import Trainer, autocast_context, check_flags, grad_accum_steps_for, run_loop
from nanochat import wandb_log

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
    add_flag(p, "matrix_lr_scaling", default=None, choices=MATRIX_LR_SCALINGS,
             help="Muon's adjust_lr_fn: original | match_rms_adamw (see docs/LR_SWEEP.md)")
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


# Flags that define the model or the order of the data. A fresh run takes these defaults; a resumed
# run takes the checkpoint's values, and an explicit different value is refused (it would train a
# different model or read different data while the metadata claimed continuity).
MODEL_DATA_DEFAULTS = {"depth": 20, "max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288,
                       "seed": 42, "p_backward": 0.5, "context_tokens": -1, "matrix_lr_scaling": "original"}
# Flags of the optimizer and the schedule: on resume they apply from the resume step (the optimizer's
# saved moments are kept, its hyperparameters are this run's), and the metadata records the change.
SCHEDULE_FLAGS = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "init_lr_frac", "warmup_ratio",
                  "warmdown_ratio", "final_lr_frac", "grad_clip")
LOG_PHASE = PHASES["base"].log_name  # nanochat/phases.py


def default_model_tag(depth, direction):
    return f"d{depth}" if direction == "forward" else f"d{depth}_{direction}"


def validate_args(args):
    if args.direction is not None:
        validate_direction(args.direction)
    if args.p_backward is not None:
        validate_p_backward(args.p_backward)
    if args.core_metric_every == 0 or args.core_metric_every < -1:
        raise UserError(f"--core_metric_every={args.core_metric_every}: use a positive step count or -1 (off)")
    if args.core_metric_every > 0 and args.eval_every > 0 and args.core_metric_every % args.eval_every:
        raise UserError(f"--core_metric_every={args.core_metric_every} must be a multiple of --eval_every="
                        f"{args.eval_every}: CORE runs at evaluation steps")
    for name in ("depth", "max_seq_len", "device_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.total_batch_size is not None and args.total_batch_size != -1 and args.total_batch_size <= 0:
        raise UserError(f"--total_batch_size must be positive (or -1 = B*T*world), got {args.total_batch_size}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError("--num_iterations must be positive (or -1 to derive it from --target_param_data_ratio)")
    check_flags(args, nonnegative=("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"),
                positive=("init_lr_frac", "target_param_data_ratio", "log_every", "tokenizer_threads",
                          "log_flush_every"),
                fraction=("warmup_ratio", "warmdown_ratio", "final_lr_frac"),
                positive_or_off=("eval_every", "eval_tokens", "sample_every", "save_every", "snapshot_every"))
    if args.warmup_ratio + args.warmdown_ratio > 1:
        raise UserError(f"--warmup_ratio={args.warmup_ratio} plus --warmdown_ratio={args.warmdown_ratio} exceed 1: "
                        "the warmup and the warmdown would overlap")


def resolve_model_data_flags(args, meta, checkpoint_dir, world_size=1):
    """Fill the model/data flags left unset; on resume check the ones given against the checkpoint."""
    if meta is None:
        for name, default in MODEL_DATA_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        if args.direction is None:
            args.direction = "forward"
        return
    saved = dict(meta.get("user_config") or {})
    config = meta.get("model_config") or {}
    saved.update({"depth": config.get("n_layer", saved.get("depth")),
                  "max_seq_len": config.get("sequence_len", saved.get("max_seq_len")),
                  "direction": meta.get("direction"),
                  "p_backward": (meta.get("direction_spec") or {}).get("p_backward", saved.get("p_backward"))})
    differ = []
    for name in ("direction",) + tuple(MODEL_DATA_DEFAULTS):
        given, old = getattr(args, name), saved.get(name)
        if old is None:  # an older checkpoint without the record: the given value (or default) stands
            setattr(args, name, given if given is not None else MODEL_DATA_DEFAULTS.get(name))
        elif given is None:
            setattr(args, name, old)
        elif name == "total_batch_size" and _tokens_per_step(args, given, world_size) == meta.get("tokens_per_step"):
            pass  # -1 and its explicit value B*T*world are the same batch
        elif given != old:
            differ.append(f"--{name}={given} (checkpoint: {old})")
    if differ:
        raise UserError(f"--resume_from_step={args.resume_from_step}: {', '.join(differ)} would change the model or "
                        f"the order of the data of the run in {checkpoint_dir}; drop these flags to continue with the "
                        "checkpoint's values, or train a new run under another --model_tag")


def _tokens_per_step(args, total_batch_size, world_size):
    if total_batch_size == -1:
        return args.device_batch_size * args.max_seq_len * world_size
    return total_batch_size


def schedule_changes(args, num_iterations, meta):
    """{flag: [checkpoint's value, this run's value]} for the schedule flags that differ on resume."""
    saved = meta.get("user_config") or {}
    changed = {name: [saved.get(name), getattr(args, name)] for name in SCHEDULE_FLAGS
               if name in saved and saved[name] != getattr(args, name)}
    if meta.get("num_iterations") is not None and meta["num_iterations"] != num_iterations:
        changed["num_iterations"] = [meta["num_iterations"], num_iterations]
    return changed


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
    model_tag = args.model_tag or default_model_tag(args.depth or MODEL_DATA_DEFAULTS["depth"],
                                                    args.direction or "forward")
    dirs = artifact_dirs("base", model_tag)  # refuses a tag that is not a plain name
    if master:  # before hours of training, not at the first save
        check_writable(dirs["checkpoints"], "the checkpoint directory")
    # One writer per run: a second base_train on this tag fails here, at once, naming the holder.
    lock = acquire_run_lock(dirs["run"], f"run {model_tag!r}") if master else None
    try:
        _train_locked(args, rank, world_size, device, master, model_tag, dirs)
    finally:
        if lock is not None:
            lock.release()


def prepare_run_dir(args, dirs, master):
    """Check the run directory before any training: leftovers of a killed save removed, and
    the resume step saved. Returns (resuming, existing steps, the steps this run would overwrite):
    refuse_overwrite refuses them without --overwrite, clear_for_run deletes them with it, once
    every other check passed."""
    checkpoint_dir = dirs["checkpoints"]
    if master:
        removed = clean_checkpoint_dir(checkpoint_dir)
        removed += remove_stale_temporaries(dirs["evaluations"]) + remove_stale_temporaries(dirs["logs"])
        if removed:
            print0(f"removed what an interrupted save left behind: {', '.join(removed)}")
    existing = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    resuming = args.resume_from_step >= 0
    if resuming and args.resume_from_step not in existing:
        raise UserError(f"--resume_from_step={args.resume_from_step}: {checkpoint_dir} has checkpoints at steps "
                        f"{existing or 'none'}")
    later = [s for s in existing if s > args.resume_from_step] if resuming else existing
    return resuming, existing, later


def refuse_overwrite(args, checkpoint_dir, resuming, existing, later):
    """Checkpoints this run would overwrite are refused unless --overwrite names them."""
    if later and not args.overwrite:
        if resuming:
            raise UserError(f"{checkpoint_dir} has checkpoints after step {args.resume_from_step} (steps {later}) that "
                            f"this run would overwrite; resume from --resume_from_step={later[-1]}, or pass "
                            f"--overwrite to delete steps {later} and their evaluations")
        raise UserError(f"{checkpoint_dir} already holds checkpoints (steps {existing}); resume with "
                        f"--resume_from_step={existing[-1]}, choose another --model_tag, or pass --overwrite to "
                        "delete them and start again")


def clear_for_run(dirs, resuming, later, master):
    """Just before training: delete what --overwrite named, and move aside a log that has no
    checkpoint to continue from (a run killed before its first save, or one being overwritten)."""
    if not master:
        return
    checkpoint_dir = dirs["checkpoints"]
    if later:
        remove_steps(checkpoint_dir, later)
        gone = remove_evaluations(dirs["evaluations"], later)
        print0(f"--overwrite: deleted checkpoint steps {later} of {checkpoint_dir}"
               + (f" and their evaluations {gone}" if gone else ""))
    log = log_path(dirs["run"], LOG_PHASE)
    if not resuming and os.path.exists(log):
        moved = move_aside(log)
        print0(f"a previous run left the research log {log} without a checkpoint to resume from; moved it aside "
               f"to {moved} and starting a new log")


def _train_locked(args, rank, world_size, device, master, model_tag, dirs):
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    checkpoint_dir = dirs["checkpoints"]
    resuming, existing, later = prepare_run_dir(args, dirs, master)
    resume_meta = load_meta(checkpoint_dir, args.resume_from_step) if resuming else None
    if resume_meta is not None:
        check_tokenizer_matches(resume_meta, tokenizer)
    resolve_model_data_flags(args, resume_meta, checkpoint_dir, world_size)
    refuse_overwrite(args, checkpoint_dir, resuming, existing, later)
    B, T = args.device_batch_size, args.max_seq_len
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    spec = DirectionSpec.from_tokenizer(args.direction, tokenizer, seed=args.seed, p_backward=args.p_backward)

    torch.manual_seed(args.seed)
    if resuming:
        model, meta = build_model(checkpoint_dir, args.resume_from_step, device, phase="train")
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
                                        weight_decay=args.weight_decay, matrix_lr_scaling=args.matrix_lr_scaling)
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
                                        world_size=world_size, grad_accum_steps=grad_accum,
                                        context_tokens=None if args.context_tokens == -1 else args.context_tokens)
    loader = prefetching(loader, args.prefetch, device)
    trainer = Trainer(train_model, optimizers, loader, grad_accum, num_iterations, tokens_per_step, device,
                      world_size=world_size, grad_clip=args.grad_clip, flops_per_token=flops_per_token,
                      init_lr_frac=args.init_lr_frac,
                      schedule=dict(warmup_ratio=args.warmup_ratio, warmdown_ratio=args.warmdown_ratio,
                                    final_lr_frac=args.final_lr_frac))
    start_step = 0
    history = []
    if resuming:
        _, optim_state, _ = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=rank)
        loader_direction = (optim_state.get("dataloader") or {}).get("direction")
        if loader_direction is not None and loader_direction != resume_meta["direction"]:
            raise UserError(f"checkpoint step {args.resume_from_step} in {checkpoint_dir} is inconsistent: its meta says "
                            f"direction {resume_meta['direction']} but its saved dataloader state is {loader_direction}; "
                            "its files were mixed up or edited: resume from another step")
        # The saved moments continue; this run's learning rates and schedule apply from here on.
        trainer.load_optimizer_state(optim_state["optimizers"])
        loader.load_state_dict(optim_state["dataloader"])
        start_step = args.resume_from_step
        changed = schedule_changes(args, num_iterations, resume_meta)
        history = list(resume_meta.get("schedule_history") or [])
        if changed:
            history.append({"from_step": start_step, "changed": changed})
            print0(f"resuming with changed schedule flags, applied from step {start_step}: "
                   + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        print0(f"resumed from step {start_step}")

    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else min(20 * tokens_per_step, 20 * 524288)
    eval_docs = select_documents(tokenizer, eval_tokens, "val", rank, world_size)
    eval_directions = concrete_directions(args.direction)
    autocast = autocast_context(device.type)
    from nanochat.core_eval import CORE_TRAINING_MAX_PER_TASK, CoreBenchmark
    core = (CoreBenchmark.prepare(max_per_task=CORE_TRAINING_MAX_PER_TASK, needed_by="--core_metric_every")
            if args.core_metric_every > 0 else None)

    def evaluate(step):
        model.eval()
        res = evaluate_bpb(model, tokenizer, token_bytes, eval_docs, eval_directions, args.direction, T, B, device, autocast)
        model.train()
        print0(f"step {step:05d} | " + " | ".join(f"val bpb {d}: {r['bpb']:.4f}" for d, r in res.items()))
        metrics = {f"val_bpb_{d}": r["bpb"] for d, r in res.items()}
        if core is not None and (step % args.core_metric_every == 0 or step == num_iterations):
            model.eval()
            metrics.update(core.evaluate_during_training(model, tokenizer, args.direction, device, T, B, autocast, step,
                                                         dirs["evaluations"], rank, world_size, {"model_tag": model_tag}))
            model.train()
        return metrics

    user_config = {k: v for k, v in vars(args).items()}
    base_meta = {"phase": "base", "direction": args.direction, "model_tag": model_tag,
                 "model_config": config.to_dict(), "vocab_size": tokenizer.get_vocab_size(),
                 "bos_id": tokenizer.get_bos_token_id(),
                 "marker_ids": ({"forward": spec.forward_id, "backward": spec.backward_id}
                                if args.direction == "bidirectional" else None),
                 "direction_spec": spec.describe(), "user_config": user_config, "parent": None,
                 "num_iterations": num_iterations, "tokens_per_step": tokens_per_step, "world_size": world_size,
                 "grad_accum_steps": grad_accum, "num_params": num_params,
                 "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                 # Schedule flags changed on resume, with the step they applied from: together with
                 # user_config (this run's values) the record of what was actually used.
                 "schedule_history": history}
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
    clear_for_run(dirs, resuming, later, master)
    logger = None
    if research_on and master:
        logger = ResearchLogger(dirs["run"], phase=LOG_PHASE, flush_every=args.log_flush_every,
                                snapshot_every=args.snapshot_every,
                                resume=resuming, resume_from_step=start_step if resuming else None,
                                metadata={"direction": args.direction, "model_tag": model_tag, **user_config})
        if logger.resume_gap is not None:
            print0(f"warning: the research log {logger.path} ends at step {logger.resume_gap[0]} but training "
                   f"resumes from step {logger.resume_gap[1]}: the steps in between are missing from it")
    wb = wandb_log.init(args.run, config=dict(user_config, num_params=num_params), master=master)
    try:
        last = run_loop(trainer, start_step, num_iterations, log_every=args.log_every, eval_every=args.eval_every,
                        evaluate=evaluate, save=save, save_every=args.save_every, sample=sample,
                        sample_every=args.sample_every, logger=logger,
                        snapshot=lambda step, grads: research_snapshot(model, trainer, spec, grads),
                        wandb_run=wb, print_fn=print0, blowup_loss=10 * math.log(tokenizer.get_vocab_size()))
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
