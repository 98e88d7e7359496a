#!/usr/bin/env bash
# Create .venv and install dbrx-lab with its dev tools. Idempotent; safe to re-run. Works on Linux and macOS.
# torch==2.13.0 is installed first, the build chosen for the machine by scripts/torch_choice.sh: the local
# wheel on this project's machines, the CUDA build where an NVIDIA GPU answers, PyTorch's CPU wheel elsewhere
# (a plain `pip install torch` on Linux fetches the CUDA build and ~20 nvidia packages); DBRX_LAB_TORCH=
# cpu|cuda|local|pypi|<index URL> overrides it.
# Once installed, a stamp (.venv/.dbrx-lab-setup: a hash of pyproject.toml and the set-up scripts) makes a re-run a
# no-op without any pip call, so `make lab` starts offline; editing those files, deleting the stamp or
# asking for another torch build with DBRX_LAB_TORCH reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.dbrx-lab-setup
TORCH_STAMP=.venv/.dbrx-lab-torch            # the torch build installed (torch_choice's answer)
. scripts/torch_choice.sh

setup_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        cat pyproject.toml scripts/setup.sh scripts/torch_choice.sh | sha256sum | cut -d' ' -f1
    else
        cat pyproject.toml scripts/setup.sh scripts/torch_choice.sh | shasum -a 256 | cut -d' ' -f1     # macOS
    fi
}

installed_torch() { cat "$TORCH_STAMP" 2>/dev/null || true; }

WANT="$(setup_hash)"
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
        && { [ -z "${DBRX_LAB_TORCH:-}" ] || [ "$DBRX_LAB_TORCH" = "$(installed_torch)" ]; }; then
    echo ".venv is up to date (delete $STAMP to reinstall)"
else
    if [ ! -x .venv/bin/python ]; then
        "$PYTHON" -m venv .venv
    fi
    rm -f "$STAMP"
    .venv/bin/python -m pip install -q --upgrade pip
    CHOICE="$(torch_choice .venv/bin/python)"
    echo "installing $(torch_describe "$CHOICE")"
    if [ -n "$(installed_torch)" ] && [ "$(installed_torch)" != "$CHOICE" ]; then
        # pip counts 2.13.0+cpu as satisfying torch==2.13.0: remove the other build first
        .venv/bin/python -m pip uninstall -q -y torch
    fi
    # shellcheck disable=SC2046  # one argument per line, none with spaces
    .venv/bin/python -m pip install -q $(torch_pip_args "$CHOICE")
    echo "$CHOICE" > "$TORCH_STAMP"
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$WANT" > "$STAMP"                    # written only after every install succeeded
fi
if [ "${1:-}" = "--browser" ]; then
    # Chromium for the browser tests (playwright's own browser download does not work offline): Debian's
    # package where apt-get exists; elsewhere the tests skip, saying what to install.
    CHROMIUM="${DBRX_LAB_CHROMIUM:-/usr/bin/chromium}"
    if [ ! -x "$CHROMIUM" ]; then
        if [ -z "${DBRX_LAB_CHROMIUM:-}" ] && [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then
            SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
            $SUDO apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
        else
            echo "No Chromium at $CHROMIUM (and no apt-get to install it): the browser tests will be skipped." \
                 "Install Chromium (macOS: brew install --cask chromium; other Linux: your package manager's" \
                 "chromium) and set DBRX_LAB_CHROMIUM to its executable" \
                 "(macOS: /Applications/Chromium.app/Contents/MacOS/Chromium)." >&2
        fi
    fi
fi
