"""Evaluate base checkpoints, the same way in every direction (docs/DESIGN.md §3, §7).

    python -m scripts.base_eval --eval=bpb --model_tag=d4_backward --eval_directions=forward,backward
    python -m scripts.base_eval --model_tag=fwd,bwd,bidi      # prints the cross-direction bpb matrix
    python -m scripts.base_eval --eval=core --model_tag=fwd --max_per_task=500
    python -m scripts.base_eval --eval=bpb,core,consistency --model_tag=fwd,bwd,bidi

--eval is a comma list of:
  bpb          bits per byte on the validation documents in each requested direction, the same
               documents for every direction (nanochat/loss_eval.py).
  core         the CORE-style few-shot benchmark scored by whole-text likelihood in each requested
               direction, with the centred-accuracy aggregate (nanochat/core_eval.py). The task
               bundle is downloaded once to $NANOCHAT_BASE_DIR/eval_bundle/ (or --bundle_dir).
  consistency  per-document bpb forward vs backward (nanochat/consistency.py): a bidirectional
               model's two readings, and each forward/backward pair among the tags (the i-th
               forward-trained tag with the i-th backward-trained one).

A one-way model is scored in the other direction too (the cross direction): its rows simply
carry no marker. Results are printed and written as JSON to the run's `evaluations/` directory
(beside the checkpoints): bpb_step<step>.json, core_step<step>.json,
consistency_step<step>.json (+ .png), consistency_pair_<backward tag>_step<step>.json (+ .png, in
the forward model's run). An existing file is never replaced without --overwrite, and every
output path is checked before any model is evaluated.
"""

import argparse
import math
import os
import sys
from datetime import datetime, timezone

from nanochat.phases import PHASE_NAMES
from nanochat.checkpoint_manager import artifact_dirs, load_meta, load_model, resolve_checkpoint
from nanochat.common import UserError, add_flag, compute_cleanup, compute_init, print0, run_main
from nanochat.consistency import (consistency_evaluation_path, consistency_record, format_stats, per_document_bpb,
                                  write_consistency)
from nanochat.core_eval import BUNDLE_URL, CoreBenchmark, core_evaluation_path, format_table, write_record
from nanochat.direction import DirectionSpec, is_two_way, parse_directions
from nanochat.loss_eval import arrow_of_time_gap, bpb_evaluation_path, evaluate_bpb, select_documents
from nanochat.tokenizer import get_token_bytes
from nanochat.training import autocast_context

SOURCES = PHASE_NAMES
EVALS = ("bpb", "core", "consistency")


def format_matrix(rows):
    """rows: [(label, trained_direction, {direction: bpb})] -> a text table with the gap."""
    lines = [f"{'model':<28} {'trained':<14} {'bpb fwd':>9} {'bpb bwd':>9} {'gap':>8}"]
    for label, trained, bpb in rows:
        f, b = bpb.get("forward"), bpb.get("backward")
        gap = f"{100 * (b - f) / f:+.1f}%" if f and b else "-"
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        lines.append(f"{label:<28} {trained:<14} {fmt(f):>9} {fmt(b):>9} {gap:>8}")
    return "\n".join(lines)


def parse_evals(spec):
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    unknown = [n for n in names if n not in EVALS]
    if not names or unknown:
        raise UserError(f"--eval={spec!r}: use a comma list of {', '.join(EVALS)}")
    return list(dict.fromkeys(names))


def build_parser():
    parser = argparse.ArgumentParser(description="Evaluate base checkpoints in each direction: bpb, CORE, consistency")
    add_flag(parser, "eval", default="bpb", help=f"comma list of {', '.join(EVALS)}")
    add_flag(parser, "source", default="base", help="checkpoint source: base | mid | sft | rl")
    add_flag(parser, "model_tag", default=None, help="one tag or a comma list (default: newest)")
    add_flag(parser, "step", type=int, default=None, help="checkpoint step (default: last)")
    add_flag(parser, "eval_directions", default="forward,backward",
             help="comma list of forward, backward (bpb and core; consistency always reads both)")
    add_flag(parser, "eval_tokens", type=int, default=20 * 524288, help="validation text tokens to score (bpb, consistency)")
    add_flag(parser, "max_seq_len", type=int, default=-1, help="context per row (-1 = the checkpoint's)")
    add_flag(parser, "device_batch_size", type=int, default=32)
    add_flag(parser, "max_per_task", type=int, default=-1, help="core: items per task, the first of each file (-1 = all)")
    add_flag(parser, "core_tasks", default="", help="core: comma list of task labels (empty = every task of the bundle)")
    add_flag(parser, "bundle_dir", default="", help="core: an unpacked bundle (default: $NANOCHAT_BASE_DIR/eval_bundle, "
                                                    "downloaded on first use)")
    add_flag(parser, "bundle_url", default=BUNDLE_URL, help="core: where the bundle zip is downloaded from")
    add_flag(parser, "device_type", default="")
    add_flag(parser, "overwrite", action="store_true", help="replace existing evaluation files")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    evals = parse_evals(args.eval)
    if args.source not in SOURCES:
        raise UserError(f"unknown --source {args.source!r}: use one of {', '.join(SOURCES)}")
    if args.eval_tokens <= 0 or args.device_batch_size <= 0:
        raise UserError("--eval_tokens and --device_batch_size must be positive")
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise UserError("--max_per_task must be positive (or -1 for every item)")
    directions = parse_directions(args.eval_directions)
    tags = [t.strip() for t in args.model_tag.split(",")] if args.model_tag else [None]
    plan = plan_outputs(args, evals, tags)
    core = None
    if "core" in evals:
        labels = [s.strip() for s in args.core_tasks.split(",") if s.strip()]
        core = CoreBenchmark.prepare(args.bundle_dir or None, args.bundle_url, args.max_per_task, labels)
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        rows, docs_cache, per_doc = [], {}, {}
        for entry in plan["models"]:
            row = evaluate_one(args, entry, evals, directions, rank, world_size, device, docs_cache, core, per_doc)
            if row is not None:
                rows.append(row)
        if rows and (len(rows) > 1 or len(directions) > 1):
            print0("\n" + format_matrix(rows))
        for fwd, bwd, path in plan["pairs"]:
            pair_consistency(args, fwd, bwd, path, per_doc, rank)
    finally:
        compute_cleanup()


def plan_outputs(args, evals, tags):
    """Resolve every checkpoint (metadata only) and every output path, and refuse before any
    work if one exists without --overwrite (or if consistency has nothing to compare)."""
    models, outputs = [], []
    for tag in tags:
        directory, step, tag = resolve_checkpoint(args.source, tag, args.step)
        meta = load_meta(directory, step)
        evaluations = artifact_dirs(args.source, tag)["evaluations"]
        entry = {"tag": tag, "step": step, "direction": meta["direction"], "evaluations": evaluations, "paths": {}}
        if "bpb" in evals:
            entry["paths"]["bpb"] = bpb_evaluation_path(evaluations, step)
        if "core" in evals:
            entry["paths"]["core"] = core_evaluation_path(evaluations, step)
        if "consistency" in evals and is_two_way(meta["direction"]):
            entry["paths"]["consistency"] = consistency_evaluation_path(evaluations, step)
        outputs += entry["paths"].values()
        models.append(entry)
    pairs = []
    if "consistency" in evals:
        forwards = [m for m in models if m["direction"] == "forward"]
        backwards = [m for m in models if m["direction"] == "backward"]
        for fwd, bwd in zip(forwards, backwards):
            path = consistency_evaluation_path(fwd["evaluations"], fwd["step"], pair_tag=bwd["tag"])
            pairs.append((fwd, bwd, path))
            outputs.append(path)
        if not pairs and not any(is_two_way(m["direction"]) for m in models):
            raise UserError("--eval=consistency needs a bidirectional model or a forward and a backward model "
                            "together (--model_tag=<forward tag>,<backward tag>): a one-way model has one reading")
    existing = [p for p in outputs if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
    return {"models": models, "pairs": pairs}


def _atomic_json(path, record, rank):
    if rank == 0:
        write_record(path, record)
        print0(f"wrote {path}")


def evaluate_one(args, entry, evals, directions, rank, world_size, device, docs_cache, core, per_doc):
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=entry["tag"], step=entry["step"])
    trained_len = meta["model_config"]["sequence_len"]
    T = trained_len if args.max_seq_len == -1 else args.max_seq_len
    if T <= 0:
        raise UserError(f"--max_seq_len={args.max_seq_len}: use a positive context (at most {trained_len}, the "
                        "checkpoint's training context) or -1 for the checkpoint's")
    if T > trained_len:
        raise UserError(f"--max_seq_len={args.max_seq_len} is larger than the checkpoint supports "
                        f"({trained_len}, its training context); use at most {trained_len}")
    step, tag, trained = meta["step"], meta["model_tag"], meta["direction"]
    autocast = autocast_context(device.type)
    common = {"source": args.source, "model_tag": tag, "step": step, "trained_direction": trained, "max_seq_len": T,
              "created_at": datetime.now(timezone.utc).isoformat()}
    if "bpb" in evals or "consistency" in evals:
        if args.eval_tokens not in docs_cache:
            docs_cache[args.eval_tokens] = select_documents(tokenizer, args.eval_tokens, "val", rank, world_size)
        docs = docs_cache[args.eval_tokens]
        token_bytes = get_token_bytes(device)
    row = None
    if "bpb" in evals:
        results = evaluate_bpb(model, tokenizer, token_bytes, docs, directions, trained, T,
                               args.device_batch_size, device, autocast)
        gap = arrow_of_time_gap(results)
        for d, r in results.items():
            print0(f"{tag} (trained {trained}) step {step}: bpb {d} = {r['bpb']:.4f} "
                   f"({r['tokens']:,} tokens, {r['bytes']:,} bytes, {r['documents']} documents)")
        if gap is not None:
            print0(f"{tag}: arrow-of-time gap (bwd - fwd) / fwd = {100 * gap:+.2f}%")
        _atomic_json(entry["paths"]["bpb"], dict(common, eval="bpb", split="val", eval_tokens=args.eval_tokens,
                                                 results=results, arrow_of_time_gap=gap), rank)
        bad = [d for d, r in results.items() if not math.isfinite(r["bpb"])]
        if bad:  # recorded (it is the result), but a NaN is a failed evaluation: exit non-zero
            raise UserError(f"{tag}: bpb {', '.join(bad)} is not finite ({entry['paths']['bpb']}); the weights or "
                            "the evaluation data are broken")
        row = (tag, trained, {d: r["bpb"] for d, r in results.items()})
    if "core" in evals:
        results = core.evaluate(model, tokenizer, trained, directions, device, T, args.device_batch_size,
                                autocast, rank, world_size)
        print0(f"\n{tag} (trained {trained}) step {step}: CORE\n" + format_table(results))
        _atomic_json(entry["paths"]["core"], dict(common, eval="core", bundle_dir=core.bundle_dir,
                                                  max_per_task=args.max_per_task, **results), rank)
    if "consistency" in evals:
        # A one-way model is read in its own direction only here: it is half of a pair.
        native = DirectionSpec.for_model(meta, tokenizer).generation_directions()
        readings = {d: per_document_bpb(model, tokenizer, token_bytes, docs, trained, d, T, args.device_batch_size,
                                        device, autocast) for d in native}
        per_doc[tag] = readings
        if is_two_way(trained):
            record = consistency_record(trained, readings["forward"], readings["backward"],
                                        readings["forward"][1], label=tag, eval_tokens=args.eval_tokens, **common)
            print0(format_stats(f"{tag} consistency (one model, two readings)", record["stats"]))
            if rank == 0:
                write_consistency(entry["paths"]["consistency"], record, f"{tag} (bidirectional), step {step}")
                print0(f"wrote {entry['paths']['consistency']}")
    return row


def pair_consistency(args, fwd, bwd, path, per_doc, rank):
    forward, backward = per_doc[fwd["tag"]]["forward"], per_doc[bwd["tag"]]["backward"]
    label = f"{fwd['tag']} + {bwd['tag']}"
    record = consistency_record("pair", forward, backward, forward[1], label=label, source=args.source,
                                forward_model=fwd["tag"], forward_step=fwd["step"], backward_model=bwd["tag"],
                                backward_step=bwd["step"], eval_tokens=args.eval_tokens,
                                created_at=datetime.now(timezone.utc).isoformat())
    print0(format_stats(f"{label} consistency (forward model vs backward model)", record["stats"]))
    if rank == 0:
        write_consistency(path, record, f"{label}: forward model vs backward model")
        print0(f"wrote {path}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
