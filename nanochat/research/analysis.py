"""Research analysis: read experiments back and compute what compares them (training curves, the
cross-direction bpb matrix of docs/DESIGN.md §7, task accuracy in each direction, per-position loss).
Computes only (plots.py draws, report.py writes). Every function takes an experiment as its id
(under `base_dir`, default $NANOCHAT_BASE_DIR) or its directory's path.
"""

import math
import os
from pathlib import Path

import numpy as np

from nanochat.phases import PHASES
from nanochat.checkpoint_manager import list_steps, load_meta
from nanochat.common import UserError
from nanochat.direction import CONCRETE_DIRECTIONS, DIRECTIONS
from nanochat.experiment_config import ExperimentConfig, read_json
from nanochat.evaluations import latest_of_each, list_records
from nanochat.loss_eval import arrow_of_time_gap
from nanochat.research_logger import list_snapshots, log_path, read_attrs, read_scalars, read_snapshot

EVAL_DIRECTIONS = CONCRETE_DIRECTIONS
TRAINED_DIRECTIONS = DIRECTIONS
BASE_LOG_PHASE = PHASES["base"].log_name
TRAINING_LOG_PHASES = {p.name: p.log_name for p in PHASES.values()}  # what each phase's --research_log=1 writes
TRAINING_SCRIPTS = {p.log_name: p.script for p in PHASES.values()}


# ---------------------------------------------------------------------------- resolving experiments

def experiment_id_from_dir(experiment_dir):
    """The id of the experiment stored in `experiment_dir` (its directory name)."""
    return os.path.basename(os.path.normpath(os.fspath(experiment_dir)))


def resolve_experiment(experiment, base_dir=None):
    """(ExperimentConfig, experiment id) for an id or an experiment directory path (anything with a
    separator, or a PathLike), matched against ExperimentConfig's layout under each of its ancestors."""
    if not isinstance(experiment, (str, os.PathLike)):
        raise UserError(f"an experiment is given by its id or its directory, not {type(experiment).__name__}")
    is_path = not isinstance(experiment, str) or "/" in experiment or os.sep in experiment  # altsep is "/"
    if not is_path and experiment not in (".", ".."):  # an id
        experiments = ExperimentConfig(base_dir)
        experiments.load_config(experiment)  # a clear error (with the known ids) if it is unknown
        return experiments, experiment
    path = os.path.normpath(os.path.abspath(os.fspath(experiment)))
    experiment_id = experiment_id_from_dir(path)
    for candidate in [base_dir] if base_dir is not None else map(str, Path(path).parents):
        experiments = ExperimentConfig(candidate)
        try:
            if os.path.normpath(os.path.abspath(experiments.experiment_dir(experiment_id))) == path:
                experiments.load_config(experiment_id)
                return experiments, experiment_id
        except UserError:
            continue
    raise UserError(f"{path} is not an experiment directory (expected <base_dir>/experiments/<id>/ "
                    "with a config.json)")


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
        if present:  # e.g. an SFT experiment asked for the base log: point at the log it has
            raise UserError(f"experiment {experiment_id!r} has no {phase} log ({path}; its logs: "
                            f"{', '.join(present)}): ask for one of those (scripts.report --phase={present[0]})")
        raise UserError(f"experiment {experiment_id!r} has no {phase} log ({path}; it has no logs at all); "
                        f"produce it with: {_train_command(experiment_id, phase)}")
    return path


def _log_files(experiments, experiment_id):
    """{phase: path} for every research log in the experiment's logs directory."""
    logs_dir = experiments.logs_dir(experiment_id)
    names = map(os.path.splitext, sorted(os.listdir(logs_dir)) if os.path.isdir(logs_dir) else [])
    paths = {phase: _log_file(experiments, experiment_id, phase) for phase, ext in names if ext == ".h5"}
    return {phase: path for phase, path in paths.items() if os.path.isfile(path)}


def _read_json(path):
    return read_json(path, fix="rerun the command that wrote it")


def _last_finite(values):
    finite = np.flatnonzero(np.isfinite(values))
    return float(values[finite[-1]]) if finite.size else None


# ---------------------------------------------------------------------------- metadata and curves

def load_experiment_metadata(experiment_dir_or_id, base_dir=None):
    """(experiment_metadata()'s dict, parent_link.json's dict or None), as the plan unpacks it."""
    meta = experiment_metadata(experiment_dir_or_id, base_dir)
    return meta, meta["parent_link"]


def experiment_metadata(experiment_dir_or_id, base_dir=None):
    """The experiment's config.json plus what its logs, checkpoints and evaluations say (docs/RESEARCH.md)."""
    experiments, experiment_id = resolve_experiment(experiment_dir_or_id, base_dir)
    meta = dict(experiments.load_config(experiment_id))
    meta["parent_link"] = experiments.load_parent_link(experiment_id)
    meta["experiment_dir"] = experiments.experiment_dir(experiment_id)
    meta["base_dir"] = experiments.base_dir
    meta["logs"] = {}
    scalars_of = {}
    for phase, path in _log_files(experiments, experiment_id).items():
        scalars = scalars_of[phase] = read_scalars(path)
        steps = scalars["step"]
        meta["logs"][phase] = {"path": path, "num_rows": int(steps.shape[0]),
                               "last_step": int(steps[-1]) if steps.size else None,
                               "final_loss": _last_finite(scalars.get("loss", np.empty(0)))}
    phase = training_log_phase(meta)
    if phase is None and len(meta["logs"]) == 1:
        phase = next(iter(meta["logs"]))
    meta["training_log_phase"] = phase
    log = meta["logs"].get(phase) or {"last_step": None, "num_rows": 0, "final_loss": None}
    meta.update(last_step=log["last_step"], num_rows=log["num_rows"], final_loss=log["final_loss"])
    scalars = scalars_of.get(phase, {})
    final = {d: _last_finite(scalars[f"val_bpb_{d}"]) for d in EVAL_DIRECTIONS if f"val_bpb_{d}" in scalars}
    meta["final_val_bpb"] = {d: value for d, value in final.items() if value is not None}
    meta["log_metadata"] = (read_attrs(log["path"]).get("metadata") or {}) if "path" in log else {}
    meta["checkpoint_steps"] = list_steps(experiments.checkpoint_dir(experiment_id))
    meta["tokens_per_step"], meta["tokens_per_step_source"] = _tokens_per_step(experiments, experiment_id, meta)
    meta["evaluations"] = [p for _, p in list_records(experiments.evaluations_dir(experiment_id), "bpb")]
    latest = meta["evaluations"][-1] if meta["evaluations"] else None
    meta["latest_evaluation"] = dict(_read_json(latest), path=latest) if latest else None
    return meta


def _tokens_per_step(experiments, experiment_id, meta):
    """(tokens per optimizer step, where it was found) or (None, why not). A checkpoint records it exactly
    (B·T·world·accum), as does an explicit --total_batch_size; with -1 the world size is not recorded."""
    checkpoint_steps = list_steps(experiments.checkpoint_dir(experiment_id))
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
    """(steps, losses) of one training log as the plan reads it, or (None, None) without the log."""
    path = _log_file(*resolve_experiment(experiment, base_dir), phase)
    if not os.path.isfile(path):
        return None, None
    scalars = read_scalars(path)
    steps = np.asarray(scalars["step"], dtype=np.int64)
    loss = np.asarray(scalars.get("loss", np.full(steps.shape[0], np.nan)), dtype=np.float64)
    finite = np.isfinite(loss)
    return steps[finite], loss[finite]


def load_training_curves(experiment, phase=BASE_LOG_PHASE, base_dir=None):
    """{name: np.ndarray} of one training log aligned on "step", plus "tokens_per_step" (docs/RESEARCH.md)."""
    experiments, experiment_id = resolve_experiment(experiment, base_dir)
    path = _require_log(experiments, experiment_id, phase)
    scalars = read_scalars(path)
    steps = scalars["step"]
    missing = np.full(steps.shape[0], np.nan)
    out = {"step": steps}
    for name in ("loss", "val_bpb_forward", "val_bpb_backward", "lr_mult", "grad_norm"):
        out[name] = scalars.get(name, missing.copy())
    config = dict(experiments.load_config(experiment_id), log_metadata=read_attrs(path).get("metadata") or {})
    tokens_per_step, _ = _tokens_per_step(experiments, experiment_id, config)
    out["tokens"] = steps * float(tokens_per_step) if tokens_per_step else missing.copy()
    out["tokens_per_step"] = tokens_per_step
    return out


def load_direction_evaluations(experiment, base_dir=None):
    """The task evaluations in every direction (nanochat/direction_eval.py) of one experiment:
    [record] from evaluations/direction_*.json, the newest step of each task only, by task name."""
    experiments, experiment_id = resolve_experiment(experiment, base_dir)
    latest = latest_of_each(experiments.evaluations_dir(experiment_id), "direction")
    return [dict(_read_json(path), path=path) for _, path in latest.values()]


def collect_task_rows(experiment_dirs_or_ids, base_dir=None):
    """[row] of direction task evaluations, one per (experiment, task) (docs/RESEARCH.md)."""
    rows = []
    for experiment in experiment_dirs_or_ids:
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        config = experiments.load_config(experiment_id)
        for record in load_direction_evaluations(experiments.experiment_dir(experiment_id)):
            results = record.get("results") or {}
            rows.append({"experiment": experiment_id,
                         "trained_direction": record.get("trained_direction") or config.get("direction"),
                         "task": record.get("task"), "step": record.get("step"),
                         "accuracy": {d: r.get("accuracy") for d, r in results.items()},
                         "bpb": {d: r["bpb"] for d, r in results.items() if r.get("bpb") is not None},
                         "not_applicable": {d: r.get("reason") for d, r in results.items() if r.get("accuracy") is None},
                         "n": {d: r.get("total") for d, r in results.items()},
                         "evaluation_path": record["path"]})
    return rows


# ---------------------------------------------------------------------------- cross-direction matrix

def collect_direction_rows(experiment_dirs_or_ids, base_dir=None):
    """([row], [(experiment_id, what is missing, command producing it)]): the rows of
    direction_transfer for the experiments that have an evaluation, and what is missing
    for the others (no evaluation, or one direction not evaluated). Never raises for missing data."""
    rows, missing = [], []
    for experiment in experiment_dirs_or_ids:
        experiments, experiment_id = resolve_experiment(experiment, base_dir)
        config = experiments.load_config(experiment_id)
        source = config.get("phase") or "base"
        files = list_records(experiments.evaluations_dir(experiment_id), "bpb")
        if not files:
            missing.append((experiment_id, f"no bpb evaluation in {experiments.evaluations_dir(experiment_id)}",
                            _eval_command(experiment_id, source)))
            continue
        step, path = files[-1]
        record = _read_json(path)
        results = record.get("results") or {}
        bpb = {d: float(results[d]["bpb"]) if d in results else math.nan for d in EVAL_DIRECTIONS}
        not_evaluated = [d for d in EVAL_DIRECTIONS if d not in results]
        if not_evaluated:
            missing.append((experiment_id, f"{path} has no {', '.join(not_evaluated)} result",
                            f"{_eval_command(experiment_id, source)} --eval_directions=forward,backward --overwrite"))
        rows.append({"experiment": experiment_id,
                     "trained_direction": record.get("trained_direction") or config.get("direction"),
                     "depth": config.get("depth"), "step": record.get("step", step), "bpb": bpb,
                     "gap": arrow_of_time_gap(results), "evaluation_path": path,
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
             "cross-direction penalty (bwd−fwd)/fwd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {r['trained_direction']} | {r['depth']} | {r['step']} | "
                     f"{_fmt(r['bpb']['forward'])} | {_fmt(r['bpb']['backward'])} | {_fmt_gap(r['gap'])} |")
    return "\n".join(lines)


def direction_transfer(experiment_dirs_or_ids, base_dir=None):
    """The cross-direction bpb matrix (docs/DESIGN.md §7; its fields: docs/RESEARCH.md) from each
    experiment's latest bpb evaluation; never raises for missing data."""
    if isinstance(experiment_dirs_or_ids, (str, os.PathLike)):
        experiment_dirs_or_ids = [experiment_dirs_or_ids]
    rows, missing = collect_direction_rows(experiment_dirs_or_ids, base_dir)
    return dict(matrix_from_rows(rows), tasks=collect_task_rows(experiment_dirs_or_ids, base_dir), missing=missing)


def require_evaluated(matrix):
    """Raise a UserError naming each experiment of `matrix` without a bpb evaluation and its command."""
    evaluated = {r["experiment"] for r in matrix["rows"]}
    unevaluated = [m for m in matrix["missing"] if m[0] not in evaluated]
    if unevaluated:
        raise UserError("; ".join(f"experiment {i!r} has {why}: run `{cmd}`" for i, why, cmd in unevaluated))
    return matrix


def matrix_from_rows(rows):
    """The matrix of collect_direction_rows' rows (see direction_transfer)."""
    return {"rows": rows, "row_labels": [r["experiment"] for r in rows], "columns": EVAL_DIRECTIONS,
            "values": np.array([[r["bpb"][d] for d in EVAL_DIRECTIONS] for r in rows], dtype=np.float64).reshape(
                len(rows), len(EVAL_DIRECTIONS)),
            "gap": {r["experiment"]: r["gap"] for r in rows},
            "markdown": direction_matrix_markdown(rows)}


# ---------------------------------------------------------------------------- per-position loss

def per_position_loss(experiment, step=None, phase=BASE_LOG_PHASE, base_dir=None, bucket_size=1):
    """Mean per-token loss at each position of the context, split by the direction of each token's
    document, from the research log's snapshot at `step` (default the latest; docs/RESEARCH.md)."""
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
    starts = np.arange(0, loss.shape[1], bucket_size)
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
