"""Flags shared by the phase scripts (groups, checks, the step from parsed flags to the values the
library takes) and the recipe the two conversation phases share (`train_conversations`).

Not an entry point: each script builds its own parser from these groups and its own flags; the
library (nanochat/) never sees the namespace. Flags that define the model or the order of the data
default to None here: the script's MODEL_DATA_DEFAULTS (fresh) or the checkpoint's values (resuming;
a different explicit value is refused, nanochat/phase_run.py resolve_flags).
"""

import json
import math
from contextlib import contextmanager

from nanochat.chat_data import ConversationBatches
from nanochat.chat_training import row_length, validation_loss
from nanochat.common import UserError, add_flag, print0
from nanochat.direction import validate_direction, validate_p_backward, validate_train_on
from nanochat.paths import validate_name
from nanochat.phase_run import model_for_run, open_later_run, resolve_flags
from nanochat.training import Every, LossMonitor, StepLog, Trainer, autocast_context, grad_accum_steps_for, run_loop


def add_parent_flags(p, default_source):
    """Which checkpoint a later phase continues, and where it saves."""
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
    add_flag(p, "p_backward", type=float, default=None,
             help="bidirectional draw (default: the parent's; resuming: the checkpoint's)")
    add_flag(p, "seed", type=int, default=None, help="data order and bidirectional draw (default 42)")


def add_run_flags(p):
    """Saving, resuming, progress, logging, device and experiment bookkeeping."""
    add_flag(p, "save_every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    add_flag(p, "resume_from_step", type=int, default=-1,
             help="continue this run (under --output_tag, default the parent's tag) from a saved step")
    add_flag(p, "overwrite", action="store_true",
             help="delete the checkpoints this run would otherwise refuse to overwrite")
    add_flag(p, "log_every", type=int, default=1)
    add_flag(p, "run", default="dummy", help="wandb run name ('dummy' = off)")
    add_flag(p, "research_log", type=int, default=-1, help="1 on, 0 off, -1 = on when --run is named")
    add_flag(p, "log_flush_every", type=int, default=100)
    add_flag(p, "device_type", default="")
    add_flag(p, "parent_experiment", default=None, help="recorded in the metadata (the orchestrator sets it)")


def add_conversation_flags(p, default_source, init_lr_frac):
    """The flags of a conversation phase (mid, SFT): data, batch, schedule, evaluation, run."""
    add_parent_flags(p, default_source)
    add_flag(p, "train_on", default=None, help="auto | assistant | user | all (default: the phase's)")
    add_flag(p, "tasks", default=None, help="'default' (offline synthetic mixture) or a comma list of task names")
    add_flag(p, "shuffle", type=int, default=None, choices=(0, 1),
             help="1: each epoch reads the conversations in a fresh order drawn from --seed (default); 0: task order")
    add_flag(p, "max_seq_len", type=int, default=None, help="-1 = the parent's context length (default)")
    add_flag(p, "device_batch_size", type=int, default=None, help="rows per micro-batch (default 8)")
    add_flag(p, "total_batch_size", type=int, default=None, help="tokens per step (-1 = B*T*world, the default)")
    add_flag(p, "num_iterations", type=int, default=200)
    add_optimizer_flags(p, init_lr_frac)
    add_flag(p, "warmdown_ratio", type=float, default=0.2)
    add_flag(p, "eval_every", type=int, default=50, help="validation loss every N steps (-1 = only at the end)")
    add_flag(p, "eval_batches", type=int, default=8, help="validation batches per evaluation")
    add_run_flags(p)
    return p


def load_tasks(spec, phase, direction, split):
    """The conversation mixture --tasks names ('default': the phase's offline mixture)."""
    from tasks.common import TaskMixture
    from tasks.registry import default_mixture, get_task
    if spec == "default":
        return default_mixture(phase, direction, split)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    return TaskMixture([get_task(n, split) for n in names])


# ---- checks: one clear error before anything runs -----------------------------------------------

def check_flags(args, positive=(), nonnegative=(), fraction=(), positive_or_off=()):
    """One clear error for a numeric flag out of range: every value must be finite; `positive` > 0,
    `nonnegative` >= 0, `fraction` in [0, 1], `positive_or_off` -1 (off) or >= 1."""
    rules = [(positive, lambda v: v > 0, "must be positive"), (nonnegative, lambda v: v >= 0, "must be >= 0"),
             (fraction, lambda v: 0 <= v <= 1, "must be between 0 and 1"),
             (positive_or_off, lambda v: v == -1 or v >= 1, "must be at least 1, or -1 for off")]
    for names, ok, rule in rules:
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            if not math.isfinite(value):
                raise UserError(f"--{name}={value}: must be a finite number")
            if not ok(value):
                raise UserError(f"--{name}={value} {rule}")


def check_phase_flags(args):
    """Flags shared by mid, SFT and RL: names that become paths, and numbers in range."""
    if args.direction is not None:
        validate_direction(args.direction)
    for name in ("model_tag", "output_tag", "parent_experiment"):
        if getattr(args, name, None) is not None:
            validate_name(getattr(args, name), f"--{name}")
    check_flags(args, positive=("init_lr_frac", "log_every", "log_flush_every"),
                nonnegative=("embedding_lr", "unembedding_lr", "matrix_lr"), positive_or_off=("save_every",))
    if args.p_backward is not None:
        validate_p_backward(args.p_backward)


def check_batch_flags(args):
    """--device_batch_size > 0; --total_batch_size > 0 or -1 (= B*T*world)."""
    check_flags(args, positive=("device_batch_size",))
    if args.total_batch_size is not None and args.total_batch_size != -1 and args.total_batch_size <= 0:
        raise UserError(f"--total_batch_size={args.total_batch_size} must be positive (or -1 = B*T*world)")


def check_conversation_flags(args):
    validate_train_on(args.train_on)
    check_phase_flags(args)
    check_batch_flags(args)
    check_flags(args, positive=("num_iterations", "eval_batches"), fraction=("warmdown_ratio",),
                positive_or_off=("eval_every", "max_seq_len"))


# ---- from flags to values -----------------------------------------------------------------------

def run_options(args):
    """The PhaseRun settings (nanochat/phase_run.py) that every phase's flags give."""
    return dict(resume_from_step=args.resume_from_step, overwrite=args.overwrite, research_log=args.research_log,
                wandb_run=args.run, log_flush_every=args.log_flush_every)


def flag_values(args, names):
    return {name: getattr(args, name) for name in names}


def resolve_model_data_flags(args, defaults, saved, run, same=None):
    """Set the flags that define the model or the data order: `defaults` where unset (fresh), the
    checkpoint's `saved` values (resuming; an explicit different value is refused)."""
    if saved is not None and "shuffle" in defaults:
        saved = {"shuffle": 0, **saved}  # runs saved before --shuffle existed read in stored order
    vars(args).update(resolve_flags(vars(args), defaults, saved, run.resume_step, run.checkpoint_dir, same))


@contextmanager
def later_phase_run(phase, args, defaults, rank, device, check_parent=None):
    """The locked run of a phase after base, with its model: yields (run, model, tokenizer, direction
    spec, parent record, resume meta). The parent checkpoint (--source/--model_tag/--step; resuming,
    this run's own checkpoint) gives the model and its direction; `check_parent(direction)` may
    refuse a fresh run's parent before any file is touched. Unset model/data flags take `defaults`
    (and the parent's p_backward), or the checkpoint's values when resuming."""
    # args.model_tag: the parent is resolved once, the newest tag not looked up twice
    run, parent_dir, parent_step, args.model_tag = open_later_run(
        phase, args.source, args.model_tag, args.step, args.output_tag, args.direction, rank, device,
        check_parent, **run_options(args))
    with run:
        run.prepare()
        model, tokenizer, spec, parent, resume_meta = model_for_run(run, device, args.source, args.model_tag, args.step,
                                                                    args.direction, parent_dir, args.parent_experiment)
        resolve_model_data_flags(args, dict(defaults, p_backward=spec.p_backward),
                                 resume_meta and resume_meta.get("user_config"), run)
        run.refuse_overwrite()
        yield run, model, tokenizer, spec, parent, resume_meta


# ---- the conversation phases' recipe (mid_train, chat_sft) -----------------------------------------

def train_conversations(phase, mode, args, run, model, tokenizer, spec, parent, rank, world_size, device,
                        lr_schedule, schedule_flags):
    """Train a conversation phase: rows "pack"ed (mid) or one conversation per row, "pad"ded (SFT), in
    the model's direction; the phase's `lr_schedule(step)` at --init_lr_frac x the base rates; the
    validation loss on the trained tokens every --eval_every steps and at the end; checkpoints."""
    # Data: rows of T tokens (the parent's context unless --max_seq_len); --train_on says which
    # tokens are targets.
    B, T = args.device_batch_size, row_length(args.max_seq_len, model.config.sequence_len)
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    train_task = load_tasks(args.tasks, phase, spec.direction, "train")
    val_task = load_tasks(args.tasks, phase, spec.direction, "test")
    rows = dict(direction=spec.direction, B=B, T=T, mode=mode, train_on=validate_train_on(args.train_on),
                seed=args.seed, p_backward=args.p_backward, rank=rank, world_size=world_size, device=device)
    batches = ConversationBatches(train_task, tokenizer, grad_accum_steps=grad_accum, shuffle=args.shuffle, **rows)
    print0(f"{phase}: parent {parent['checkpoint_dir']} step {parent['step']} (trained {spec.direction}); "
           f"train_on={args.train_on}; {len(train_task)} train / {len(val_task)} val conversations")
    print0(f"B={B} T={T} grad_accum={grad_accum} tokens/step={tokens_per_step:,} steps={args.num_iterations}; "
           f"saving to {run.checkpoint_dir}")

    # Optimizers as the parent's, at --init_lr_frac x the base rates, following the phase's schedule.
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    trainer = Trainer(model, optimizers, batches, grad_accum, tokens_per_step, device, world_size=world_size,
                      lr_schedule=lr_schedule, lr_scale=args.init_lr_frac)
    start_step = run.restore(trainer, batches, args.num_iterations, flag_values(args, schedule_flags))

    # Evaluation: the loss on the trained tokens of the same validation batches each time.
    autocast = autocast_context(device.type)

    def evaluate(step):
        loss = validation_loss(model, ConversationBatches(val_task, tokenizer, **rows), args.eval_batches, autocast)
        print0(f"step {step:05d} | val loss ({args.train_on} tokens) {loss:.4f}")
        return {"val_loss": loss}

    user_config = dict(vars(args))
    meta = run.meta(batches.spec, model, tokenizer, user_config, parent, train_on=args.train_on,
                    num_iterations=args.num_iterations, tokens_per_step=tokens_per_step, world_size=world_size)

    def save(step, last):
        run.save(step, model, trainer.optimizer_state(), batches.state_dict(), dict(meta, **last))

    run.clear()
    with run.logs(spec.direction, user_config) as (logger, wb):
        last = run_loop(trainer, start_step, args.num_iterations, StepLog(print0, args.log_every, logger=logger,
                                                                          wandb_run=wb),
                        LossMonitor(blowup_loss=10 * math.log(tokenizer.get_vocab_size())),
                        evaluate=Every(args.eval_every, evaluate), save=Every(args.save_every, save))
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))
