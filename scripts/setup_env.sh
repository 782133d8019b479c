#!/usr/bin/env bash
# Create .venv and install the project with everything its tests use (CPU torch, pinned):
# dev (pytest), web (the chat page's server and test client), hf (the Hugging Face export and its
# round-trip test), browser (Selenium for the chat page's end-to-end test). The browser itself is
# Debian's chromium + chromium-driver, installed with apt when we run as root and they are missing;
# without them that one test is skipped with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev,web,hf,browser]"
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt) for the chat page's browser test"
    if ! { apt-get update -qq >/dev/null 2>&1 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; then
        echo "warning: could not install chromium; the browser test will be skipped"
    fi
fi
