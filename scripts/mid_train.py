"""Midtraining: continue a base model on conversations (packed rows), in the base model's direction.

    python -m scripts.mid_train --model_tag=test_backward --device_batch_size=2 --num_iterations=5
    python -m scripts.mid_train --model_tag=test_backward --resume_from_step=100 --num_iterations=200

The direction comes from the parent checkpoint; nanochat/chat_training.py says which tokens are
trained on in each direction, nanochat/phase_run.py what a run does around its loop (lock,
overwrite guard, resume, logs).
"""

import argparse
import sys

from nanochat.chat_training import check_chat_flags, train_chat_phase
from nanochat.common import compute_cleanup, compute_init, run_main
from nanochat.phases import PHASES
from scripts.phase_flags import add_conversation_flags, load_tasks

# Flags that define the model or the order of the data (a resumed run keeps the checkpoint's).
MODEL_DATA_DEFAULTS = {"train_on": "all", "tasks": "default", "max_seq_len": -1, "device_batch_size": 8,
                       "total_batch_size": -1, "seed": 42}


def build_parser():
    p = argparse.ArgumentParser(description="Midtrain a base model on conversations, in its own direction")
    add_conversation_flags(p, default_source=PHASES["mid"].parent, init_lr_frac=1.0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_chat_flags(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        train_chat_phase("mid", args, "pack", MODEL_DATA_DEFAULTS, load_tasks, rank, world_size, device)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
