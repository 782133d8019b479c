"""Bits per byte on whole validation documents, in any concrete direction (docs/DESIGN.md §3).

Special tokens are excluded from both sums. A document longer than the context is scored in
overlapping windows that restate its header (BOS, marker) and score only their new tokens, so every
text token is a target exactly once in every direction and forward and backward bpb share their byte
denominators (training rows do the same with less context: docs/DIRECTIONS.md, "Long documents").
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.dataset import DocumentSource
from nanochat.direction import DirectionSpec, validate_direction, CONCRETE_DIRECTIONS


def select_documents(tokenizer, max_tokens, split="val", rank=0, world_size=1, data_dir=None, threads=4):
    """This rank's share (index % world_size) of the first documents of the split, as token lists,
    `max_tokens` text tokens in all (the last one cut to fit, in reading order): the same set for
    every direction and number of processes."""
    from nanochat.direction_dataloader import encode_documents
    source = DocumentSource(split, data_dir)
    docs, total = [], 0
    texts = (text for _, text in source.iter_from())
    while total < max_tokens:
        batch = [t for _, t in zip(range(64), texts)]
        if not batch:
            break
        for tokens in encode_documents(tokenizer, batch, threads):
            if tokens and total < max_tokens:
                tokens = tokens[:max_tokens - total]
                docs.append(tokens)
                total += len(tokens)
    return docs[rank::world_size]


def document_windows(row, T, header_len):
    """(inputs, targets, is_first, offset) windows of one oriented document, each at most T long, that
    score every target exactly once; target j of a window is row[offset + j + 1]. After the first
    window, windows advance by T/2 and restate the document's header (BOS + the marker: without it a
    bidirectional model would not know which way it reads) before T - header_len context tokens; only
    their new targets are scored (the rest are -1)."""
    last = len(row) - 1  # index of the last target token
    first = row[:T + 1]
    yield first[:-1], first[1:], True, 0
    covered = len(first) - 1  # targets row[1..covered] are scored
    if T <= header_len:
        raise ValueError(f"a context of {T} tokens cannot hold the {header_len}-token document header and text")
    stride = max(1, min(T // 2, T - header_len))
    header = row[:header_len]
    while covered < last:
        end = min(covered + stride, last)          # score targets row[covered+1 .. end]
        start = end - (T - header_len)             # context row[start .. end-1] after the header
        inputs = header + row[start:end]
        targets = [-1] * header_len + row[start + 1:end + 1]
        n_old = (covered + 1) - (start + 1)        # targets row[start+1 .. covered] were scored before
        targets = targets[:header_len] + [-1] * n_old + targets[header_len + n_old:]
        yield inputs, targets, False, start - header_len
        covered = end


def padded_batch(pairs, pad_id, width=None):
    """(x, y) long tensors of (inputs, targets) pairs padded to `width` (default: the longest) with
    pad_id and -1 (an ignored target)."""
    width = width or max(len(inputs) for inputs, _ in pairs)
    x = torch.tensor([list(inputs) + [pad_id] * (width - len(inputs)) for inputs, _ in pairs], dtype=torch.long)
    y = torch.tensor([list(targets) + [-1] * (width - len(targets)) for _, targets in pairs], dtype=torch.long)
    return x, y


def token_losses(model, x, y, autocast_ctx=None):
    """Per-position cross-entropy (0 where the target is -1), under `autocast_ctx` when given."""
    with autocast_ctx if autocast_ctx is not None else nullcontext():
        return model(x, y, loss_reduction="none")


def _rows(docs, spec, concrete_direction, T):
    """Pack scored windows into (inputs, targets) rows of at most T: a document's first window may
    follow other documents (it starts with BOS, as in training); a continuation starts its own row
    so that its context is its own document."""
    cur_in, cur_tgt = [], []
    for tokens in docs:
        row, _ = spec.orient(tokens, concrete_direction=concrete_direction)
        for inp, tgt, is_first, _ in document_windows(row, T, spec.header_len):
            if cur_in and (not is_first or len(cur_in) + len(inp) > T):
                yield cur_in, cur_tgt
                cur_in, cur_tgt = [], []
            cur_in += inp
            cur_tgt += tgt
    if cur_in:
        yield cur_in, cur_tgt


@torch.no_grad()
def evaluate_bpb(model, tokenizer, token_bytes, docs, directions, trained_direction, T, batch_size, device,
                 autocast_ctx=None):
    """{direction: {"bpb", "nats", "bytes", "tokens", "documents"}} on the same `docs` for each concrete
    direction (a one-way model read the other way gets no marker); sums all-reduced over ranks."""
    spec = DirectionSpec.from_tokenizer(trained_direction, tokenizer)
    token_bytes = token_bytes.to(device)
    results = {}
    for direction in directions:
        validate_direction(direction, CONCRETE_DIRECTIONS)
        nats, nbytes, ntok = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        rows = list(_rows(docs, spec, direction, T))
        from nanochat.progress import progress  # quiet for quick evaluations (min_time_s)
        for i in progress(range(0, len(rows), batch_size), desc=f"bpb {direction}", unit="batch"):
            x, y = padded_batch(rows[i:i + batch_size], spec.bos_id, T)
            x, y = x.to(device), y.to(device)
            loss = token_losses(model, x, y, autocast_ctx)
            nb = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
            text = nb > 0
            nats += (loss.double() * text).sum()
            nbytes += nb.double().sum()
            ntok += text.sum()
        ndocs = torch.tensor(float(len(docs)), dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized():
            for t in (nats, nbytes, ntok, ndocs):
                dist.all_reduce(t)
        results[direction] = {
            "bpb": (nats / (math.log(2) * nbytes)).item() if nbytes > 0 else float("nan"),
            "nats": nats.item(), "bytes": int(nbytes.item()), "tokens": int(ntok.item()), "documents": int(ndocs.item()),
        }
    return results


POSITION_BUCKETS = (0, 4, 16, 64)  # bucket edges; the last two buckets are [64, T) and [T, end)


@torch.no_grad()
def evaluate_bpb_by_position(model, tokenizer, token_bytes, docs, direction, trained_direction, T, batch_size,
                             device, edges=POSITION_BUCKETS, autocast_ctx=None):
    """Bits per byte by a text token's position in its document *in the reading direction* (0 = first
    read): [{"from", "to", "nats", "bytes", "bpb"}] for [edges[0], edges[1]), ..., [edges[-1], T),
    [T, end); the buckets add up to evaluate_bpb's totals. Shows whether a gap between directions comes
    from a document's first tokens (its boundary) or the bulk of the text."""
    validate_direction(direction, CONCRETE_DIRECTIONS)
    spec = DirectionSpec.from_tokenizer(trained_direction, tokenizer)
    bounds = sorted({e for e in edges if e < T} | {T})
    nats = [0.0] * len(bounds)
    nbytes = [0.0] * len(bounds)
    pending = []  # (inputs, targets, body position of each target or -1)

    def flush():
        x, y = padded_batch([p[:2] for p in pending], spec.bos_id, T)
        loss = token_losses(model, x.to(device), y.to(device), autocast_ctx)
        loss = loss.view(len(pending), T).double().cpu().tolist()
        for (_, targets, positions), row_loss in zip(pending, loss):
            for t, pos, l in zip(targets, positions, row_loss):
                b = int(token_bytes[t]) if t >= 0 else 0
                if b > 0:
                    k = next(i for i in range(len(bounds) - 1, -1, -1) if pos >= bounds[i])
                    nats[k] += l
                    nbytes[k] += b
        pending.clear()

    for tokens in docs:
        row, _ = spec.orient(tokens, concrete_direction=direction)
        for inputs, targets, _, offset in document_windows(row, T, spec.header_len):
            positions = [offset + j + 1 - spec.header_len for j in range(len(targets))]
            pending.append((inputs, targets, positions))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    out = []
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else None
        out.append({"from": lo, "to": hi, "nats": nats[i], "bytes": int(nbytes[i]),
                    "bpb": nats[i] / (math.log(2) * nbytes[i]) if nbytes[i] else float("nan")})
    return out


def arrow_of_time_gap(results):
    """(bpb_bwd - bpb_fwd) / bpb_fwd when both are present, else None."""
    if "forward" in results and "backward" in results:
        f, b = results["forward"]["bpb"], results["backward"]["bpb"]
        return (b - f) / f
    return None

