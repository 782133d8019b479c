"""Midtraining and SFT: the parent checkpoint decides the direction; the data is conversations.

Both phases share this flow (scripts/mid_train.py and scripts/chat_sft.py own their flags and
defaults): load the parent (or, resuming, this run's own checkpoint), take its direction (a
contradicting --direction is an error), build direction-aware conversation batches (packed for
mid, padded for SFT), train with the same Trainer/run_loop as base training, evaluate validation
loss on the trained tokens, and save checkpoints whose metadata records direction, phase and
parent. What every phase does around its loop (lock, overwrite guard, resume, logs, metadata)
is nanochat/phase_run.py.

Which tokens are trained on (--train_on, docs/DESIGN.md §4): auto = the assistant's answer forward,
the user's question backward (the model reads the answer and writes the question), each draw's
policy for bidirectional; or assistant / user / all explicitly. Midtraining defaults to all.
"""

import json
import math

import torch

from nanochat.chat_data import ConversationBatches
from nanochat.checkpoint_manager import load_meta, resolve_checkpoint
from nanochat.common import UserError, print0
from nanochat.direction import DirectionSpec, validate_direction, validate_train_on
from nanochat.paths import validate_name
from nanochat.phase_run import (PhaseRun, check_direction_flag, load_parent, parent_record, resolve_flags)
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Trainer, autocast_context, check_flags, grad_accum_steps_for, run_loop

# Optimizer and schedule flags: on resume they apply from the resume step (recorded in the metadata).
SCHEDULE_FLAGS = ("init_lr_frac", "embedding_lr", "unembedding_lr", "matrix_lr", "warmdown_ratio")


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
    if args.direction is not None:
        validate_direction(args.direction)
    for name in ("model_tag", "output_tag", "parent_experiment"):
        if getattr(args, name, None) is not None:
            validate_name(getattr(args, name), f"--{name}")
    check_flags(args, positive=("init_lr_frac", "log_every", "log_flush_every"),
                nonnegative=("embedding_lr", "unembedding_lr", "matrix_lr"), positive_or_off=("save_every",))
    if args.p_backward is not None and not 0 <= args.p_backward <= 1:
        raise UserError(f"--p_backward={args.p_backward} must be between 0 and 1")


def check_chat_flags(args):
    validate_train_on(args.train_on)
    check_phase_flags(args)
    check_flags(args, positive=("num_iterations", "device_batch_size", "eval_batches"),
                fraction=("warmdown_ratio",), positive_or_off=("eval_every", "max_seq_len"))
    if args.total_batch_size is not None and args.total_batch_size != -1 and args.total_batch_size <= 0:
        raise UserError(f"--total_batch_size={args.total_batch_size} must be positive (or -1 = B*T*world)")


def start_run(phase, args, rank, device):
    """The PhaseRun of a later phase and its output tag: --output_tag, else the parent's tag
    (resolved without loading the parent: a resumed run loads its own checkpoint instead).
    Returns (run, parent checkpoint directory, parent step)."""
    parent_dir, parent_step, parent_tag = resolve_checkpoint(args.source, args.model_tag, args.step)
    args.model_tag = parent_tag  # the parent is resolved once: the newest tag is not looked up twice
    run = PhaseRun(phase, args.output_tag or parent_tag, args, rank, device)
    if not run.resuming:  # a contradicting --direction is refused before any file is touched
        check_direction_flag(args.direction, DirectionSpec.from_meta(load_meta(parent_dir, parent_step)).direction,
                             f"the parent checkpoint ({parent_dir})")
    return run, parent_dir, parent_step


def model_for_run(run, args, parent_dir, device):
    """(model, tokenizer, trained direction, parent record, resume meta) of a later phase.

    Fresh: the parent checkpoint (--direction checked against it). Resuming: this run's own
    checkpoint, whose recorded parent must be the one the flags name."""
    resume_meta = run.resume_meta()
    if resume_meta is None:
        model, tokenizer, parent_meta, spec = load_parent(args, device)
        return model, tokenizer, spec, parent_record(args, parent_meta), None
    tokenizer = get_tokenizer()
    model, _ = run.load_resumed_model(tokenizer)
    spec = DirectionSpec.from_meta(resume_meta)
    where = f"the checkpoint being resumed ({run.checkpoint_dir} step {run.resume_step})"
    check_direction_flag(args.direction, spec.direction, where)
    parent = resume_meta.get("parent") or {}
    if parent.get("checkpoint_dir") not in (None, parent_dir) or (args.step is not None
                                                                   and args.step != parent.get("step")):
        raise UserError(f"--resume_from_step={run.resume_step}: {where} continues {parent.get('checkpoint_dir')} step "
                        f"{parent.get('step')}, not {parent_dir}" + (f" step {args.step}" if args.step is not None
                                                                     else "") +
                        "; name that parent (or drop --step), or train a new run under another --output_tag")
    return model, tokenizer, spec, parent, resume_meta


def train_chat_phase(phase, args, mode, defaults, load_tasks, rank, world_size, device):
    """Train one conversation phase; `defaults` are the phase's model/data flag defaults and
    `load_tasks(tasks_flag, phase, direction, split)` builds its conversations (tasks/)."""
    run, parent_dir, _ = start_run(phase, args, rank, device)
    with run:
        run.prepare()
        model, tokenizer, spec, parent, resume_meta = model_for_run(run, args, parent_dir, device)
        # A fresh run inherits the parent's bidirectional draw probability unless told otherwise.
        resolve_flags(args, dict(defaults, p_backward=spec.p_backward), resume_meta and resume_meta.get("user_config"),
                      run.resume_step, run.checkpoint_dir)
        run.refuse_overwrite()
        _train(phase, args, mode, load_tasks, run, model, tokenizer, spec.direction, parent, rank, world_size, device)


def _train(phase, args, mode, load_tasks, run, model, tokenizer, direction, parent, rank, world_size, device):
    train_on = validate_train_on(args.train_on)
    parent_len = model.config.sequence_len
    T = parent_len if args.max_seq_len == -1 else args.max_seq_len
    if not 0 < T <= parent_len:
        raise UserError(f"--max_seq_len={args.max_seq_len} exceeds the parent's context ({parent_len})")
    B = args.device_batch_size
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    train_task = load_tasks(args.tasks, phase, direction, "train")
    val_task = load_tasks(args.tasks, phase, direction, "test")
    common = dict(direction=direction, B=B, T=T, mode=mode, train_on=train_on, seed=args.seed,
                  p_backward=args.p_backward, rank=rank, world_size=world_size, device=device)
    batches = ConversationBatches(train_task, tokenizer, grad_accum_steps=grad_accum, **common)
    autocast = autocast_context(device.type)

    print0(f"{phase}: parent {parent['checkpoint_dir']} step {parent['step']} (trained {direction}); "
           f"train_on={train_on or 'auto'}; {len(train_task)} train / {len(val_task)} val conversations")
    print0(f"B={B} T={T} grad_accum={grad_accum} tokens/step={tokens_per_step:,} steps={args.num_iterations}; "
           f"saving to {run.checkpoint_dir}")

    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    trainer = Trainer(model, optimizers, batches, grad_accum, args.num_iterations, tokens_per_step, device,
                      world_size=world_size, init_lr_frac=args.init_lr_frac,
                      schedule=dict(warmdown_ratio=args.warmdown_ratio))
    start_step = run.restore(trainer, batches, args.num_iterations, SCHEDULE_FLAGS)

    def evaluate(step):
        val_batches = ConversationBatches(val_task, tokenizer, **common)  # same batches every time
        loss = validation_loss(model, val_batches, args.eval_batches, autocast)
        print0(f"step {step:05d} | val loss ({train_on or 'auto'} tokens) {loss:.4f}")
        return {"val_loss": loss}

    user_config = dict(vars(args))
    meta = run.meta(batches.spec, model, tokenizer, user_config, parent, train_on=train_on or "auto",
                    num_iterations=args.num_iterations, tokens_per_step=tokens_per_step, world_size=world_size)

    def save(step, last):
        run.save(step, model, trainer.optimizer_state(), batches.state_dict(), dict(meta, **last))

    run.clear()
    with run.logs(direction, user_config) as (logger, wb):
        last = run_loop(trainer, start_step, args.num_iterations, log_every=args.log_every,
                        eval_every=args.eval_every, evaluate=evaluate, save=save, save_every=args.save_every,
                        logger=logger, wandb_run=wb, print_fn=print0,
                        blowup_loss=10 * math.log(tokenizer.get_vocab_size()))
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))
