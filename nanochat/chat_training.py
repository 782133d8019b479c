"""Midtraining and SFT: the parent checkpoint decides the direction; the data is conversations.

Both phases share this flow (scripts/mid_train.py and scripts/chat_sft.py only pick defaults):
load the parent with load_model, take its direction from the checkpoint (a contradicting
--direction is an error), build direction-aware conversation batches (packed for mid, padded
for SFT), train with the same Trainer/run_loop as base training, evaluate validation loss on
the trained tokens, and save checkpoints whose metadata records direction, phase and parent.

Which tokens are trained on (--train_on, docs/DESIGN.md §4): auto = the assistant's answer forward,
the user's question backward (the model reads the answer and writes the question), each draw's
policy for bidirectional; or assistant / user / all explicitly. Midtraining defaults to all.
"""

import json
import math
import os
from datetime import datetime, timezone

import torch

from nanochat import wandb_log
from nanochat.phases import PHASES as PHASE_TABLE
from nanochat.chat_data import ConversationBatches
from nanochat.checkpoint_manager import (artifact_dirs, clean_checkpoint_dir, list_steps, load_model, save_checkpoint,
                                         tokenizer_fingerprint)
from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0
from nanochat.direction import validate_direction, validate_train_on
from nanochat.locking import acquire_run_lock
from nanochat.paths import check_writable, move_aside, remove_stale_temporaries, validate_name
from nanochat.research_logger import ResearchLogger, log_path
from nanochat.training import Trainer, autocast_context, check_flags, grad_accum_steps_for, run_loop

PHASES = {
    # phase: where it saves, its default parent source, batch layout, research log name, train_on
    "mid": dict(source="mid", parent_source=PHASE_TABLE["mid"].parent, mode="pack", log_phase=PHASE_TABLE["mid"].log_name,
                train_on="all"),
    "sft": dict(source="sft", parent_source=PHASE_TABLE["sft"].parent, mode="pad", log_phase=PHASE_TABLE["sft"].log_name,
                train_on="auto"),
}


def add_parent_flags(p, default_source):
    """Which checkpoint a later phase continues, and where it saves (shared with RL)."""
    add_flag(p, "source", default=default_source, help="parent checkpoint source: base | mid | sft | rl")
    add_flag(p, "model_tag", default=None, help="parent's tag or experiment id (default: newest)")
    add_flag(p, "step", type=int, default=None, help="parent's step (default: last)")
    add_flag(p, "output_tag", default=None, help="tag or experiment id to save to (default: the parent's tag)")
    add_flag(p, "direction", default=None, help="optional check: must match the parent's direction")


def add_optimizer_flags(p, init_lr_frac):
    add_flag(p, "init_lr_frac", type=float, default=init_lr_frac, help="scale of the base learning rates")
    add_flag(p, "embedding_lr", type=float, default=0.2)
    add_flag(p, "unembedding_lr", type=float, default=0.004)
    add_flag(p, "matrix_lr", type=float, default=0.02)
    add_flag(p, "p_backward", type=float, default=None, help="bidirectional draw (default: the parent's)")
    add_flag(p, "seed", type=int, default=42)


def add_run_flags(p):
    """Progress, logging, device and experiment bookkeeping (shared with RL)."""
    add_flag(p, "log_every", type=int, default=1)
    add_flag(p, "run", default="dummy", help="wandb run name ('dummy' = off)")
    add_flag(p, "research_log", type=int, default=-1, help="1 on, 0 off, -1 = on when --run is named")
    add_flag(p, "log_flush_every", type=int, default=100)
    add_flag(p, "device_type", default="")
    add_flag(p, "parent_experiment", default=None, help="recorded in the metadata (the orchestrator sets it)")


def add_chat_phase_flags(p, phase):
    """The flags of a conversation phase (mid or sft) on the script's parser (scripts/mid_train.py,
    scripts/chat_sft.py own their parsers; the library only defines the flag groups)."""
    d = PHASES[phase]
    add_parent_flags(p, d["parent_source"])
    add_flag(p, "train_on", default=d["train_on"], help="auto | assistant | user | all")
    add_flag(p, "tasks", default="default", help="'default' (offline synthetic mixture) or a comma list of task names")
    add_flag(p, "max_seq_len", type=int, default=-1, help="-1 = the parent's context length")
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "total_batch_size", type=int, default=-1, help="tokens per step (-1 = B*T*world)")
    add_flag(p, "num_iterations", type=int, default=200)
    add_optimizer_flags(p, 1.0 if phase == "mid" else 0.1)
    add_flag(p, "warmdown_ratio", type=float, default=0.2)
    add_flag(p, "eval_every", type=int, default=50, help="validation loss every N steps (-1 = only at the end)")
    add_flag(p, "eval_batches", type=int, default=8, help="validation batches per evaluation")
    add_run_flags(p)
    return p


def load_tasks(spec, phase, direction, split):
    from tasks.common import TaskMixture
    from tasks.registry import default_mixture, get_task
    if spec == "default":
        return default_mixture(phase, direction, split)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return TaskMixture([get_task(n, split) for n in names])


@torch.no_grad()
def validation_loss(model, batches, n_batches, autocast):
    """Mean loss over the trained (unmasked) target tokens of n validation batches."""
    model.eval()
    total, count = 0.0, 0
    for _ in range(n_batches):
        x, y = next(batches)
        with autocast:
            loss = model(x, y, loss_reduction="none")
        valid = y >= 0
        total += float((loss * valid).sum())
        count += int(valid.sum())
    model.train()
    return total / max(1, count)


def check_phase_flags(args):
    """Flags shared by mid, SFT and RL: names that become paths, and numbers in range."""
    for name in ("model_tag", "output_tag", "parent_experiment"):
        if getattr(args, name, None) is not None:
            validate_name(getattr(args, name), f"--{name}")
    check_flags(args, positive=("init_lr_frac", "log_every", "log_flush_every"),
                nonnegative=("embedding_lr", "unembedding_lr", "matrix_lr"))
    if args.p_backward is not None and not 0 <= args.p_backward <= 1:
        raise UserError(f"--p_backward={args.p_backward} must be between 0 and 1")


def prepare_output(dirs, phase, log_phase, research_on, master):
    """Before training a later phase: the output run is locked by this process, writable, free of
    a killed save's leftovers, holds no checkpoints (never overwritten), and a log left by an
    attempt killed before its first checkpoint is moved aside. Returns the RunLock (or None)."""
    checkpoint_dir = dirs["checkpoints"]
    if master:
        check_writable(checkpoint_dir, "the checkpoint directory")
    lock = acquire_run_lock(dirs["run"], f"{phase} output {dirs['run']}") if master else None
    try:
        if master:
            removed = clean_checkpoint_dir(checkpoint_dir) + remove_stale_temporaries(dirs["logs"])
            if removed:
                print0(f"removed what an interrupted save left behind: {', '.join(removed)}")
        if os.path.isdir(checkpoint_dir) and list_steps(checkpoint_dir):
            raise UserError(f"{checkpoint_dir} already holds {phase} checkpoints (steps {list_steps(checkpoint_dir)}); "
                            "choose another --output_tag")
        log = log_path(dirs["run"], log_phase)
        if master and research_on and os.path.exists(log):
            moved = move_aside(log)
            print0(f"a previous {phase} run left the research log {log} without a checkpoint; moved it aside to "
                   f"{moved} and starting a new log")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def run_chat_phase(phase, args):
    d = PHASES[phase]
    train_on = validate_train_on(args.train_on)
    if args.direction is not None:
        validate_direction(args.direction)
    check_phase_flags(args)
    check_flags(args, positive=("num_iterations", "device_batch_size", "eval_batches"),
                fraction=("warmdown_ratio",), positive_or_off=("eval_every", "max_seq_len"))
    if args.total_batch_size != -1 and args.total_batch_size <= 0:
        raise UserError(f"--total_batch_size={args.total_batch_size} must be positive (or -1 = B*T*world)")
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        _train(phase, d, args, train_on, rank, world_size, device)
    finally:
        compute_cleanup()


def _train(phase, d, args, train_on, rank, world_size, device):
    model, tokenizer, parent_meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.step)
    direction = parent_meta["direction"]
    if args.direction is not None and args.direction != direction:
        raise UserError(f"--direction={args.direction} contradicts the parent checkpoint, which was trained "
                        f"{direction} ({parent_meta['checkpoint_dir']}); drop --direction to inherit it")
    parent_len = model.config.sequence_len
    T = parent_len if args.max_seq_len == -1 else args.max_seq_len
    if not 0 < T <= parent_len:
        raise UserError(f"--max_seq_len={args.max_seq_len} exceeds the parent's context ({parent_len})")
    B = args.device_batch_size
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    p_backward = args.p_backward if args.p_backward is not None else (parent_meta.get("direction_spec") or {}).get("p_backward") or 0.5
    output_tag = args.output_tag or parent_meta["model_tag"]
    dirs = artifact_dirs(d["source"], output_tag)
    checkpoint_dir = dirs["checkpoints"]
    research_on = args.research_log == 1 or (args.research_log == -1 and args.run != "dummy")
    lock = prepare_output(dirs, phase, d["log_phase"], research_on, rank == 0)
    try:
        _train_locked(phase, d, args, train_on, rank, world_size, device, model, tokenizer, parent_meta, T, B,
                      grad_accum, tokens_per_step, p_backward, direction, output_tag, dirs, checkpoint_dir, research_on)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(phase, d, args, train_on, rank, world_size, device, model, tokenizer, parent_meta, T, B,
                  grad_accum, tokens_per_step, p_backward, direction, output_tag, dirs, checkpoint_dir, research_on):
    train_task = load_tasks(args.tasks, phase, direction, "train")
    val_task = load_tasks(args.tasks, phase, direction, "test")
    common = dict(direction=direction, B=B, T=T, mode=d["mode"], train_on=train_on, seed=args.seed,
                  p_backward=p_backward, rank=rank, world_size=world_size, device=device)
    batches = ConversationBatches(train_task, tokenizer, grad_accum_steps=grad_accum, **common)
    autocast = autocast_context(device.type)

    print0(f"{phase}: parent {parent_meta['checkpoint_dir']} step {parent_meta['step']} (trained {direction}); "
           f"train_on={train_on or 'auto'}; {len(train_task)} train / {len(val_task)} val conversations")
    print0(f"B={B} T={T} grad_accum={grad_accum} tokens/step={tokens_per_step:,} steps={args.num_iterations}; "
           f"saving to {checkpoint_dir}")

    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    trainer = Trainer(model, optimizers, batches, grad_accum, args.num_iterations, tokens_per_step, device,
                      world_size=world_size, init_lr_frac=args.init_lr_frac,
                      schedule=dict(warmdown_ratio=args.warmdown_ratio))

    def evaluate(step):
        val_batches = ConversationBatches(val_task, tokenizer, **common)  # same batches every time
        loss = validation_loss(model, val_batches, args.eval_batches, autocast)
        print0(f"step {step:05d} | val loss ({train_on or 'auto'} tokens) {loss:.4f}")
        return {"val_loss": loss}

    user_config = dict(vars(args))
    base_meta = {"phase": phase, "direction": direction, "model_tag": output_tag,
                 "model_config": model.config.to_dict(), "vocab_size": tokenizer.get_vocab_size(),
                 "bos_id": tokenizer.get_bos_token_id(), "marker_ids": parent_meta.get("marker_ids"),
                 "direction_spec": dict(batches.spec.describe()), "train_on": train_on or "auto",
                 "user_config": user_config, "num_iterations": args.num_iterations,
                 "tokens_per_step": tokens_per_step, "world_size": world_size,
                 "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                 "parent": {"source": args.source, "model_tag": parent_meta["model_tag"], "step": parent_meta["step"],
                            "checkpoint_dir": parent_meta["checkpoint_dir"], "experiment": args.parent_experiment}}

    def save(step, last):
        meta = dict(base_meta, step=step, saved_at=datetime.now(timezone.utc).isoformat(), **last)
        save_checkpoint(checkpoint_dir, step, model.state_dict(),
                        {"optimizers": trainer.optimizer_state(), "dataloader": batches.state_dict()}, meta, rank=rank)
        print0(f"saved {phase} checkpoint step {step} to {checkpoint_dir} (direction: {direction})")

    logger = None
    if research_on and rank == 0:
        logger = ResearchLogger(dirs["run"], phase=d["log_phase"], flush_every=args.log_flush_every,
                                metadata={"direction": direction, "model_tag": output_tag, **user_config})
    wb = wandb_log.init(args.run, config=user_config, master=rank == 0)
    try:
        last = run_loop(trainer, 0, args.num_iterations, log_every=args.log_every, eval_every=args.eval_every,
                        evaluate=evaluate, save=save, logger=logger, wandb_run=wb, print_fn=print0,
                        blowup_loss=10 * math.log(tokenizer.get_vocab_size()))
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))
    finally:
        if logger is not None:
            logger.close()
        wb.finish()
