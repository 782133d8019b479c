"""Learning-rate sweep: which Muon and AdamW learning rates train our models best on a fixed budget.

    python -m scripts.lr_sweep --depths=2,4 --directions=forward,backward --num_iterations=250
    python -m scripts.lr_sweep --stage=confirm --directions=backward --configs="original:0.04:0.2:0.004"

Each configuration is one real `scripts.base_train` run, scored by its final validation bpb; rows
are appended to `--out` (JSON lines), so an interrupted sweep loses nothing. Method (a coordinate
sweep: Muon, then embedding, then head lr) and results: docs/LR_SWEEP.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from nanochat.common import UserError, add_flag, get_base_dir, print0, run_main
from nanochat.direction import DIRECTIONS, default_generation_direction, parse_directions

MATRIX_GRID = ("original:0.01", "original:0.02", "original:0.04", "original:0.08",
               "match_rms_adamw:0.005", "match_rms_adamw:0.01", "match_rms_adamw:0.02")
DEFAULTS = {"matrix_lr_scaling": "original", "matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004}


def build_parser():
    p = argparse.ArgumentParser(description="Sweep learning rates with real base_train runs")
    add_flag(p, "depths", default="2,4", help="comma list of depths")
    add_flag(p, "directions", default="forward", help="comma list of forward, backward, bidirectional")
    add_flag(p, "stage", default="all", choices=("all", "matrix", "embedding", "unembedding", "confirm", "table"),
             help="table: print the table of the results file only")
    add_flag(p, "matrix_grid", default=",".join(MATRIX_GRID), help="scaling:lr pairs for stage 1")
    add_flag(p, "embedding_grid", default="0.1,0.4,0.8")
    add_flag(p, "unembedding_grid", default="0.002,0.008,0.016")
    add_flag(p, "configs", default="", help="--stage=confirm: scaling:matrix_lr:embedding_lr:unembedding_lr;...")
    add_flag(p, "num_iterations", type=int, default=250)
    add_flag(p, "max_seq_len", type=int, default=128)
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "total_batch_size", type=int, default=1024)
    add_flag(p, "eval_tokens", type=int, default=40000, help="validation tokens scored (the same documents every run)")
    add_flag(p, "seed", type=int, default=42)
    add_flag(p, "out", default="", help="JSON-lines results file (default $NANOCHAT_BASE_DIR/lr_sweep/results.jsonl)")
    add_flag(p, "timeout", type=int, default=3600, help="seconds per run")
    return p


def _load(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["key"]: row for row in rows}


def run_one(depth, direction, cfg, args, done, out):
    """Final validation bpb of one base_train run (cached in `out` by configuration)."""
    key = json.dumps([depth, direction, cfg["matrix_lr_scaling"], cfg["matrix_lr"], cfg["embedding_lr"],
                      cfg["unembedding_lr"], args.num_iterations, args.max_seq_len, args.total_batch_size, args.seed])
    if key in done:
        return done[key]["bpb"]
    tag = f"lrsweep_{os.getpid()}_{len(done)}_{int(time.time())}"  # its checkpoints are deleted after the run
    flags = dict(direction=direction, depth=depth, max_seq_len=args.max_seq_len,
                 device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
                 num_iterations=args.num_iterations, **cfg, seed=args.seed, eval_tokens=args.eval_tokens,
                 eval_every=-1, sample_every=-1, log_every=50, model_tag=tag, research_log=0)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *(f"--{k}={v}" for k, v in flags.items())],
                          capture_output=True, text=True, timeout=args.timeout)
    shutil.rmtree(os.path.join(get_base_dir(), "base_checkpoints", tag), ignore_errors=True)
    final = [line for line in proc.stdout.splitlines() if line.startswith("final: ")]
    if proc.returncode != 0 or not final:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print0(f"  run failed (exit {proc.returncode}): {' | '.join(tail)}")
        bpb = float("nan")
    else:
        bpb = json.loads(final[-1][len("final: "):]).get(f"val_bpb_{default_generation_direction(direction)}")
    row = dict(key=key, depth=depth, direction=direction, **cfg, bpb=bpb, seconds=round(time.time() - t0, 1))
    if bpb == bpb:  # a failed run is not recorded: a rerun tries it again
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[key] = row
    print0(f"  depth {depth} {direction:8s} {cfg['matrix_lr_scaling']:>15s} matrix {cfg['matrix_lr']:<6} "
           f"emb {cfg['embedding_lr']:<5} unemb {cfg['unembedding_lr']:<6} -> val bpb {bpb:.4f} ({row['seconds']:.0f}s)")
    return bpb


def _floats(spec, name):
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name}={spec!r}: use a comma list of numbers")


def sweep(depth, direction, args, done, out):
    def best(configs):  # the lowest final bpb; a failed run (NaN) is skipped
        scored = [(run_one(depth, direction, c, args, done, out), c) for c in configs]
        finite = [(bpb, c) for bpb, c in scored if bpb == bpb]
        if not finite:
            raise UserError("every run of this stage failed; see the messages above")
        return min(finite, key=lambda t: t[0])[1]

    cfg = dict(DEFAULTS)
    stages = ("matrix", "embedding", "unembedding") if args.stage == "all" else (args.stage,)
    if "matrix" in stages:
        pairs = [pair.partition(":") for pair in args.matrix_grid.split(",")]
        cfg = best([dict(cfg, matrix_lr_scaling=scaling, matrix_lr=float(lr)) for scaling, _, lr in pairs])
    for stage, name in (("embedding", "embedding_lr"), ("unembedding", "unembedding_lr")):
        if stage in stages:
            grid = sorted(set(_floats(getattr(args, f"{stage}_grid"), f"{stage}_grid") + [cfg[name]]))
            cfg = best([dict(cfg, **{name: v}) for v in grid])
    return cfg


def confirm(depth, direction, args, done, out):
    for spec in filter(None, args.configs.split(";")):
        parts = spec.split(":")
        if len(parts) != 4:
            raise UserError(f"--configs entry {spec!r}: use scaling:matrix_lr:embedding_lr:unembedding_lr")
        cfg = dict(matrix_lr_scaling=parts[0], matrix_lr=float(parts[1]), embedding_lr=float(parts[2]),
                   unembedding_lr=float(parts[3]))
        run_one(depth, direction, cfg, args, done, out)


def print_table(rows):
    print0("\n| depth | direction | Muon scaling | matrix lr | embedding lr | unembedding lr | val bpb |")
    print0("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["depth"], r["direction"], r["bpb"] if r["bpb"] == r["bpb"] else 1e9)):
        print0(f"| {r['depth']} | {r['direction']} | {r['matrix_lr_scaling']} | {r['matrix_lr']} | {r['embedding_lr']} "
               f"| {r['unembedding_lr']} | {r['bpb']:.4f} |")


def main(argv=None):
    args = build_parser().parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    directions = parse_directions(args.directions, allowed=DIRECTIONS)
    if args.stage == "confirm" and not args.configs:
        raise UserError("--stage=confirm needs --configs")
    out = args.out or os.path.join(get_base_dir(), "lr_sweep", "results.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    done = _load(out)
    if args.stage == "table":
        if not done:
            raise UserError(f"no results in {out}")
        print_table(done.values())
        return
    print0(f"lr sweep on {get_base_dir()}: results in {out} ({len(done)} earlier runs reused)")
    mine = []
    for depth in depths:
        for direction in directions:
            if args.stage == "confirm":
                confirm(depth, direction, args, done, out)
            else:
                best = sweep(depth, direction, args, done, out)
                print0(f"best at depth {depth}, {direction}: {best}")
            mine += [r for r in done.values() if r["depth"] == depth and r["direction"] == direction]
    print_table({r["key"]: r for r in mine}.values())


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
