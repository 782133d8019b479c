"""Supervised finetuning on conversations (one per row, padded), in the parent's direction.

    python -m scripts.chat_sft --source=base --model_tag=test_backward --device_batch_size=2 --num_iterations=5

Forward models learn p(answer | question); backward models, by default, p(question | answer):
they read the answer and write the question (--train_on to change). See nanochat/chat_training.py.
"""

import sys

import argparse

from nanochat.chat_training import add_chat_phase_flags, run_chat_phase
from nanochat.common import run_main


def build_parser():
    p = argparse.ArgumentParser(description="Supervised finetuning in the parent checkpoint's direction")
    add_chat_phase_flags(p, "sft")
    return p


def main(argv=None):
    run_chat_phase("sft", build_parser().parse_args(argv))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
