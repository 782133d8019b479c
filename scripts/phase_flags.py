"""Flag groups shared by the phase scripts after base (scripts/mid_train.py, chat_sft.py, chat_rl.py).

Not an entry point: each script builds its own parser (build_parser) from these groups and its own
flags. The library (nanochat/) never parses flags; it receives the parsed namespace.

Flags that define the model or the order of the data default to None here: a fresh run takes the
phase's defaults (the script's MODEL_DATA_DEFAULTS), a resumed run the checkpoint's values, and an
explicit value that differs from the checkpoint's is refused (nanochat/phase_run.py resolve_flags).
"""

from nanochat.common import add_flag


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
