"""Midtraining: continue a base model on conversations (packed rows), in the base model's direction.

    python -m scripts.mid_train --model_tag=test_backward --device_batch_size=2 --num_iterations=5
    python -m scripts.mid_train --model_tag=test_backward --resume_from_step=100 --num_iterations=200

The direction comes from the parent checkpoint; --train_on (default: all tokens) is docs/DESIGN.md §4.
"""

import argparse
import sys

from nanochat.common import compute_cleanup, compute_init, run_main
from nanochat.phases import PHASES
from scripts.phase_flags import add_conversation_flags, check_conversation_flags, later_phase_run, train_conversations

# Flags that define the model or the order of the data (a resumed run keeps the checkpoint's).
MODEL_DATA_DEFAULTS = {"train_on": "all", "tasks": "default", "max_seq_len": -1, "device_batch_size": 8,
                       "total_batch_size": -1, "seed": 42, "shuffle": 1}
# Optimizer and schedule flags: on resume they apply from the resume step (recorded in the metadata).
SCHEDULE_FLAGS = ("init_lr_frac", "embedding_lr", "unembedding_lr", "matrix_lr", "warmdown_ratio")


def build_parser():
    p = argparse.ArgumentParser(description="Midtrain a base model on conversations, in its own direction")
    add_conversation_flags(p, default_source=PHASES["mid"].parent, init_lr_frac=1.0)
    return p


def lr_multiplier(step, num_iterations, warmdown_ratio):
    """Midtraining's schedule (step counts from 0): the full rate, then a linear decay over the
    last warmdown_ratio of the steps, to zero at the last one."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < num_iterations - warmdown:
        return 1.0
    return (num_iterations - 1 - step) / max(1, warmdown)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_conversation_flags(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        with later_phase_run("mid", args, MODEL_DATA_DEFAULTS, rank, device) as (run, model, tokenizer, spec,
                                                                                parent, _):
            train_conversations("mid", "pack", args, run, model, tokenizer, spec, parent, rank, world_size, device,
                                lambda step: lr_multiplier(step, args.num_iterations, args.warmdown_ratio),
                                SCHEDULE_FLAGS)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
