"""Benchmark: training throughput per direction at one shape, and dataloader throughput.

    python -m scripts.bench_direction --depth=4 --max_seq_len=256 --device_batch_size=8 --steps=10
    python -m scripts.bench_direction --depth=20 --max_seq_len=2048 --device_batch_size=32   # one GPU

Needs shards and a tokenizer in $NANOCHAT_BASE_DIR (`python -m nanochat.dataset --builtin`,
`python -m scripts.tok_train`). Prints, in one run: training tok/s (and MFU on a GPU) for
forward, backward and bidirectional, and dataloader tok/s (tokenize + orient + pack) for each.
Direction should cost nothing in the model: only the data differs.
"""

import argparse
import sys
import time

import torch

from nanochat.common import add_flag, compute_init, print0, run_main
from nanochat.direction import DIRECTIONS
from nanochat.direction_dataloader import direction_aware_dataloader
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Trainer


def bench_loader(tokenizer, B, T, direction, batches, threads):
    loader = direction_aware_dataloader(B, T, "train", direction, tokenizer_threads=threads, device="cpu",
                                        tokenizer=tokenizer, rank=0, world_size=1)
    next(loader)  # first fill of the packing buffer is not steady state
    t0 = time.time()
    for _ in range(batches):
        next(loader)
    return B * T * batches / (time.time() - t0)


def bench_training(tokenizer, args, direction, device):
    B, T = args.device_batch_size, args.max_seq_len
    torch.manual_seed(0)
    model = GPT.build(config_for_depth(args.depth, tokenizer.get_vocab_size(), T), device)
    optimizers = model.setup_optimizers()
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    loader = direction_aware_dataloader(B, T, "train", direction, tokenizer_threads=args.tokenizer_threads,
                                        device=device, tokenizer=tokenizer, rank=0, world_size=1)
    total = args.warmup_steps + args.steps
    trainer = Trainer(train_model, optimizers, loader, 1, total * 10, B * T, device,
                      flops_per_token=model.estimate_flops())
    for step in range(args.warmup_steps):
        trainer.step(step)
    dts, mfus = [], []
    for step in range(args.warmup_steps, total):
        m = trainer.step(step)
        dts.append(m["dt"])
        if "mfu" in m:
            mfus.append(m["mfu"])
    dt = sum(dts) / len(dts)
    return B * T / dt, (sum(mfus) / len(mfus) if mfus else None), model.num_params()


def main(argv=None):
    p = argparse.ArgumentParser(description="Throughput of training and data loading per direction")
    add_flag(p, "depth", type=int, default=4)
    add_flag(p, "max_seq_len", type=int, default=256)
    add_flag(p, "device_batch_size", type=int, default=8)
    add_flag(p, "steps", type=int, default=10, help="timed optimizer steps per direction")
    add_flag(p, "warmup_steps", type=int, default=3, help="untimed steps first (compilation, caches)")
    add_flag(p, "loader_batches", type=int, default=50)
    add_flag(p, "tokenizer_threads", type=int, default=4)
    add_flag(p, "device_type", default="")
    add_flag(p, "compile", type=int, default=-1)
    args = p.parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type)
    tokenizer = get_tokenizer()
    B, T = args.device_batch_size, args.max_seq_len
    print0(f"device={device} depth={args.depth} B={B} T={T} torch={torch.__version__} threads={torch.get_num_threads()}")
    rows = []
    for direction in DIRECTIONS:
        loader_tps = bench_loader(tokenizer, B, T, direction, args.loader_batches, args.tokenizer_threads)
        train_tps, mfu, n_params = bench_training(tokenizer, args, direction, device)
        rows.append((direction, train_tps, mfu, loader_tps))
        print0(f"{direction}: train {train_tps:,.0f} tok/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")
               + f"; dataloader {loader_tps:,.0f} tok/s")
    base = rows[0][1]
    print0(f"\nparams {n_params:,}")
    print0(f"{'direction':<14} {'train tok/s':>12} {'vs fwd':>8} {'MFU':>7} {'loader tok/s':>13}")
    for direction, tps, mfu, ltps in rows:
        mfu_s = f"{100 * mfu:.1f}%" if mfu else "-"
        print0(f"{direction:<14} {tps:>12,.0f} {100 * (tps / base - 1):>+7.1f}% {mfu_s:>7} {ltps:>13,.0f}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
