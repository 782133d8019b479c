"""Helper for tests/test_research_logger.py: log steps forever, announcing each flushed block.

    python tests/_killed_writer.py <experiment_dir> <flush_every>

Prints "flushed <step>" (flushed to stdout) each time a block reaches the file, so the test can
SIGKILL this process at a known point and check what a reader still finds.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.research_logger import ResearchLogger  # noqa: E402


def main():
    experiment_dir, flush_every = sys.argv[1], int(sys.argv[2])
    logger = ResearchLogger(experiment_dir, phase="base_training", flush_every=flush_every)
    announced = None
    step = 0
    while True:
        logger.log_step(step, {"loss": 1.0 / (step + 1), "lr": 0.01, "grad_norm": {"layer0": float(step)}})
        flushed = logger._last_flushed_step  # the last step on disk: what a reader finds after the kill
        if flushed != announced:
            announced = flushed
            print(f"flushed {announced}", flush=True)
        step += 1
        time.sleep(0.0005)  # keep the loop (and the moment of the kill) inside ordinary work


if __name__ == "__main__":
    main()
