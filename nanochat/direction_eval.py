"""Task evaluation in several directions: the plan's evaluate_task_multi_direction and
compute_direction_metrics (docs/DESIGN.md §7, docs/EVALUATION.md), on nanochat/chat_eval_lib.py.

    results = evaluate_task_multi_direction(task, model, tokenizer, ["forward", "backward"],
                                            engine=Engine(model, tokenizer, meta), max_examples=100)
    compute_direction_metrics(results)   # forward_accuracy, backward_accuracy, direction_gap, ...

What is scored comes from the task's view in each direction (task.in_direction); every entry also
holds the reference conversations' bits per byte in that direction.
"""

import json
import math
from datetime import datetime, timezone

import torch

from nanochat.chat_eval_lib import (evaluate_generative, evaluate_multiple_choice, example_indices,
                                    sequence_logprobs)
from nanochat.common import UserError, print0
from nanochat.direction import CONCRETE_DIRECTIONS, DIRECTIONS, validate_direction
from nanochat.evaluations import kind_name, latest_of_each, record_path, refuse_existing, write_record

SECTION_TITLE = "Task accuracy in each direction"


def _trained_direction(engine, model_direction):
    if engine is not None:
        engine_direction = getattr(engine, "direction", None)
        if model_direction is not None and engine_direction != model_direction:
            raise UserError(f"model_direction={model_direction!r} contradicts the engine's {engine_direction!r}")
        return engine_direction
    if model_direction is not None:
        validate_direction(model_direction, DIRECTIONS)
    return model_direction


def reference_bpb(model, wrapper, indices, device, token_bytes, batch_size=32, autocast_ctx=None):
    """(nats, bytes, examples) of the reference conversations task[indices] read in the wrapper's
    direction: nats summed over targets that are text tokens, bytes their UTF-8 length. Rows
    longer than the context are left out."""
    max_len = model.config.sequence_len + 1
    rows, n_bytes = [], 0
    for index in indices:
        ids = wrapper.render_for_eval(wrapper[index])
        if len(ids) > max_len:
            continue
        lengths = [int(token_bytes[t]) for t in ids]
        rows.append((ids, [1 if b > 0 else 0 for b in lengths]))
        n_bytes += sum(lengths[1:])
    if not rows:
        return 0.0, 0, 0
    nats = -sum(sequence_logprobs(model, rows, device, batch_size, autocast_ctx))
    return nats, n_bytes, len(rows)


def evaluate_task_multi_direction(task, model, tokenizer, directions=("forward", "backward"), engine=None,
                                  max_examples=None, *, model_direction=None, mc_answer="letter", batch_size=32,
                                  num_samples=1, max_new_tokens=64, temperature=0.0, top_k=None, seed=42,
                                  autocast_ctx=None, verbose=True):
    """Evaluate `task` in each concrete direction of `directions`, on the first `max_examples`
    examples (None or -1: all). Returns {direction: entry}; the entry's keys: docs/EVALUATION.md."""
    if isinstance(directions, str):
        directions = [directions]
    directions = [validate_direction(d, CONCRETE_DIRECTIONS) for d in directions]
    if not directions or len(set(directions)) != len(directions):
        raise UserError(f"directions={directions!r}: give forward and/or backward, each once")
    if not callable(getattr(task, "in_direction", None)):
        raise UserError(f"{type(task).__name__} is not a task (tasks/common.py Task): it has no in_direction() "
                        "to be evaluated in a direction")
    trained = _trained_direction(engine, model_direction)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # tests' stand-ins have none
    if autocast_ctx is None:
        from nanochat.training import autocast_context
        autocast_ctx = autocast_context(device.type)
    token_bytes = tokenizer.token_byte_lengths()
    indices = example_indices(len(task), max_examples)
    if not indices:
        raise UserError(f"task {getattr(task, 'name', '?')} has no examples to evaluate")
    was_training = model.training
    model.eval()
    results = {}
    try:
        for direction in directions:
            if verbose:
                print0(f"Evaluating {getattr(task, 'name', type(task).__name__)} in the {direction} direction "
                       f"({len(indices)} examples, model trained {trained or 'one-way'})...")
            # The engine's spec (from the checkpoint) when there is one, else the trained name.
            wrapper = task.in_direction(direction, tokenizer,
                                        model_direction=engine.spec if engine is not None else trained)
            entry = {"scoring": wrapper.scoring}
            if wrapper.scoring == "multiple_choice":
                r = evaluate_multiple_choice(model, tokenizer, wrapper.spec, task, indices, direction, device,
                                             batch_size=batch_size, autocast_ctx=autocast_ctx, mc_answer=mc_answer)
                entry["indices"] = [i for i, _, _ in r["predictions"]]
                entry["per_example"] = [p == a for _, p, a in r["predictions"]]
                entry["predictions"] = [p for _, p, _ in r["predictions"]]
            elif wrapper.scoring == "generation":
                if engine is None:
                    from nanochat.engine import Engine
                    engine = Engine(model, tokenizer, spec=wrapper.spec)
                with autocast_ctx:
                    r = evaluate_generative(engine, task, indices, direction, num_samples=num_samples,
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                            seed=seed)
                entry["indices"] = [i for i, _ in r["per_example"]]
                entry["per_example"] = [score >= 1.0 for _, score in r["per_example"]]
                entry["samples"] = r["samples"]
            else:
                r = {"correct": 0.0, "n": 0, "skipped_too_long": None}
                entry.update(indices=[], per_example=[], reason=wrapper.not_applicable_reason)
            entry.update(correct=r["correct"], total=r["n"], accuracy=r["correct"] / r["n"] if r["n"] else None)
            if r["n"] == 0 and wrapper.scoring != "likelihood_only":
                entry["reason"] = (f"none of the {len(indices)} examples fits the model's "
                                   f"{model.config.sequence_len}-token context")
            acc = entry["accuracy"]
            entry["stderr"] = None if acc is None else math.sqrt(max(acc * (1 - acc), 0.0) / r["n"])
            nats, n_bytes, n_rows = reference_bpb(model, wrapper, indices, device, token_bytes, batch_size,
                                                  autocast_ctx)
            entry.update(bpb=nats / (math.log(2) * n_bytes) if n_bytes else None, bpb_nats=nats,
                         bpb_bytes=n_bytes, bpb_examples=n_rows)
            entry["skipped_too_long"] = (len(indices) - n_rows if r["skipped_too_long"] is None
                                         else r["skipped_too_long"])
            if verbose:
                shown = (f"accuracy {acc:.4f} ({entry['correct']:g}/{entry['total']})" if acc is not None
                         else f"accuracy n/a ({entry['reason']})")
                bpb = f"{entry['bpb']:.4f}" if entry["bpb"] is not None else "n/a"
                print0(f"  {direction}: {shown}; reference bpb {bpb}")
            results[direction] = entry
    finally:
        model.train(was_training)
    return results


def compute_direction_metrics(results):
    """Cross-direction numbers from evaluate_task_multi_direction's results (keys: docs/EVALUATION.md);
    a direction's keys only if it was evaluated, the two-direction keys only if both were."""
    metrics = {}
    for d in CONCRETE_DIRECTIONS:
        if d in results:
            metrics.update({f"{d}_{key}": results[d].get(key) for key in ("accuracy", "stderr", "bpb")})
    if "forward" in results and "backward" in results:
        fwd, bwd = metrics["forward_accuracy"], metrics["backward_accuracy"]
        both = fwd is not None and bwd is not None
        metrics["direction_gap"] = abs(fwd - bwd) if both else None
        metrics["signed_gap"] = fwd - bwd if both else None
        metrics["average_accuracy"] = (fwd + bwd) / 2 if both else None
        fb, bb = metrics["forward_bpb"], metrics["backward_bpb"]
        metrics["bpb_gap"] = (bb - fb) / fb if fb and bb is not None else None
    return metrics


# ---- files --------------------------------------------------------------------------------------
def save_direction_evaluation(results, evaluations_dir, task_name, step, trained_direction=None, overwrite=False,
                              **extra):
    """Write one task's results (with compute_direction_metrics) as JSON; return the path. An
    existing file is refused unless overwrite."""
    path = record_path(evaluations_dir, kind_name("direction", task_name), step)
    refuse_existing([path], overwrite)
    record = {"eval": "direction", "task": task_name, "step": int(step), "trained_direction": trained_direction,
              "eval_directions": list(results), "results": results, "metrics": compute_direction_metrics(results),
              **extra, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return write_record(path, record)


# ---- report section (nanochat/research/report.py REPORT_SECTIONS) -------------------------------
def _cell_accuracy(entry):
    if entry is None:
        return "not evaluated"
    if entry["accuracy"] is None:
        return "n/a"
    return f"{entry['accuracy']:.4f} ± {entry['stderr']:.4f} (n={entry['total']})"


def _cell_bpb(entry):
    return "n/a" if entry is None or entry.get("bpb") is None else f"{entry['bpb']:.4f}"


def markdown_section(run_name, evaluations_dir, plots_dir):
    """The run's latest direction evaluation of each task as a Markdown table, or None if it has none."""
    latest = latest_of_each(evaluations_dir, "direction")
    if not latest:
        return None
    lines = ["| task | step | accuracy forward | accuracy backward | bpb forward | bpb backward | bpb gap |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for task, (step, path) in latest.items():
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        results = record.get("results") or {}
        gap = (record.get("metrics") or {}).get("bpb_gap")
        lines.append(f"| {task} | {step} | {_cell_accuracy(results.get('forward'))} | "
                     f"{_cell_accuracy(results.get('backward'))} | {_cell_bpb(results.get('forward'))} | "
                     f"{_cell_bpb(results.get('backward'))} | {'n/a' if gap is None else f'{100 * gap:+.2f}%'} |")
        for d, entry in results.items():
            if entry.get("accuracy") is None and entry.get("reason"):
                notes.append(f"- {task}, {d}: no accuracy: {entry['reason']}")
    trained = record.get("trained_direction") or "one-way"
    text = [f"Model trained {trained}. Multiple choice: choices ranked by the log-likelihood of the whole "
            "conversation read in that direction (no length normalisation); generative: generated and checked "
            "by the task's reward (± binomial standard error). bpb: the reference conversations' text read in "
            "that direction; bpb gap = (bwd − fwd) / fwd.", "", *lines]
    if notes:
        text += ["", *notes]
    return "\n".join(text)
