#!/usr/bin/env bash
# Quick start: set up .venv and run the test suite (CPU only, offline, a few minutes).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh dev,web,hf,browser
.venv/bin/python -m pytest "$@"
