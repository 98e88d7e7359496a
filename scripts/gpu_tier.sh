#!/usr/bin/env bash
# The GPU test tier: every test marked `cuda` (tests/test_cuda.py) on a real CUDA GPU, float32 and bfloat16.
#   bash scripts/gpu_tier.sh [extra pytest args]      (from anywhere; it runs in the repository root)
# Python, in this order: $PYTHON if set; else the current python3 if its torch sees a CUDA GPU; else
# .venv/bin/python if its torch does. If none does and an NVIDIA driver is present, .venv gets the CUDA
# build of torch (this needs the internet; the CPU wheel that scripts/setup.sh installs is replaced).
# Environment: GPU_TIER_TIMEOUT (seconds for the pytest run, default 480), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (default https://download.pytorch.org/whl/cu128; pick the cuXYZ your driver supports).
# Exit status: pytest's (0 = all passed); 3 no usable CUDA GPU; 4 install failed; 6 every test skipped;
# 124 timed out.
set -euo pipefail
cd "$(dirname "$0")/.."

TIMEOUT="${GPU_TIER_TIMEOUT:-480}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"   # deterministic cuBLAS (determinism test)

has_cuda_torch() {   # $1: a python; true if it imports torch and torch sees a CUDA device
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

PY=""
if [ -n "${PYTHON:-}" ]; then
    candidates=("$PYTHON")
else
    candidates=("$(command -v python3 || true)" ".venv/bin/python")
fi
for cand in "${candidates[@]}"; do
    if [ -n "$cand" ] && [ -x "$cand" ] && has_cuda_torch "$cand"; then
        PY="$cand"
        break
    fi
done

if [ -z "$PY" ]; then
    if [ -n "${PYTHON:-}" ]; then
        echo "gpu_tier: \$PYTHON=$PYTHON has no torch that sees a CUDA GPU" >&2
        exit 3
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_tier: no NVIDIA GPU or driver here (nvidia-smi fails): this tier needs a CUDA GPU" >&2
        exit 3
    fi
    echo "gpu_tier: no python with a CUDA build of torch; installing torch==$TORCH_VERSION from $TORCH_INDEX_URL into .venv"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    if .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)' >/dev/null 2>&1; then
        .venv/bin/python -m pip uninstall -y -q torch             # the CPU wheel: pip would call it satisfied
    fi
    if ! .venv/bin/python -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"; then
        echo "gpu_tier: installing the CUDA build of torch failed (offline? another cuXYZ: TORCH_INDEX_URL=...)" >&2
        exit 4
    fi
    if ! .venv/bin/python -c 'import dbrx_lab, transformers, pytest' >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q -e ".[dev]" || { echo "gpu_tier: pip install -e .[dev] failed" >&2; exit 4; }
    fi
    if ! has_cuda_torch .venv/bin/python; then
        echo "gpu_tier: .venv's torch still sees no CUDA GPU:" >&2
        .venv/bin/python -c 'import torch; print("  torch", torch.__version__, "CUDA", torch.version.cuda)' >&2 || true
        nvidia-smi >&2 || true
        exit 3
    fi
    PY=.venv/bin/python
fi

# what the tests import (dbrx_lab from this checkout: python -m puts the working directory on sys.path)
if ! "$PY" -c 'import dbrx_lab, transformers, accelerate, safetensors, pytest' 2>/tmp/gpu_tier_import.$$; then
    echo "gpu_tier: $PY lacks what the tests need:" >&2
    tail -1 /tmp/gpu_tier_import.$$ >&2
    rm -f /tmp/gpu_tier_import.$$
    echo "  install it there: $PY -m pip install -e '.[dev]'" >&2
    exit 4
fi
rm -f /tmp/gpu_tier_import.$$

"$PY" - <<'EOF'
import sys

import torch
import transformers

print(f"python       {sys.version.split()[0]} ({sys.executable})")
print(f"torch        {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"transformers {transformers.__version__}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}        {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF

report="$(mktemp -d)/gpu_tier.xml"
extra=()
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    extra+=(--timeout=300)                                      # one hung test does not eat the whole budget
fi
echo "gpu_tier: $PY -m pytest -m cuda -q tests/ (timeout ${TIMEOUT}s)"
start=$(date +%s)
set +e
timeout --kill-after=20 "$TIMEOUT" "$PY" -m pytest -m cuda -q tests/ --junitxml="$report" "${extra[@]}" "$@"
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))

echo
echo "=== GPU tier summary ==="
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "timed out after ${TIMEOUT}s (GPU_TIER_TIMEOUT raises the limit)"
    exit 124
fi
if [ ! -s "$report" ]; then
    echo "pytest exited with $rc and wrote no report (${elapsed}s)"
    exit "$rc"
fi
set +e
"$PY" - "$report" "$rc" "$elapsed" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
      f"({n['tests']} tests) in {sys.argv[3]}s; pytest exit status {sys.argv[2]}")
failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
          if c.find("failure") is not None or c.find("error") is not None]
for name in failed:
    print(f"  FAILED {name}")
if n["tests"] and passed == 0 and n["skipped"] == n["tests"]:
    print("every test skipped: does this python's torch see the GPU?")
    sys.exit(6)
EOF
summary_rc=$?
set -e
[ "$summary_rc" = 6 ] && exit 6
exit "$rc"
