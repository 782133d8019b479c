"""Benchmark: the research log's time per `log_step` (8 scalars, as Python floats and as 0-d CPU tensors,
closing included) and the file growth per 1,000 steps: `python -m scripts.bench_logger --steps=20000`.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from nanochat.common import add_flag, run_main
from nanochat.research_logger import ResearchLogger, read_scalar

SCALARS = ["train/loss", "train/loss_smooth", "lrm", "grad_norm", "dt", "tok_per_sec", "mfu",
           "total_training_flops"]


def measure(num_steps, flush_every, use_tensors):
    """(µs per log_step, bytes per 1,000 steps, file bytes) for `num_steps` steps."""
    values = np.random.default_rng(0).random((num_steps, len(SCALARS)))
    if use_tensors:
        import torch
        rows = [dict(zip(SCALARS, row.unbind(0))) for row in torch.from_numpy(values)]
    else:
        rows = [dict(zip(SCALARS, v.tolist())) for v in values]
    with tempfile.TemporaryDirectory() as tmp:
        empty = ResearchLogger(os.path.join(tmp, "empty"), flush_every=flush_every)
        empty.close()
        empty_size = os.path.getsize(empty.path)
        logger = ResearchLogger(os.path.join(tmp, "bench"), flush_every=flush_every)
        t0 = time.perf_counter()
        for step, metrics in enumerate(rows):
            logger.log_step(step, metrics)
        logger.close()
        elapsed = time.perf_counter() - t0
        size = os.path.getsize(logger.path)
        if read_scalar(logger.path, "mfu").shape != (num_steps,):  # what was written reads back
            raise RuntimeError("the benchmark log does not read back the steps it logged")
    return elapsed / num_steps * 1e6, (size - empty_size) / num_steps * 1000, size


def main(argv=None):
    p = argparse.ArgumentParser(description="Time ResearchLogger.log_step and measure the file size")
    add_flag(p, "steps", type=int, default=20000, help="steps to log")
    add_flag(p, "flush_every", type=int, default=100, help="rows per block")
    args = p.parse_args(argv)
    for kind, use_tensors in (("Python floats", False), ("0-d torch tensors (CPU)", True)):
        us, per_1000, total = measure(args.steps, args.flush_every, use_tensors)
        print(f"{kind:>24}: {us:6.2f} µs per log_step ({len(SCALARS)} scalars, flush_every={args.flush_every}, "
              f"{args.steps} steps, close included); {per_1000 / 1024:.1f} KiB per 1,000 steps "
              f"(file {total / 1024:.0f} KiB)")


if __name__ == "__main__":
    run_main(main)
