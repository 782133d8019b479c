"""Tasks by name, the default offline mixtures, and the direction check for generation/RL.

    get_task("gsm8k", "test")                         -> a Task
    default_mixture("sft", "backward", "train")       -> a TaskMixture of synthetic tasks
    check_task_direction(task, "backward")            -> ["backward"], or a UserError

Keyword arguments go to the task's constructor (size/seed for synthetic tasks, data_files for
downloaded ones, and start/stop/step for slicing).
"""

from nanochat.phases import CHAT_PHASES
from nanochat.common import UserError
from nanochat.direction import validate_direction
from tasks.arc import ARC
from tasks.arithmetic import TwoWayArithmetic
from tasks.arithmetic_unseen import UnseenProductArithmetic
from tasks.common import TaskMixture, check_task_direction  # noqa: F401  (re-exported)
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.reversal import ReversalFacts
from tasks.smoltalk import SmolTalk

TASKS = {
    "arithmetic": TwoWayArithmetic,
    "arithmetic_unseen": UnseenProductArithmetic,
    "reversal": ReversalFacts,
    "gsm8k": GSM8K,
    "arc_easy": lambda split="train", **kwargs: ARC("ARC-Easy", split, **kwargs),
    "arc_challenge": lambda split="train", **kwargs: ARC("ARC-Challenge", split, **kwargs),
    "mmlu": MMLU,
    "smoltalk": SmolTalk,
}

PHASES = CHAT_PHASES  # nanochat/phases.py

# Offline mixtures: synthetic tasks only, small enough for a tiny CPU model to learn in minutes.
# Sizes per phase and split: arithmetic problems, and reversal facts (each fact gives 3 train
# examples and 2 test probes). Reversal facts depend only on the seed, so every phase and split
# uses the same facts, and the test probes ask about exactly what training taught.
MIXTURE_SIZES = {
    "mid": {"train": {"arithmetic": 4000, "reversal": 100}, "test": {"arithmetic": 200, "reversal": 100}},
    "sft": {"train": {"arithmetic": 1000, "reversal": 100}, "test": {"arithmetic": 200, "reversal": 100}},
    "rl": {"train": {"arithmetic": 1000, "reversal": 100}, "test": {"arithmetic": 200, "reversal": 100}},
}


def get_task(name, split="train", **kwargs):
    """The task registered as `name`, for `split`."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name](split=split, **kwargs)


def default_mixture(phase, direction, split="train", seed=0):
    """The offline data of `phase` (mid, sft, rl) for a model of `direction`: arithmetic and
    reversal facts shuffled together, deterministic in `seed`. The conversations are the same in
    every direction (orientation happens later); for rl every task must be rewardable in `direction`."""
    if phase not in MIXTURE_SIZES:  # a phase added to nanochat/phases.py chooses its data itself
        raise UserError(f"phase {phase!r} has no default task mixture (tasks/registry.py MIXTURE_SIZES has "
                        f"{', '.join(MIXTURE_SIZES)}): pass --tasks=<comma list of task names>")
    validate_direction(direction)
    if split not in ("train", "test"):
        raise UserError(f"the default mixtures have splits train and test, not {split!r}")
    sizes = MIXTURE_SIZES[phase][split]
    tasks = [get_task(name, split, size=size, seed=seed) for name, size in sizes.items()]
    if phase == "rl":
        for task in tasks:
            check_task_direction(task, direction)
    return TaskMixture(tasks, seed=seed)
