#!/usr/bin/env bash
# Quick start, CPU only and offline: set up .venv, then run the whole pipeline on the built-in
# corpus (Python's standard library): tokenizer -> an arrow-of-time study (forward and backward
# models, two seeds) and a bidirectional model -> bits-per-byte matrix -> report. About 10 minutes
# on 2 cores. Outputs go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh   # the pipeline's dependencies only (runtests.sh adds the tests' extras and browser)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
.venv/bin/python -m scripts.cpu_pipeline "$@"
