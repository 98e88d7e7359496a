"""DBRX as one readable nn.Module, with state-dict names identical to HF's DbrxForCausalLM.

Shapes: B batch, T tokens in this call, S tokens in the cache (keys), d d_model, H query heads,
K kv heads, D head_dim, E experts, k experts per token, F ffn_hidden_size, N = B*T tokens, V vocab.

Every tensor worth seeing passes through a named HookPoint (`DbrxModel.hook_names(shapes=True)`); its
public name is its module path through `hooks.hook_alias`. How a module computes (attention, experts, the
linear layers, greedy unembedding) is a kernel chosen by name from `dbrx_lab.kernels`; the reference
kernels are the plain functions here. Interventions (dbrx_lab.interventions) edit routing and attention
through the `edits` of the calling context. Generation, traces, interventions and checkpoints are added to
the public class `dbrx_lab.DbrxLM` from their own modules (dbrx_lab/lm.py).
"""
from __future__ import annotations

import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .config import DbrxConfig
from .hooks import ForwardContext, HookedMixin, HookPoint, call_context, current_call, current_scope, edited
from .hooks import version as tensor_version
from .kernels import ATTENTION, EXPERTS, LINEAR
from .kernels.unembed import UnembedScreen

__all__ = ["DbrxModel", "DbrxOutput", "KVCache", "reference_experts", "reference_attention", "attention_pattern",
           "CacheFullError"]


def note_kernel(kind: str, layer: int | None, name: str) -> None:
    current_call().kernels[(kind, layer)] = name


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
    """x [B, T, heads, D] rotated with the rotate-half convention, x cos + (-x2, x1) sin. Rolling x by D/2
    gives (x2, x1); the sign is in signed_sin."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, -1), signed_sin)


def _holds_bool(x) -> bool:
    """Whether a (nested) list or tuple holds a Python or numpy bool."""
    if isinstance(x, (list, tuple)):
        return any(_holds_bool(v) for v in x)
    return type(x).__name__ in ("bool", "bool_")


def check_attention_mask(mask) -> None:
    """ValueError unless mask [B, S] holds only 0/1 (or bools), every row has a real token and each row's real
    tokens are contiguous (padding before and/or after them, no holes). One host sync."""
    mask = torch.as_tensor(mask)
    if mask.ndim != 2 or mask.shape[1] == 0:
        raise ValueError(f"attention_mask must be [batch, tokens], got shape {tuple(mask.shape)}")
    real = mask != 0
    ones = real.sum(-1)
    first = real.int().argmax(-1)
    last = mask.shape[1] - 1 - real.int().flip(-1).argmax(-1)
    problems = torch.stack([((mask != 0) & (mask != 1)).any(), (ones == 0).any(),
                            ((ones > 0) & (ones != last - first + 1)).any()]).tolist()
    if problems[0]:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token); got other values")
    if problems[1]:
        rows = torch.nonzero(ones == 0).flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no real token (all 0); every row needs at least one")
    if problems[2]:
        rows = torch.nonzero((ones > 0) & (ones != last - first + 1)).flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have holes (a 0 between 1s); pad on the left (a row's real "
                         f"tokens must be contiguous)")


# ------------------------------------------------------------------------------------------------
class CacheFullError(ValueError):
    """A call would write past the end of a KVCache."""


class KVCache:
    """Preallocated keys/values for one layer: k, v [B, K, S_max, D]; filled up to the columns written."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, K, t, D] at columns start..start+t-1 -> all keys/values so far [B, K, start+t, D]."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise CacheFullError(f"the KV cache is full: it holds {self.max_len} positions and this call writes "
                                 f"columns {start}..{end - 1}; make it with model.new_cache(batch, max_len >= {end})")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class ReadOnlyCache:
    """A cache view for a side pass: returns the cached columns before `start` plus the new ones, writes nothing."""

    def __init__(self, cache: KVCache | None) -> None:
        self.cache = cache

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        if self.cache is None or start == 0:
            return k, v
        return (torch.cat([self.cache.k[:, :, :start], k], dim=2), torch.cat([self.cache.v[:, :, :start], v], dim=2))


# ------------------------------------------------------------------------------------------------
# Attention (reference kernel and the pattern computed on the side for observers)
def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, D], k [B, K, S, D] -> scaled scores [B, H, T, S] with masked entries -inf. The G = H/K
    query heads of a KV head are stacked as G*T rows of one product with it (GQA without copying K)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    scores = (q.reshape(B, K, H // K * T, D) @ k.transpose(-1, -2)).view(B, H, T, S).div_(math.sqrt(D))
    if mask is None and T > 1:                                  # causal: the T queries are the last T keys
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))
    return scores


def softmax_pattern(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def attend(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """pattern [B, H, T, S], v [B, K, S, D] -> z [B, H, T, D] (GQA as in attention_scores)."""
    B, H, T, S = pattern.shape
    K = v.shape[1]
    return (pattern.reshape(B, K, H // K * T, S) @ v).view(B, H, T, v.shape[-1])


@ATTENTION.register("reference")
def reference_attention(q, k, v, mask):
    """q [B, H, T, D], k, v [B, K, S, D], mask [B|1, 1, T, S] or None (causal) -> z [B, H, T, D]."""
    return attend(softmax_pattern(attention_scores(q, k, mask)), v)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, heads: Sequence[int],
                      rows: Sequence[int]) -> torch.Tensor:
    """The softmax pattern of some heads and query rows: q [B, H, T, D], k [B, K, S, D], mask as in
    attention_scores -> [B, len(heads), len(rows), S] float32. Only those heads and rows are computed."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    heads, rows = list(heads), list(rows)
    heads_t = torch.as_tensor(heads, device=q.device)
    qs = q if heads == list(range(H)) else q.index_select(1, heads_t)
    qs = qs if rows == list(range(T)) else qs[:, :, rows]                             # [B, h, r, D]
    ks = k.index_select(1, heads_t // (H // K))                                      # [B, h, S, D]
    scores = (qs @ ks.transpose(-1, -2)).div_(math.sqrt(D))                          # [B, h, r, S]
    scores = scores.masked_fill_(~_rows_mask(mask, rows, T, S, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def _rows_mask(mask: torch.Tensor | None, rows: list[int], T: int, S: int, device) -> torch.Tensor:
    """The [B|1, 1, r, S] bool mask of some query rows (mask None: causal, the T queries the last T keys)."""
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    return mask if rows == list(range(T)) else mask[:, :, rows]


class Linear(nn.Linear):
    """nn.Linear without bias whose product is a registered linear kernel (`impl`); same state dict."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, kernel = LINEAR.choose(self.impl, flat, self.weight)
        return kernel(flat, self.weight).view(*x.shape[:-1], -1)


LINEAR.register("reference")(F.linear)


class Attention(nn.Module):
    """GQA attention with clip_qkv and RoPE; the attention itself is a registered kernel (`impl`)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
        self.impl = "auto"
        self.Wqkv = Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_n_heads * cfg.head_dim)
        self.out_proj = Linear(cfg.d_model, cfg.d_model)
        self.hook_q = HookPoint(("batch", "pos", "head", "d_head"))            # after clip and RoPE
        self.hook_k = HookPoint(("batch", "pos", "kv_head", "d_head"))         # this call's tokens only
        self.hook_v = HookPoint(("batch", "pos", "kv_head", "d_head"))
        self.hook_scores = HookPoint(("batch", "head", "query", "key"))        # scaled, masked entries -inf
        self.hook_pattern = HookPoint(("batch", "head", "query", "key"))       # softmax of the scores
        self.hook_z = HookPoint(("batch", "pos", "head", "d_head"))            # per-head output before out_proj

    @property
    def edits(self) -> tuple:
        """Interventions attached to this module in the calling context (`edit_z`)."""
        return current_scope().edits.get(self, ())

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None, start: int, last_only: bool = False) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]; last_only: keys and values of all T tokens (cached), the query of the last
        one only -> [B, 1, d]. mask [B|1, 1, T, S] bool or None (causal)."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.Wqkv(x)                                                         # [B, T, (H+2K)D]
        if self.cfg.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.cfg.clip_qkv, max=self.cfg.clip_qkv)
        qk = apply_rope(qkv[..., :(H + K) * D].view(B, T, H + K, D), *rope)       # q and k heads at once
        q = self.hook_q(qk[:, :, :H])                                              # [B, T, H, D]
        k = self.hook_k(qk[:, :, H:])                                              # [B, T, K, D]
        v = self.hook_v(qkv[..., (H + K) * D:].view(B, T, K, D))                  # [B, T, K, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)                                # [B, K, T, D]
        if cache is not None:
            k, v = cache.update(start, k, v)                                       # [B, K, S, D]
        q = q.transpose(1, 2)                                                      # [B, H, T, D]
        if last_only:                                                              # the last query sees all keys
            q, mask = q[:, :, -1:], None if mask is None else mask[:, :, -1:]
            current_call().narrow(T - 1, T)
        name, kernel = ATTENTION.choose(self.impl, q, k)
        note_kernel("attention", self.hook_z.layer, name)
        z = self.observe_pattern(q, k, v, mask, kernel(q, k, v, mask))            # [B, H, t, D]
        z = self.hook_z(z.transpose(1, 2))                                         # [B, t, H, D]
        for edit in self.edits:
            z = edit.edit_z(z, self.hook_z.layer, current_call())
        return self.out_proj(z.reshape(B, z.shape[1], H * D))

    def observe_pattern(self, q, k, v, mask, z):
        """Scores and pattern for observers, computed beside the output z [B, H, t, D]: captures (a trace's
        selected heads and rows) and hook_scores / hook_pattern. Unless a hook edits them, z is returned as
        the kernel computed it; an edited pattern gives z = pattern @ v."""
        scope = current_scope()
        for capture in scope.captures.get(self, ()):
            capture(self, q, k, mask)
        if not (scope.fns.get(self.hook_scores) or scope.fns.get(self.hook_pattern)):
            return z
        scores = attention_scores(q, k, mask)
        version = tensor_version(scores)
        hooked = self.hook_scores(scores)
        change = edited(scores, version, hooked)
        pattern = softmax_pattern(hooked)
        version = tensor_version(pattern)
        hooked = self.hook_pattern(pattern)
        change = change or edited(pattern, version, hooked)
        return attend(hooked, v) if change else z


class NormAttnNorm(nn.Module):
    """norm_1 -> attention -> + residual -> norm_2 (HF's DbrxNormAttentionNorm): x -> (resid_mid, normed)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.hook_attn_out = HookPoint()    # attention output after out_proj
        self.hook_resid_mid = HookPoint()
        self.norm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)

    def forward(self, x, rope, mask, cache, start, last_only: bool = False):
        """x [B, T, d] -> (resid_mid, norm_2(resid_mid)) [B, T, d] (or [B, 1, d] with last_only)."""
        attn_out = self.hook_attn_out(self.attn(self.norm_1(x), rope, mask, cache, start, last_only))
        if last_only:
            x = x[:, -1:]
        resid = self.hook_resid_mid(x + attn_out)
        return resid, self.norm_2(resid)


# ------------------------------------------------------------------------------------------------
# Mixture of experts
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

    def expert(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] through expert e -> (output [n, d], GLU hidden [n, F]): (silu(x w1_e^T) * x v1_e^T) w2_e."""
        rows = slice(e * self.ffn, (e + 1) * self.ffn)
        h = F.silu(x @ self.w1[rows].T) * (x @ self.v1[rows].T)                    # [n, F]
        return h @ self.w2[rows], h


@EXPERTS.register("reference")
def reference_experts(mlp: ExpertGLU, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                      observe: bool = False):
    """y = sum_k w_k GLU_{e_k}(x), one expert at a time; each token's outputs added in ascending expert order.
    x [N, d], experts and weights [N, k] -> (y [N, d], unweighted outputs [N, k, d], GLU hidden L2 norms
    [N, k] float32; the last two only with observe)."""
    N, k = experts.shape
    out = torch.zeros_like(x)
    outs = x.new_zeros(N, k, x.shape[1]) if observe else None
    norms = x.new_zeros(N, k, dtype=torch.float32) if observe else None
    for e in experts.unique().tolist():                                           # ascending
        token, slot = (experts == e).nonzero(as_tuple=True)                        # rows routed to e
        y, h = mlp.expert(x[token], e)
        out.index_add_(0, token, y * weights[token, slot, None])                   # a token occurs once per e
        if observe:
            outs[token, slot], norms[token, slot] = y, h.float().norm(dim=-1)
    return out, outs, norms


def weighted_sum(outs: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """outs [N, k, d] (e.g. edited by a hook) -> sum_k w_k outs_k, each token's in ascending expert order."""
    order = experts.argsort(dim=-1, stable=True)
    y = (outs * weights[..., None]).gather(1, order[..., None].expand_as(outs))
    total = torch.zeros_like(y[:, 0])
    for j in range(y.shape[1]):
        total += y[:, j]
    return total


class Experts(nn.Module):
    """The experts of one layer; how they are computed is a registered experts kernel (`impl`)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.mlp = ExpertGLU(cfg)
        self.impl = "auto"
        self.layer: int | None = None

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, observe: bool = False):
        """x [N, d], experts [N, k], weights [N, k] -> (y [N, d], unweighted outputs [N, k, d] | None,
        GLU hidden norms [N, k] | None); see kernels.registry.EXPERTS."""
        name, kernel = EXPERTS.choose(self.impl, self.mlp, x)
        note_kernel("experts", self.layer, name)
        return kernel(self.mlp, x, experts, weights, observe)


def check_expert_ids(experts: torch.Tensor, n_experts: int, where: str) -> None:
    """ValueError unless every id is in [0, n_experts) (an id past the end would silently add nothing)."""
    bad = (experts < 0) | (experts >= n_experts)
    if bool(bad.any()):
        raise ValueError(f"{where}: expert id {int(experts[bad][0])} out of range: this model has experts "
                         f"0..{n_experts - 1}")


class MoE(nn.Module):
    """Router -> float32 softmax -> top-k -> p-norm renormalisation -> experts -> weighted sum."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.moe_top_k
        self.router = Router(cfg)
        self.hook_router_logits = HookPoint(("batch", "pos", "expert"))      # raw, before softmax
        self.hook_topk_experts = HookPoint(("batch", "pos", "k"))            # long, descending weight
        self.hook_topk_weights = HookPoint(("batch", "pos", "k"))            # applied (after renorm and edits)
        self.experts = Experts(cfg)
        self.hook_expert_hidden_norm = HookPoint(("batch", "pos", "k"))      # L2 norm of each GLU hidden
        self.hook_expert_out = HookPoint(("batch", "pos", "k", "d_model"))   # each chosen expert's output

    @property
    def edits(self) -> tuple:
        """Interventions attached to this module in the calling context (see interventions.Intervention)."""
        return current_scope().edits.get(self, ())

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [N, E] -> (experts [N, k] long, weights [N, k] float32), with the edits of this context."""
        edits, layer, ctx = self.edits, self.hook_router_logits.layer, current_call()
        for edit in edits:
            logits = edit.edit_logits(logits, layer, ctx)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)                # [N, E]
        k = self.top_k
        for edit in edits:
            k = edit.edit_top_k(k, layer)
        weights, experts = probs.topk(k, dim=-1)                                   # [N, k]
        for edit in edits:
            experts = edit.edit_experts(experts, probs, layer, ctx)
        if edits:
            weights = probs.gather(-1, experts)
        p = self.cfg.moe_normalize_expert_weights
        if p is not None:
            weights = weights / weights.norm(p=p, dim=-1, keepdim=True)
        for edit in edits:
            weights = edit.edit_weights(weights, experts, probs, layer, ctx)
        if edits:
            weights, order = weights.sort(dim=-1, descending=True, stable=True)
            experts = experts.gather(-1, order)
        return experts, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (sum of the chosen experts' weighted outputs [B, T, d], router logits [N, E])."""
        B, T, d = x.shape
        flat = x.reshape(-1, d)                                                    # [N, d]
        logits = self.hook_router_logits(self.router(flat).view(B, T, -1)).view(B * T, -1)   # [N, E]
        experts, weights = self.route(logits)
        chosen = experts.view(B, T, -1)
        chosen_version = tensor_version(chosen)
        experts = self.hook_topk_experts(chosen)
        if edited(chosen, chosen_version, experts):    # only a hook's ids are checked (a host sync)
            check_expert_ids(experts, self.cfg.moe_num_experts, self.hook_topk_experts.name)
        experts = experts.reshape(B * T, -1)                                        # [N, k]
        weights = self.hook_topk_weights(weights.to(x.dtype).view(B, T, -1)).view(B * T, -1)
        fns = current_scope().fns
        observe = bool(fns.get(self.hook_expert_out) or fns.get(self.hook_expert_hidden_norm))
        out, outs, hidden_norm = self.experts(flat, experts, weights, observe)
        if observe:                                    # values the kernel computed anyway; out unchanged
            self.hook_expert_hidden_norm(hidden_norm.view(B, T, -1))
            outs = outs.view(B, T, -1, d)
            version = tensor_version(outs)
            hooked = self.hook_expert_out(outs)
            if edited(outs, version, hooked):
                out = weighted_sum(hooked.reshape(B * T, -1, d), experts, weights)
        return out.view(B, T, d), logits


class Block(nn.Module):
    def __init__(self, cfg: DbrxConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.hook_resid_pre = HookPoint()
        self.norm_attn_norm = NormAttnNorm(cfg)
        self.ffn = MoE(cfg)
        self.ffn.experts.layer = layer
        self.hook_ffn_out = HookPoint()     # weighted sum of the chosen experts' outputs
        self.hook_resid_post = HookPoint()

    def forward(self, x, rope, mask, cache, start, last_only: bool = False):
        """x [B, T, d] -> (x [B, T, d], router logits [N, E]). last_only: fill the cache with all T tokens
        but compute the rest of the block for the last one only -> x [B, 1, d] (a prefill's last block)."""
        x = self.hook_resid_pre(x)
        resid, h = self.norm_attn_norm(x, rope, mask, cache, start, last_only)
        ffn_out, router_logits = self.ffn(h)
        return self.hook_resid_post(resid + self.hook_ffn_out(ffn_out)), router_logits

    def observed(self) -> bool:
        """Whether any hook or capture of this block is attached in the calling context."""
        scope = current_scope()
        return any(p in scope.fns for p in self._points) or self.norm_attn_norm.attn in scope.captures


class Transformer(nn.Module):
    """wte -> blocks -> norm_f (HF's DbrxModel)."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.hook_final = HookPoint()       # after norm_f: the input of lm_head

    def forward(self, input_ids, rope, mask, cache=None, start: int = 0, last_only: bool = False,
                router_logits: list | None = None):
        """input_ids [B, T] -> final hidden states [B, T, d] ([B, 1, d] with last_only).

        last_only computes the last block for the last token only (the cache still gets every token), unless
        an intervention there needs every token (`needs_every_token`: HeadAblation's prompt mean). When something
        observes that block, a side pass computes it for the other tokens too, for the observers
        only (a cache view that writes nothing), so the output is computed exactly as without observers.
        """
        x = self.hook_embed(self.wte(input_ids))                                   # [B, T, d]
        T, last = x.shape[1], len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            prune = (last_only and T > 1 and i == last and router_logits is None
                     and not any(e.needs_every_token for e in block.norm_attn_norm.attn.edits + block.ffn.edits))
            if prune and block.observed():
                with current_call().side_pass(0, T - 1):
                    block(x[:, :-1], tuple(r[:, :-1] for r in rope), None if mask is None else mask[:, :, :-1, :-1],
                          ReadOnlyCache(layer_cache), start)
            x, logits = block(x, rope, mask, layer_cache, start, prune)
            if router_logits is not None:
                router_logits.append(logits)
        if last_only and x.shape[1] > 1:
            x = x[:, -1:]
            current_call().narrow(T - 1, T)
        return self.hook_final(self.norm_f(x))


class Unembed(Linear):
    """lm_head. For a greedy generation step whose logits nobody observes (no torch hook on this module),
    the caller may pass an UnembedScreen: the logits are then exact where a row's maximum can be and -inf
    elsewhere (kernels/unembed.py), the same argmax for a quarter of the bytes read."""

    def forward(self, x: torch.Tensor, screen: UnembedScreen | None = None) -> torch.Tensor:
        if screen is None or x.shape[1] != 1 or self.observed():
            return super().forward(x)
        current_call().kernels[("unembed", None)] = "int8-screen"
        return screen.logits(x[:, 0], self.weight)[:, None]                       # [B, 1, V]

    def observed(self) -> bool:
        """Whether a torch hook (this module's or a global one) or nnsight (which replaces the instance's
        forward) watches this module's output."""
        return bool(self._forward_hooks or self._forward_pre_hooks or torch_module._global_forward_hooks
                    or torch_module._global_forward_pre_hooks or "forward" in self.__dict__)


@dataclass
class DbrxOutput:
    """logits [B, T, V] (or [B, 1, V] with last_only); loss: mean next-token CE when labels are given;
    router_logits: per layer [N, E] when asked for (training losses); hidden: lm_head's input [B, T, d]."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    hidden: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------------
class DbrxModel(HookedMixin, nn.Module):
    """DBRX causal LM: transformer + lm_head. `DbrxModel(cfg)` is a plain constructor (works under
    `torch.device("meta")`). The public class with generation, traces and interventions is dbrx_lab.DbrxLM."""

    def __init__(self, cfg: DbrxConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = Unembed(cfg.d_model, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.name_hook_points()
        self.tokenizer = None               # set by load_model; used when generate() gets text
        self.execution_device: torch.device | None = None   # accelerate's main device when dispatched
        self.expert_runtime = None          # dbrx_lab.offload.OffloadRuntime when loaded with experts="offload"
        self.expert_cache = None            # its fast-tier ExpertCache (`.stats()`)
        self._lock = threading.RLock()      # serializes calls on a dispatched model (accelerate swaps weights)
        self.reset_parameters()

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickle: the lock is not copied (a copy gets its own)."""
        state = super().__getstate__()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _dim_sizes(self) -> dict[str, int]:
        c = self.config
        return {"d_model": c.d_model, "head": c.n_heads, "kv_head": c.kv_n_heads, "d_head": c.head_dim,
                "expert": c.moe_num_experts, "k": c.moe_top_k}

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Normal(0, std) for every matrix (std defaults to initializer_range), ones for norms."""
        std = self.config.initializer_range if std is None else std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # --- kernels -----------------------------------------------------------------------------------
    def name_hook_points(self) -> None:
        """(Re)name every hook point from its module path (after a module swap, e.g. offloaded experts)."""
        self.hook_points = self._name_hook_points()
        for block in self.transformer.blocks:
            block._points = [p for p in self.hook_points.values() if p.layer == block.layer]

    def set_kernels(self, experts: str | None = None, attention: str | None = None, linear: str | None = None,
                    screen_greedy: bool | None | str = "keep") -> "DbrxModel":
        """Choose kernels by name for every layer ("auto" picks per call; see dbrx_lab.kernels).
        screen_greedy: lm_head's int8 screen for greedy decoding (None: when it pays; False: never)."""
        if experts is not None:
            EXPERTS.check(experts)
            for block in self.transformer.blocks:
                block.ffn.experts.impl = experts
        if attention is not None:
            ATTENTION.check(attention)
            for block in self.transformer.blocks:
                block.norm_attn_norm.attn.impl = attention
        if linear is not None:
            LINEAR.check(linear)
            for m in self.modules():
                if isinstance(m, Linear):
                    m.impl = linear
        if screen_greedy != "keep":
            self.lm_head.screen_greedy = screen_greedy
        return self

    def kernels(self) -> dict[str, str]:
        b = self.transformer.blocks[0]
        return {"experts": b.ffn.experts.impl, "attention": b.norm_attn_norm.attn.impl,
                "linear": self.lm_head.impl}

    # --- devices -----------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.blocks

    @property
    def device(self) -> torch.device:
        """The main (execution) device: accelerate's when dispatched, else the first parameter not on meta."""
        if self.execution_device is not None:
            return torch.device(self.execution_device)
        hook = getattr(self, "_hf_hook", None) or getattr(self.transformer.wte, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        for p in self.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def dispatched(self) -> bool:
        """Whether accelerate's hooks are attached (`load_model(..., device_map=...)` or dispatched by hand)."""
        return any(hasattr(m, "_hf_hook") for m in self.modules())

    # --- forward -----------------------------------------------------------------------------------
    def validate_input_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            if _holds_bool(input_ids):          # torch.as_tensor([0, False]) would make it 0
                raise ValueError("input_ids must be integer token ids, got a bool among them")
            try:                                # no dtype: float ids ([1.5, 2.7]) must not be truncated
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError, OverflowError) as err:
                raise ValueError(f"input_ids must be integer token ids [batch, tokens]: {err}") from None
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one row of one token")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
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
                output_router_logits: bool = False, last_only: bool = False,
                greedy_screen: UnembedScreen | None = None, validate: bool = True) -> DbrxOutput:
        """input_ids [B, T] -> DbrxOutput(logits [B, T, V]).

        attention_mask [B, start+T] (1 real, 0 padding; left padding expected) covers the cache too.
        cache/start: per-layer KVCache and the column this call starts at (for decoding).
        last_only: logits of the last position only ([B, 1, V]); the last block runs for it alone.
        greedy_screen: lm_head's screen for a greedy decoding step (see Unembed); validate=False skips the
        token-id checks (generation feeds ids it produced; on a GPU the check would wait for the device).
        """
        if validate:
            input_ids = self.validate_input_ids(input_ids)
        B, T = input_ids.shape
        if start + T > self.config.max_seq_len:
            raise ValueError(f"position {start + T} exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and start + T > cache[0].max_len:
            raise CacheFullError(f"the KV cache is full: it holds {cache[0].max_len} positions and this call "
                                 f"writes columns {start}..{start + T - 1}; make it with "
                                 f"model.new_cache(batch, max_len >= {start + T})")
        device = self.device
        input_ids = input_ids.to(device)
        S = start + T
        if attention_mask is not None:
            if validate:
                check_attention_mask(attention_mask)
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must be [batch, {S}] (cache + new tokens), got "
                                 f"{tuple(attention_mask.shape)}")
        ctx, rope, mask = self._call_context(attention_mask, B, T, start, device)
        router_logits = [] if output_router_logits else None
        with self._lock if self.dispatched() else nullcontext(), call_context(ctx):
            x = self.transformer(input_ids, rope, mask, cache, start, last_only, router_logits)   # [B, T, d]
            logits = self.lm_head(x, greedy_screen) if greedy_screen is not None else self.lm_head(x)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return DbrxOutput(logits, loss, tuple(router_logits) if output_router_logits else None, x)

    def _call_context(self, attention_mask: torch.Tensor | None, B: int, T: int, start: int, device):
        """Per-call state for T new tokens at columns start..start+T-1 -> (ForwardContext, RoPE cos and signed
        sin [B, T, 1, D], attention mask [B or 1, 1, T, S] bool or None for plain causal attention)."""
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
        ctx = ForwardContext(columns, range(start, S), attention_mask, start == 0)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        return ctx, rope, mask

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One KVCache per block, on the device the block runs on (accelerate's execution device if dispatched)."""
        cfg = self.config

        def device(b: Block):
            hook_device = getattr(getattr(b, "_hf_hook", None), "execution_device", None)
            if hook_device is not None:
                return hook_device
            weight = b.ffn.router.layer.weight
            return self.device if weight.device.type == "meta" else weight.device

        return [KVCache(batch, cfg.kv_n_heads, max_len, cfg.head_dim, self.dtype, device(b))
                for b in self.transformer.blocks]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
