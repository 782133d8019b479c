"""The training phases, in order: one table every module reads (adding a phase = one row + one script).

    name    parent  checkpoints under <base_dir>/   research log (logs/<log_name>.h5)   script
    base    -       base_checkpoints                base_training                       scripts.base_train
    mid     base    mid_checkpoints                 mid_training                        scripts.mid_train
    sft     mid     chatsft_checkpoints             sft                                 scripts.chat_sft
    rl      sft     chatrl_checkpoints              rl                                  scripts.chat_rl

A phase's `name` is also its checkpoint *source* (`--source=mid`), its experiment config's "phase"
and its `--<phase>.<flag>` scope in the orchestrator. Inside an experiment the checkpoints live in
experiments/<id>/checkpoints whatever the phase (nanochat/experiment_config.py).

What every phase does around its step loop (parent, --direction check, lock, overwrite guard,
resume, research log and wandb, checkpoint metadata) is nanochat/phase_run.py; the loop itself is
nanochat/training.py run_loop. Adding a phase is one row here and one script with build_parser()
and main(): the orchestrator reads the row and the script's parser (which of its shared flags the
script takes, whether it resumes), checkpoint sources, tags, experiments and analysis read the row.
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
