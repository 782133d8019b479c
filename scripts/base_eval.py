"""Evaluate base checkpoints. `--eval=bpb`: bits per byte on the validation documents in each
requested direction, the same documents for every direction (docs/DESIGN.md §3, §7).

    python -m scripts.base_eval --eval=bpb --model_tag=d4_backward --eval_directions=forward,backward
    python -m scripts.base_eval --model_tag=fwd,bwd,bidi      # prints the cross-direction matrix

A one-way model is scored in the other direction too (the cross direction): its rows simply
carry no marker. Results are printed and written as JSON to the run's `evaluations/` directory
(beside the checkpoints): evaluations/bpb_step<step>.json.
"""

import argparse
import json
import os
import sys
from datetime import datetime, timezone

from nanochat.checkpoint_manager import artifact_dirs, load_model
from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0, run_main
from nanochat.direction import parse_directions
from nanochat.loss_eval import arrow_of_time_gap, bpb_evaluation_path, evaluate_bpb, select_documents
from nanochat.tokenizer import get_token_bytes
from nanochat.training import autocast_context

SOURCES = ("base", "mid", "sft", "rl")


def format_matrix(rows):
    """rows: [(label, trained_direction, {direction: bpb})] -> a text table with the gap."""
    lines = [f"{'model':<28} {'trained':<14} {'bpb fwd':>9} {'bpb bwd':>9} {'gap':>8}"]
    for label, trained, bpb in rows:
        f, b = bpb.get("forward"), bpb.get("backward")
        gap = f"{100 * (b - f) / f:+.1f}%" if f and b else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        lines.append(f"{label:<28} {trained:<14} {fmt(f):>9} {fmt(b):>9} {gap:>8}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate base checkpoints (bits per byte per direction)")
    add_flag(parser, "eval", default="bpb", help="what to evaluate: bpb")
    add_flag(parser, "source", default="base", help="checkpoint source: base | mid | sft | rl")
    add_flag(parser, "model_tag", default=None, help="one tag or a comma list (default: newest)")
    add_flag(parser, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(parser, "eval_directions", default="forward,backward", help="comma list of forward, backward")
    add_flag(parser, "eval_tokens", type=int, default=20 * 524288, help="validation text tokens to score")
    add_flag(parser, "max_seq_len", type=int, default=-1, help="context per row (-1 = the checkpoint's)")
    add_flag(parser, "device_batch_size", type=int, default=32)
    add_flag(parser, "device_type", default="")
    add_flag(parser, "overwrite", action="store_true", help="replace an existing evaluation file")
    args = parser.parse_args(argv)
    if args.eval != "bpb":
        raise UserError(f"--eval={args.eval!r} is not available: only 'bpb' (CORE arrives with the evaluation suite)")
    if args.source not in SOURCES:
        raise UserError(f"unknown --source {args.source!r}: use one of {', '.join(SOURCES)}")
    if args.eval_tokens <= 0 or args.device_batch_size <= 0:
        raise UserError("--eval_tokens and --device_batch_size must be positive")
    directions = parse_directions(args.eval_directions)
    tags = [t.strip() for t in args.model_tag.split(",")] if args.model_tag else [None]
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        rows = []
        docs_cache = {}
        for tag in tags:
            rows.append(evaluate_one(args, tag, directions, rank, world_size, device, docs_cache))
        if len(rows) > 1 or len(directions) > 1:
            print0("\n" + format_matrix(rows))
    finally:
        compute_cleanup()


def evaluate_one(args, tag, directions, rank, world_size, device, docs_cache):
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=tag, step=args.step)
    trained_len = meta["model_config"]["sequence_len"]
    T = trained_len if args.max_seq_len == -1 else args.max_seq_len
    if T <= 0 or T > trained_len:
        raise UserError(f"--max_seq_len={args.max_seq_len} is larger than the checkpoint supports "
                        f"({trained_len}, its training context); use at most {trained_len}")
    step, tag = meta["step"], meta["model_tag"]
    out_path = bpb_evaluation_path(artifact_dirs(args.source, tag)["evaluations"], step)
    if os.path.exists(out_path) and not args.overwrite:
        raise UserError(f"{out_path} already exists; pass --overwrite to replace it")
    if args.eval_tokens not in docs_cache:
        docs_cache[args.eval_tokens] = select_documents(tokenizer, args.eval_tokens, "val", rank, world_size)
    docs = docs_cache[args.eval_tokens]
    token_bytes = get_token_bytes(device)
    results = evaluate_bpb(model, tokenizer, token_bytes, docs, directions, meta["direction"], T,
                           args.device_batch_size, device, autocast_context(device.type))
    gap = arrow_of_time_gap(results)
    for d, r in results.items():
        print0(f"{tag} (trained {meta['direction']}) step {step}: bpb {d} = {r['bpb']:.4f} "
               f"({r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['documents']} documents)")
    if gap is not None:
        print0(f"{tag}: arrow-of-time gap (bwd - fwd) / fwd = {100 * gap:+.2f}%")
    record = {"eval": "bpb", "source": args.source, "model_tag": tag, "step": step,
              "trained_direction": meta["direction"], "split": "val", "eval_tokens": args.eval_tokens,
              "max_seq_len": T, "results": results, "arrow_of_time_gap": gap,
              "created_at": datetime.now(timezone.utc).isoformat()}
    if rank == 0:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, out_path)
        print0(f"wrote {out_path}")
    return tag, meta["direction"], {d: r["bpb"] for d, r in results.items()}


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
