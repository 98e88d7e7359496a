#!/usr/bin/env bash
# Create .venv and install dbrx-lab with its dev tools. Idempotent; safe to re-run.
# torch==2.13.0 is installed first: it is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
if [ "${1:-}" = "--browser" ]; then
    # Debian's Chromium for the browser tests (playwright's own browser download does not work offline).
    if [ ! -x /usr/bin/chromium ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    fi
fi
