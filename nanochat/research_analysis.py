"""Research analysis: read experiments back and compare them (learning curves, the cross-direction
bpb matrix of DESIGN §7, per-position loss) and write a Markdown report with PNG figures.

Meant for notebooks as much as for `python -m scripts.report`:

    from nanochat.research_analysis import *
    losses = load_training_losses("base_d4_forward")        # numpy arrays: step, loss, tokens, ...
    compare_learning_curves(["fwd", "bwd", "bidi"], "curves.png")
    matrix = analyze_direction_transfer(["fwd", "bwd", "bidi"]); print(matrix["markdown"])
    generate_research_report(["fwd", "bwd", "bidi"])        # -> <base_dir>/reports/<timestamp>/report.md

Every function takes an experiment as its id (resolved under `base_dir`, default
$NANOCHAT_BASE_DIR) or as the path of its directory. Paths inside an experiment come from
ExperimentConfig (the owner of the layout), the research log's file from
`research_logger.log_path`, checkpoint metadata from `checkpoint_manager`: this module only reads.

Figures are drawn on `matplotlib.figure.Figure` objects and saved as PNG through the Agg canvas,
never through pyplot: nothing is displayed, no global backend is switched (a notebook keeps its
own), and no figure is left open.
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from nanochat.checkpoint_manager import list_steps, load_meta
from nanochat.common import UserError
from nanochat.experiment_config import ExperimentConfig, format_lineage
from nanochat.loss_eval import arrow_of_time_gap, list_bpb_evaluations
from nanochat.research_logger import list_snapshots, log_path, read_attrs, read_scalars, read_snapshot

EVAL_DIRECTIONS = ("forward", "backward")
TRAINED_DIRECTIONS = ("forward", "backward", "bidirectional")
BASE_LOG_PHASE = "base_training"
# The research-log phase each experiment phase writes, and the script that writes it. Only base
# training writes a research log so far; later phases are added here when their scripts do.
TRAINING_LOG_PHASES = {"base": BASE_LOG_PHASE}
TRAINING_SCRIPTS = {BASE_LOG_PHASE: "scripts.base_train"}
# Flags shown in the report, in this order, when the run recorded them.
KEY_FLAGS = ("max_seq_len", "device_batch_size", "total_batch_size", "num_iterations", "matrix_lr",
             "embedding_lr", "unembedding_lr", "weight_decay", "warmup_ratio", "warmdown_ratio",
             "final_lr_frac", "grad_clip", "p_backward", "seed", "eval_every", "eval_tokens")
_LINE_STYLE = {"forward": "-", "backward": "--"}
REPORT_NAME = "report.md"


# ---------------------------------------------------------------------------- resolving experiments

def experiment_id_from_dir(experiment_dir):
    """The id of the experiment stored in `experiment_dir` (its directory name)."""
    return os.path.basename(os.path.normpath(os.fspath(experiment_dir)))


def _looks_like_path(experiment):
    text = os.fspath(experiment)
    return (not isinstance(experiment, str) or os.sep in text or "/" in text
            or (os.altsep is not None and os.altsep in text) or text in (".", ".."))


def resolve_experiment(experiment, base_dir=None):
    """(ExperimentConfig, experiment id) for an id or an experiment directory path.

    An id is looked up under `base_dir` (default $NANOCHAT_BASE_DIR); a path (anything with a
    separator, or a PathLike) is matched against ExperimentConfig's layout for each of its
    ancestors, so the layout stays known in one place only. Unknown experiments are a UserError.
    """
    if isinstance(experiment, dict) and "experiment_id" in experiment:  # a loaded metadata dict
        experiment = experiment.get("experiment_dir") or experiment["experiment_id"]
    if not isinstance(experiment, (str, os.PathLike)):
        raise UserError(f"an experiment is given by its id or its directory, not {type(experiment).__name__}")
    if not _looks_like_path(experiment):
        experiments = ExperimentConfig(base_dir)
        experiments.load_config(experiment)  # a clear error (with the known ids) if it is unknown
        return experiments, experiment
    path = os.path.normpath(os.path.abspath(os.fspath(experiment)))
    experiment_id = experiment_id_from_dir(path)
    candidates = [base_dir] if base_dir is not None else _ancestors(path)
    for candidate in candidates:
        experiments = ExperimentConfig(candidate)
        try:
            if os.path.normpath(os.path.abspath(experiments.experiment_dir(experiment_id))) == path:
                experiments.load_config(experiment_id)
                return experiments, experiment_id
        except UserError:
            continue
    raise UserError(f"{path} is not an experiment directory (expected <base_dir>/experiments/<id>/ "
                    "with a config.json)")


def _ancestors(path):
    out, current = [], os.path.dirname(path)
    while True:
        out.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            return out
        current = parent


def training_log_phase(config):
    """The research-log phase name an experiment's training writes (None if unknown)."""
    return TRAINING_LOG_PHASES.get(config.get("phase"))


def _train_command(experiment_id, phase):
    script = TRAINING_SCRIPTS.get(phase)
    if script is None:
        return f"the training script of this phase, with the research log on (it writes logs/{phase}.h5)"
    return f"python -m {script} --model_tag={experiment_id} --research_log=1"


def _eval_command(experiment_id, source="base"):
    src = "" if source == "base" else f" --source={source}"
    return f"python -m scripts.base_eval{src} --model_tag={experiment_id}"


def _log_file(experiments, experiment_id, phase):
    return log_path(experiments.experiment_dir(experiment_id), phase)


def _require_log(experiments, experiment_id, phase):
    path = _log_file(experiments, experiment_id, phase)
    if not os.path.isfile(path):
        present = sorted(_log_files(experiments, experiment_id))
        have = f"its logs: {', '.join(present)}" if present else "it has no logs at all"
        raise UserError(f"experiment {experiment_id!r} has no {phase} log ({path}; {have}); "
                        f"produce it with: {_train_command(experiment_id, phase)}")
    return path


def _log_files(experiments, experiment_id):
    """{phase: path} for every research log in the experiment's logs directory."""
    logs_dir = experiments.logs_dir(experiment_id)
    if not os.path.isdir(logs_dir):
        return {}
    out = {}
    for name in sorted(os.listdir(logs_dir)):
        phase, ext = os.path.splitext(name)
        if ext == ".h5" and os.path.isfile(_log_file(experiments, experiment_id, phase)):
            out[phase] = _log_file(experiments, experiment_id, phase)
    return out


def _evaluation_files(experiments, experiment_id):
    """[(step, path)] of the experiment's bpb evaluation JSONs, by increasing step."""
    return list_bpb_evaluations(experiments.evaluations_dir(experiment_id))


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from None


def latest_evaluation(experiment, base_dir=None):
    """The newest bpb evaluation record (the base_eval JSON plus its "path"), or None."""
    experiments, experiment_id = resolve_experiment(experiment, base_dir)
    files = _evaluation_files(experiments, experiment_id)
    if not files:
        return None
    record = _read_json(files[-1][1])
    record["path"] = files[-1][1]
    return record


def _last_finite(values):
    finite = np.flatnonzero(np.isfinite(values))
    return float(values[finite[-1]]) if finite.size else None


# ---------------------------------------------------------------------------- metadata and curves

def load_experiment_metadata(experiment_dir_or_id, base_dir=None):
    """The experiment's config.json plus what can be read off its files:

        experiment_dir, base_dir
        logs                {phase: {"path", "num_rows", "last_step", "final_loss"}}
        training_log_phase  the phase its training writes (base -> "base_training"), or None
        last_step, final_loss, final_val_bpb {forward|backward: bpb}   from that log (None if absent)
        log_metadata        the flags the training run recorded in its log (empty if no log)
        checkpoint_steps, tokens_per_step, tokens_per_step_source
        evaluations         [paths], oldest first
        latest_evaluation   the newest evaluation record (with "path"), or None
    """
    experiments, experiment_id = resolve_experiment(experiment_dir_or_id, base_dir)
    meta = dict(experiments.load_config(experiment_id))
    meta["experiment_dir"] = experiments.experiment_dir(experiment_id)
    meta["base_dir"] = experiments.base_dir
    meta["logs"] = {}
    scalars_of = {}
    for phase, path in _log_files(experiments, experiment_id).items():
        scalars = scalars_of[phase] = read_scalars(path)
        steps = scalars["step"]
        loss = scalars.get("loss")
        meta["logs"][phase] = {"path": path, "num_rows": int(steps.shape[0]),
                               "last_step": int(steps[-1]) if steps.size else None,
                               "final_loss": _last_finite(loss) if loss is not None else None}
    phase = training_log_phase(meta)
    if phase is None and len(meta["logs"]) == 1:
        phase = next(iter(meta["logs"]))
    meta["training_log_phase"] = phase
    log = meta["logs"].get(phase)
    meta["last_step"] = log["last_step"] if log else None
    meta["final_loss"] = log["final_loss"] if log else None
    meta["final_val_bpb"] = {}
    meta["log_metadata"] = {}
    if log:
        scalars = scalars_of[phase]
        for d in EVAL_DIRECTIONS:
            if f"val_bpb_{d}" in scalars:
                value = _last_finite(scalars[f"val_bpb_{d}"])
                if value is not None:
                    meta["final_val_bpb"][d] = value
        meta["log_metadata"] = read_attrs(log["path"]).get("metadata") or {}
    checkpoint_dir = experiments.checkpoint_dir(experiment_id)
    meta["checkpoint_steps"] = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    meta["tokens_per_step"], meta["tokens_per_step_source"] = _tokens_per_step(
        experiments, experiment_id, meta, meta["checkpoint_steps"])
    evaluations = _evaluation_files(experiments, experiment_id)
    meta["evaluations"] = [p for _, p in evaluations]
    meta["latest_evaluation"] = None
    if evaluations:
        meta["latest_evaluation"] = dict(_read_json(evaluations[-1][1]), path=evaluations[-1][1])
    return meta


def _tokens_per_step(experiments, experiment_id, meta, checkpoint_steps):
    """(tokens per optimizer step, where it was found) or (None, why not).

    The checkpoint metadata records it exactly (base_train's `tokens_per_step`: B·T·world·accum).
    Without a checkpoint, an explicit --total_batch_size is the same number (the gradient
    accumulation is derived so that it is); with -1 the world size is not recorded, so it is unknown.
    """
    if checkpoint_steps:
        ckpt_meta = load_meta(experiments.checkpoint_dir(experiment_id), checkpoint_steps[-1])
        if ckpt_meta.get("tokens_per_step"):
            return int(ckpt_meta["tokens_per_step"]), f"checkpoint metadata (step {checkpoint_steps[-1]})"
    for source, flags in (("config.json flags", meta.get("flags") or {}),
                          ("research log metadata", meta.get("log_metadata") or {})):
        total = flags.get("total_batch_size")
        if isinstance(total, (int, float)) and total > 0:
            return int(total), f"--total_batch_size in the {source}"
    return None, "no checkpoint and no explicit --total_batch_size recorded"


def load_training_losses(experiment, phase=BASE_LOG_PHASE, base_dir=None):
    """{name: np.ndarray} of one training log, all aligned on "step":

        step (int64), loss, tokens (step × tokens_per_step; NaN if tokens_per_step is unknown),
        val_bpb_forward, val_bpb_backward (NaN where not evaluated, or all NaN if never),
        lr_mult, grad_norm (NaN where not logged)

    plus "tokens_per_step" (an int, or None). Raises UserError if the experiment has no such log.
    """
    experiments, experiment_id = resolve_experiment(experiment, base_dir)
    path = _require_log(experiments, experiment_id, phase)
    scalars = read_scalars(path)
    steps = scalars["step"]
    n = steps.shape[0]
    missing = np.full(n, np.nan)
    out = {"step": steps}
    for name in ("loss", "val_bpb_forward", "val_bpb_backward", "lr_mult", "grad_norm"):
        out[name] = scalars.get(name, missing.copy())
    config = experiments.load_config(experiment_id)
    log_metadata = read_attrs(path).get("metadata") or {}
    checkpoint_dir = experiments.checkpoint_dir(experiment_id)
    ckpt_steps = list_steps(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    tokens_per_step, _ = _tokens_per_step(experiments, experiment_id,
                                          dict(config, log_metadata=log_metadata), ckpt_steps)
    out["tokens"] = steps * float(tokens_per_step) if tokens_per_step else missing.copy()
    out["tokens_per_step"] = tokens_per_step
    return out


def curve_label(config):
    """"<id> (<direction>, d<depth>)": how one experiment is named in every figure."""
    return f"{config['experiment_id']} ({config.get('direction')}, d{config.get('depth')})"


@dataclass
class PlotResult:
    """A written figure: its PNG `path` and the `series` actually drawn (read back from the lines).

    `os.fspath(result)` is the path, so a PlotResult can be passed wherever a path is expected.
    """
    path: str
    series: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def __fspath__(self):
        return self.path


def _new_figure(ncols, width_per_panel=5.5, height=4.2):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_per_panel * ncols, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save_png(fig, output_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    output_path = os.fspath(output_path)
    if os.path.dirname(output_path):
        os.makedirs(os.path.dirname(output_path), exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: a PNG without any GUI backend
    fig.savefig(output_path, format="png", dpi=110)
    return output_path


def _line_data(line):
    return (np.asarray(line.get_xdata(), dtype=np.float64), np.asarray(line.get_ydata(), dtype=np.float64))


def compare_learning_curves(experiment_dirs, output_path, phase=BASE_LOG_PHASE, base_dir=None):
    """One PNG, three panels: train loss vs step, train loss vs tokens, val bpb vs step (solid
    forward, dashed backward). One colour per experiment, labelled "<id> (<direction>, d<depth>)".

    Returns a PlotResult whose `series[<id>]` holds the (x, y) arrays read back from the drawn
    lines: "loss_vs_step", "loss_vs_tokens" (absent when tokens per step is unknown), and
    "val_bpb_<direction>" for each evaluated direction. An experiment without the log is an error.
    """
    if isinstance(experiment_dirs, (str, os.PathLike)):
        experiment_dirs = [experiment_dirs]
    if not experiment_dirs:
        raise UserError("compare_learning_curves needs at least one experiment")
    loaded = []
    for experiment in experiment_dirs:
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        config = experiments.load_config(experiment_id)
        losses = load_training_losses(experiment, phase=phase, base_dir=base_dir)
        loaded.append((experiment_id, config, losses))

    fig, (ax_step, ax_tokens, ax_bpb) = _new_figure(3)
    colors = [f"C{i % 10}" for i in range(len(loaded))]
    drawn, notes = {}, []
    any_bpb = any_tokens = False
    for (experiment_id, config, losses), color in zip(loaded, colors):
        label = curve_label(config)
        lines = {}
        finite = np.isfinite(losses["loss"])
        steps = losses["step"][finite]
        (lines["loss_vs_step"],) = ax_step.plot(steps, losses["loss"][finite], color=color, label=label)
        if losses["tokens_per_step"]:
            (lines["loss_vs_tokens"],) = ax_tokens.plot(losses["tokens"][finite], losses["loss"][finite],
                                                        color=color, label=label)
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

    ax_step.set(title="train loss vs step", xlabel="step", ylabel="train loss (nats/token)")
    ax_tokens.set(title="train loss vs tokens", xlabel="tokens", ylabel="train loss (nats/token)")
    ax_bpb.set(title="validation bpb vs step (solid fwd, dashed bwd)", xlabel="step", ylabel="bits per byte")
    for ax, has_data, why in ((ax_tokens, any_tokens, "tokens per step unknown"),
                              (ax_bpb, any_bpb, "no validation bpb logged")):
        if not has_data:
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center")
    for ax in (ax_step, ax_tokens, ax_bpb):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return PlotResult(path=_save_png(fig, output_path), series=drawn, notes=notes)


# ---------------------------------------------------------------------------- cross-direction matrix

def collect_direction_rows(experiment_dirs_or_ids, base_dir=None):
    """([row], [(experiment_id, what is missing, command producing it)]): the rows of
    analyze_direction_transfer for the experiments that have an evaluation, and what is missing
    for the others (no evaluation, or one direction not evaluated). Never raises for missing data."""
    rows, missing = [], []
    for experiment in experiment_dirs_or_ids:
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        config = experiments.load_config(experiment_id)
        source = config.get("phase") or "base"
        files = _evaluation_files(experiments, experiment_id)
        if not files:
            missing.append((experiment_id, f"no bpb evaluation in {experiments.evaluations_dir(experiment_id)}",
                            _eval_command(experiment_id, source)))
            continue
        step, path = files[-1]
        record = _read_json(path)
        results = record.get("results") or {}
        bpb = {d: float(results[d]["bpb"]) if d in results else math.nan for d in EVAL_DIRECTIONS}
        gap = arrow_of_time_gap(results)
        not_evaluated = [d for d in EVAL_DIRECTIONS if d not in results]
        if not_evaluated:
            missing.append((experiment_id, f"{path} has no {', '.join(not_evaluated)} result",
                            f"{_eval_command(experiment_id, source)} --eval_directions=forward,backward --overwrite"))
        rows.append({"experiment": experiment_id,
                     "trained_direction": record.get("trained_direction") or config.get("direction"),
                     "depth": config.get("depth"), "step": record.get("step", step), "bpb": bpb,
                     "gap": gap, "evaluation_path": path,
                     "details": {d: results[d] for d in EVAL_DIRECTIONS if d in results}})
    order = {d: i for i, d in enumerate(TRAINED_DIRECTIONS)}
    rows.sort(key=lambda r: order.get(r["trained_direction"], len(order)))  # stable: fwd, bwd, bidi
    return rows, missing


def _fmt(value, digits=4):
    return "not evaluated" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _fmt_gap(gap):
    return "not computable" if gap is None or not math.isfinite(gap) else f"{100 * gap:+.2f}%"


def direction_matrix_markdown(rows):
    """The cross-direction table in Markdown (bpb to 4 decimals, the gap in percent)."""
    lines = ["| experiment | trained direction | depth | step | bpb forward | bpb backward | "
             "arrow-of-time gap (bwd−fwd)/fwd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['trained_direction']} | {r['depth']} | {r['step']} | "
                     f"{_fmt(r['bpb']['forward'])} | {_fmt(r['bpb']['backward'])} | {_fmt_gap(r['gap'])} |")
    return "\n".join(lines)


def analyze_direction_transfer(experiment_dirs_or_ids, base_dir=None):
    """The cross-direction bpb matrix (DESIGN §7) from each experiment's latest
    evaluations/bpb_step*.json:

        rows         [{"experiment", "trained_direction", "depth", "step", "bpb": {forward, backward},
                       "gap", "evaluation_path", "details": {direction: base_eval's result}}]
                     ordered forward, backward, bidirectional (several experiments per direction
                     allowed: a row is an experiment)
        row_labels   the experiment ids, in row order
        columns      ("forward", "backward"): the evaluated direction
        values       np.ndarray (rows × 2) of bpb, NaN where a direction was not evaluated
        gap          {experiment id: (bpb_bwd − bpb_fwd) / bpb_fwd, or None}
        markdown     the table as Markdown

    An experiment with no evaluation is a UserError naming it and the base_eval command.
    """
    if isinstance(experiment_dirs_or_ids, (str, os.PathLike)):
        experiment_dirs_or_ids = [experiment_dirs_or_ids]
    rows, missing = collect_direction_rows(experiment_dirs_or_ids, base_dir)
    evaluated = {r["experiment"] for r in rows}
    unevaluated = [m for m in missing if m[0] not in evaluated]
    if unevaluated:
        raise UserError("; ".join(f"experiment {i!r} has {why}: run `{cmd}`" for i, why, cmd in unevaluated))
    return _matrix_from_rows(rows)


def _matrix_from_rows(rows):
    return {"rows": rows, "row_labels": [r["experiment"] for r in rows], "columns": EVAL_DIRECTIONS,
            "values": np.array([[r["bpb"][d] for d in EVAL_DIRECTIONS] for r in rows], dtype=np.float64).reshape(
                len(rows), len(EVAL_DIRECTIONS)),
            "gap": {r["experiment"]: r["gap"] for r in rows},
            "markdown": direction_matrix_markdown(rows)}


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
    fig, (ax_heat, ax_gap) = _new_figure(2, width_per_panel=5.0, height=1.6 + 0.7 * len(rows))
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
    ax_gap.set(title="arrow-of-time gap (bwd − fwd) / fwd", xlabel="%")
    for pos, g in zip(positions, gaps):
        ax_gap.text(0, pos, f" {100 * g:+.2f}% " if math.isfinite(g) else " not computable",
                    va="center", ha="left" if not math.isfinite(g) or g < 0 else "right", fontsize="small")
    ax_gap.grid(axis="x", alpha=0.3)
    return PlotResult(path=_save_png(fig, output_path),
                      series={"values": np.asarray(image.get_array().filled(np.nan)), "gap": gaps})


# ---------------------------------------------------------------------------- per-position loss

def per_position_loss(experiment, step=None, phase=BASE_LOG_PHASE, base_dir=None, bucket_size=1):
    """Mean per-token loss at each position of the context (the row), split by the direction of
    the document each token belongs to (DESIGN §7), from the research log's snapshot at `step`
    (default: the latest one). Positions whose target is ignored (-1: direction markers) are left
    out. A snapshot holds one batch (a few rows), so `bucket_size` > 1 averages neighbouring
    positions together. Returns {"experiment", "step", "bucket_size", "position": the first position
    of each bucket, "forward"/"backward": mean loss per bucket (NaN where no token of that
    direction), "count_forward"/"count_backward": tokens averaged per bucket,
    "mean_forward"/"mean_backward": the overall mean (None if no such token)}.
    """
    if not isinstance(bucket_size, int) or bucket_size < 1:
        raise UserError(f"bucket_size must be a positive integer, got {bucket_size!r}")
    experiments, experiment_id = resolve_experiment(experiment, base_dir)
    path = _require_log(experiments, experiment_id, phase)
    steps = list_snapshots(path)
    if not steps:
        raise UserError(f"experiment {experiment_id!r} has no snapshot in {path}: snapshots are taken every "
                        "--snapshot_every steps of a run with the research log on "
                        f"({_train_command(experiment_id, phase)})")
    step = steps[-1] if step is None else step
    snapshot = read_snapshot(path, step)
    needed = [k for k in ("per_token_loss", "targets", "position_is_backward") if k not in snapshot]
    if needed:
        raise UserError(f"the snapshot at step {step} in {path} lacks {', '.join(needed)}")
    loss = np.asarray(snapshot["per_token_loss"], dtype=np.float64)
    targets = np.asarray(snapshot["targets"])
    is_backward = np.asarray(snapshot["position_is_backward"], dtype=bool)
    if not (loss.shape == targets.shape == is_backward.shape) or loss.ndim != 2:
        raise UserError(f"the snapshot at step {step} in {path} has mismatched shapes: per_token_loss "
                        f"{loss.shape}, targets {targets.shape}, position_is_backward {is_backward.shape}")
    valid = targets >= 0
    T = loss.shape[1]
    starts = np.arange(0, T, bucket_size)
    out = {"experiment": experiment_id, "step": int(step), "bucket_size": bucket_size, "position": starts}
    for d, mask in (("forward", valid & ~is_backward), ("backward", valid & is_backward)):
        counts = np.add.reduceat(mask.sum(axis=0), starts)
        sums = np.add.reduceat(np.where(mask, loss, 0.0).sum(axis=0), starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[d] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        out[f"count_{d}"] = counts
        total = int(counts.sum())
        out[f"mean_{d}"] = float(sums.sum() / total) if total else None
    return out


def plot_per_position_loss(results, output_path, labels=None):
    """Mean loss vs position for one or more per_position_loss() results: solid forward tokens,
    dashed backward tokens, one colour per experiment. Returns a PlotResult."""
    if isinstance(results, dict):
        results = [results]
    fig, (ax,) = _new_figure(1, width_per_panel=7.0)
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
    return PlotResult(path=_save_png(fig, output_path), series=drawn)


# ---------------------------------------------------------------------------- report

def _default_report_dir(base_dir, name=None):
    """<base_dir>/reports/<name or UTC timestamp>; a taken timestamp gets a _2, _3... suffix."""
    reports = os.path.join(base_dir, "reports")
    if name is not None:
        if not re.match(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$", name):
            raise UserError(f"report name {name!r}: use letters, digits, '.', '_' and '-'")
        return os.path.join(reports, name)
    stem = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    candidate, n = os.path.join(reports, stem), 2
    while os.path.exists(candidate):
        candidate, n = os.path.join(reports, f"{stem}_{n}"), n + 1
    return candidate


def _check_report_dir(report_dir):
    """Refuse a destination that already holds files: a report is never overwritten."""
    if os.path.exists(report_dir):
        if not os.path.isdir(report_dir):
            raise UserError(f"report directory {report_dir} exists and is not a directory")
        if os.listdir(report_dir):
            raise UserError(f"report directory {report_dir} already exists and is not empty; "
                            "choose another --output_dir (or --name), or remove it")
    return report_dir


def _report_bucket_size(meta):
    """About 32 buckets over the context: one snapshot batch is too few rows for single positions."""
    flags, _ = _key_flags(meta)
    seq_len = flags.get("max_seq_len")
    return max(1, int(seq_len) // 32) if isinstance(seq_len, int) else 1


def _code_version(config):
    cv = config.get("code_version")
    if not cv:
        return "not recorded (no git repository when the experiment was created)"
    return f"{cv.get('commit', '?')[:12]}{' (uncommitted changes)' if cv.get('dirty') else ''}"


def _key_flags(meta):
    """(flags, where they were recorded): config.json flags, else the research log's metadata."""
    for source, flags in (("config.json", meta.get("flags") or {}),
                          ("the research log's metadata", meta.get("log_metadata") or {})):
        if flags:
            shown = {k: flags[k] for k in KEY_FLAGS if k in flags}
            if meta.get("direction") != "bidirectional":
                shown.pop("p_backward", None)  # only the bidirectional draw uses it
            return shown, source
    return {}, None


def _mark_lineage(text, included):
    """Append a marker to the lineage lines of the experiments in the report."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^[\s│├└─]*(\S+) \(", line)
        out.append(f"{line}   ◀ in this report" if m and m.group(1) in included else line)
    return "\n".join(out)


def _rel(path, start):
    return os.path.relpath(path, start).replace(os.sep, "/")


def generate_research_report(experiment_ids, output_dir=None, base_dir=None, title=None, name=None,
                             phase=BASE_LOG_PHASE, skipped=None):
    """Write a Markdown report comparing experiments, with its figures beside it; return its path.

    The report (`report.md`) holds: a summary table, the lineage tree, the learning curves
    (learning_curves.png), the cross-direction bpb matrix (table + direction_matrix.png),
    per-position loss from the latest snapshots (per_position_loss.png) and each experiment's
    config and final numbers. Where data is missing, its section says what and which command
    produces it. Default directory: <base_dir>/reports/<name or UTC timestamp>/; an existing
    non-empty directory is refused. Every experiment needs its training log (UserError
    otherwise). `skipped`: [(id, reason)] for experiments left out by the caller (listed as such).
    """
    if isinstance(experiment_ids, (str, os.PathLike)):
        experiment_ids = [experiment_ids]
    if not experiment_ids:
        raise UserError("no experiments to report on")
    resolved, seen = [], set()
    for experiment in experiment_ids:
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        if experiment_id not in seen:
            seen.add(experiment_id)
            resolved.append((experiments, experiment_id))
    base_dir = resolved[0][0].base_dir
    # Refuse experiments without a training log before anything is written.
    metas = {}
    for experiments, experiment_id in resolved:
        _require_log(experiments, experiment_id, phase)
        metas[experiment_id] = load_experiment_metadata(experiments.experiment_dir(experiment_id))
    if output_dir is not None and name is not None:
        raise UserError("give the report an output_dir or a name, not both")
    report_dir = _check_report_dir(os.path.abspath(os.fspath(output_dir)) if output_dir is not None
                                   else _default_report_dir(base_dir, name))
    # Build the report in a hidden directory beside its destination and rename it at the end: a
    # failure part-way leaves nothing behind, and a reader never sees a half-written report.
    parent = os.path.dirname(report_dir)
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(report_dir)}.partial-", dir=parent)
    try:
        _write_report(work_dir, report_dir, resolved, metas, base_dir, title, phase, skipped)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work_dir, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        if os.path.isdir(report_dir):
            os.rmdir(report_dir)  # checked empty above; fails (and we stop) if something appeared since
        os.rename(work_dir, report_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return os.path.join(report_dir, REPORT_NAME)


def _write_report(work_dir, report_dir, resolved, metas, base_dir, title, phase, skipped):
    """Write report.md and its figures into `work_dir` (links relative to the final `report_dir`)."""
    ids = [i for _, i in resolved]
    dirs = [experiments.experiment_dir(i) for experiments, i in resolved]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    title = title or f"Research report: {', '.join(ids)}"
    md = [f"# {title}", "",
          f"Generated {now} from `{base_dir}` for {len(ids)} experiment(s): {', '.join(f'`{i}`' for i in ids)}.", ""]
    if skipped:
        md += ["Left out (no training log): " + "; ".join(f"`{i}` ({why})" for i, why in skipped) + ".", ""]

    # Summary
    rows, missing_evals = collect_direction_rows(dirs)
    row_of = {r["experiment"]: r for r in rows}
    md += ["## Summary", "",
           "| experiment | phase | direction | depth | status | steps logged | final train loss | "
           "final val bpb fwd | final val bpb bwd | eval bpb fwd | eval bpb bwd | gap |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in ids:
        m, r = metas[i], row_of.get(i)
        md.append(f"| {i} | {m.get('phase')} | {m.get('direction')} | {m.get('depth')} | {m.get('status')} | "
                  f"{m['last_step']} | {_fmt(m['final_loss'])} | {_fmt(m['final_val_bpb'].get('forward'))} | "
                  f"{_fmt(m['final_val_bpb'].get('backward'))} | "
                  f"{_fmt(r['bpb']['forward']) if r else 'no evaluation'} | "
                  f"{_fmt(r['bpb']['backward']) if r else 'no evaluation'} | "
                  f"{_fmt_gap(r['gap']) if r else 'no evaluation'} |")
    md += ["", "Train loss is nats per token of the last logged step; val bpb is the last in-training "
           "evaluation; eval bpb is the latest `scripts.base_eval` result (DESIGN §3).", ""]

    # Lineage
    trees, roots_seen = [], set()
    for experiments, experiment_id in resolved:
        tree = experiments.lineage(experiment_id)
        if tree[0]["id"] not in roots_seen:
            roots_seen.add(tree[0]["id"])
            trees += tree
    md += ["## Lineage", "", "Each line: id (phase, direction, status); children branch from their parent.", "",
           "```", _mark_lineage(format_lineage(trees), set(ids)), "```", ""]

    # Learning curves
    curves = compare_learning_curves(dirs, os.path.join(work_dir, "learning_curves.png"), phase=phase)
    md += ["## Learning curves", "", f"![learning curves]({_rel(curves.path, work_dir)})", "",
           "Panels: train loss vs step, train loss vs tokens, validation bpb vs step (solid forward, dashed backward).",
           ""]
    md += [f"- {note}" for note in curves.notes] + ([""] if curves.notes else [])

    # Direction matrix
    md += ["## Cross-direction bpb", ""]
    if rows:
        matrix = _matrix_from_rows(rows)
        figure = plot_direction_matrix(matrix, os.path.join(work_dir, "direction_matrix.png"))
        md += ["Rows: the trained direction (one row per experiment); columns: the evaluated direction, on the "
               "same held-out documents. Gap = (bpb_bwd − bpb_fwd) / bpb_fwd.", "",
               matrix["markdown"], "", f"![direction matrix]({_rel(figure.path, work_dir)})", ""]
    else:
        md += ["No experiment in this report has a bpb evaluation, so there is no matrix.", ""]
    for experiment_id, why, command in missing_evals:
        md.append(f"- `{experiment_id}`: {why}; produce it with `{command}`")
    if missing_evals:
        md.append("")

    # Per-position loss
    md += ["## Per-position loss", ""]
    position_results, position_missing = [], []
    for experiments, experiment_id in resolved:
        try:
            position_results.append(per_position_loss(experiments.experiment_dir(experiment_id), phase=phase,
                                                      bucket_size=_report_bucket_size(metas[experiment_id])))
        except UserError as e:
            position_missing.append((experiment_id, str(e)))
    if position_results:
        figure = plot_per_position_loss(position_results, os.path.join(work_dir, "per_position_loss.png"))
        buckets = sorted({res["bucket_size"] for res in position_results})
        md += ["Mean training loss at each position of the context, from each run's latest research-log snapshot "
               "(the rows of one batch, so noisy), split by the direction of the document each token is in; "
               f"neighbouring positions averaged in buckets of {', '.join(map(str, buckets))}.", "",
               f"![per-position loss]({_rel(figure.path, work_dir)})", "",
               "| experiment | snapshot step | mean loss, forward tokens | mean loss, backward tokens |",
               "|---|---|---|---|"]
        for res in position_results:
            md.append(f"| {res['experiment']} | {res['step']} | "
                      f"{_fmt(res['mean_forward']) if res['mean_forward'] is not None else 'no forward tokens'} | "
                      f"{_fmt(res['mean_backward']) if res['mean_backward'] is not None else 'no backward tokens'} |")
        md.append("")
    for experiment_id, why in position_missing:
        md.append(f"- `{experiment_id}`: {why}")
    if position_missing:
        md.append("")

    # Per-experiment details
    md += ["## Experiments", ""]
    for i in ids:
        md += _experiment_section(metas[i], row_of.get(i), report_dir=report_dir)

    with open(os.path.join(work_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")




def _experiment_section(meta, row, report_dir):
    i = meta["experiment_id"]
    out = [f"### {i}", "",
           f"- phase: {meta.get('phase')}; direction: {meta.get('direction')}; depth: {meta.get('depth')}; "
           f"status: {meta.get('status')}",
           f"- parent: {meta.get('parent_experiment') or 'none (a root experiment)'}; "
           f"children: {', '.join(meta.get('children') or []) or 'none'}",
           f"- code version: {_code_version(meta)}; created {meta.get('created_at')}",
           f"- directory: `{meta['experiment_dir']}`"]
    flags, source = _key_flags(meta)
    if flags:
        out.append(f"- key flags (from {source}): " + ", ".join(f"`{k}={v}`" for k, v in flags.items()))
    else:
        out.append("- key flags: none recorded in config.json or the research log")
    tps = meta.get("tokens_per_step")
    out.append(f"- tokens per step: {tps:,} ({meta['tokens_per_step_source']})" if tps
               else f"- tokens per step: unknown ({meta['tokens_per_step_source']})")
    logs = meta["logs"]
    out.append("- logs: " + (", ".join(f"{p} ({v['num_rows']} rows, last step {v['last_step']})"
                                       for p, v in logs.items()) or "none"))
    out.append(f"- checkpoints at steps: {', '.join(map(str, meta['checkpoint_steps'])) or 'none'}")
    out.append(f"- final train loss: {_fmt(meta['final_loss'])} at step {meta['last_step']}")
    for d in EVAL_DIRECTIONS:
        if d in meta["final_val_bpb"]:
            out.append(f"- final validation bpb ({d}, during training): {_fmt(meta['final_val_bpb'][d])}")
    if not meta["final_val_bpb"]:
        out.append("- final validation bpb: none logged (train with --eval_every=N)")
    if row is None:
        out.append(f"- evaluation: none; produce it with `{_eval_command(i, meta.get('phase') or 'base')}`")
    else:
        parts = []
        for d in EVAL_DIRECTIONS:
            detail = row["details"].get(d)
            if detail:
                counts = ", ".join(f"{detail[k]:,} {k}" for k in ("tokens", "bytes", "documents") if k in detail)
                parts.append(f"{d} {_fmt(detail['bpb'])}" + (f" ({counts})" if counts else ""))
            else:
                parts.append(f"{d} not evaluated")
        out.append(f"- evaluation at step {row['step']} ([{os.path.basename(row['evaluation_path'])}]"
                   f"({_rel(row['evaluation_path'], report_dir)})): bpb " + "; ".join(parts)
                   + f"; arrow-of-time gap {_fmt_gap(row['gap'])}")
        ckpts = meta["checkpoint_steps"]
        if ckpts and ckpts[-1] > row["step"]:
            out.append(f"- the latest checkpoint (step {ckpts[-1]}) is newer than the evaluation: "
                       f"`{_eval_command(i, meta.get('phase') or 'base')}`")
    out.append("")
    return out
