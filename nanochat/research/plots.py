"""Figures of experiments, drawn from what analysis.py computes; the report embeds them. Each returns
a PlotResult: the PNG path and the data drawn, read back from the lines (tests check the numbers).
Figures are saved through the Agg canvas, never pyplot: no global backend switched, no figure left open.
"""

import math
import os
from dataclasses import dataclass, field

import numpy as np

from nanochat.common import UserError
from nanochat.research.analysis import BASE_LOG_PHASE, EVAL_DIRECTIONS, load_training_curves, resolve_experiment

_LINE_STYLE = {"forward": "-", "backward": "--"}


def curve_label(config):
    """"<id> (<direction>, d<depth>)": how one experiment is named in every figure."""
    return f"{config['experiment_id']} ({config.get('direction')}, d{config.get('depth')})"


@dataclass
class PlotResult:
    """A written figure: its PNG `path` and the `series` drawn; `os.fspath(result)` is the path."""
    path: str
    series: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __fspath__(self):
        return self.path


def new_figure(ncols, width_per_panel=5.5, height=4.2):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_per_panel * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def save_png(fig, output_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    output_path = os.fspath(output_path)
    if os.path.dirname(output_path):
        os.makedirs(os.path.dirname(output_path), exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: a PNG without any GUI backend
    fig.savefig(output_path, format="png", dpi=110)
    return output_path


def _line_data(line):
    return (np.asarray(line.get_xdata(), dtype=np.float64), np.asarray(line.get_ydata(), dtype=np.float64))


def ema(values, alpha=0.1):
    """Bias-corrected exponential moving average (Adam's correction: the zero start is divided out)."""
    smoothed, state = np.empty(len(values)), 0.0
    for t, value in enumerate(values):
        state = (1 - alpha) * state + alpha * value
        smoothed[t] = state / (1 - (1 - alpha) ** (t + 1))
    return smoothed


def compare_learning_curves(experiment_dirs, output_path, phase=BASE_LOG_PHASE, base_dir=None):
    """One PNG, three panels: train loss vs step, train loss vs tokens (each an EMA, solid, over the faint
    raw loss), val bpb vs step (solid forward, dashed backward), one colour per experiment. `series[<id>]`
    holds the drawn (x, y) arrays: "loss_vs_step", "loss_vs_tokens" (raw; if tokens per step is known),
    "loss_vs_step_ema", "val_bpb_<direction>"."""
    if isinstance(experiment_dirs, (str, os.PathLike)):
        experiment_dirs = [experiment_dirs]
    if not experiment_dirs:
        raise UserError("compare_learning_curves needs at least one experiment")
    fig, (ax_step, ax_tokens, ax_bpb) = new_figure(3)
    drawn, notes = {}, []
    any_bpb = any_tokens = False
    for i, experiment in enumerate(experiment_dirs):
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        losses = load_training_curves(experiment, phase=phase, base_dir=base_dir)
        label, color = curve_label(experiments.load_config(experiment_id)), f"C{i % 10}"
        lines = {}
        finite = np.isfinite(losses["loss"])
        steps = losses["step"][finite]
        (lines["loss_vs_step"],) = ax_step.plot(steps, losses["loss"][finite], color=color, alpha=0.25)
        (lines["loss_vs_step_ema"],) = ax_step.plot(steps, ema(losses["loss"][finite]), color=color, label=label)
        if losses["tokens_per_step"]:
            (lines["loss_vs_tokens"],) = ax_tokens.plot(losses["tokens"][finite], losses["loss"][finite],
                                                        color=color, alpha=0.25)
            ax_tokens.plot(losses["tokens"][finite], ema(losses["loss"][finite]), color=color, label=label)
            any_tokens = True
        else:
            notes.append(f"{experiment_id}: tokens per step unknown (no checkpoint and no explicit "
                         "--total_batch_size), so it is missing from the loss-vs-tokens panel")
        for d in EVAL_DIRECTIONS:
            values = losses[f"val_bpb_{d}"]
            at = np.isfinite(values)
            if at.any():
                (lines[f"val_bpb_{d}"],) = ax_bpb.plot(losses["step"][at], values[at], color=color,
                                                       linestyle=_LINE_STYLE[d], marker="o", markersize=3,
                                                       label=f"{label} {d}")
                any_bpb = True
        if not any(k.startswith("val_bpb_") for k in lines):
            notes.append(f"{experiment_id}: no validation bpb in its log (train with --eval_every=N)")
        drawn[experiment_id] = {"label": label, "color": color,
                                **{k: _line_data(line) for k, line in lines.items()}}

    ax_step.set(title="train loss vs step (EMA 0.1 over raw)", xlabel="step", ylabel="train loss (nats/token)")
    ax_tokens.set(title="train loss vs tokens", xlabel="tokens", ylabel="train loss (nats/token)")
    ax_bpb.set(title="val bpb (solid fwd, dashed bwd)", xlabel="step", ylabel="bits per byte")
    for ax, has_data, why in ((ax_tokens, any_tokens, "tokens per step unknown"),
                              (ax_bpb, any_bpb, "no validation bpb logged")):
        if not has_data:
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
    for ax in (ax_step, ax_tokens, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return PlotResult(path=save_png(fig, output_path), series=drawn, notes=notes)


def plot_direction_matrix(matrix, output_path):
    """Heatmap of the bpb matrix (rows: experiment and trained direction; columns: evaluated
    direction; cells annotated) beside a bar chart of the arrow-of-time gap. Returns a PlotResult
    whose series holds the drawn "values" and "gap" arrays."""
    rows = matrix["rows"]
    if not rows:
        raise UserError("the direction matrix has no rows: evaluate an experiment first "
                        "(python -m scripts.base_eval --model_tag=<id>)")
    values = np.asarray(matrix["values"], dtype=np.float64)
    labels = [f"{r['experiment']}\n(trained {r['trained_direction']})" for r in rows]
    fig, (ax_heat, ax_gap) = new_figure(2, width_per_panel=5.0, height=1.6 + 0.7 * len(rows))
    image = ax_heat.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax_heat, label="bits per byte (lower is better)")
    ax_heat.set_xticks(range(len(EVAL_DIRECTIONS)), [f"eval {d}" for d in EVAL_DIRECTIONS])
    ax_heat.set_yticks(range(len(rows)), labels, fontsize="small")
    ax_heat.set_title("bpb: trained (rows) × evaluated (columns)")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = f"{v:.4f}" if math.isfinite(v) else "not\nevaluated"
            # viridis_r is dark at high values: white text there, black on the light low end.
            ax_heat.text(j, i, text, ha="center", va="center", fontsize="small",
                         color="white" if math.isfinite(v) and v > middle else "black")
    gaps = np.array([r["gap"] if r["gap"] is not None else np.nan for r in rows], dtype=np.float64)
    positions = np.arange(len(rows))
    bar_colors = ["C3" if g > 0 else "C0" for g in np.nan_to_num(gaps)]
    ax_gap.barh(positions, np.nan_to_num(100 * gaps), color=bar_colors)
    ax_gap.set_yticks(positions, labels, fontsize="small")
    ax_gap.invert_yaxis()  # the same row order as the heatmap, top to bottom
    ax_gap.axvline(0, color="black", linewidth=0.8)
    ax_gap.set(title="penalty: (bwd − fwd) / fwd", xlabel="%")
    for pos, g in zip(positions, gaps):
        ax_gap.text(0, pos, f" {100 * g:+.2f}% " if math.isfinite(g) else " not computable",
                    va="center", ha="left" if not math.isfinite(g) or g < 0 else "right", fontsize="small")
    ax_gap.grid(axis="x", alpha=0.3)
    return PlotResult(path=save_png(fig, output_path),
                      series={"values": np.asarray(image.get_array().filled(np.nan)), "gap": gaps})


def plot_per_position_loss(results, output_path, labels=None):
    """Mean loss vs position for one or more per_position_loss() results: solid forward tokens,
    dashed backward tokens, one colour per experiment. Returns a PlotResult."""
    if isinstance(results, dict):
        results = [results]
    fig, (ax,) = new_figure(1, width_per_panel=7.0)
    drawn = {}
    for i, res in enumerate(results):
        label = (labels[i] if labels else res.get("experiment", f"run {i}"))
        drawn[label] = {}
        for d in EVAL_DIRECTIONS:
            if res[f"count_{d}"].sum():
                at = np.isfinite(res[d])
                (line,) = ax.plot(res["position"][at], res[d][at], color=f"C{i % 10}", linestyle=_LINE_STYLE[d],
                                  label=f"{label} {d} tokens (step {res['step']})")
                drawn[label][d] = _line_data(line)
    sizes = sorted({res.get("bucket_size", 1) for res in results})
    xlabel = "position in the context" + (f" (buckets of {sizes[0]} positions)" if sizes != [1] and len(sizes) == 1
                                          else "")
    ax.set(title="per-position loss (solid: forward tokens, dashed: backward tokens)",
           xlabel=xlabel, ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return PlotResult(path=save_png(fig, output_path), series=drawn)
