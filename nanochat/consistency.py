"""Factorisation consistency: do the forward and backward readings of a document agree on its probability?

For the true distribution log p_fwd(x) = log p_bwd(x). For a bidirectional model (two readings) or a
forward/backward pair: per-document bpb of the same document read each way (nanochat/loss_eval.py's
windows, one document per row), then their agreement (docs/EVALUATION.md, "Factorisation consistency").
"""

import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from nanochat.direction import CONCRETE_DIRECTIONS, DirectionSpec, validate_direction
from nanochat.evaluations import list_family, write_record
from nanochat.loss_eval import document_windows, padded_batch, token_losses
from nanochat.paths import atomic_write


@torch.no_grad()
def per_document_bpb(model, tokenizer, token_bytes, docs, trained_direction, concrete_direction, T, batch_size,
                     device, autocast_ctx=None):
    """(nats, bytes) per document of `docs` (this rank's share) read in `concrete_direction`; under a
    process group, gathered from every rank back into select_documents' global order."""
    validate_direction(concrete_direction, CONCRETE_DIRECTIONS)
    spec = DirectionSpec.from_tokenizer(trained_direction, tokenizer)
    token_bytes = token_bytes.to(device)
    pieces = []  # (doc index, inputs, targets): one window per row
    for d, tokens in enumerate(docs):
        row, _ = spec.orient(tokens, concrete_direction=concrete_direction)
        pieces += [(d, inp, tgt) for inp, tgt, _, _ in document_windows(row, T, spec.header_len)]
    nats = [0.0] * len(docs)
    nbytes = [0] * len(docs)
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start:start + batch_size]
        x, y = padded_batch([(inp, tgt) for _, inp, tgt in chunk], spec.bos_id)
        x, y = x.to(device), y.to(device)
        loss = token_losses(model, x, y, autocast_ctx)
        nb = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        row_nats = (loss.double() * (nb > 0)).sum(dim=1).tolist()  # special-token targets drop out
        row_bytes = nb.sum(dim=1).tolist()
        for (d, _, _), n, b in zip(chunk, row_nats, row_bytes):
            nats[d] += n
            nbytes[d] += int(b)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        gathered = [None] * world
        dist.all_gather_object(gathered, (nats, nbytes))
        # rank r's i-th document is document r + i * world
        merged = sorted((i * world + r, n, b) for r, g in enumerate(gathered) for i, (n, b) in enumerate(zip(*g)))
        nats, nbytes = [n for _, n, _ in merged], [b for _, _, b in merged]
    return nats, nbytes


def bits_per_byte(nats, nbytes):
    return [n / (math.log(2) * b) if b > 0 else float("nan") for n, b in zip(nats, nbytes)]


def consistency_stats(bpb_forward, bpb_backward):
    """Agreement of two per-document bpb lists (same documents, same order)."""
    f, b = np.asarray(bpb_forward, dtype=np.float64), np.asarray(bpb_backward, dtype=np.float64)
    keep = np.isfinite(f) & np.isfinite(b)
    f, b = f[keep], b[keep]
    corr = float(np.corrcoef(f, b)[0, 1]) if len(f) > 1 and f.std() > 0 and b.std() > 0 else float("nan")
    diff = b - f
    return {"documents": int(len(f)), "mean_bpb_forward": float(f.mean()), "mean_bpb_backward": float(b.mean()),
            "mean_abs_diff": float(np.abs(diff).mean()), "mean_diff": float(diff.mean()),
            "std_diff": float(diff.std(ddof=1)) if len(f) > 1 else float("nan"),
            "max_abs_diff": float(np.abs(diff).max()), "correlation": corr}


def plot_consistency(bpb_forward, bpb_backward, output_path, title):
    """Scatter of per-document bpb, forward (x) against backward (y), with the diagonal."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switched, no figure left open
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(bpb_forward, bpb_backward, s=10, alpha=0.6)
    values = [v for v in list(bpb_forward) + list(bpb_backward) if math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0, 1)
    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, linestyle="--", label="same both ways")
    ax.set_xlabel("bits per byte, forward reading")
    ax.set_ylabel("bits per byte, backward reading")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    atomic_write(output_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return output_path


def consistency_record(kind, forward, backward, docs_nbytes, **info):
    """The JSON record: stats plus the per-document numbers. `forward`/`backward` are (nats, bytes)."""
    bpb_f, bpb_b = bits_per_byte(*forward), bits_per_byte(*backward)
    if list(forward[1]) != list(backward[1]):  # the same text both ways: identical byte counts
        raise ValueError("forward and backward byte counts differ: not the same documents")
    return dict(info, eval="consistency", kind=kind, stats=consistency_stats(bpb_f, bpb_b),
                per_document={"bytes": list(docs_nbytes), "bpb_forward": bpb_f, "bpb_backward": bpb_b,
                              "nats_forward": list(forward[0]), "nats_backward": list(backward[0])})


# ---- files and the report ---------------------------------------------------------------------------
# Records (nanochat/evaluations.py): `consistency` in a bidirectional model's run (its two readings) and
# `consistency_pair_<backward tag>` in the forward model's run (a forward/backward pair); the scatter plot
# beside each, same name with .png.
def write_consistency(path, record, title):
    """JSON and its scatter plot (rank 0 only)."""
    per_doc = record["per_document"]
    plot_consistency(per_doc["bpb_forward"], per_doc["bpb_backward"], path[:-len(".json")] + ".png", title)
    write_record(path, record)


def format_stats(label, stats):
    return (f"{label}: {stats['documents']} documents | mean bpb fwd {stats['mean_bpb_forward']:.4f} "
            f"bwd {stats['mean_bpb_backward']:.4f} | mean |diff| {stats['mean_abs_diff']:.4f} | "
            f"mean diff (bwd - fwd) {stats['mean_diff']:+.4f} | correlation {stats['correlation']:.4f}")


SECTION_TITLE = "Factorisation consistency"


def markdown_section(run_name, evaluations_dir, plots_dir):
    """The report's consistency section for one run (latest step, each kind), or None
    (nanochat/research/report.py REPORT_SECTIONS). The scatter plots are copied into plots_dir
    as <run_name>_<file name> and linked by file name."""
    import shutil
    found = [(step, detail, path) for step, detail, path in list_family(evaluations_dir, "consistency")
             if detail is None or detail.startswith("pair_")]
    if not found:
        return None
    last_step = found[-1][0]
    lines = [f"Step {last_step}: per-document bits per byte of the same documents read forward and backward "
             "(nanochat/consistency.py). A perfect model gives the same number both ways.", "",
             "| models | documents | bpb fwd | bpb bwd | mean abs diff | mean diff (bwd - fwd) | correlation |",
             "|---|---|---|---|---|---|---|"]
    plots = []
    for _, detail, path in [f for f in found if f[0] == last_step]:
        pair = detail and detail[len("pair_"):]
        with open(path) as f:
            record = json.load(f)
        s = record["stats"]
        label = record.get("label") or (f"{run_name} + {pair}" if pair else run_name)
        lines.append(f"| {label} | {s['documents']} | {s['mean_bpb_forward']:.4f} | {s['mean_bpb_backward']:.4f} | "
                     f"{s['mean_abs_diff']:.4f} | {s['mean_diff']:+.4f} | {s['correlation']:.4f} |")
        png = path[:-len(".json")] + ".png"
        if os.path.isfile(png) and plots_dir:
            os.makedirs(plots_dir, exist_ok=True)
            dst = os.path.join(plots_dir, f"{run_name}_{os.path.basename(png)}")
            shutil.copyfile(png, dst)
            plots.append((label, os.path.basename(dst)))
    lines.append("")
    for label, name in plots:
        lines.append(f"![consistency {label}]({name})")
    return "\n".join(lines) + "\n"
