"""Reinforcement learning on a task with a verifiable reward, in the parent checkpoint's direction.

    python -m scripts.chat_rl --source=sft --model_tag=d4_backward --task=arithmetic --num_iterations=50

Forward models are rewarded for the answer they write to a question; backward models are given
the answer and rewarded for the question they write before it (arithmetic: a product x*y, x, y > 1,
that equals the answer); bidirectional models for both. On-policy policy gradient with
group-normalised advantages (GRPO-style, no KL term): see nanochat/rl.py. --save_every and
--resume_from_step work as in the other phases (nanochat/phase_run.py).
"""

import argparse
import sys

from nanochat.common import add_flag, compute_cleanup, compute_init, run_main
from nanochat.phases import PHASES
from nanochat.rl import check_args, train_rl
from scripts.phase_flags import add_optimizer_flags, add_parent_flags, add_run_flags


def build_parser():
    p = argparse.ArgumentParser(description="RL (group-normalised policy gradient) in the parent checkpoint's direction")
    add_parent_flags(p, PHASES["rl"].parent)
    # Flags that define the rollouts default to None: nanochat/rl.py MODEL_DATA_DEFAULTS (fresh) or
    # the checkpoint's values (resuming).
    add_flag(p, "task", default=None, help="task with a reward: arithmetic (any direction, default), gsm8k (forward)")
    add_flag(p, "num_iterations", type=int, default=100, help="RL steps")
    add_flag(p, "examples_per_step", type=int, default=None, help="prompts per step, all ranks together (default 16)")
    add_flag(p, "num_samples", type=int, default=None, help="completions per prompt, the group (default 8)")
    add_flag(p, "max_new_tokens", type=int, default=None, help="default 128")
    add_flag(p, "temperature", type=float, default=None, help="default 1.0")
    add_flag(p, "top_k", type=int, default=None, help="-1 = sample from the whole vocabulary (default)")
    add_optimizer_flags(p, 0.05)  # small: the policy stays near its SFT parent (the rate decays to 0)
    add_flag(p, "eval_every", type=int, default=50, help="evaluate every N steps (-1 = only before and after)")
    add_flag(p, "eval_examples", type=int, default=100, help="test prompts per evaluation")
    add_flag(p, "eval_k", type=int, default=8, help="samples per test prompt (pass@k)")
    add_run_flags(p)
    return p


def usable_directions(task_name, model_direction):
    """The concrete directions in which the task can be generated and rewarded for this model;
    one UserError if none. Checked on the task's class when the registry holds one, so that a
    task that can never work here (gsm8k on a backward model) is refused before its data loads."""
    from tasks.common import check_task_direction
    from tasks.registry import TASKS, get_task
    task = TASKS.get(task_name)
    if not isinstance(task, type):  # unknown name (get_task says so) or a factory: build it
        task = get_task(task_name, "test")
    return list(check_task_direction(task, model_direction))


def load_task(name, split):
    from tasks.registry import get_task
    return get_task(name, split)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        train_rl(args, usable_directions, load_task, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
