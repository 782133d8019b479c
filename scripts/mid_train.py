"""Midtraining: continue a base model on conversations (packed rows), in the base model's direction.

    python -m scripts.mid_train --model_tag=test_backward --device_batch_size=2 --num_iterations=5

The direction comes from the parent checkpoint; see nanochat/chat_training.py for the flags
and which tokens are trained on in each direction.
"""

import sys

import argparse

from nanochat.chat_training import add_chat_phase_flags, run_chat_phase
from nanochat.common import run_main


def build_parser():
    p = argparse.ArgumentParser(description="Midtrain a base model on conversations, in its own direction")
    add_chat_phase_flags(p, "mid")
    return p


def main(argv=None):
    run_chat_phase("mid", build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
