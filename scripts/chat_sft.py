"""Supervised finetuning on conversations (one per row, padded), in the parent's direction.

    python -m scripts.chat_sft --source=base --model_tag=test_backward --device_batch_size=2 --num_iterations=5

Forward models learn p(answer | question); backward models, by default, p(question | answer):
they read the answer and write the question (--train_on to change; docs/DESIGN.md §4).
"""

import argparse
import sys

from nanochat.common import compute_cleanup, compute_init, run_main
from nanochat.phases import PHASES
from scripts.phase_flags import add_conversation_flags, check_conversation_flags, later_phase_run, train_conversations

# Flags that define the model or the order of the data (a resumed run keeps the checkpoint's).
MODEL_DATA_DEFAULTS = {"train_on": "auto", "tasks": "default", "max_seq_len": -1, "device_batch_size": 8,
                       "total_batch_size": -1, "seed": 42, "shuffle": 1}
# Optimizer and schedule flags: on resume they apply from the resume step (recorded in the metadata).
SCHEDULE_FLAGS = ("init_lr_frac", "embedding_lr", "unembedding_lr", "matrix_lr", "warmdown_ratio")


def build_parser():
    p = argparse.ArgumentParser(description="Supervised finetuning in the parent checkpoint's direction")
    add_conversation_flags(p, default_source=PHASES["sft"].parent, init_lr_frac=0.1)
    return p


def lr_multiplier(step, num_iterations, warmdown_ratio):
    """SFT's schedule (step counts from 0): the full rate (--init_lr_frac x the base rates), then
    a linear decay over the last warmdown_ratio of the steps, to zero at the last one."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < num_iterations - warmdown:
        return 1.0
    return (num_iterations - 1 - step) / max(1, warmdown)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_conversation_flags(args)
    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        with later_phase_run("sft", args, MODEL_DATA_DEFAULTS, rank, device) as (run, model, tokenizer, spec,
                                                                                parent, _):
            train_conversations("sft", "pad", args, run, model, tokenizer, spec, parent, rank, world_size, device,
                                lambda step: lr_multiplier(step, args.num_iterations, args.warmdown_ratio),
                                SCHEDULE_FLAGS)
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
