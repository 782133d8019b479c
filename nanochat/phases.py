"""The training phases, in order: one table every module reads (adding a phase = one row + one script
with build_parser() and main(); what a phase does around its loop is nanochat/phase_run.py).

A phase's `name` is also its checkpoint *source* (`--source=mid`), its experiment config's "phase"
and its `--<phase>.<flag>` scope in the orchestrator; `checkpoint_dir` is under the base dir (inside
an experiment: experiments/<id>/checkpoints), the research log is logs/<log_name>.h5.
"""

from collections import namedtuple

Phase = namedtuple("Phase", "name parent checkpoint_dir log_name script")

PHASES = {p.name: p for p in (
    Phase("base", None, "base_checkpoints", "base_training", "scripts.base_train"),
    Phase("mid", "base", "mid_checkpoints", "mid_training", "scripts.mid_train"),
    Phase("sft", "mid", "chatsft_checkpoints", "sft", "scripts.chat_sft"),
    Phase("rl", "sft", "chatrl_checkpoints", "rl", "scripts.chat_rl"),
)}
PHASE_NAMES = tuple(PHASES)  # in chain order
CHAT_PHASES = PHASE_NAMES[1:]  # the phases trained on conversations (tasks/)
