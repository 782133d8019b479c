"""Score a checkpoint on tasks in BOTH directions, whatever it was trained in (docs/EVALUATION.md).

    python -m scripts.direction_eval --model_tag=d4_forward --tasks=arc_easy,arithmetic --max_examples=100
    python -m scripts.direction_eval --source=sft --model_tag=d4_bidi --tasks=gsm8k --directions=forward

Writes evaluations/direction_<task>_step<step>.json beside the checkpoint (kept unless --overwrite);
the report shows them in "Task accuracy in each direction".
"""

import argparse
import os
import sys

from nanochat.chat_eval_lib import MC_ANSWERS
from nanochat.checkpoint_manager import artifact_dirs, load_model
from nanochat.common import (UserError, add_flag, check_sampling, compute_cleanup, compute_init, is_ddp_env, print0,
                             run_main)
from nanochat.direction import parse_directions
from nanochat.evaluations import kind_name, record_path, refuse_existing


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate tasks in both directions (cross-direction transfer)")
    add_flag(p, "source", default="base", help="checkpoint source: base | mid | sft | rl")
    add_flag(p, "model_tag", default=None, help="tag or experiment id (default: newest)")
    add_flag(p, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(p, "tasks", default="arithmetic", help="comma list of task names (tasks/registry.py)")
    add_flag(p, "split", default="test", help="task split to evaluate")
    add_flag(p, "directions", default="forward,backward", help="evaluated directions (comma list)")
    add_flag(p, "max_examples", type=int, default=-1, help="the first N examples of each task (-1 = all)")
    add_flag(p, "mc_answer", default="letter", help="multiple choice: score the choice's letter or its text")
    add_flag(p, "num_samples", type=int, default=1, help="generative: samples per example (pass@k)")
    add_flag(p, "max_new_tokens", type=int, default=64, help="generative: tokens to generate at most")
    add_flag(p, "temperature", type=float, default=0.0, help="generative: 0 = greedy")
    add_flag(p, "top_k", type=int, default=50, help="generative: top-k sampling (-1 = off)")
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "batch_size", type=int, default=32, help="rows per forward pass when scoring likelihoods")
    add_flag(p, "device_type", default="")
    add_flag(p, "overwrite", action="store_true", help="replace existing evaluation files")
    return p


def check_args(args):
    if args.mc_answer not in MC_ANSWERS:
        raise UserError(f"--mc_answer={args.mc_answer!r}: use {' or '.join(MC_ANSWERS)}")
    if args.max_examples == 0 or args.max_examples < -1:
        raise UserError(f"--max_examples={args.max_examples}: use a positive number, or -1 for all")
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--num_samples, --max_new_tokens and --batch_size must be positive")
    check_sampling(args.temperature, args.top_k)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--tasks={args.tasks!r}: give a comma list of distinct task names")
    if is_ddp_env():
        raise UserError("scripts.direction_eval runs in one process: start it with python -m, not torchrun")
    return names, parse_directions(args.directions)


def main(argv=None):
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    names, directions = check_args(args)
    _, _, _, _, device = compute_init(args.device_type)
    try:
        run(args, names, directions, device)
    finally:
        compute_cleanup()


def run(args, names, directions, device):
    from nanochat.direction_eval import evaluate_task_multi_direction, save_direction_evaluation
    from nanochat.engine import Engine
    from tasks.registry import get_task
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    trained, step, tag = meta["direction"], meta["step"], meta["model_tag"]
    evaluations_dir = artifact_dirs(args.source, tag)["evaluations"]
    tasks = []
    for name in names:  # everything that can fail is checked before any example is scored
        task = get_task(name, args.split)
        refuse_existing([record_path(evaluations_dir, kind_name("direction", name), step)], args.overwrite)
        tasks.append((name, task))
    print0(f"direction_eval: {tag} step {step} (trained {trained}, {args.source}); directions {', '.join(directions)}")
    engine = Engine(model, tokenizer, meta)
    summary = []
    for name, task in tasks:
        results = evaluate_task_multi_direction(
            task, model, tokenizer, directions, engine=engine, max_examples=args.max_examples,
            mc_answer=args.mc_answer, batch_size=args.batch_size, num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=None if args.top_k < 0 else args.top_k, seed=args.seed)
        path = save_direction_evaluation(
            results, evaluations_dir, name, step, trained_direction=trained, overwrite=args.overwrite,
            source=args.source, model_tag=tag, split=args.split, max_examples=args.max_examples,
            mc_answer=args.mc_answer, generation={"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                                                  "temperature": args.temperature, "top_k": args.top_k,
                                                  "seed": args.seed})
        print0(f"wrote {path}")
        summary.append((name, results))
    print0("\n| task | direction | scoring | accuracy | n | bpb |\n|---|---|---|---|---|---|")
    for name, results in summary:
        for d, r in results.items():
            acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            bpb = "n/a" if r["bpb"] is None else f"{r['bpb']:.4f}"
            print0(f"| {name} | {d} | {r['scoring']} | {acc} | {r['total']} | {bpb} |")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
