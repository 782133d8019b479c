"""Supervised finetuning on conversations (one per row, padded), in the parent's direction.

    python -m scripts.chat_sft --source=base --model_tag=test_backward --device_batch_size=2 --num_iterations=5

Forward models learn p(answer | question); backward models, by default, p(question | answer):
they read the answer and write the question (--train_on to change). See nanochat/chat_training.py;
--resume_from_step continues a run as in the other phases (nanochat/phase_run.py).
"""

import argparse
import sys

from nanochat.chat_training import check_chat_flags, train_chat_phase
from nanochat.common import compute_cleanup, compute_init, run_main
from nanochat.phases import PHASES
from scripts.phase_flags import add_conversation_flags, load_tasks

# Flags that define the model or the order of the data (a resumed run keeps the checkpoint's).
MODEL_DATA_DEFAULTS = {"train_on": "auto", "tasks": "default", "max_seq_len": -1, "device_batch_size": 8,
                       "total_batch_size": -1, "seed": 42}


def build_parser():
    p = argparse.ArgumentParser(description="Supervised finetuning in the parent checkpoint's direction")
    add_conversation_flags(p, default_source=PHASES["sft"].parent, init_lr_frac=0.1)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_chat_flags(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        train_chat_phase("sft", args, "pad", MODEL_DATA_DEFAULTS, load_tasks, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
