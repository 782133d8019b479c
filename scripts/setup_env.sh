#!/usr/bin/env bash
# Create .venv and install the project (CPU torch, pinned) with the extras named in $1
# (comma-separated, from pyproject.toml: dev, web, hf, browser); no argument: what the pipeline needs.
# runtests.sh asks for all of them; `browser` also installs the browser itself, Debian's chromium +
# chromium-driver, with apt when we run as root and they are missing (without them the chat page's
# browser test is skipped with its reason).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
case ",$EXTRAS," in *,browser,*) ;; *) exit 0 ;; esac
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt) for the chat page's browser test"
    if ! { apt-get update -qq >/dev/null 2>&1 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; then
        echo "warning: could not install chromium; the browser test will be skipped"
    fi
fi
