"""Reinforcement learning on a task with a verifiable reward, in the parent checkpoint's direction.

    python -m scripts.chat_rl --source=sft --model_tag=d4_backward --task=arithmetic --num_iterations=50

Forward models are rewarded for the answer they write to a question; backward models are given
the answer and rewarded for the question they write before it (arithmetic: a product x*y, x, y > 1,
that equals the answer); bidirectional models for both. On-policy policy gradient with
group-normalised advantages (GRPO-style, no KL term): see nanochat/rl.py.
"""

import argparse
import sys

from nanochat.chat_training import add_optimizer_flags, add_parent_flags, add_run_flags
from nanochat.common import add_flag, run_main
from nanochat.rl import run_rl


def build_parser():
    p = argparse.ArgumentParser(description="RL (group-normalised policy gradient) in the parent checkpoint's direction")
    add_parent_flags(p, "sft")
    add_flag(p, "task", default="arithmetic", help="task with a reward: arithmetic (any direction), gsm8k (forward)")
    add_flag(p, "num_iterations", type=int, default=100, help="RL steps")
    add_flag(p, "examples_per_step", type=int, default=16, help="prompts per step (all ranks together)")
    add_flag(p, "num_samples", type=int, default=8, help="completions per prompt (the group)")
    add_flag(p, "max_new_tokens", type=int, default=128)
    add_flag(p, "temperature", type=float, default=1.0)
    add_flag(p, "top_k", type=int, default=-1, help="-1 = sample from the whole vocabulary")
    add_optimizer_flags(p, 0.05)  # small: the policy stays near its SFT parent (the rate decays to 0)
    add_flag(p, "eval_every", type=int, default=50, help="evaluate every N steps (-1 = only before and after)")
    add_flag(p, "eval_examples", type=int, default=100, help="test prompts per evaluation")
    add_flag(p, "eval_k", type=int, default=8, help="samples per test prompt (pass@k)")
    add_run_flags(p)
    return p


def main(argv=None):
    run_rl(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
