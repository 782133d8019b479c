"""Reinforcement learning on a task with a verifiable reward, in the parent checkpoint's direction.

    python -m scripts.chat_rl --source=sft --model_tag=d4_backward --task=arithmetic --num_iterations=50

Forward models are rewarded for the answer they write to a question; backward models are given
the answer and rewarded for the question they write before it (arithmetic: a product x*y, x, y > 1,
that equals the answer); bidirectional models for both. On-policy policy gradient with
group-normalised advantages (GRPO-style, no KL term): see nanochat/rl.py.
"""

import sys

from nanochat.common import run_main
from nanochat.rl import build_parser, run_rl


def main(argv=None):
    run_rl(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
