"""Supervised finetuning on conversations (one per row, padded), in the parent's direction.

    python -m scripts.chat_sft --source=base --model_tag=test_backward --device_batch_size=2 --num_iterations=5

Forward models learn p(answer | question); backward models, by default, p(question | answer):
they read the answer and write the question (--train_on to change). See nanochat/chat_training.py.
"""

import sys

from nanochat.chat_training import build_parser, run_chat_phase
from nanochat.common import run_main


def main(argv=None):
    args = build_parser("sft", "Supervised finetuning in the parent checkpoint's direction").parse_args(argv)
    run_chat_phase("sft", args)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
