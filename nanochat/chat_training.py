"""Midtraining and SFT (scripts/mid_train.py, scripts/chat_sft.py): what the two conversation phases
share beyond the step loop. Which tokens are trained on (--train_on): docs/DESIGN.md §4.
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
