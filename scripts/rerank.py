"""Rerank a forward model's sampled answers with a backward model (nanochat/rerank.py, docs/EVALUATION.md).

    python -m scripts.rerank --forward_tag=fwd --backward_tag=bwd --task=arithmetic --num_samples=8
    python -m scripts.rerank --forward_tag=fwd --backward_tag=bwd --task=gsm8k --data_files=tests/fixtures/tasks/gsm8k

Writes the forward model's evaluations/rerank_<task>_step<step>.json.
"""

import argparse
import sys
from datetime import datetime, timezone

from nanochat.checkpoint_manager import artifact_dirs, load_meta, load_model, resolve_checkpoint
from nanochat.common import UserError, add_flag, check_sampling, compute_cleanup, compute_init, print0, run_main
from nanochat.direction import DirectionSpec
from nanochat.engine import Engine
from nanochat.evaluations import record_path, refuse_existing, write_record
from nanochat.rerank import format_table, rerank_task
from nanochat.training import autocast_context
from tasks.registry import get_task


def build_parser():
    p = argparse.ArgumentParser(description="Best-of-N with a backward model: rerank a forward model's answers")
    add_flag(p, "forward_tag", required=True, help="the sampling model (trained forward or bidirectional)")
    add_flag(p, "backward_tag", required=True, help="the scoring model (trained backward or bidirectional)")
    add_flag(p, "source", default="sft", help="checkpoint source of both models: base | mid | sft | rl")
    add_flag(p, "backward_source", default="", help="checkpoint source of the backward model (default: --source)")
    add_flag(p, "forward_step", type=int, default=None)
    add_flag(p, "backward_step", type=int, default=None)
    add_flag(p, "task", default="arithmetic",
             help="arithmetic | arithmetic_unseen | gsm8k (any generative task with a forward reward)")
    add_flag(p, "split", default="test")
    add_flag(p, "data_files", default="", help="local task data (file, glob or directory; see tasks/hub.py)")
    add_flag(p, "num_questions", type=int, default=200, help="questions (the first of the split)")
    add_flag(p, "num_samples", type=int, default=8, help="candidates per question (N)")
    add_flag(p, "temperature", type=float, default=1.0)
    add_flag(p, "top_k", type=int, default=-1, help="-1 = no top-k")
    add_flag(p, "max_new_tokens", type=int, default=64)
    add_flag(p, "seed", type=int, default=42, help="question i is sampled with seed + i")
    add_flag(p, "device_batch_size", type=int, default=32, help="rows per scoring batch")
    add_flag(p, "device_type", default="")
    add_flag(p, "overwrite", action="store_true", help="replace an existing result file")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    backward_source = args.backward_source or args.source
    for name in ("num_questions", "num_samples", "max_new_tokens", "device_batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive")
    check_sampling(args.temperature, args.top_k)
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError("--temperature=0 gives N identical candidates: use a positive temperature to rerank")

    # Check both checkpoints and the output path before loading anything.
    fwd_dir, fwd_step, fwd_tag = resolve_checkpoint(args.source, args.forward_tag, args.forward_step)
    bwd_dir, bwd_step, bwd_tag = resolve_checkpoint(backward_source, args.backward_tag, args.backward_step)
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    fwd_spec = DirectionSpec.for_model(load_meta(fwd_dir, fwd_step), tokenizer)
    bwd_spec = DirectionSpec.for_model(load_meta(bwd_dir, bwd_step), tokenizer)
    fwd_direction, bwd_direction = fwd_spec.direction, bwd_spec.direction
    if "forward" not in fwd_spec.generation_directions():
        raise UserError(f"--forward_tag={fwd_tag} was trained {fwd_direction}: the sampler must be a forward or "
                        "bidirectional model")
    if "backward" not in bwd_spec.generation_directions():
        raise UserError(f"--backward_tag={bwd_tag} was trained {bwd_direction}: the scorer must be a backward or "
                        "bidirectional model (it scores the question given the answer)")
    out_path = record_path(artifact_dirs(args.source, fwd_tag)["evaluations"], f"rerank_{args.task}", fwd_step)
    refuse_existing([out_path], args.overwrite)

    task_kwargs = {"data_files": args.data_files} if args.data_files else {}
    if args.task in ("arithmetic", "reversal"):
        task_kwargs["size"] = args.num_questions
    task = get_task(args.task, args.split, **task_kwargs)
    if "forward" not in task.generation_directions:
        raise UserError(f"task {args.task} has no forward reward: answers to it cannot be checked")
    indices = list(range(min(args.num_questions, len(task))))
    if not indices:
        raise UserError(f"task {args.task} ({args.split}) has no questions")

    _, rank, _, world_size, device = compute_init(args.device_type)
    try:
        if world_size > 1:
            raise UserError("scripts.rerank runs on one process; run it without torchrun")
        fwd_model, tokenizer, fwd_meta = load_model(args.source, device, model_tag=fwd_tag, step=fwd_step)
        bwd_model, bwd_tokenizer, _ = load_model(backward_source, device, model_tag=bwd_tag, step=bwd_step)
        engine = Engine(fwd_model, tokenizer, fwd_meta)
        print0(f"sampler {fwd_tag} (trained {fwd_direction}, step {fwd_step}); scorer {bwd_tag} (trained "
               f"{bwd_direction}, step {bwd_step}); {args.task}/{args.split}: {len(indices)} questions x "
               f"{args.num_samples} samples at temperature {args.temperature}")
        result = rerank_task(engine, bwd_model, bwd_spec, task, indices, args.num_samples, args.max_new_tokens,
                             args.temperature, args.top_k if args.top_k > 0 else None, args.seed, device,
                             args.device_batch_size, autocast_context(device.type), log=print0)
        summary = result["summary"]
        print0(f"\n{args.task}: {summary['questions']} questions, N = {args.num_samples} candidates each "
               "(mean +- standard error over questions)\n" + format_table(summary, args.num_samples))
        record = {"eval": "rerank", "task": args.task, "split": args.split, "num_samples": args.num_samples,
                  "temperature": args.temperature, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
                  "seed": args.seed, "source": args.source, "forward_model": fwd_tag, "forward_step": fwd_step,
                  "forward_direction": fwd_direction, "backward_source": backward_source, "backward_model": bwd_tag,
                  "backward_step": bwd_step, "backward_direction": bwd_direction,
                  "created_at": datetime.now(timezone.utc).isoformat(), **result}
        write_record(out_path, record)
        print0(f"wrote {out_path}")
    finally:
        compute_cleanup()


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
