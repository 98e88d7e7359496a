"""DBRX as one readable nn.Module, with state-dict names identical to HF's DbrxForCausalLM.

Shapes: B batch, T tokens in this call, S tokens in the cache (keys), d d_model, H query heads,
K kv heads, D head_dim, E experts, k experts per token, F ffn_hidden_size, N = B*T tokens, V vocab.

Every tensor worth seeing passes through a named HookPoint (see `DbrxLM.hook_names()`).
Interventions (dbrx_lab.interventions) plug in through each module's `edits` list; see `RoutingEdit`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DbrxConfig
from .hooks import ForwardContext, HookedMixin, HookPoint

if TYPE_CHECKING:
    from .interventions import Intervention
    from .trace import Record, Trace

__all__ = ["DbrxLM", "DbrxOutput", "KVCache", "linear"]


# ------------------------------------------------------------------------------------------------
# Matrix products for decoding
SPLIT_MAX_ROWS = 4      # inputs with at most this many rows take the split path on a multi-threaded CPU
PAIR_MAX_ROWS = 128     # experts with at most this many rows may run two at a time (Experts._groups)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ weight[out, in].T -> [n, out]; `weight` may be any strided view (e.g. a transpose).

    Decoding multiplies a few rows by large matrices, and torch runs such a matrix-vector product on one
    core at a fraction of the memory bandwidth. With P > 1 CPU threads and n <= SPLIT_MAX_ROWS, `out` is
    cut into P slices that run as one bmm (torch parallelises a bmm over its batch): each output element is
    still one dot product over `in`. A weight with contiguous rows is multiplied as weight @ x.T, which
    streams it faster than x @ weight.T (measured: ~15% more bandwidth).
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


def padded_rows_ok(experts: int, m: int, routed: int) -> bool:
    """Whether running all `experts` on m rows each (zero rows filling the gaps) is worth it for `routed`
    (token, expert) pairs. Measured on CPU (benchmarks/README.md): with m <= 32 the products are bound by
    reading the weights, so up to 2.5x padding pays; beyond, up to 1.5x."""
    return routed >= 2 * experts and experts * m <= (2.5 if m <= 32 else 1.5) * routed


class Linear(nn.Linear):
    """nn.Linear without bias whose forward uses `linear` (the decoding fast path); same state dict."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Scratch(threading.local):
    """Buffers reused from call to call (one set per thread) for the MoE's large temporaries when no
    gradient is recorded.

    glibc hands blocks at or above its (adaptive) mmap threshold out as fresh mmaps and returns them on
    free, so a large temporary allocated anew every layer costs one page fault per 4 KiB on first touch:
    measured 7-25 thousand faults per 512-token prefill of the benchmark model, which ran 1.07x faster
    without them. A buffer grows to the largest size asked for and is kept until `clear()`.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor of `shape` with like's dtype and device; the same memory as
        the previous `get` of `name` for that dtype and device (whose contents it may hold)."""
        n, key = math.prod(shape), (name, like.dtype, like.device)
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


# ------------------------------------------------------------------------------------------------
# RoPE
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, signed sin [B, T, 1, D] (broadcast over heads) for integer positions [B, T]; computed in float32,
    returned in `dtype`. The sin's first half is negated, as `apply_rope` wants it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))                              # [D/2]
    freqs = positions.float()[..., None, None] * inv_freq                          # [B, T, 1, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D] rotated with the rotate-half convention, x cos + (-x2, x1) sin; cos, signed_sin
    [B, T, 1, D] from `rope_cos_sin`. Rolling x by D/2 gives (x2, x1); the sign is in signed_sin."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)


# ------------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Preallocated keys/values for one layer: k, v [B, K, S_max, D]; filled up to `length`."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """GQA attention with clip_qkv and RoPE. Uses SDPA unless a hook asks for scores or pattern."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.Wqkv = Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_n_heads * cfg.head_dim)
        self.out_proj = Linear(cfg.d_model, cfg.d_model)
        self.hook_q = HookPoint()        # [B, H, T, D] after clip and RoPE
        self.hook_k = HookPoint()        # [B, K, T, D] after clip and RoPE (this call's tokens only)
        self.hook_v = HookPoint()        # [B, K, T, D]
        self.hook_scores = HookPoint()   # [B, H, T, S] scaled scores with the mask applied (-inf)
        self.hook_pattern = HookPoint()  # [B, H, T, S] softmax of the scores
        self.hook_z = HookPoint()        # [B, T, H, D] per-head output before out_proj
        self.edits: list = []            # interventions with `edit_z(z, layer, ctx)`

    def wants_pattern(self) -> bool:
        return bool(self.hook_scores.fns or self.hook_pattern.fns)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, start: int, last_only: bool = False) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; with last_only, keys and values of all T tokens (cached) but only the
        last token's query -> [B, 1, d]. mask [B, 1, T, S] bool or None (causal)."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.Wqkv(x)                                                         # [B, T, (H+2K)D]
        if self.cfg.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.cfg.clip_qkv, max=self.cfg.clip_qkv)
        qk = apply_rope(qkv[..., :(H + K) * D].view(B, T, H + K, D), cos, sin)    # q and k heads at once
        q = self.hook_q(qk[:, :, :H].transpose(1, 2))                              # [B, H, T, D]
        k = self.hook_k(qk[:, :, H:].transpose(1, 2))                              # [B, K, T, D]
        v = self.hook_v(qkv[..., (H + K) * D:].view(B, T, K, D).transpose(1, 2))  # [B, K, T, D]
        if cache is not None:
            k, v = cache.update(start, k, v)                                       # [B, K, S, D]
        if last_only:
            q, mask = q[:, :, -1:], None if mask is None else mask[:, :, -1:]     # the last row sees all keys
        if self.wants_pattern():
            z = self._explicit(q, k, v, mask)
        elif mask is None and q.shape[2] == k.shape[2]:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != K)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
        z = self.hook_z(z.transpose(1, 2))                                         # [B, T, H, D]
        for edit in self.edits:
            z = edit.edit_z(z, self.hook_z.layer, self.hook_z.ctx)
        return self.out_proj(z.reshape(B, -1, H * D))

    def _explicit(self, q, k, v, mask):
        """Attention that materialises the pattern [B, H, T, S]. GQA without copying K/V: the G query heads
        that share a KV head are stacked as G*T rows of one product with it."""
        B, H, T, D = q.shape
        K, S = k.shape[1], k.shape[2]
        scores = (q.reshape(B, K, H // K * T, D) @ k.transpose(-1, -2)).view(B, H, T, S).div_(math.sqrt(D))
        if mask is None and T > 1:                                                 # causal (one query sees all)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        scores = self.hook_scores(scores)
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = self.hook_pattern(pattern)
        return (pattern.reshape(B, K, H // K * T, S) @ v).view(B, H, T, D)


class NormAttnNorm(nn.Module):
    """norm_1 -> attention -> + residual -> norm_2 (HF's DbrxNormAttentionNorm layout)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.norm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)


class Router(nn.Module):
    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.jitter_eps = cfg.moe_jitter_eps
        self.layer = nn.Linear(cfg.d_model, cfg.moe_num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, d] -> logits [N, E]; multiplicative jitter in training when moe_jitter_eps is set."""
        if self.training and self.jitter_eps:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return self.layer(x)


class ExpertGLU(nn.Module):
    """All experts' weights stacked: w1, v1, w2 [E*F, d]; expert e owns rows e*F:(e+1)*F."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        E, Fh, d = cfg.moe_num_experts, cfg.ffn_hidden_size, cfg.d_model
        self.n_experts, self.ffn = E, Fh
        self.w1 = nn.Parameter(torch.empty(E * Fh, d))
        self.v1 = nn.Parameter(torch.empty(E * Fh, d))
        self.w2 = nn.Parameter(torch.empty(E * Fh, d))

    def expert(self, x: torch.Tensor, e: int, scratch: Scratch | None = None, out: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] through expert e -> (output [n, d], GLU hidden [n, F]). Given `scratch` (no autograd,
        n > SPLIT_MAX_ROWS), the GLU products are its buffers and the output is written to `out` [n, d]."""
        rows = slice(e * self.ffn, (e + 1) * self.ffn)
        if scratch is None:
            h = F.silu(linear(x, self.w1[rows]), inplace=True).mul_(linear(x, self.v1[rows]))   # [n, F]
            return linear(h, self.w2[rows].T), h
        shape = (x.shape[0], self.ffn)
        h = F.silu(torch.mm(x, self.w1[rows].T, out=scratch.get("glu_a", shape, x)), inplace=True)
        h.mul_(torch.mm(x, self.v1[rows].T, out=scratch.get("glu_b", shape, x)))
        return torch.mm(h, self.w2[rows], out=out), h

    def pairs_possible(self) -> bool:
        """Whether `expert_pair` and `all_experts` apply: w1, v1, w2 contiguous (views of experts' rows)."""
        return self.w1.is_contiguous() and self.v1.is_contiguous() and self.w2.is_contiguous()

    def all_experts(self, x: torch.Tensor, scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [E, m, d] (row block e for expert e) -> (outputs [E, m, d], GLU hiddens [E, m, F]); one bmm per
        weight over [E, F, d] views of the stacked weights. Given `scratch`, the results are its buffers."""
        E, Fh, d = self.n_experts, self.ffn, x.shape[2]
        w1, v1, w2 = (w.view(E, Fh, d) for w in (self.w1, self.v1, self.w2))
        return self._glu_bmm(x, w1, v1, w2, scratch)

    @staticmethod
    def _glu_bmm(x, w1, v1, w2, scratch: Scratch | None, scale: torch.Tensor | None = None):
        """x [G, m, d], w1 and v1 [G, F, d], w2 [G, F, d] -> (outputs [G, m, d], GLU hiddens [G, m, F]);
        scale [G, m, 1] weights the outputs (applied to a copy of the hiddens before w2)."""
        G, m, Fh, d = x.shape[0], x.shape[1], w1.shape[1], x.shape[2]
        h = F.silu(torch.bmm(x, w1.transpose(1, 2), out=scratch_out(scratch, "glu_a", (G, m, Fh), x)), inplace=True)
        h = h.mul_(torch.bmm(x, v1.transpose(1, 2), out=scratch_out(scratch, "glu_b", (G, m, Fh), x)))  # [G, m, F]
        return torch.bmm(h if scale is None else h * scale, w2, out=scratch_out(scratch, "glu_y", (G, m, d), x)), h

    def expert_pair(self, x: torch.Tensor, a: int, b: int, scale: torch.Tensor | None = None,
                    scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [2, m, d]: m rows for expert a and m for expert b (a <= b) -> (outputs [2, m, d], GLU hiddens
        [2, m, F]).

        Expert b's rows lie a fixed stride after expert a's, so each (contiguous) weight gives a [2, F, d]
        view and each product is one bmm, which torch runs on two threads, one expert each. scale
        [2, m, 1]: weights the outputs (applied to the hiddens before w2; the returned hiddens are unscaled).
        Given `scratch` (m > 1), the results are its buffers.
        """
        Fh, d = self.ffn, x.shape[2]

        def pair(w: torch.Tensor) -> torch.Tensor:                                # [2, F, d]
            return w.as_strided((2, Fh, d), ((b - a) * Fh * d, d, 1), w.storage_offset() + a * Fh * d)

        if x.shape[1] == 1:                        # matrix-vector: weight @ x streams the weights faster
            xT = x.transpose(1, 2)                                                 # [2, d, 1]
            h = F.silu(torch.bmm(pair(self.w1), xT), inplace=True).mul_(torch.bmm(pair(self.v1), xT))
            h = h.transpose(1, 2)                                                  # [2, 1, F]
            return torch.bmm(h if scale is None else h * scale, pair(self.w2)), h
        return self._glu_bmm(x, pair(self.w1), pair(self.v1), pair(self.w2), scratch, scale)


class Experts(nn.Module):
    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.mlp = ExpertGLU(cfg)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor | None = None,
                want_hidden_norm: bool = False):
        """x [N, d], experts [N, k] -> (out, GLU hidden L2 norms [N, k] float32, or None).

        out: each chosen expert's unweighted output [N, k, d]; or, given `weights` [N, k], the weighted
        sum over the k experts [N, d], accumulated per token without materialising [N, k, d].
        Only routed (token, expert) pairs are computed, their rows gathered sorted by expert. When every
        expert's tokens fit in a batch of m rows with little padding (`padded_rows_ok`), all experts run as
        one bmm over [E, m, d] (each thread takes whole experts); otherwise experts run one or two at a time
        (`_grouped`). The weighted outputs are then added into `out` with one index_add.
        """
        N, k = experts.shape
        if N == 1 and k > 1 and self._pairs_pay(x):
            return self._one_token(x, experts[0].tolist(), weights, want_hidden_norm)
        E, d = self.mlp.n_experts, x.shape[1]
        scratch = None if torch.is_grad_enabled() and (x.requires_grad or self.mlp.w1.requires_grad) else SCRATCH
        flat = experts.reshape(-1)                                                 # [N*k] pair = (token, rank)
        order = flat.argsort(stable=True)                                          # pairs sorted by expert
        counts = torch.bincount(flat, minlength=E)                                 # [E]
        token_of = order // k                                                      # [N*k]
        xs = torch.index_select(x, 0, token_of, out=scratch_out(scratch, "moe_x", (N * k, d), x))
        hidden_norm = None                                                         # [N*k] sorted, if wanted
        m = int(counts.max())
        if padded_rows_ok(E, m, N * k) and self.mlp.pairs_possible():
            expert_of = flat[order]                                                # [N*k] sorted
            row = expert_of * m + torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[expert_of]
            xp = scratch_tensor(scratch, "moe_pad", (E * m, d), x, zero=True)
            xp.index_copy_(0, row, xs)
            y, h = self.mlp.all_experts(xp.view(E, m, d), scratch)                 # [E, m, d], [E, m, F]
            ys = torch.index_select(y.view(E * m, d), 0, row, out=scratch_out(scratch, "moe_y", (N * k, d), x))
            if want_hidden_norm:
                hidden_norm = h.view(E * m, -1).index_select(0, row).float().norm(dim=-1)
        else:
            if want_hidden_norm:
                hidden_norm = x.new_empty(N * k, dtype=torch.float32)
            ys = self._grouped(xs, counts.tolist(), scratch, hidden_norm)
        if want_hidden_norm:
            hidden_norm = hidden_norm.new_empty(N * k).index_copy_(0, order, hidden_norm).view(N, k)
        if weights is None:
            return ys.new_empty(N * k, d).index_copy_(0, order, ys).view(N, k, d), hidden_norm
        ys.mul_(weights.reshape(-1)[order, None])
        # a token's outputs are added in ascending expert order, the order of the rows
        return x.new_zeros(N, d).index_add_(0, token_of, ys), hidden_norm

    def _grouped(self, xs: torch.Tensor, n_of: list[int], scratch: Scratch | None,
                 hidden_norm: torch.Tensor | None) -> torch.Tensor:
        """xs [P, d]: rows sorted by expert, n_of[e] of them for expert e -> outputs [P, d] in the same order
        (a `scratch` buffer if given); fills hidden_norm [P] (GLU hidden L2 norms) if given. Each expert that
        got rows runs one GLU over them, or two experts of similar size share one bmm (`_groups`)."""
        rows_of = [slice(s - n, s) for s, n in zip(itertools.accumulate(n_of), n_of)]
        ys = scratch_tensor(scratch, "moe_y", tuple(xs.shape), xs)
        for group in self._groups(n_of, xs):
            if len(group) == 1:
                e, rows = group[0], rows_of[group[0]]
                if scratch is not None and n_of[e] > SPLIT_MAX_ROWS:
                    _, h = self.mlp.expert(xs[rows], e, scratch, out=ys[rows])
                else:
                    ys[rows], h = self.mlp.expert(xs[rows], e)
                if hidden_norm is not None:
                    hidden_norm[rows] = h.float().norm(dim=-1)
                continue
            a, b = group                                                           # a < b
            na, nb = n_of[a], n_of[b]
            shape = (2, max(na, nb), xs.shape[1])
            pad = scratch_tensor(scratch, "moe_pad", shape, xs, zero=True)
            pad[0, :na], pad[1, :nb] = xs[rows_of[a]], xs[rows_of[b]]
            y, h = self.mlp.expert_pair(pad, a, b, scratch=scratch)                # [2, m, d], [2, m, F]
            ys[rows_of[a]], ys[rows_of[b]] = y[0, :na], y[1, :nb]
            if hidden_norm is not None:
                hidden_norm[rows_of[a]] = h[0, :na].float().norm(dim=-1)
                hidden_norm[rows_of[b]] = h[1, :nb].float().norm(dim=-1)
        return ys

    def _pairs_pay(self, x: torch.Tensor) -> bool:
        """Whether to run experts two at a time (`ExpertGLU.expert_pair`): a multi-threaded CPU, no autograd,
        contiguous stacked weights."""
        return x.is_cpu and torch.get_num_threads() > 1 and not x.requires_grad and self.mlp.pairs_possible()

    def _groups(self, n_of: list[int], x: torch.Tensor) -> list[tuple[int, ...]]:
        """The experts that got tokens, alone or in pairs (a, b), a < b. On a multi-threaded CPU, experts
        sorted by token count are paired when both have at most PAIR_MAX_ROWS rows and the smaller has at
        least half the rows of the larger (so at most a third of the pair's rows are padding): one bmm runs
        both, one expert per thread, which beats two products each split over the threads (measured
        1.3-1.6x at 16-128 rows; with hundreds of rows the split products are as fast or faster)."""
        hit = sorted((e for e, n in enumerate(n_of) if n), key=lambda e: -n_of[e])
        if not self._pairs_pay(x):
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

    def _one_token(self, x: torch.Tensor, chosen: list[int], weights: torch.Tensor | None, want_hidden_norm: bool):
        """Decoding one token x [1, d]: its experts in ascending order, two at a time (with an odd k the last
        one is paired with itself at weight 0), through `ExpertGLU.expert_pair` -> what `forward` returns, up
        to float rounding. Given weights, each hidden is scaled before w2, so the pairs' outputs just add."""
        k = len(chosen)
        order = sorted(range(k), key=chosen.__getitem__)                          # slots by expert id
        if k % 2:
            order.append(order[-1])                                                # paired with itself
        scale = None
        if weights is not None:
            scale = weights[0, order]                                              # [k rounded up to even]
            if k % 2:
                scale[-1] = 0
            scale = scale.view(-1, 2, 1, 1)
        xs = x.expand(2, 1, x.shape[1])
        outs, hiddens = [], []
        for p in range(len(order) // 2):
            a, b = chosen[order[2 * p]], chosen[order[2 * p + 1]]
            y, h = self.mlp.expert_pair(xs, a, b, None if scale is None else scale[p])   # [2, 1, d], [2, 1, F]
            outs.append(y)
            hiddens.append(h)
        slot_rows = [order.index(slot) for slot in range(k)]                     # row of each slot
        hidden_norm = None
        if want_hidden_norm:
            hidden_norm = torch.linalg.vector_norm(torch.cat(hiddens)[slot_rows, 0].float(), dim=-1)[None]
        if weights is None:
            return torch.cat(outs)[slot_rows, 0][None], hidden_norm               # [1, k, d]
        out = outs[0]
        for y in outs[1:]:
            out = out.add_(y)
        return out.sum(0), hidden_norm                                             # [1, d]


class MoE(nn.Module):
    """Router -> float32 softmax -> top-k -> p-norm renormalisation -> grouped GLU experts -> weighted sum."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.moe_top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.hook_router_logits = HookPoint()  # [N, E] raw router logits (N = B*T, row-major)
        self.hook_topk_experts = HookPoint()   # [N, k] long, descending weight
        self.hook_topk_weights = HookPoint()   # [N, k] weights applied (after renormalisation and edits)
        self.hook_expert_out = HookPoint()     # [N, k, d] each chosen expert's unweighted output
        self.hook_expert_hidden_norm = HookPoint()  # [N, k] L2 norm of each chosen expert's GLU hidden
        self.edits: list = []                  # interventions; see interventions.Intervention

    def route(self, logits: torch.Tensor):
        """logits [N, E] -> (experts [N, k] long, weights [N, k], probs [N, E] float32)."""
        ctx, layer = self.hook_router_logits.ctx, self.hook_router_logits.layer
        for edit in self.edits:
            logits = edit.edit_logits(logits, layer, ctx)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)                # [N, E]
        k = self.top_k
        for edit in self.edits:
            k = edit.edit_top_k(k, layer)
        weights, experts = probs.topk(k, dim=-1)                                   # [N, k]
        for edit in self.edits:
            experts = edit.edit_experts(experts, probs, layer, ctx)
        if self.edits:
            weights = probs.gather(-1, experts)
        p = self.cfg.moe_normalize_expert_weights
        if p is not None:
            weights = weights / weights.norm(p=p, dim=-1, keepdim=True)
        for edit in self.edits:
            weights = edit.edit_weights(weights, experts, probs, layer, ctx)
        if self.edits:
            weights, order = weights.sort(dim=-1, descending=True, stable=True)
            experts = experts.gather(-1, order)
        return experts, weights, probs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (output [B, T, d], router logits [N, E])."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)                                                    # [N, d]
        out, logits = self.mix(flat, self.router(flat))
        return out.view(B, T, d), logits

    def mix(self, flat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat [N, d] and its raw router logits [N, E] -> (weighted sum of the chosen experts' outputs
        [N, d], router logits as hooked): everything after the router, hook points included."""
        logits = self.hook_router_logits(logits)
        experts, weights, _ = self.route(logits)
        experts = self.hook_topk_experts(experts)
        weights = self.hook_topk_weights(weights.to(flat.dtype))
        want_norm = bool(self.hook_expert_hidden_norm.fns)
        want_out = bool(self.hook_expert_out.fns)                                  # else no [N, k, d]
        out, hidden_norm = self.experts(flat, experts, None if want_out else weights, want_norm)
        if want_norm:
            self.hook_expert_hidden_norm(hidden_norm)
        if want_out:
            out = torch.bmm(weights[:, None], self.hook_expert_out(out))[:, 0]    # [N, 1, k] @ [N, k, d] -> [N, d]
        return out, logits


class Block(nn.Module):
    def __init__(self, cfg: DbrxConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm_attn_norm = NormAttnNorm(cfg)
        self.ffn = MoE(cfg)
        self.hook_resid_pre = HookPoint()   # [B, T, d]
        self.hook_attn_out = HookPoint()    # [B, T, d] attention output after out_proj
        self.hook_resid_mid = HookPoint()   # [B, T, d]
        self.hook_ffn_out = HookPoint()     # [B, T, d] weighted sum of the chosen experts' outputs
        self.hook_resid_post = HookPoint()  # [B, T, d]

    def forward(self, x, cos, sin, mask, cache, start, last_only: bool = False):
        """x [B, T, d] -> (x [B, T, d], router logits [N, E]). last_only: fill the cache with all T tokens
        but compute the rest of the block for the last one only -> x [B, 1, d] (a prefill's last block)."""
        x = self.hook_resid_pre(x)
        nan = self.norm_attn_norm
        attn_out = self.hook_attn_out(nan.attn(nan.norm_1(x), cos, sin, mask, cache, start, last_only))
        if last_only:
            x = x[:, -1:]
        x = self.hook_resid_mid(x + attn_out)
        ffn_out, router_logits = self.ffn(nan.norm_2(x))
        x = self.hook_resid_post(x + self.hook_ffn_out(ffn_out))
        return x, router_logits


class Transformer(nn.Module):
    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)


@dataclass
class DbrxOutput:
    """logits [B, T, V] (or [B, 1, V] with last_only); loss: mean next-token CE when labels are given;
    router_logits: per layer [N, E] when asked for (training losses)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


# ------------------------------------------------------------------------------------------------
class DbrxLM(HookedMixin, nn.Module):
    """DBRX causal LM. `DbrxLM(cfg)` is a plain constructor (works under `torch.device("meta")`)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.hook_embed = HookPoint()   # [B, T, d]
        self.hook_final = HookPoint()   # [B, T, d] after norm_f, the input of lm_head
        self.ctx = ForwardContext()
        self.hook_points = self._name_hook_points()
        self.tokenizer = None           # set by load_model; used when generate() gets text
        self.screen_greedy: bool | None = None   # greedy decoding via generation.UnembedScreen: None = when it pays
        self.reset_parameters()

    def _name_hook_points(self) -> dict[str, HookPoint]:
        points: dict[str, HookPoint] = {}

        def add(name: str, point: HookPoint, layer: int | None) -> None:
            point.name, point.layer, point.ctx = name, layer, self.ctx
            points[name] = point

        add("hook_embed", self.hook_embed, None)
        for i, block in enumerate(self.transformer.blocks):
            attn, ffn = block.norm_attn_norm.attn, block.ffn
            add(f"blocks.{i}.hook_resid_pre", block.hook_resid_pre, i)
            for n in ("q", "k", "v", "scores", "pattern", "z"):
                add(f"blocks.{i}.attn.hook_{n}", getattr(attn, f"hook_{n}"), i)
            add(f"blocks.{i}.hook_attn_out", block.hook_attn_out, i)
            add(f"blocks.{i}.hook_resid_mid", block.hook_resid_mid, i)
            for n in ("router_logits", "topk_experts", "topk_weights", "expert_hidden_norm", "expert_out"):
                add(f"blocks.{i}.ffn.hook_{n}", getattr(ffn, f"hook_{n}"), i)
            add(f"blocks.{i}.hook_ffn_out", block.hook_ffn_out, i)
            add(f"blocks.{i}.hook_resid_post", block.hook_resid_post, i)
        add("hook_final", self.hook_final, None)
        self._points_of_layer = [[p for p in points.values() if p.layer == i]
                                 for i in range(len(self.transformer.blocks))]
        return points

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (std defaults to initializer_range), ones for norms."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # --- forward ---------------------------------------------------------------------------------
    def validate_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.config.vocab_size - 1}]")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than max_seq_len="
                             f"{self.config.max_seq_len}")
        return input_ids.long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, cache: Sequence[KVCache] | None = None, start: int = 0,
                output_router_logits: bool = False, last_only: bool = False) -> DbrxOutput:
        """input_ids [B, T] -> DbrxOutput(logits [B, T, V]).

        attention_mask [B, start+T] (1 real, 0 padding; left padding expected) covers the cache too.
        cache/start: per-layer KVCache and the column this call starts at (for decoding).
        """
        input_ids = self.validate_input_ids(input_ids)
        B, T = input_ids.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"position {start + T} exceeds max_seq_len={self.config.max_seq_len}")
        device = self.transformer.wte.weight.device
        input_ids = input_ids.to(device)
        S = start + T
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must be [batch, {S}] (cache + new tokens), got "
                                 f"{tuple(attention_mask.shape)}")
        cos, sin, mask = self._start_call(attention_mask, B, T, start, device)

        x = self.hook_embed(self.transformer.wte(input_ids))                        # [B, T, d]
        all_router_logits = []
        blocks = self.transformer.blocks
        prune = last_only and T > 1 and not output_router_logits and self._plain(len(blocks) - 1)
        for i, block in enumerate(blocks):
            x, router_logits = block(x, cos, sin, mask, None if cache is None else cache[i], start,
                                     prune and i == len(blocks) - 1)
            if output_router_logits:
                all_router_logits.append(router_logits)
        if last_only:
            x = x[:, -1:]
        x = self.hook_final(self.transformer.norm_f(x))
        logits = self.lm_head(x)                                                    # [B, T, V]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return DbrxOutput(logits, loss, tuple(all_router_logits) if output_router_logits else None)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: Sequence[KVCache], start: int,
                    attention_mask: torch.Tensor | None = None, *, unembed: bool = True) -> torch.Tensor:
        """tokens [B] (one new token per row, at column `start`) -> next-token logits [B, V], or with
        unembed=False the input of lm_head [B, d] (after norm_f and hook_final).

        The computation of `forward(tokens[:, None], attention_mask, cache=cache, start=start, last_only=True)`,
        hook points included, written out as one function (gpt-fast's decode step): without nn.Module calls
        and input checks, which cost ~5-8% of a CPU decode step. Generation uses it while
        `decode_step_applies()`; interventions take forward. attention_mask [B, start + 1] as in forward.
        """
        cfg = self.config
        B, H, K, D = tokens.shape[0], cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        d, eps, clip = cfg.d_model, cfg.layer_norm_eps, cfg.clip_qkv
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        cos, sin, mask = self._start_call(attention_mask, B, 1, start, tokens.device)       # [B, 1, 1, D]
        x = self.hook_embed(F.embedding(tokens.view(B, 1), self.transformer.wte.weight))   # [B, 1, d]
        for block, layer_cache in zip(self.transformer.blocks, cache):
            nan, ffn = block.norm_attn_norm, block.ffn
            attn = nan.attn
            x = block.hook_resid_pre(x)
            qkv = linear(F.layer_norm(x, (d,), nan.norm_1.weight, None, eps).view(B, d), attn.Wqkv.weight)
            if clip is not None:
                qkv = qkv.clamp(min=-clip, max=clip)                                        # [B, (H+2K)D]
            qk = apply_rope(qkv[:, :(H + K) * D].view(B, 1, H + K, D), cos, sin)
            q = attn.hook_q(qk[:, :, :H].transpose(1, 2))                                   # [B, H, 1, D]
            k = attn.hook_k(qk[:, :, H:].transpose(1, 2))                                   # [B, K, 1, D]
            v = attn.hook_v(qkv[:, (H + K) * D:].view(B, 1, K, D).transpose(1, 2))
            k, v = layer_cache.update(start, k, v)                                          # [B, K, S, D]
            if attn.wants_pattern():
                z = attn._explicit(q, k, v, mask)
            else:
                z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
            z = attn.hook_z(z.transpose(1, 2))                                              # [B, 1, H, D]
            attn_out = block.hook_attn_out(linear(z.reshape(B, H * D), attn.out_proj.weight).view(B, 1, d))
            x = block.hook_resid_mid(x + attn_out)
            h = F.layer_norm(x, (d,), nan.norm_2.weight, None, eps).view(B, d)
            out = ffn.mix(h, F.linear(h, ffn.router.layer.weight))[0].view(B, 1, d)       # router without jitter: eval
            x = block.hook_resid_post(x + block.hook_ffn_out(out))
        x = self.hook_final(F.layer_norm(x, (d,), self.transformer.norm_f.weight, None, eps)).view(B, d)
        return linear(x, self.lm_head.weight) if unembed else x                             # [B, V] or [B, d]

    def _start_call(self, attention_mask: torch.Tensor | None, B: int, T: int, start: int, device):
        """Per-call state for T new tokens at columns start..start+T-1: sets `ctx` and returns RoPE cos and
        signed sin [B, T, 1, D] and the attention mask [B or 1, 1, T, S] bool, or None for plain causal
        attention. attention_mask: [B, S] bool (1 real, 0 padding) or None."""
        S = start + T
        columns = torch.arange(start, S, device=device).expand(B, T)                      # [B, T]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if attention_mask is None:
            positions, mask = columns, None
            if start > 0 and T > 1:                     # new tokens after cached ones: causal among themselves
                mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)[None, None]   # [1, 1, T, S]
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]       # [B, T]
            causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(start)           # [T, S]
            mask = causal & attention_mask[:, None, :]                                      # [B, T, S]
            mask = mask | (columns[:, :, None] == torch.arange(S, device=device))           # pads see self
            mask = mask[:, None]                                                            # [B, 1, T, S]
        ctx = self.ctx
        ctx.positions, ctx.attention_mask, ctx.is_prefill = columns, attention_mask, start == 0
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        return cos, sin, mask

    def dispatched(self) -> bool:
        """Whether accelerate's hooks are attached (`load_model(..., device_map=...)`)."""
        return any(hasattr(m, "_hf_hook") for m in self.modules())

    def decode_step_applies(self, dispatched: bool | None = None) -> bool:
        """Whether `decode_step` may replace forward: eval mode, no intervention active, not dispatched by
        accelerate (its hooks move weights and inputs). dispatched: the last condition if already known (it
        walks every module)."""
        if dispatched is None:
            dispatched = self.dispatched()
        return not (dispatched or self.training or self.active_interventions())

    def _plain(self, layer: int) -> bool:
        """Whether block `layer` runs with no hook and no intervention (so nothing observes its other tokens)."""
        block = self.transformer.blocks[layer]
        return not (block.ffn.edits or block.norm_attn_norm.attn.edits
                    or any(p.fns for p in self._points_of_layer[layer]))

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One KVCache per block, on the device the block runs on (accelerate's execution device if dispatched)."""
        cfg = self.config

        def device(b: Block):
            hook_device = getattr(getattr(b, "_hf_hook", None), "execution_device", None)
            return hook_device if hook_device is not None else b.ffn.router.layer.weight.device

        return [KVCache(batch, cfg.kv_n_heads, max_len, cfg.head_dim, self.dtype, device(b))
                for b in self.transformer.blocks]

    # --- generation, tracing, interventions --------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 50, **kwargs) -> torch.Tensor:
        """Prompt ids [B, T] (or a string, or chat messages) -> ids [B, T + n]; see generation.generate."""
        from .generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def generate_text(self, prompt, max_new_tokens: int = 50, **kwargs) -> str | list[str]:
        """A string or chat messages in, the generated continuation (decoded, without the prompt) out."""
        from .generation import generate_text

        return generate_text(self, prompt, max_new_tokens=max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens: int = 50, **kwargs) -> Iterator:
        """Yield a `generation.Step` per generated token (ids, text pieces, finished flags)."""
        from .generation import stream

        return stream(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def run_with_trace(self, input_ids, attention_mask=None, record: "Record | None" = None, **kwargs):
        """Forward pass that also returns a Trace (see dbrx_lab.trace)."""
        from .trace import run_with_trace

        return run_with_trace(self, input_ids, attention_mask=attention_mask, record=record, **kwargs)

    def generate_with_trace(self, input_ids, max_new_tokens: int = 50, record: "Record | None" = None,
                            **kwargs) -> tuple[torch.Tensor, "Trace"]:
        from .trace import generate_with_trace

        return generate_with_trace(self, input_ids, max_new_tokens=max_new_tokens, record=record, **kwargs)

    @contextlib.contextmanager
    def intervene(self, *interventions: "Intervention") -> Iterator["DbrxLM"]:
        """Apply interventions inside the block (forward, traces, generate); removed on exit, even on error."""
        from .interventions import attach_all

        with attach_all(self, interventions):
            yield self

    def active_interventions(self) -> list:
        seen: list = []
        for block in self.transformer.blocks:
            for edit in block.ffn.edits + block.norm_attn_norm.attn.edits:
                if not any(edit is s for s in seen):
                    seen.append(edit)
        return seen

    # --- checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, folder, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None):
        """Write config.json + (sharded) safetensors + index; loads in HF transformers and dbrx_lab."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
