"""Evaluate chat checkpoints on tasks, in the model's direction(s) (docs/EVALUATION.md).

    python -m scripts.chat_eval --source=sft --model_tag=d4_bidi --tasks=arithmetic,arc_easy --max_examples=100
    python -m scripts.chat_eval --model_tag=d4_bidi --tasks=arithmetic --eval_direction=backward

Writes evaluations/chat_<task>_step<step>.json (kept unless --overwrite). Under torchrun, examples are
split over ranks and the counts summed.
"""

import argparse
import os
import sys
from datetime import datetime, timezone

import torch.distributed as dist

from nanochat.chat_eval_lib import (EVAL_DIRECTION_CHOICES, MC_ANSWERS, evaluate_generative, evaluate_multiple_choice,
                                    resolve_eval_directions, example_indices)
from nanochat.checkpoint_manager import artifact_dirs, load_model
from nanochat.common import UserError, add_flag, check_sampling, compute_cleanup, compute_init, print0, run_main
from nanochat.engine import Engine
from nanochat.evaluations import kind_name, record_path, refuse_existing, write_record
from nanochat.progress import progress
from nanochat.training import autocast_context

MC_SCORING = ("whole-text log-likelihood in the evaluated direction: sum of log p(token | preceding tokens) over "
              "every position of the oriented conversation (choice as the assistant answer) except BOS and the "
              "direction marker; argmax over choices")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate chat checkpoints on generative and multiple-choice tasks")
    add_flag(p, "source", default="sft", help="checkpoint source: base | mid | sft | rl")
    add_flag(p, "model_tag", default=None, help="tag or experiment id (default: newest)")
    add_flag(p, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "tasks", default="arithmetic", help="comma list of task names (tasks/registry.py)")
    add_flag(p, "split", default="test", help="task split to evaluate")
    add_flag(p, "eval_direction", default="auto", help="auto (where the model generates) | both | forward | backward")
    add_flag(p, "max_examples", type=int, default=-1, help="the first N examples of each task (-1 = all)")
    add_flag(p, "num_samples", type=int, default=1, help="generative: samples per example (pass@k)")
    add_flag(p, "max_new_tokens", type=int, default=128, help="generative: tokens to generate at most")
    add_flag(p, "temperature", type=float, default=0.0, help="generative: 0 = greedy")
    add_flag(p, "top_k", type=int, default=50, help="generative: top-k sampling (-1 = off)")
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "batch_size", type=int, default=32, help="multiple choice: rows per forward pass")
    add_flag(p, "mc_answer", default="letter", help="multiple choice: score the choice's letter or its text")
    add_flag(p, "device_type", default="")
    add_flag(p, "overwrite", action="store_true", help="replace existing evaluation files")
    return p


def check_args(args):
    if args.eval_direction not in EVAL_DIRECTION_CHOICES:
        raise UserError(f"--eval_direction={args.eval_direction!r}: use {', '.join(EVAL_DIRECTION_CHOICES)}")
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--num_samples, --max_new_tokens and --batch_size must be positive")
    if args.max_examples == 0 or args.max_examples < -1:
        raise UserError(f"--max_examples={args.max_examples}: use a positive number, or -1 for all")
    if args.mc_answer not in MC_ANSWERS:
        raise UserError(f"--mc_answer={args.mc_answer!r}: use {' or '.join(MC_ANSWERS)}")
    check_sampling(args.temperature, args.top_k)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--tasks={args.tasks!r}: give a comma list of distinct task names")
    return names


def plan_directions(task, eval_directions):
    """(directions to run, {direction: why skipped}) for one task. Multiple choice scores text,
    so it runs in every direction; a generative task only where its reward can verify."""
    if task.eval_type == "categorical":
        return list(eval_directions), {}
    from tasks.common import check_task_direction
    run, skipped = [], {}
    for d in eval_directions:
        try:
            check_task_direction(task, d)
            run.append(d)
        except UserError as e:
            skipped[d] = str(e)
    return run, skipped


def merge_over_ranks(result):
    """Sum one direction's counts (overall and per probe) over ranks and gather the multiple-choice
    predictions; generation samples are rank 0's."""
    if not (dist.is_available() and dist.is_initialized()):
        return result
    parts = [None] * dist.get_world_size()
    keys = ("correct", "n", "skipped_too_long", "by_probe", "reward_sum", "predictions")
    dist.all_gather_object(parts, {k: result[k] for k in keys if k in result})
    merged = dict(result)
    for key in ("correct", "n", "skipped_too_long", "reward_sum"):
        if key in result:
            merged[key] = sum(p[key] for p in parts)
    if "predictions" in result:
        merged["predictions"] = sorted(x for p in parts for x in p["predictions"])
    merged["by_probe"] = {}
    for p in parts:
        for probe, counts in p["by_probe"].items():
            total = merged["by_probe"].setdefault(probe, {"correct": 0.0, "n": 0})
            total["correct"] += counts["correct"]
            total["n"] += counts["n"]
    return merged


def summarise(result, eval_type):
    """The JSON record of one direction: accuracy, counts, per-probe accuracy, samples."""
    n = result["n"]
    out = {"accuracy": result["correct"] / n, "correct": result["correct"], "n": n,
           "skipped_too_long": result["skipped_too_long"]}
    if result["by_probe"]:
        out["by_probe"] = {k: {**v, "accuracy": v["correct"] / v["n"]} for k, v in result["by_probe"].items()}
    if eval_type == "categorical":
        out["predictions"] = [{"index": i, "predicted": p, "answer": a} for i, p, a in result["predictions"]]
    else:
        out["mean_reward"] = result["reward_sum"] / n
        out["samples"] = result["samples"]
    return out


def main(argv=None):
    # datasets' "Generating split" progress bars would bury the accuracies (and break the
    # one-line error contract on stderr); a user who wants them sets the variable to 0.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    names = check_args(args)
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        run(args, names, rank, world_size, device)
    finally:
        compute_cleanup()


def run(args, names, rank, world_size, device):
    from tasks.registry import get_task
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, meta)
    trained, step, tag = engine.direction, meta["step"], meta["model_tag"]
    eval_directions = resolve_eval_directions(engine.spec, args.eval_direction)
    evaluations_dir = artifact_dirs(args.source, tag)["evaluations"]

    # Everything that can fail is checked before any example is scored.
    plans = []
    for name in names:
        task = get_task(name, args.split)
        directions, skipped = plan_directions(task, eval_directions)
        for d, why in skipped.items():
            print0(f"note: {name}: skipping the {d} direction: {why}")
        if not directions:
            print0(f"note: skipping task {name}: it cannot be evaluated in {' or '.join(eval_directions)}")
        elif len(task) == 0:
            raise UserError(f"task {name} ({args.split} split) has no examples")
        else:
            refuse_existing([record_path(evaluations_dir, kind_name("chat", name), step)], args.overwrite)
        plans.append((name, task, directions, skipped))
    runnable = [p for p in plans if p[2]]
    if not runnable:
        reasons = "; ".join(why for _, _, _, skipped in plans for why in skipped.values())
        raise UserError(f"no task can be evaluated for this {trained} model: {reasons}")

    print0(f"chat_eval: {tag} step {step} (trained {trained}, {args.source}); directions {', '.join(eval_directions)}")
    autocast = autocast_context(device.type)
    summary, not_evaluated = [], []
    for name, task, directions, skipped in runnable:
        indices = example_indices(len(task), args.max_examples)
        mine = indices[rank::world_size]
        results = {}
        for d in directions:
            todo = progress(mine, desc=f"{name} [{d}]", unit="example")  # a bar, or lines in logs
            if task.eval_type == "categorical":
                r = evaluate_multiple_choice(model, tokenizer, engine.spec, task, todo, d, device,
                                             batch_size=args.batch_size, autocast_ctx=autocast,
                                             mc_answer=args.mc_answer)
            else:
                with autocast:
                    r = evaluate_generative(engine, task, todo, d, num_samples=args.num_samples,
                                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                            top_k=None if args.top_k < 0 else args.top_k, seed=args.seed)
            r = merge_over_ranks(r)
            if r["n"] == 0:
                skipped[d] = (f"task {name}: none of its {len(indices)} examples fits the model's "
                              f"{model.config.sequence_len}-token context")
                print0(f"note: {name}: skipping the {d} direction: {skipped[d]}")
                continue
            results[d] = summarise(r, task.eval_type)
            too_long = r["skipped_too_long"]
            note = f", {too_long} skipped (longer than the context)" if too_long else ""
            print0(f"{name} [{d}]: accuracy {results[d]['accuracy']:.4f} ({r['correct']:g}/{r['n']}{note})")
            for probe, v in results[d].get("by_probe", {}).items():
                print0(f"{name} [{d}] {probe}: accuracy {v['accuracy']:.4f} ({v['correct']:g}/{v['n']})")
            summary.append((name, d, results[d]["accuracy"]))
        if not results:
            not_evaluated += list(skipped.values())
            continue
        directions = list(results)
        record = {
            "eval": "chat", "task": name, "eval_type": task.eval_type, "split": args.split,
            "source": args.source, "model_tag": tag, "step": step, "trained_direction": trained,
            "eval_directions": directions, "skipped_directions": skipped,
            "accuracy": results[directions[0]]["accuracy"] if len(directions) == 1 else None,
            "n": results[directions[0]]["n"] if len(directions) == 1 else None,
            "max_examples": args.max_examples, "results": results,
            "scoring": MC_SCORING if task.eval_type == "categorical" else "task.reward on the generation restored "
                       "to reading order; pass@num_samples",
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        if task.eval_type == "categorical":
            record["mc_answer"] = args.mc_answer
        else:
            record["generation"] = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                                    "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed}
        if rank == 0:
            path = write_record(record_path(evaluations_dir, kind_name("chat", name), step), record)
            print0(f"wrote {path}")
    if not summary:
        raise UserError("; ".join(dict.fromkeys(not_evaluated)))
    if len(summary) > 1:
        print0("\n" + "\n".join(f"{name:<20} {d:<9} {acc:.4f}" for name, d, acc in summary))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
