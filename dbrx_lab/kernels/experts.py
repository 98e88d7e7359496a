"""Experts kernels: y = sum_k w_k GLU_{e_k}(x) computed faster than `model.reference_experts`, same order of sums.

Every kernel computes each routed (token, expert) pair's unweighted output, multiplies it by its weight and
adds a token's k outputs in ascending expert order (0 + y_a + y_b + ...), as the reference does; with
`observe` it also returns the unweighted outputs and GLU hidden norms it computed anyway, without changing
how the output is computed (so observing never changes the result).

"grouped": rows gathered once sorted by expert, one GLU per expert hit, fixed-order combine (any device;
    deterministic: no atomic adds).
"cpu": the tuned CPU path (benchmarks/README.md): temporaries in reusable per-thread buffers, experts of
    similar size two at a time in one bmm, a balanced routing as one bmm over zero-padded blocks, a single
    token's experts in pairs.
"""
from __future__ import annotations

import itertools
import math
import threading

import torch
import torch.nn.functional as F

from .linear import SPLIT_MAX_ROWS, linear
from .registry import EXPERTS

PAIR_MAX_ROWS = 128     # experts with at most this many rows may run two at a time (_groups)


def expert_rows(mlp, e: int) -> slice:
    return slice(e * mlp.ffn, (e + 1) * mlp.ffn)


# Weight access. A kernel reads expert weights only through these, so the same kernel (the same decomposition
# into products, hence the same rounding) runs on the fused resident tensors and on the expert-offload
# runtime's cache (`dbrx_lab.offload.OffloadedExperts`, which provides the methods named here).
def expert_weights(mlp, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, v1, w2) [F, d] of expert e."""
    get = getattr(mlp, "expert_weights", None)
    if get is not None:
        return get(e)
    rows = expert_rows(mlp, e)
    return mlp.w1[rows], mlp.v1[rows], mlp.w2[rows]


def pair_weights(mlp, a: int, b: int):
    """([2, F, d] views of w1, v1, w2 for experts a and b (a <= b), fix): `fix(y, h)` maps the pair's outputs
    back to (a, b) order (`fix.swap`: the views hold (b, a), so the rows go in flipped) and zeroes an
    expert not fetched; None: nothing to fix."""
    get = getattr(mlp, "pair_weights", None)
    if get is not None:
        return get(a, b)
    Fh, d = mlp.ffn, mlp.w1.shape[1]

    def pair(w: torch.Tensor) -> torch.Tensor:                                # [2, F, d], no copy
        return w.as_strided((2, Fh, d), ((b - a) * Fh * d, d, 1), w.storage_offset() + a * Fh * d)

    return (pair(mlp.w1), pair(mlp.v1), pair(mlp.w2)), None


def all_weights(mlp):
    """[E, F, d] views of w1, v1, w2 for every expert, or None (the offload runtime holds no such tensor:
    the padded path then runs each expert's block through the same product)."""
    if getattr(mlp, "expert_weights", None) is not None:
        return None
    E, Fh = mlp.n_experts, mlp.ffn
    return tuple(w.view(E, Fh, -1) for w in (mlp.w1, mlp.v1, mlp.w2))


def is_null(mlp, e: int) -> bool:
    """Whether expert e's output is known to be unused in this call (offload: an ablated expert not fetched)."""
    null = getattr(mlp, "null_experts", None)
    return bool(null) and e in null


def _sorted_rows(x: torch.Tensor, experts: torch.Tensor):
    """-> (flat [N*k], order [N*k] pairs sorted by expert (stable), token_of [N*k], counts [E] list)."""
    k = experts.shape[1]
    flat = experts.reshape(-1)                                                 # [N*k] pair = (token, rank)
    order = flat.argsort(stable=True)
    return flat, order, order // k


def _unsort(ys: torch.Tensor, order: torch.Tensor, N: int, k: int) -> torch.Tensor:
    """Rows sorted by expert [N*k, ...] -> [N, k, ...] in (token, rank) order."""
    return ys.new_empty(ys.shape).index_copy_(0, order, ys).view(N, k, *ys.shape[1:])


def combine_in_expert_order(y: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """y [N, k, d] weighted outputs, experts [N, k] -> sum over k, each token's in ascending expert order."""
    N, k, d = y.shape
    by_expert = experts.argsort(dim=-1, stable=True)                            # [N, k]
    y = y.gather(1, by_expert[..., None].expand(N, k, d))
    out = torch.zeros_like(y[:, 0])
    for j in range(k):
        out += y[:, j]
    return out


def grouped_glu(mlp, x: torch.Tensor, e: int):
    """x [n, d] through expert e as the "grouped" kernel computes it -> (output [n, d], GLU hidden [n, F]).
    The offload runtime may compute it elsewhere (`mlp.compute_expert`: a miss run where its weights are)."""
    compute = getattr(mlp, "compute_expert", None)
    if compute is not None:
        return compute(x, e, _glu_rows)
    return _glu_rows(x, *expert_weights(mlp, e))


def _glu_rows(x, w1, v1, w2):
    h = F.silu(x @ w1.T) * (x @ v1.T)                                          # [n, F]
    return h @ w2, h


@EXPERTS.register("grouped")
def grouped_experts(mlp, x, experts, weights, observe=False):
    """One GLU per expert over its rows (gathered once, sorted by expert); a fixed-order combine."""
    N, k = experts.shape
    E = mlp.n_experts
    flat, order, token_of = _sorted_rows(x, experts)
    counts = torch.bincount(flat, minlength=E).tolist()                         # the one host sync per layer
    xs = x.index_select(0, token_of)                                            # [N*k, d]
    ys = torch.empty_like(xs)
    hidden = xs.new_empty(N * k, dtype=torch.float32) if observe else None
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            ys[rows], h = grouped_glu(mlp, xs[rows], e)
            if observe:
                hidden[rows] = h.float().norm(dim=-1)
            start += n
    y = _unsort(ys, order, N, k)                                                # [N, k, d] unweighted
    out = combine_in_expert_order(y * weights[..., None], experts)
    if not observe:
        return out, None, None
    return out, y, _unsort(hidden, order, N, k)


# ------------------------------------------------------------------------------------------------
class Scratch(threading.local):
    """Buffers reused from call to call (one set per thread) for the CPU kernel's large temporaries when no
    gradient is recorded: glibc maps and unmaps large blocks anew, and the page faults cost ~7% of a CPU
    prefill (benchmarks/README.md). A buffer grows to the largest size asked for and is kept until `clear()`;
    only the CPU kernel uses it (accelerators have their own caching allocators)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device, bool], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` with like's dtype and device; the same memory as
        the previous `get` of `name` for that dtype and device (whose contents it may hold)."""
        # inference-mode tensors cannot be written outside inference mode: one set of buffers per mode
        n, key = math.prod(shape), (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = like.new_empty(n)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self.buffers.clear()


SCRATCH = Scratch()


def scratch_out(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: torch.Tensor):
    """`scratch.get(name, shape, like)`, or None (the op allocates its output) without scratch."""
    return None if scratch is None else scratch.get(name, shape, like)


def scratch_tensor(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: torch.Tensor,
                   zero: bool = False) -> torch.Tensor:
    """`scratch.get(name, shape, like)`, or a new tensor without scratch; zero-filled if `zero`."""
    t = like.new_empty(shape) if scratch is None else scratch.get(name, shape, like)
    return t.zero_() if zero else t


def padded_rows_ok(experts: int, m: int, routed: int) -> bool:
    """Whether running all `experts` on m rows each (zero rows filling the gaps) is worth it for `routed`
    (token, expert) pairs: with m <= 32 the products are bound by reading the weights, so up to 2.5x
    padding pays; beyond, up to 1.5x (measured; benchmarks/README.md)."""
    return routed >= 2 * experts and experts * m <= (2.5 if m <= 32 else 1.5) * routed


def contiguous_weights(mlp) -> bool:
    """Whether w1, v1, w2 are contiguous, so [G, F, d] views of experts' rows exist."""
    if getattr(mlp, "expert_weights", None) is not None:
        return True                            # the offload cache's slots are contiguous [F, d] blocks
    return mlp.w1.is_contiguous() and mlp.v1.is_contiguous() and mlp.w2.is_contiguous()


def glu_bmm(x, w1, v1, w2, scratch: Scratch | None):
    """x [G, m, d], w1, v1, w2 [G, F, d] -> (outputs [G, m, d], GLU hiddens [G, m, F])."""
    G, m, Fh, d = x.shape[0], x.shape[1], w1.shape[1], x.shape[2]
    h = F.silu(torch.bmm(x, w1.transpose(1, 2), out=scratch_out(scratch, "glu_a", (G, m, Fh), x)), inplace=True)
    h = h.mul_(torch.bmm(x, v1.transpose(1, 2), out=scratch_out(scratch, "glu_b", (G, m, Fh), x)))
    return torch.bmm(h, w2, out=scratch_out(scratch, "glu_y", (G, m, d), x)), h


def expert_pair(mlp, x: torch.Tensor, a: int, b: int, scratch: Scratch | None = None):
    """x [2, m, d]: m rows for expert a and m for expert b (a <= b) -> (outputs [2, m, d], hiddens [2, m, F]).
    Expert b's rows lie a fixed stride after a's, so each weight gives a [2, F, d] view and each product is
    one bmm, which torch runs on two threads, one expert each."""
    if is_null(mlp, a) and is_null(mlp, b):
        return x.new_zeros(x.shape), x.new_zeros(*x.shape[:2], mlp.ffn)
    (w1, v1, w2), fix = pair_weights(mlp, a, b)
    swap = getattr(fix, "swap", False)        # the views hold (b, a): feed the rows in that order
    if x.shape[1] == 1:                        # matrix-vector: weight @ x streams the weights faster
        xT = x.transpose(1, 2)                                                 # [2, d, 1]
        if swap:
            xT = xT.flip(0)
        h = F.silu(torch.bmm(w1, xT), inplace=True).mul_(torch.bmm(v1, xT))
        h = h.transpose(1, 2)                                                  # [2, 1, F]
        y = torch.bmm(h, w2)
    else:
        y, h = glu_bmm(x.flip(0) if swap else x, w1, v1, w2, scratch)
    return (y, h) if fix is None else fix(y, h)


def one_expert(mlp, x: torch.Tensor, e: int, scratch: Scratch | None = None, out: torch.Tensor | None = None):
    """x [n, d] through expert e -> (output [n, d], GLU hidden [n, F]); with `scratch` the GLU products are
    its buffers and the output is written to `out`."""
    if is_null(mlp, e):
        h = x.new_zeros(x.shape[0], mlp.ffn)
        return (x.new_zeros(x.shape) if out is None else out.zero_()), h
    w1, v1, w2 = expert_weights(mlp, e)
    if scratch is None:
        h = F.silu(linear(x, w1), inplace=True).mul_(linear(x, v1))           # [n, F]
        return linear(h, w2.T), h
    shape = (x.shape[0], mlp.ffn)
    h = F.silu(torch.mm(x, w1.T, out=scratch.get("glu_a", shape, x)), inplace=True)
    h.mul_(torch.mm(x, v1.T, out=scratch.get("glu_b", shape, x)))
    return torch.mm(h, w2, out=out), h


def _pairs_pay(mlp, x: torch.Tensor) -> bool:
    """Two experts at a time pay on a multi-threaded CPU, without autograd, with contiguous weights."""
    return x.is_cpu and torch.get_num_threads() > 1 and not x.requires_grad and contiguous_weights(mlp)


def _groups(mlp, n_of: list[int], x: torch.Tensor) -> list[tuple[int, ...]]:
    """The experts that got rows, alone or in pairs (a, b), a < b: on a multi-threaded CPU experts sorted by
    row count pair up when both have <= PAIR_MAX_ROWS rows and the smaller has at least half the rows of the
    larger (measured 1.3-1.6x at 16-128 rows; benchmarks/README.md)."""
    hit = sorted((e for e, n in enumerate(n_of) if n), key=lambda e: -n_of[e])
    if not _pairs_pay(mlp, x):
        return [(e,) for e in sorted(hit)]
    groups, i = [], 0
    while i < len(hit):
        if i + 1 < len(hit) and n_of[hit[i]] <= PAIR_MAX_ROWS and 2 * n_of[hit[i + 1]] >= n_of[hit[i]]:
            groups.append(tuple(sorted(hit[i:i + 2])))
            i += 2
        else:
            groups.append((hit[i],))
            i += 1
    return groups


def _grouped_rows(mlp, xs: torch.Tensor, n_of: list[int], scratch: Scratch | None, hidden: torch.Tensor | None):
    """xs [P, d] rows sorted by expert (n_of[e] for expert e) -> unweighted outputs [P, d] in the same order;
    fills hidden [P] (GLU hidden norms) if given."""
    rows_of = [slice(s - n, s) for s, n in zip(itertools.accumulate(n_of), n_of)]
    ys = scratch_tensor(scratch, "moe_y", tuple(xs.shape), xs)
    for group in _groups(mlp, n_of, xs):
        if len(group) == 1:
            e, rows = group[0], rows_of[group[0]]
            if scratch is not None and n_of[e] > SPLIT_MAX_ROWS:
                _, h = one_expert(mlp, xs[rows], e, scratch, out=ys[rows])
            else:
                ys[rows], h = one_expert(mlp, xs[rows], e)
            if hidden is not None:
                hidden[rows] = h.float().norm(dim=-1)
            continue
        a, b = group
        na, nb = n_of[a], n_of[b]
        pad = scratch_tensor(scratch, "moe_pad", (2, max(na, nb), xs.shape[1]), xs, zero=True)
        pad[0, :na], pad[1, :nb] = xs[rows_of[a]], xs[rows_of[b]]
        y, h = expert_pair(mlp, pad, a, b, scratch)                            # [2, m, d], [2, m, F]
        ys[rows_of[a]], ys[rows_of[b]] = y[0, :na], y[1, :nb]
        if hidden is not None:
            hidden[rows_of[a]] = h[0, :na].float().norm(dim=-1)
            hidden[rows_of[b]] = h[1, :nb].float().norm(dim=-1)
    return ys


def _one_token(mlp, x, chosen: list[int], weights, observe: bool):
    """One token x [1, d]: its experts in ascending order, two at a time through `expert_pair` (an odd k pairs
    the last with itself, its copy dropped); outputs weighted and added in ascending expert order."""
    k = len(chosen)
    slots = sorted(range(k), key=chosen.__getitem__)                          # slots by expert id
    padded = slots + slots[-1:] if k % 2 else slots
    xs = x.expand(2, 1, x.shape[1])
    ys, hs = [], []
    for p in range(0, len(padded), 2):
        y, h = expert_pair(mlp, xs, chosen[padded[p]], chosen[padded[p + 1]])   # [2, 1, d], [2, 1, F]
        ys += [y[0], y[1]]
        hs += [h[0], h[1]]
    w = weights[0]
    out = torch.zeros_like(x)
    for i, slot in enumerate(slots):
        out += ys[i] * w[slot]
    if not observe:
        return out, None, None
    where = [slots.index(s) for s in range(k)]                                # row of each slot
    y = torch.cat(ys)[where][None]                                             # [1, k, d]
    hidden = torch.linalg.vector_norm(torch.cat(hs)[where].float(), dim=-1)[None]
    return out, y, hidden


@EXPERTS.register("cpu")
def cpu_experts(mlp, x, experts, weights, observe=False):
    """The tuned CPU path (module docstring); any device works, the speed-ups are for CPUs."""
    N, k = experts.shape
    if N == 1 and k > 1 and _pairs_pay(mlp, x):
        return _one_token(mlp, x, experts[0].tolist(), weights, observe)
    E, d = mlp.n_experts, x.shape[1]
    grad = torch.is_grad_enabled() and (x.requires_grad or getattr(getattr(mlp, 'w1', None), 'requires_grad', False))
    scratch = None if grad or not x.is_cpu else SCRATCH
    flat, order, token_of = _sorted_rows(x, experts)
    counts = torch.bincount(flat, minlength=E)                                 # [E]
    xs = torch.index_select(x, 0, token_of, out=scratch_out(scratch, "moe_x", (N * k, d), x))
    hidden = None
    m = int(counts.max())
    if padded_rows_ok(E, m, N * k) and contiguous_weights(mlp):
        expert_of = flat[order]                                                # [N*k] sorted
        row = expert_of * m + torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[expert_of]
        xp = scratch_tensor(scratch, "moe_pad", (E * m, d), x, zero=True)
        xp.index_copy_(0, row, xs)
        stacked = all_weights(mlp)
        if stacked is not None:
            y, h = glu_bmm(xp.view(E, m, d), *stacked, scratch)                # [E, m, d], [E, m, F]
        else:                                  # offloaded: each expert's block alone (bmm's rounding is per block)
            y, h = _padded_each(mlp, xp.view(E, m, d), counts.tolist())
        ys = torch.index_select(y.view(E * m, d), 0, row, out=scratch_out(scratch, "moe_y", (N * k, d), x))
        if observe:
            hidden = h.view(E * m, -1).index_select(0, row).float().norm(dim=-1)
    else:
        if observe:
            hidden = x.new_empty(N * k, dtype=torch.float32)
        ys = _grouped_rows(mlp, xs, counts.tolist(), scratch, hidden)
    unweighted = _unsort(ys, order, N, k) if observe else None                 # a copy: ys is scaled next
    ys.mul_(weights.reshape(-1)[order, None])
    # rows are sorted by expert, so index_add adds a token's outputs in ascending expert order
    out = x.new_zeros(N, d).index_add_(0, token_of, ys)
    return out, unweighted, None if hidden is None else _unsort(hidden, order, N, k)


def _padded_each(mlp, xp: torch.Tensor, n_of: list[int]):
    """The padded path without an [E, F, d] tensor (offloaded experts): xp [E, m, d] -> ([E, m, d], [E, m, F]),
    the experts with rows two at a time through `expert_pair` (a bmm of two blocks rounds each block as the
    bmm of all E does, on any thread count; an mm may not: tested); the rest are zeros."""
    E, m, d = xp.shape
    y, h = xp.new_zeros(E, m, d), xp.new_zeros(E, m, mlp.ffn)
    hit = [e for e, n in enumerate(n_of) if n and not is_null(mlp, e)]
    for i in range(0, len(hit), 2):
        if i + 1 < len(hit):
            a, b = hit[i], hit[i + 1]
        else:                                  # an odd one out: beside another expert (recomputed, not kept) or
            a = b = hit[i]                     # a null one, not beside itself (a stride-0 pair rounds differently)
            if i:
                a = hit[i - 1]
            else:
                b = next((e for e in range(E) if e != a and is_null(mlp, e)), a)
        yy, hh = expert_pair(mlp, torch.stack([xp[a], xp[b]]), a, b)
        y[a], h[a], y[b], h[b] = yy[0], hh[0], yy[1], hh[1]
    return y, h


def _choose(mlp, x: torch.Tensor) -> str:
    if getattr(mlp, "runtime", None) is not None:
        return "offload"                       # experts offloaded (dbrx_lab.offload): the runtime picks the inner one
    return "cpu" if x.is_cpu else "grouped"


EXPERTS.chooser = _choose
