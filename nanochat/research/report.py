"""Research reports: a folder holding report.md and its PNG figures, written from what analysis.py
computes and plots.py draws; never overwritten, and built in a hidden folder renamed at the end.
Evaluation sections plug in through REPORT_SECTIONS (the contract: docs/RESEARCH.md).
"""

import importlib
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone

from nanochat.common import UserError
from nanochat.direction import DIRECTIONS, is_two_way
from nanochat.evaluations import report_sections
from nanochat.experiment_config import ExperimentConfig, format_lineage
from nanochat.paths import atomic_write_text
from nanochat.research.analysis import (BASE_LOG_PHASE, EVAL_DIRECTIONS, _eval_command, _fmt, _fmt_gap,
                                        _require_log, collect_direction_rows, experiment_metadata,
                                        matrix_from_rows, resolve_experiment)
from nanochat.research.arrow_study import studies_of, study_section
from nanochat.research.plots import compare_learning_curves, plot_direction_matrix

# Evaluation kind -> module exposing markdown_section(run_name, evaluations_dir, plots_dir).
REPORT_SECTIONS = {
    "direction": "nanochat.direction_eval",
    "core": "nanochat.core_eval",
    "rerank": "nanochat.rerank",
    "consistency": "nanochat.consistency",
}

# Flags shown in the report, in this order, when the run recorded them.
KEY_FLAGS = ("max_seq_len", "device_batch_size", "total_batch_size", "num_iterations", "matrix_lr",
             "embedding_lr", "unembedding_lr", "weight_decay", "warmup_ratio", "warmdown_ratio",
             "final_lr_frac", "grad_clip", "p_backward", "seed", "eval_every", "eval_tokens")
REPORT_NAME = "report.md"


# ---------------------------------------------------------------------------- report

def _default_report_dir(base_dir, name=None):
    """<base_dir>/reports/<name or UTC timestamp>; a taken timestamp gets a _2, _3... suffix."""
    reports = os.path.join(base_dir, "reports")
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):  # fullmatch: "x\n" is no name
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
            if not (meta.get("direction") in DIRECTIONS and is_two_way(meta["direction"])):
                shown.pop("p_backward", None)  # only a two-way model's draw uses it
            return shown, source
    return {}, None


def _mark_lineage(text, included):
    """Append a marker to the lineage lines of the experiments in the report."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^[\s│├└─]*(\S+) \(", line)
        out.append(f"{line}   ◀ in this report" if m and m.group(1) in included else line)
    return "\n".join(out)


def _bullets(lines):
    """Markdown list lines, then a blank line when there are any."""
    return lines + [""] if lines else []


def _produce_lines(missing):
    """A bullet per (experiment id, what is missing, the command producing it)."""
    return _bullets([f"- `{i}`: {why}; produce it with `{command}`" for i, why, command in missing])


def _rel(path, start):
    return os.path.relpath(path, start).replace(os.sep, "/")


def generate_research_report(experiment_ids, output_dir=None, base_dir=None, title=None, name=None,
                             phase=BASE_LOG_PHASE, skipped=None):
    """Write a report comparing experiments into a folder (report.md and its PNGs); return report.md's path.

    The folder is `output_dir` (the plan's `output_path`), else <base_dir>/reports/<name or UTC
    timestamp>/. Every experiment needs its training log; where other data is missing, its section
    names the command producing it. `skipped`: [(id, reason)] the caller left out (listed as such).
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
        metas[experiment_id] = experiment_metadata(experiments.experiment_dir(experiment_id))
    if output_dir is not None and name is not None:
        raise UserError("give the report one of output_dir or name")
    report_dir = _check_report_dir(os.path.abspath(os.fspath(output_dir)) if output_dir is not None
                                   else _default_report_dir(base_dir, name))
    # Build the report in a hidden directory beside its destination and rename it at the end: a
    # failure part-way leaves nothing behind, and a reader never sees a half-written report.
    parent = os.path.dirname(report_dir)
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(report_dir)}.partial-", dir=parent)
    try:
        _write_report(work_dir, report_dir, resolved, metas, base_dir, title, phase, skipped)
        os.chmod(work_dir, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        if os.path.isdir(report_dir):
            os.rmdir(report_dir)  # checked empty above; fails (and we stop) if something appeared since
        os.rename(work_dir, report_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return os.path.join(report_dir, REPORT_NAME)


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _section_module(module_path):
    """The module of a REPORT_SECTIONS entry, or None if it does not exist (yet)."""
    try:
        return importlib.import_module(module_path)
    except ModuleNotFoundError as e:
        if e.name and (module_path == e.name or module_path.startswith(e.name + ".")):
            return None
        raise  # the module exists but one of *its* imports is missing: a real error


def evaluation_sections(resolved, plots_dir, sections=None):
    """[(title, [(experiment_id, markdown)])] of the evaluation sections that have something to say
    for at least one experiment: REPORT_SECTIONS in order, then the modules records name themselves
    (nanochat/evaluations.py write_record(section=))."""
    out, sections = [], dict(REPORT_SECTIONS if sections is None else sections)
    for experiments, experiment_id in resolved:
        for module_path in report_sections(experiments.evaluations_dir(experiment_id)):
            if module_path not in sections.values():
                sections[module_path] = module_path
    for kind, module_path in sections.items():
        module = _section_module(module_path)
        render = getattr(module, "markdown_section", None) if module is not None else None
        if render is None:
            continue
        parts = []
        for experiments, experiment_id in resolved:
            text = render(experiment_id, experiments.evaluations_dir(experiment_id), plots_dir)
            if text is not None and text.strip():
                parts.append((experiment_id, text.strip()))
        if parts:
            out.append((getattr(module, "SECTION_TITLE", kind), parts))
    return out


def write_transfer_analysis(output_path, configs, matrix):
    """analyze_direction_transfer's file: the bpb matrix, the task accuracy in each direction and
    what is missing (with the command producing it), as Markdown at `output_path` (never
    overwritten). Returns the path."""
    output_path = os.path.abspath(os.fspath(output_path))
    if os.path.isdir(output_path):
        raise UserError(f"{output_path} is a directory: give the analysis a file path (e.g. transfer.md)")
    if os.path.exists(output_path):
        raise UserError(f"{output_path} already exists; choose another path, or remove it")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    md = ["# Direction transfer analysis", "", f"Generated {now}.", "",
          "| experiment | phase | trained direction | depth |", "|---|---|---|---|"]
    md += [f"| {c['experiment_id']} | {c.get('phase')} | {c.get('direction')} | {c.get('depth')} |" for c in configs]
    md += ["", "## Bits per byte, trained direction × evaluated direction", ""]
    if matrix["rows"]:
        md += ["Each model read forward and backward on the same held-out documents (docs/DESIGN.md §3, §7); "
               "cross-direction penalty = (bpb_bwd − bpb_fwd) / bpb_fwd of one model (not the arrow-of-time gap, "
               "which pairs a backward model with a forward one: scripts.arrow_study).", "", matrix["markdown"], ""]
    else:
        md += ["No bpb evaluation yet.", ""]
    md += _produce_lines(matrix["missing"])
    md += ["## Task accuracy in each direction", ""]
    if matrix["tasks"]:
        md += [task_table_markdown(matrix["tasks"]), "", TASK_TABLE_NOTE, ""]
    else:
        md += ["No task evaluation in any direction yet; produce one with "
               "`python -m scripts.direction_eval --model_tag=<id> --tasks=arithmetic,arc_easy`.", ""]
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    atomic_write_text(output_path, "\n".join(md).rstrip() + "\n")
    return output_path


TASK_TABLE_NOTE = ("Accuracy: multiple choice ranks each choice by the log-likelihood of the whole conversation read "
                   "in that direction (no length normalisation); generative tasks are generated and checked by the "
                   "task's reward. n/a: the model cannot generate in that direction or the task cannot check it "
                   "(no accuracy is made up); bpb: bits per byte of the reference conversations' text read in that "
                   "direction, comparable across directions (nanochat/direction_eval.py).")


def task_table_markdown(task_rows):
    """One line per (experiment, task): accuracy and bpb in each evaluated direction."""
    lines = ["| experiment | trained direction | task | step | acc forward | acc backward | bpb forward | "
             "bpb backward |", "|---|---|---|---|---|---|---|---|"]
    for r in task_rows:
        cells = ["not evaluated" if d not in r["accuracy"] else "n/a" if r["accuracy"][d] is None
                 else f"{r['accuracy'][d]:.4f} (n={r['n'][d]})" for d in EVAL_DIRECTIONS]
        cells += [_fmt(r["bpb"].get(d)) for d in EVAL_DIRECTIONS]
        lines.append(f"| {r['experiment']} | {r['trained_direction']} | {r['task']} | {r['step']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


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

    # Arrow-of-time studies these experiments belong to: the gap between models, paired by seed, first
    for study in studies_of(ids, base_dir):
        text, _ = study_section(study, ExperimentConfig(base_dir).evaluations_dir, work_dir, base_dir)
        md += [f"## Arrow of time: study `{study['name']}`", "", text]

    # Summary
    rows, missing_evals = collect_direction_rows(dirs)
    row_of = {r["experiment"]: r for r in rows}
    md += ["## Summary", "",
           "| experiment | phase | direction | depth | status | steps logged | final train loss | "
           "final val bpb fwd | final val bpb bwd | eval bpb fwd | eval bpb bwd | cross-direction penalty |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in ids:
        m, r = metas[i], row_of.get(i)
        md.append(f"| {i} | {m.get('phase')} | {m.get('direction')} | {m.get('depth')} | {m.get('status')} | "
                  f"{m['num_rows']} (last step {m['last_step']}) | {_fmt(m['final_loss'])} | {_fmt(m['final_val_bpb'].get('forward'))} | "
                  f"{_fmt(m['final_val_bpb'].get('backward'))} | "
                  f"{_fmt(r['bpb']['forward']) if r else 'no evaluation'} | "
                  f"{_fmt(r['bpb']['backward']) if r else 'no evaluation'} | "
                  f"{_fmt_gap(r['gap']) if r else 'no evaluation'} |")
    md += ["", "Train loss is nats per token of the last logged step; val bpb is the last in-training "
           "evaluation; eval bpb is the latest `scripts.base_eval` result (docs/DESIGN.md §3).", ""]

    # Lineage
    trees = {}  # root id -> tree: experiments of one tree share it
    for experiments, experiment_id in resolved:
        root = experiments.lineage(experiment_id)[0]
        trees.setdefault(root["id"], root)
    md += ["## Lineage", "", "Each line: id (phase, direction, status); children branch from their parent.", "",
           "```", _mark_lineage(format_lineage(list(trees.values())), set(ids)), "```", ""]

    # Learning curves
    curves = compare_learning_curves(dirs, os.path.join(work_dir, "learning_curves.png"), phase=phase)
    md += ["## Learning curves", "", f"![learning curves]({_rel(curves.path, work_dir)})", "",
           "Panels: train loss vs step, train loss vs tokens, validation bpb vs step (solid forward, dashed backward).",
           ""]
    md += _bullets([f"- {note}" for note in curves.notes])

    # Direction matrix
    md += ["## Cross-direction bpb", ""]
    if rows:
        matrix = matrix_from_rows(rows)
        figure = plot_direction_matrix(matrix, os.path.join(work_dir, "direction_matrix.png"))
        md += ["Rows: the trained direction (one row per experiment); columns: the evaluated direction, on the "
               "same held-out documents. Cross-direction penalty = (bpb_bwd − bpb_fwd) / bpb_fwd of one model; "
               "the arrow-of-time gap compares two models (see the study section).", "",
               matrix["markdown"], "", f"![direction matrix]({_rel(figure.path, work_dir)})", ""]
    else:
        md += ["No experiment in this report has a bpb evaluation, so there is no matrix.", ""]
    md += _produce_lines(missing_evals)

    # Evaluation sections registered in REPORT_SECTIONS (task accuracy per direction, CORE, ...)
    for section_title, parts in evaluation_sections(resolved, work_dir):
        md += [f"## {section_title}", ""]
        for experiment_id, text in parts:
            md += [f"### {experiment_id}", "", text, ""]

    # Per-experiment details
    md += ["## Experiments", ""]
    for experiments, i in resolved:
        md += _experiment_section(dict(metas[i], children=experiments.children(i)), row_of.get(i), report_dir)

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
