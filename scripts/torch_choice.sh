# Which torch build scripts/setup.sh installs (sourced by it; tested by tests/test_setup.py). Issue #22 item 3:
# a plain `pip install torch` on Linux fetches the CUDA build plus ~20 nvidia packages, which a CPU-only
# machine does not need. Order:
#   1. $DBRX_LAB_TORCH, when set: cpu | cuda | local | pypi | an index URL (http://, https://, file://)
#   2. local: a torch wheel of the pinned version in pip's find-links, as on this project's own machines
#   3. pypi:  macOS (PyPI's macOS wheel; there is no CUDA build for it)
#   4. cuda:  an NVIDIA GPU answers `nvidia-smi -L` (PyPI's default Linux wheel is the CUDA build)
#   5. cpu:   anything else: PyTorch's CPU wheel index
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

# torch_choice PYTHON: print the kind of build to install (or the override's index URL); PYTHON is the
# venv's python, whose pip checks for a local wheel. Returns 2, with a message, on a bad DBRX_LAB_TORCH.
torch_choice() {
    local python="$1"
    if [ -n "${DBRX_LAB_TORCH:-}" ]; then
        case "$DBRX_LAB_TORCH" in
            cpu|cuda|local|pypi|http://*|https://*|file://*) echo "$DBRX_LAB_TORCH"; return 0 ;;
            *) echo "DBRX_LAB_TORCH='$DBRX_LAB_TORCH' is not a torch build: use cpu, cuda, local, pypi" \
                    "or a pip index URL (https://...)" >&2
               return 2 ;;
        esac
    fi
    # a local wheel: pip resolves the pinned torch without any index (find-links only), without installing
    if "$python" -m pip install --dry-run --quiet --no-index --no-deps --ignore-installed \
            "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        echo local
    elif [ "$(uname -s)" = Darwin ]; then
        echo pypi
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo cuda
    else
        echo cpu
    fi
}

# torch_pip_args CHOICE: the `pip install` arguments for that build, one per line.
torch_pip_args() {
    echo "torch==$TORCH_VERSION"
    case "$1" in
        cpu) echo "--index-url"; echo "$TORCH_CPU_INDEX" ;;
        http://*|https://*|file://*) echo "--index-url"; echo "$1" ;;
        local|cuda|pypi) ;;     # pip's own configuration: the local wheel here, PyPI elsewhere
        *) echo "unknown torch choice '$1'" >&2; return 2 ;;
    esac
}

# torch_describe CHOICE: one line for the set-up log.
torch_describe() {
    case "$1" in
        local) echo "torch $TORCH_VERSION from the local wheel pip's find-links hold (CPU)" ;;
        cuda) echo "torch $TORCH_VERSION, CUDA build from PyPI (an NVIDIA GPU answered nvidia-smi;" \
                   "several GB with its nvidia-* packages)" ;;
        pypi) echo "torch $TORCH_VERSION from PyPI (macOS wheel: CPU and Apple MPS)" ;;
        cpu) echo "torch $TORCH_VERSION, CPU build from $TORCH_CPU_INDEX (no NVIDIA GPU found;" \
                  "DBRX_LAB_TORCH=cuda for the CUDA build)" ;;
        *) echo "torch $TORCH_VERSION from the index $1" ;;
    esac
}
