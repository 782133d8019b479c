"""The arrow of time as a study: gap = bpb(backward model, read backward) / bpb(forward model, read
forward) - 1 per (depth, seed) pair, then the mean over seeds with a 95% Student-t interval.
scripts/arrow_study.py writes `<base_dir>/studies/<name>/study.json`; this module reads and
summarises it (the record and what the numbers mean: docs/ARROW_OF_TIME.md).
"""

import json
import math
import os

import numpy as np

from nanochat.common import UserError, get_base_dir
from nanochat.evaluations import latest_record
from nanochat.loss_eval import POSITION_BUCKETS

STUDY_FILE = "study.json"
POSITIONS_FILE = "positions.json"  # bits per byte by position in the document, per pair
# Where scripts.arrow_study cuts the positions: powers of two, so the figure's log axis is evenly sampled;
# the table merges them into loss_eval.POSITION_BUCKETS (the buckets' nats and bytes add up).
LOG_POSITION_EDGES = (0,) + tuple(2 ** i for i in range(16))
SECTION_TITLE = "Arrow of time"

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def study_dir(name, base_dir=None):
    return os.path.join(base_dir or get_base_dir(), "studies", name)


def cell_key(depth, seed, direction):
    return f"d{depth}_s{seed}_{direction}"


def mean_interval(values):
    """(mean, half-width of the 95% interval); the half-width is nan for fewer than 2 values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return mean, t * sd / math.sqrt(n)


def load_study(name_or_dir, base_dir=None):
    path = name_or_dir if os.path.isdir(name_or_dir) else study_dir(name_or_dir, base_dir)
    file = os.path.join(path, STUDY_FILE)
    if not os.path.exists(file):
        raise UserError(f"no study at {path}: run `python -m scripts.arrow_study --name=...` first")
    with open(file) as f:
        return json.load(f)


def final_bpb(evaluations_dir):
    """{concrete direction: bpb} of the latest bpb evaluation in a run's evaluations/, or {}."""
    latest = latest_record(evaluations_dir, "bpb")
    if latest is None:
        return {}
    with open(latest[1]) as f:
        record = json.load(f)
    results = record.get("results", record)
    return {d: r["bpb"] for d, r in results.items() if isinstance(r, dict) and "bpb" in r}


def study_results(study, evaluations_dir_of):
    """{depth: {"pairs": [{"seed", "forward", "backward", "gap", ...}], "gap_mean", "gap_ci95", "n",
    "backward_harder", "bidirectional": [...], ...}}; cells not yet evaluated are left out.
    `evaluations_dir_of(experiment_id)` gives an experiment's evaluations/ directory."""
    out = {}
    for depth in study["depths"]:
        pairs, bidi = [], []
        for seed in study["seeds"]:
            cells = {}
            for direction in study["directions"]:
                exp = study["experiments"].get(cell_key(depth, seed, direction))
                cells[direction] = final_bpb(evaluations_dir_of(exp)) if exp else {}
            f = cells.get("forward", {}).get("forward")
            b = cells.get("backward", {}).get("backward")
            if f is not None and b is not None:
                pairs.append({"seed": seed, "forward": f, "backward": b, "gap": b / f - 1,
                              "forward_model_read_backward": cells["forward"].get("backward"),
                              "backward_model_read_forward": cells["backward"].get("forward")})
            bd = cells.get("bidirectional", {})
            if "forward" in bd and "backward" in bd:
                bidi.append({"seed": seed, "forward": bd["forward"], "backward": bd["backward"],
                             "gap": bd["backward"] / bd["forward"] - 1})
        gaps = [p["gap"] for p in pairs]
        mean, ci = mean_interval(gaps)
        bmean, bci = mean_interval([p["gap"] for p in bidi])
        out[depth] = {"pairs": pairs, "gap_mean": mean, "gap_ci95": ci,
                      "backward_harder": sum(g > 0 for g in gaps), "n": len(gaps),
                      "bidirectional": bidi, "bidirectional_gap_mean": bmean, "bidirectional_gap_ci95": bci}
    return out


def _pct(x):
    return "n/a" if x != x else f"{100 * x:+.2f}%"


def _ci(x):
    return "n/a" if x != x else f"±{100 * x:.2f}%"


def markdown(study, results, plot_file=None):
    """The study table (gap first), the per-seed pairs, and the plot when there is one."""
    lines = [f"Study `{study['name']}`: {', '.join(study['directions'])} models, seeds "
             f"{', '.join(map(str, study['seeds']))}, depth {', '.join(map(str, study['depths']))}; every model "
             "scored on the same held-out documents.",
             "",
             "Arrow-of-time gap = bpb(backward model, read backward) / bpb(forward model, read forward) − 1, "
             "paired by seed; positive = backward is harder. Interval: 95% Student t over seeds.",
             "",
             "| depth | seed pairs | gap (mean) | 95% interval | backward harder | forward bpb (mean) | backward bpb (mean) |",
             "|---|---|---|---|---|---|---|"]
    for depth, r in results.items():
        f = [p["forward"] for p in r["pairs"]]
        b = [p["backward"] for p in r["pairs"]]
        fm = f"{sum(f) / len(f):.4f}" if f else "n/a"
        bm = f"{sum(b) / len(b):.4f}" if b else "n/a"
        lines.append(f"| {depth} | {r['n']} | {_pct(r['gap_mean'])} | {_ci(r['gap_ci95'])} | "
                     f"{r['backward_harder']} of {r['n']} | {fm} | {bm} |")
    lines += ["", "Per seed:", "",
              "| depth | seed | forward model, fwd | backward model, bwd | gap | forward model, bwd | backward model, fwd |",
              "|---|---|---|---|---|---|---|"]
    for depth, r in results.items():
        for p in r["pairs"]:
            fb, bf = p["forward_model_read_backward"], p["backward_model_read_forward"]
            lines.append(f"| {depth} | {p['seed']} | {p['forward']:.4f} | {p['backward']:.4f} | {_pct(p['gap'])} | "
                         f"{'n/a' if fb is None else f'{fb:.4f}'} | {'n/a' if bf is None else f'{bf:.4f}'} |")
    if any(r["bidirectional"] for r in results.values()):
        lines += ["", "Bidirectional models (one model, both readings): within-model gap = bpb(bwd) / bpb(fwd) − 1.",
                  "", "| depth | seeds | within-model gap | 95% interval |", "|---|---|---|---|"]
        for depth, r in results.items():
            if r["bidirectional"]:
                lines.append(f"| {depth} | {len(r['bidirectional'])} | {_pct(r['bidirectional_gap_mean'])} | "
                             f"{_ci(r['bidirectional_gap_ci95'])} |")
    if plot_file:
        lines += ["", f"![arrow-of-time gap against depth]({os.path.basename(plot_file)})"]
    return "\n".join(lines) + "\n"


def load_positions(study, base_dir=None):
    path = os.path.join(study_dir(study["name"], base_dir), POSITIONS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def coarse_buckets(buckets, edges=POSITION_BUCKETS):
    """Merge position buckets into [edges[0], edges[1]), ..., [edges[-1], T), [T, end) (T: where the last
    bucket, the one without an end, starts), summing nats and bytes."""
    T = buckets[-1]["from"]
    bounds = sorted({e for e in edges if e < T} | {T})
    out = []
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else None
        inside = [b for b in buckets if b["from"] >= lo and (hi is None or b["from"] < hi)]
        nats, nbytes = sum(b["nats"] for b in inside), sum(b["bytes"] for b in inside)
        out.append({"from": lo, "to": hi, "nats": nats, "bytes": nbytes,
                    "bpb": nats / (math.log(2) * nbytes) if nbytes else float("nan")})
    return out


def positions_markdown(tables, plot_file=None):
    """Where the gap comes from: per position bucket (reading direction), the mean over seeds of
    the forward and backward bits per byte and of the gap, with each bucket's share of the text."""
    if not tables:
        return ""
    lines = ["", "Where the gap comes from: bits per byte by the position of a token in its document, counted in "
             "the reading direction (0 = the first token read: a document's start forward, its end backward), "
             "over every held-out token. A gap confined to the first positions is a document-boundary effect of "
             "the corpus, not of the direction of the text as a whole.", "",
             "| depth | positions | share of bytes | forward bpb | backward bpb | gap (mean over seeds) |",
             "|---|---|---|---|---|---|"]
    for depth in sorted({t["depth"] for t in tables.values()}):
        pairs = [{d: coarse_buckets(t[d]) for d in ("forward", "backward")}
                 for t in tables.values() if t["depth"] == depth]
        total = sum(b["bytes"] for b in pairs[0]["forward"])
        for k, bucket in enumerate(pairs[0]["forward"]):
            f = [p["forward"][k]["bpb"] for p in pairs]
            b = [p["backward"][k]["bpb"] for p in pairs]
            gaps = [y / x - 1 for x, y in zip(f, b) if x == x and y == y and x > 0]
            span = f"{bucket['from']}–{bucket['to'] - 1}" if bucket["to"] is not None else f"{bucket['from']}+"
            mean, _ = mean_interval(gaps)
            lines.append(f"| {depth} | {span} | {100 * bucket['bytes'] / max(1, total):.1f}% | {sum(f) / len(f):.4f} | "
                         f"{sum(b) / len(b):.4f} | {_pct(mean)} |")
    if plot_file:
        lines += ["", f"![bits per byte by position]({os.path.basename(plot_file)})"]
    return "\n".join(lines) + "\n"


def plot_positions(tables, path):
    """Per depth: bpb by position (log axis; bucket [a, b) drawn at the geometric mean of a+1 and b, the
    bucket past the context at 2T) of the forward model read forward and the backward model read backward,
    mean over seeds with the seeds' range as a band; below it the gap by position, likewise. Returns a
    PlotResult whose series[depth] holds the drawn "x" and the means "forward", "backward" and "gap" (%)."""
    if not tables:
        return None
    from matplotlib.figure import Figure
    from nanochat.research.plots import PlotResult, save_png
    depths = sorted({t["depth"] for t in tables.values()})
    fig = Figure(figsize=(5.5 * len(depths), 6.4), layout="constrained")
    axes = fig.subplots(2, len(depths), squeeze=False, sharex="col")
    drawn = {}
    for col, depth in enumerate(depths):
        pairs = [t for t in tables.values() if t["depth"] == depth]
        buckets = pairs[0]["forward"]
        x = np.array([math.sqrt((b["from"] + 1) * b["to"]) if b["to"] else 2.0 * b["from"] for b in buckets])
        bpb = {d: np.array([[b["bpb"] for b in p[d]] for p in pairs], dtype=float) for d in ("forward", "backward")}
        gap = 100 * (bpb["backward"] / bpb["forward"] - 1)
        drawn[depth] = {"x": x, "gap": np.nanmean(gap, axis=0), **{d: np.nanmean(v, axis=0) for d, v in bpb.items()}}
        ax, ax_gap = axes[0, col], axes[1, col]
        for d, style, color in (("forward", "-", "C0"), ("backward", "--", "C3")):
            ax.plot(x, drawn[depth][d], style, marker="o", markersize=3, color=color, label=f"{d} model, read {d}")
            ax.fill_between(x, np.nanmin(bpb[d], axis=0), np.nanmax(bpb[d], axis=0), color=color, alpha=0.2)
        ax_gap.plot(x, drawn[depth]["gap"], marker="o", markersize=3, color="C2", label="mean over seeds")
        ax_gap.fill_between(x, np.nanmin(gap, axis=0), np.nanmax(gap, axis=0), color="C2", alpha=0.2,
                            label=f"range over {len(pairs)} seed(s)")
        ax_gap.axhline(0, color="black", linewidth=0.6)
        ax_gap.axvline(buckets[-1]["from"], color="gray", linestyle=":", linewidth=0.8,
                       label=f"context length {buckets[-1]['from']}")
        ax.set(xscale="log", title=f"depth {depth}: bits per byte by position", ylabel="bits per byte")
        # symlog: linear within ±2% (the bulk of the text), compressed beyond (a document's first tokens)
        ax_gap.set_yscale("symlog", linthresh=2.0)
        low, high = np.nanmin(gap), np.nanmax(gap)
        ticks = [t for t in (-100, -30, -10, -3, -1, 0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
                 if min(low, -1) <= t <= max(high, 1) * 1.5]
        ax_gap.set_yticks(ticks, [f"{t:+d}" if t else "0" for t in ticks])
        ax_gap.set(xscale="log", xlabel="position in the document, reading direction (1 = first token read)",
                   ylabel="gap (bwd − fwd) / fwd, % (symlog)")
        for a in (ax, ax_gap):
            a.grid(alpha=0.3)
            a.legend(fontsize="small")
    return PlotResult(path=save_png(fig, path), series=drawn)


def plot_gap(results, path):
    """Gap (mean and 95% interval, and each seed) at every depth; written when any depth has a pair."""
    depths = [d for d, r in results.items() if r["n"]]
    if not depths:
        return None
    from nanochat.research.plots import new_figure, save_png
    fig, (ax,) = new_figure(1, width_per_panel=5, height=3.5)
    means = [100 * results[d]["gap_mean"] for d in depths]
    cis = [0 if results[d]["gap_ci95"] != results[d]["gap_ci95"] else 100 * results[d]["gap_ci95"] for d in depths]
    ax.errorbar(depths, means, yerr=cis, marker="o", capsize=4, label="mean, 95% interval")
    for d in depths:
        ax.scatter([d + 0.1] * results[d]["n"], [100 * p["gap"] for p in results[d]["pairs"]], s=14, color="gray",
                   zorder=3, label="each seed" if d == depths[0] else None)  # beside the bar, not under it
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(xlabel="depth", ylabel="arrow-of-time gap (%)", title="backward vs forward bits per byte",
           xticks=depths, xlim=(min(depths) - 1, max(depths) + 1))
    ax.legend(fontsize=8)
    return save_png(fig, path)


def study_section(study, evaluations_dir_of, plots_dir, base_dir=None):
    """(markdown, results) of one study; the plot goes to plots_dir when any depth has a pair."""
    results = study_results(study, evaluations_dir_of)
    plot = plot_gap(results, os.path.join(plots_dir, f"arrow_of_time_{study['name']}.png")) if plots_dir else None
    tables = load_positions(study, base_dir)
    positions = os.path.join(plots_dir, f"arrow_of_time_{study['name']}_positions.png") if plots_dir else None
    if positions and tables:
        plot_positions(tables, positions)
    return markdown(study, results, plot) + positions_markdown(tables, positions), results


def studies_of(experiment_ids, base_dir=None):
    """The studies any of `experiment_ids` belongs to (for the report)."""
    root = study_dir("", base_dir)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    studies = [load_study(n, base_dir) for n in names if os.path.exists(os.path.join(root, n, STUDY_FILE))]
    return [study for study in studies if set(experiment_ids) & set(study["experiments"].values())]
