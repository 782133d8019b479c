"""Supervised finetuning on conversations (one per row, padded), in the parent's direction.

    python -m scripts.chat_sft --source=base --model_tag=test_backward --device_batch_size=2 --num_iterations=5

Forward models learn p(answer | question); backward models, by default, p(question | answer):
they read the answer and write the question (--train_on to change; nanochat/chat_training.py).
--resume_from_step continues a run as in the other phases (nanochat/phase_run.py).
"""

import argparse
import json
import math
import sys

from nanochat.chat_data import ConversationBatches
from nanochat.chat_training import row_length, validation_loss
from nanochat.common import compute_cleanup, compute_init, print0, run_main
from nanochat.direction import validate_train_on
from nanochat.phases import PHASES
from nanochat.training import Every, LossMonitor, StepLog, Trainer, autocast_context, grad_accum_steps_for, run_loop
from scripts.phase_flags import (add_conversation_flags, check_conversation_flags, flag_values, later_phase_run,
                                 load_tasks)

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
            train(args, run, model, tokenizer, spec, parent, rank, world_size, device)
    finally:
        compute_cleanup()


def train(args, run, model, tokenizer, spec, parent, rank, world_size, device):
    # Data: one conversation per row, padded to T (the parent's context unless --max_seq_len), in
    # the model's direction; --train_on says which tokens are targets.
    B, T = args.device_batch_size, row_length(args.max_seq_len, model.config.sequence_len)
    grad_accum = grad_accum_steps_for(args.total_batch_size, B, T, world_size)
    tokens_per_step = B * T * world_size * grad_accum
    train_task = load_tasks(args.tasks, "sft", spec.direction, "train")
    val_task = load_tasks(args.tasks, "sft", spec.direction, "test")
    rows = dict(direction=spec.direction, B=B, T=T, mode="pad", train_on=validate_train_on(args.train_on),
                seed=args.seed, p_backward=args.p_backward, rank=rank, world_size=world_size, device=device)
    batches = ConversationBatches(train_task, tokenizer, grad_accum_steps=grad_accum, shuffle=args.shuffle, **rows)
    print0(f"sft: parent {parent['checkpoint_dir']} step {parent['step']} (trained {spec.direction}); "
           f"train_on={args.train_on}; {len(train_task)} train / {len(val_task)} val conversations")
    print0(f"B={B} T={T} grad_accum={grad_accum} tokens/step={tokens_per_step:,} steps={args.num_iterations}; "
           f"saving to {run.checkpoint_dir}")

    # Optimizers as the parent's, at --init_lr_frac x the base rates, following lr_multiplier above.
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    trainer = Trainer(model, optimizers, batches, grad_accum, tokens_per_step, device, world_size=world_size,
                      lr_schedule=lambda step: lr_multiplier(step, args.num_iterations, args.warmdown_ratio),
                      lr_scale=args.init_lr_frac)
    start_step = run.restore(trainer, batches, args.num_iterations, flag_values(args, SCHEDULE_FLAGS))

    # Evaluation, every --eval_every steps and at the end: loss on the trained tokens of the same
    # validation batches each time.
    autocast = autocast_context(device.type)

    def evaluate(step):
        loss = validation_loss(model, ConversationBatches(val_task, tokenizer, **rows), args.eval_batches, autocast)
        print0(f"step {step:05d} | val loss ({args.train_on} tokens) {loss:.4f}")
        return {"val_loss": loss}

    user_config = dict(vars(args))
    meta = run.meta(batches.spec, model, tokenizer, user_config, parent, train_on=args.train_on,
                    num_iterations=args.num_iterations, tokens_per_step=tokens_per_step, world_size=world_size)

    def save(step, last):
        run.save(step, model, trainer.optimizer_state(), batches.state_dict(), dict(meta, **last))

    run.clear()
    with run.logs(spec.direction, user_config) as (logger, wb):
        last = run_loop(trainer, start_step, args.num_iterations, StepLog(print0, args.log_every, logger=logger,
                                                                          wandb_run=wb),
                        LossMonitor(blowup_loss=10 * math.log(tokenizer.get_vocab_size())),
                        evaluate=Every(args.eval_every, evaluate), save=Every(args.save_every, save))
        print0("final: " + json.dumps({k: round(v, 4) for k, v in last.items()}))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
