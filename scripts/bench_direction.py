"""Benchmark: training throughput per direction at one shape, with the real data path.

    python -m scripts.bench_direction --depth=4 --max_seq_len=256 --device_batch_size=8 --steps=10
    python -m scripts.bench_direction --depth=20 --max_seq_len=2048 --device_batch_size=32   # one GPU
    bash scripts/gpu_bench.sh       # the GPU table of depth 12 and 20, every direction (see that file)

Needs shards and a tokenizer. Each direction trains on the real loader behind the prefetcher, as
scripts.base_train does: tok/s and MFU, the step split into data / forward+backward / optimizer
(`--split_steps`, synchronised between phases), peak memory (on CPU the process's peak RSS, which only
grows) and the loader's own tok/s. Direction should cost nothing in the model: only the data differs.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from nanochat.common import UserError, add_flag, compute_init, print0, run_main
from nanochat.direction import DIRECTIONS, parse_directions
from nanochat.direction_dataloader import direction_aware_dataloader
from nanochat.gpt import GPT, config_for_depth
from nanochat.prefetch import prefetching
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Trainer


def bench_loader(tokenizer, B, T, direction, batches, threads, shuffle):
    loader = direction_aware_dataloader(B, T, "train", direction, tokenizer_threads=threads, device="cpu",
                                        tokenizer=tokenizer, rank=0, world_size=1, shuffle=shuffle)
    next(loader)  # first fill of the packing buffer is not steady state
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return B * T * batches / (time.perf_counter() - t0)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def bench_training(tokenizer, args, direction, device):
    B, T = args.device_batch_size, args.max_seq_len
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(args.depth, tokenizer.get_vocab_size(), T), device)
    model.chunked_loss = bool(args.chunked_loss)
    optimizers = model.setup_optimizers()
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    loader = direction_aware_dataloader(B, T, "train", direction, tokenizer_threads=args.tokenizer_threads,
                                        device="cpu" if args.prefetch else device, tokenizer=tokenizer,
                                        rank=0, world_size=1, shuffle=bool(args.shuffle))
    batches = prefetching(loader, args.prefetch, device)
    total = args.warmup_steps + args.steps + args.split_steps
    # No schedule: every measured step runs at the full learning rate.
    trainer = Trainer(train_model, optimizers, batches, 1, B * T, device, flops_per_token=model.estimate_flops())
    t_first = time.perf_counter()
    for step in range(args.warmup_steps):
        trainer.step(step)
        if step == 0:
            first_step_s = time.perf_counter() - t_first  # includes compilation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [trainer.step(step) for step in range(args.warmup_steps, args.warmup_steps + args.steps)]
    split = [trainer.step(step, timing=True) for step in range(args.warmup_steps + args.steps, total)]
    if hasattr(batches, "close"):
        batches.close()
    dts = [m["dt"] for m in timed]
    tok_per_s = B * T * len(dts) / sum(dts)
    median = (lambda key: statistics.median(m[key] for m in split)) if split else (lambda key: float("nan"))
    row = {
        "direction": direction, "depth": args.depth, "B": B, "T": T, "compile": use_compile,
        "prefetch": args.prefetch, "chunked_loss": bool(args.chunked_loss), "params": model.num_params(),
        "tok_per_s": tok_per_s, "step_s_median": statistics.median(dts),
        "mfu": (model.estimate_flops() * tok_per_s / trainer.peak_flops) if trainer.peak_flops else None,
        "data_wait_s": median("dt_data"), "fwd_bwd_s": median("dt_fwd_bwd"), "optim_s": median("dt_optim"),
        "data_wait_s_unsplit": statistics.median(m["dt_data"] for m in timed),
        "peak_mem_gb": peak_memory_gb(device), "first_step_s": first_step_s if args.warmup_steps else None,
        "final_loss": timed[-1]["loss"],
    }
    del trainer, train_model, model, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description="Throughput of training (real data path) and data loading per direction")
    add_flag(p, "depth", type=int, default=4)
    add_flag(p, "max_seq_len", type=int, default=256)
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "steps", type=int, default=10, help="optimizer steps timed like training, per direction")
    add_flag(p, "split_steps", type=int, default=3, help="further steps synchronised between phases for the split")
    add_flag(p, "warmup_steps", type=int, default=3, help="untimed steps first (compilation, caches)")
    add_flag(p, "loader_batches", type=int, default=50, help="batches for the loader-only benchmark (0 = skip)")
    add_flag(p, "tokenizer_threads", type=int, default=4)
    add_flag(p, "shuffle", type=int, default=1, help="1: documents in a seeded order per epoch; 0: storage order")
    add_flag(p, "prefetch", type=int, default=2, help="batches prepared ahead, as base_train (0 = off)")
    add_flag(p, "chunked_loss", type=int, default=1, help="1: loss without whole-batch logits; 0: plain path")
    add_flag(p, "directions", default=",".join(DIRECTIONS), help="comma-separated subset to run")
    add_flag(p, "device_type", default="")
    add_flag(p, "compile", type=int, default=-1, help="torch.compile the model (-1 = on for cuda)")
    add_flag(p, "out", default="", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    directions = parse_directions(args.directions, DIRECTIONS)
    if args.steps < 1 or args.warmup_steps < 0 or args.split_steps < 0 or args.prefetch < 0:
        raise UserError("--steps must be >= 1; --warmup_steps, --split_steps and --prefetch >= 0")
    _, _, _, _, device = compute_init(args.device_type)
    tokenizer = get_tokenizer()
    B, T = args.device_batch_size, args.max_seq_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print0(f"device={device} ({name}) depth={args.depth} B={B} T={T} vocab={tokenizer.get_vocab_size()} "
           f"torch={torch.__version__} threads={torch.get_num_threads()} prefetch={args.prefetch} "
           f"chunked_loss={args.chunked_loss}")
    rows = []
    for direction in directions:
        row = bench_training(tokenizer, args, direction, device)
        row["loader_tok_per_s"] = (bench_loader(tokenizer, B, T, direction, args.loader_batches, args.tokenizer_threads,
                                                   bool(args.shuffle))
                                   if args.loader_batches > 0 else None)
        rows.append(row)
        print0(f"{direction}: {row['tok_per_s']:,.0f} tok/s" + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else "")
               + f", step {1000 * row['step_s_median']:.0f} ms (data {1000 * row['data_wait_s']:.1f} / "
               f"fwd+bwd {1000 * row['fwd_bwd_s']:.0f} / optim {1000 * row['optim_s']:.0f} ms), "
               f"peak {row['peak_mem_gb']:.2f} GB, first step {row['first_step_s'] or 0:.1f} s")
    base = rows[0]["tok_per_s"]
    print0(f"\nparams {rows[0]['params']:,}")
    print0(f"{'direction':<14} {'tok/s':>10} {'vs first':>8} {'MFU':>6} {'step ms':>8} {'data ms':>8} "
           f"{'fwd+bwd ms':>10} {'optim ms':>9} {'peak GB':>8} {'loader tok/s':>13}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        loader = f"{r['loader_tok_per_s']:,.0f}" if r["loader_tok_per_s"] else "-"
        print0(f"{r['direction']:<14} {r['tok_per_s']:>10,.0f} {100 * (r['tok_per_s'] / base - 1):>+7.1f}% {mfu:>6} "
               f"{1000 * r['step_s_median']:>8.0f} {1000 * r['data_wait_s']:>8.1f} {1000 * r['fwd_bwd_s']:>10.0f} "
               f"{1000 * r['optim_s']:>9.0f} {r['peak_mem_gb']:>8.2f} {loader:>13}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
