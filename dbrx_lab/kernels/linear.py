"""Matrix products for decoding on a multi-threaded CPU (registered as the "split" linear kernel)."""
from __future__ import annotations

import torch

from .registry import LINEAR

SPLIT_MAX_ROWS = 4      # inputs with at most this many rows take the split path on a multi-threaded CPU


@LINEAR.register("split")
def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ weight[out, in].T -> [n, out]; `weight` may be any strided view (e.g. a transpose).

    torch runs a matrix-vector product on one core. With P > 1 CPU threads and n <= SPLIT_MAX_ROWS, `out`
    is cut into P slices that run as one bmm (torch parallelises a bmm over its batch): each output element
    is still one dot product over `in`. A weight with contiguous rows is multiplied as weight @ x.T, which
    streams it faster (benchmarks/README.md).
    """
    n, P = x.shape[0], torch.get_num_threads()
    out = weight.shape[0]
    if n > SPLIT_MAX_ROWS or P < 2 or out % P or not x.is_cpu or out < 64 * P:
        return x @ weight.T
    w = weight.unflatten(0, (P, out // P))                                        # [P, out/P, in]
    if weight.stride(-1) == 1:
        y = torch.bmm(w, x.T.expand(P, x.shape[1], n))                              # [P, out/P, n]
        return y.view(1, out) if n == 1 else y.permute(2, 0, 1).reshape(n, out)
    y = torch.bmm(x.expand(P, n, x.shape[1]), w.transpose(1, 2))                    # [P, n, out/P]
    return y.transpose(0, 1).reshape(n, out)


def _choose(x: torch.Tensor, weight: torch.Tensor) -> str:
    return "split" if x.is_cpu and torch.get_num_threads() > 1 and x.shape[0] <= SPLIT_MAX_ROWS else "reference"


LINEAR.chooser = _choose
