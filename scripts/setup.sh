#!/usr/bin/env bash
# Create .venv and install dbrx-lab with its dev tools. Idempotent; safe to re-run.
# torch==2.13.0 is installed first: it is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
# Once installed, a stamp (.venv/.dbrx-lab-setup: a hash of pyproject.toml and this script) makes a re-run a
# no-op without any pip call, so `make lab` starts offline; editing either file (or deleting the stamp) reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.dbrx-lab-setup

setup_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
    else
        cat pyproject.toml scripts/setup.sh | shasum -a 256 | cut -d' ' -f1     # macOS
    fi
}

WANT="$(setup_hash)"
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo ".venv is up to date (delete $STAMP to reinstall)"
else
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    rm -f "$STAMP"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$WANT" > "$STAMP"                    # written only after every install succeeded
fi
if [ "${1:-}" = "--browser" ]; then
    # Debian's Chromium for the browser tests (playwright's own browser download does not work offline).
    if [ ! -x /usr/bin/chromium ]; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
    fi
fi
