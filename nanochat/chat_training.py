"""Midtraining and SFT: what the two conversation phases share beyond the step loop.

The phases themselves are scripts (scripts/mid_train.py, scripts/chat_sft.py), each with its
defaults, schedule and evaluation: load the parent (or, resuming, this run's own checkpoint), take
its direction, build direction-aware conversation batches (nanochat/chat_data.py: packed for mid,
padded for SFT), train with the Trainer/run_loop of every phase, evaluate validation loss on the
trained tokens, save checkpoints that record direction, phase and parent (nanochat/phase_run.py).

Which tokens are trained on (--train_on, docs/DESIGN.md §4): auto = the assistant's answer forward,
the user's question backward (the model reads the answer and writes the question), each draw's
policy for bidirectional; or assistant / user / all explicitly. Midtraining defaults to all.
"""

import torch

from nanochat.common import UserError


@torch.no_grad()
def validation_loss(model, batches, n_batches, autocast):
    """Mean loss over the trained (unmasked) target tokens of n validation batches."""
    model.eval()
    total, count = 0.0, 0
    for _ in range(n_batches):
        x, y = next(batches)
        with autocast:
            loss = model(x, y, loss_reduction="none")
        valid = y >= 0
        total += float((loss * valid).sum())
        count += int(valid.sum())
    model.train()
    return total / max(1, count)


def row_length(max_seq_len, parent_len):
    """T of a conversation row: the parent's context (max_seq_len -1) or less, never more."""
    T = parent_len if max_seq_len == -1 else max_seq_len
    if not 0 < T <= parent_len:
        raise UserError(f"--max_seq_len={max_seq_len} exceeds the parent's context ({parent_len})")
    return T
