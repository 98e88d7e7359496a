"""Interventions: edits of routing and attention that apply inside `model.intervene(...)`.

    with model.intervene(ExpertAblation(layer=3, experts=[5, 11], mode="reroute"), TopK(2, layer="all")):
        out = model(ids)                      # also model.generate(...), run_with_trace, generate_with_trace

Each intervention is attached, in the calling thread (context) only, to the `edits` of the modules it
touches (`blocks[i].ffn` for routing edits, `blocks[i].norm_attn_norm.attn` for head edits) and removed on
exit, even on error.
Edits apply in order (outer `intervene` blocks first, then argument order). The MoE calls, per layer:
`edit_logits` -> `edit_top_k` -> `edit_experts` -> (weights re-gathered from the probabilities and
p-norm renormalised) -> `edit_weights`, then sorts the chosen experts by weight; attention calls
`edit_z` on the per-head output before out_proj. Traces record what was actually applied.

Shapes: N = B*T tokens of this call (row-major), E experts, k chosen per token, H heads, D head_dim.
`positions`: absolute columns of the (left-padded) input, as in `ctx.positions` and in traces;
None means every position. `layer`/`layers`: an int, a list of ints, or "all".
p: `config.moe_normalize_expert_weights` (DBRX: 1, so applied weights sum to 1); where a config has
none, weights keep their sum instead.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import operator
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, Union

import torch

from .config import DbrxConfig
from .hooks import ForwardContext, scoped

if TYPE_CHECKING:
    from .lm import DbrxLM

__all__ = ["Intervention", "ExpertAblation", "ExpertForce", "ExpertScale", "TopK", "HeadAblation",
           "RoutingPatch", "attach_all", "intervene", "active_interventions"]

LayerSpec = Union[int, Sequence[int], str]
IntSpec = Union[int, Sequence[int]]


# ------------------------------------------------------------------------------------------------
# argument checking
def _ints(name: str, value, allow_all: bool = False) -> tuple[int, ...] | str:
    """An int or a non-empty sequence of distinct ints >= 0 (or "all") -> sorted tuple (or "all")."""
    if allow_all and isinstance(value, str):
        if value != "all":
            raise ValueError(f"{name} must be an int, a list of ints or 'all', got {value!r}")
        return "all"
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and hasattr(value, "dtype")):
        value = value.tolist()                  # a tensor or numpy array / scalar
    items = [value] if _is_int(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        kinds = "an int, a list of ints or 'all'" if allow_all else "an int or a list of ints"
        raise ValueError(f"{name} must be {kinds}, got {value!r}")
    items = list(items)
    if not items:
        raise ValueError(f"{name} must not be empty")
    for i, v in enumerate(items):
        if not _is_int(v) or operator.index(v) < 0:
            raise ValueError(f"{name} must be integers >= 0, got {v!r}")
        items[i] = operator.index(v)            # numpy integers work like ints
    if len(set(items)) != len(items):
        raise ValueError(f"{name} has duplicates: {items}")
    return tuple(sorted(items))


def _is_int(v) -> bool:
    """An int or an integer scalar of numpy (np.int64, ...): not a bool, float or str."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and hasattr(v, "__index__") and \
        type(v).__name__ != "bool_"


def _number(v) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v).__name__ != "bool_"


def _positions(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, range):
        value = list(value)
    return _ints("positions", value)


def _in_range(name: str, values: Sequence[int], n: int, what: str) -> None:
    bad = [v for v in values if v >= n]
    if bad:
        raise ValueError(f"{name} {bad} out of range: this model has {what} 0..{n - 1}")


def _fmt(values) -> str:
    if values is None or isinstance(values, str):
        return repr(values)
    return str(values[0]) if len(values) == 1 else str(list(values))


def _overlap(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


# ------------------------------------------------------------------------------------------------
class Intervention:
    """Base class: every edit is the identity. Subclasses override the edits they need.

    site: "ffn" (the MoE's `edits`) or "attn" (the attention's `edits`).
    """

    site = "ffn"
    needs_every_token = False       # True: a pruned prefill must still run its layers for every prompt token

    @property
    def removes_experts(self) -> bool:
        """Whether this edit takes `self.experts` out of the router's choice (checked: top-k must stay possible)."""
        return False

    def __init__(self, layer: LayerSpec = "all", positions: IntSpec | None = None) -> None:
        self.layer = _ints("layer", layer, allow_all=True)
        self.positions = _positions(positions)
        self.config: DbrxConfig | None = None

    # --- attaching -------------------------------------------------------------------------------
    def layers(self, cfg: DbrxConfig) -> list[int]:
        """The layers this intervention edits under `cfg`."""
        return list(range(cfg.n_layers)) if self.layer == "all" else list(self.layer)

    def attach(self, cfg: DbrxConfig) -> None:
        """Check the arguments against the model config (ValueError naming the valid range); reset state."""
        if self.layer != "all":
            _in_range("layer", self.layer, cfg.n_layers, "layers")
        if self.positions is not None:
            _in_range("positions", self.positions, cfg.max_seq_len, "positions")
        self.config = cfg

    # --- edits (identity) ------------------------------------------------------------------------
    def edit_logits(self, logits: torch.Tensor, layer: int, ctx: ForwardContext) -> torch.Tensor:
        """Router logits [N, E] before softmax."""
        return logits

    def edit_top_k(self, k: int, layer: int) -> int:
        return k

    def edit_experts(self, experts: torch.Tensor, probs: torch.Tensor, layer: int,
                     ctx: ForwardContext) -> torch.Tensor:
        """Chosen experts [N, k] long; probs [N, E] float32 softmax of the (edited) logits."""
        return experts

    def edit_weights(self, weights: torch.Tensor, experts: torch.Tensor, probs: torch.Tensor, layer: int,
                     ctx: ForwardContext) -> torch.Tensor:
        """Applied weights [N, k] float32 (renormalised), aligned with experts [N, k]."""
        return weights

    def edit_z(self, z: torch.Tensor, layer: int, ctx: ForwardContext) -> torch.Tensor:
        """Per-head attention output [B, T, H, D] before out_proj."""
        return z

    # --- helpers ---------------------------------------------------------------------------------
    def token_mask(self, ctx: ForwardContext) -> torch.Tensor | None:
        """[B, T] bool: tokens of this call at `self.positions`; None when every token is edited."""
        if self.positions is None:
            return None
        if ctx.positions is None:
            raise RuntimeError(f"{self!r} needs ctx.positions: call it through DbrxLM.forward")
        wanted = torch.tensor(self.positions, device=ctx.positions.device)
        return torch.isin(ctx.positions, wanted)

    def row_mask(self, ctx: ForwardContext, n: int, device) -> torch.Tensor:
        """[N] bool over the flattened tokens of this call (all True without `positions`)."""
        mask = self.token_mask(ctx)
        if mask is None:
            return torch.ones(n, dtype=torch.bool, device=device)
        if mask.numel() != n:
            raise RuntimeError(f"{self!r}: ctx.positions has {mask.numel()} tokens, the MoE got {n}")
        return mask.reshape(-1).to(device)

    def norm_p(self) -> float | None:
        return None if self.config is None else self.config.moe_normalize_expert_weights

    def describe(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self._fields())})"

    def _fields(self) -> list[tuple[str, str]]:
        return [("layer", _fmt(self.layer)), ("positions", _fmt(self.positions))]

    def __repr__(self) -> str:
        return self.describe()


def _renormalise(weights: torch.Tensor, before: torch.Tensor, p: float | None) -> torch.Tensor:
    """Rescale each row of weights [N, k] to the p-norm 1 (p None: to the row sum of `before`); 0-rows stay 0."""
    if p is not None:
        norm = weights.norm(p=p, dim=-1, keepdim=True)
        return torch.where(norm > 0, weights / norm.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
    total, now = before.sum(-1, keepdim=True), weights.sum(-1, keepdim=True)
    return torch.where(now > 0, weights * total / now.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)


# ------------------------------------------------------------------------------------------------
class ExpertAblation(Intervention):
    """Remove experts from a layer's routing.

    mode "reroute": their router logits become -inf before top-k, so top-k picks from the others
        (renormalised as usual): the model routes around them.
    mode "zero": routing unchanged; their applied weight becomes 0, the other weights are unchanged.
    mode "renormalize": routing unchanged; their weight becomes 0 and the survivors are renormalised
        to p-norm 1 (a token whose chosen experts are all ablated gets no expert output).
    """

    MODES = ("reroute", "zero", "renormalize")

    def __init__(self, layer: LayerSpec, experts: IntSpec, mode: str = "reroute",
                 positions: IntSpec | None = None) -> None:
        super().__init__(layer, positions)
        self.experts = _ints("experts", experts)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        _in_range("experts", self.experts, cfg.moe_num_experts, "experts")

    @property
    def removes_experts(self) -> bool:
        return self.mode == "reroute"

    def edit_logits(self, logits, layer, ctx):
        if self.mode != "reroute":
            return logits
        drop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        drop[list(self.experts)] = True
        drop = self.row_mask(ctx, logits.shape[0], logits.device)[:, None] & drop          # [N, E]
        return logits.masked_fill(drop, float("-inf"))

    def edit_weights(self, weights, experts, probs, layer, ctx):
        if self.mode == "reroute":
            return weights
        rows = self.row_mask(ctx, weights.shape[0], weights.device)[:, None]              # [N, 1]
        hit = rows & torch.isin(experts, torch.tensor(self.experts, device=experts.device))
        kept = weights.masked_fill(hit, 0.0)
        if self.mode == "renormalize":
            kept = torch.where(rows, _renormalise(kept, weights, self.norm_p()), kept)
        return kept

    def _fields(self):
        return [("layer", _fmt(self.layer)), ("experts", _fmt(self.experts)), ("mode", repr(self.mode)),
                ("positions", _fmt(self.positions))]


class ExpertForce(Intervention):
    """Make expert(s) always among the chosen at a layer.

    A forced expert that top-k did not pick replaces the lowest-probability chosen expert that is not
    forced itself. weight=None: every chosen expert gets its natural probability, renormalised together
    (p-norm) as usual. weight=w (0..1): each forced expert's applied weight is exactly w, and the other
    chosen experts' weights are multiplied by one common factor so the weights keep p-norm 1 (DBRX:
    they still sum to 1; with k forced experts or w*len(expert) = 1 the others get 0).
    To force several experts at one layer, pass them as one list (several ExpertForce on the same
    layer and positions raise ValueError).
    """

    def __init__(self, layer: LayerSpec, expert: IntSpec, weight: float | None = None,
                 positions: IntSpec | None = None) -> None:
        super().__init__(layer, positions)
        self.experts = _ints("expert", expert)
        if weight is not None:
            if not _number(weight) or not 0.0 <= weight <= 1.0:
                raise ValueError(f"weight must be None or a number in [0, 1], got {weight!r}")
            if weight * len(self.experts) > 1.0 + 1e-9:
                raise ValueError(f"weight {weight} for {len(self.experts)} forced experts sums past 1: "
                                 f"use at most {1.0 / len(self.experts):.4g}")
            weight = float(weight)
        self.weight = weight

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        _in_range("expert", self.experts, cfg.moe_num_experts, "experts")

    def _forced(self, device) -> torch.Tensor:
        return torch.tensor(self.experts, device=device)

    def edit_experts(self, experts, probs, layer, ctx):
        N, k = experts.shape
        f = len(self.experts)
        if f > k:
            raise ValueError(f"layer {layer}: cannot force {f} experts with top_k={k}: force 1..{k}")
        forced = self._forced(experts.device).expand(N, f)                                  # [N, f]
        cand = torch.cat([forced, experts], dim=1)                                          # [N, f+k]
        score = probs.gather(-1, cand)
        score[:, :f] = float("inf")
        score[:, f:] = score[:, f:].masked_fill(torch.isin(experts, forced[0]), float("-inf"))
        chosen = cand.gather(-1, score.topk(k, dim=-1).indices)                             # [N, k]
        rows = self.row_mask(ctx, N, experts.device)[:, None]
        return torch.where(rows, chosen, experts)

    def edit_weights(self, weights, experts, probs, layer, ctx):
        if self.weight is None:
            return weights
        rows = self.row_mask(ctx, weights.shape[0], weights.device)[:, None]
        is_forced = torch.isin(experts, self._forced(experts.device))                       # [N, k]
        p = self.norm_p()
        w, f = self.weight, len(self.experts)
        others = weights.masked_fill(is_forced, 0.0)
        if p is None:
            total = weights.sum(-1, keepdim=True)
            scale = (total - f * w).clamp_min(0.0) / others.sum(-1, keepdim=True)
        else:
            scale = (max(1.0 - f * w ** p, 0.0) / others.pow(p).sum(-1, keepdim=True)) ** (1.0 / p)
        scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0)
        edited = torch.where(is_forced, torch.full_like(weights, w), others * scale)
        return torch.where(rows, edited, weights)

    def _fields(self):
        return [("layer", _fmt(self.layer)), ("expert", _fmt(self.experts)), ("weight", repr(self.weight)),
                ("positions", _fmt(self.positions))]


class ExpertScale(Intervention):
    """Multiply the applied weight of expert(s) by `factor` wherever they are chosen (no renormalisation)."""

    def __init__(self, layer: LayerSpec, expert: IntSpec, factor: float, positions: IntSpec | None = None) -> None:
        super().__init__(layer, positions)
        self.experts = _ints("expert", expert)
        if not _number(factor) or not math.isfinite(factor):
            raise ValueError(f"factor must be a finite number, got {factor!r}")
        self.factor = float(factor)

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        _in_range("expert", self.experts, cfg.moe_num_experts, "experts")

    def edit_weights(self, weights, experts, probs, layer, ctx):
        rows = self.row_mask(ctx, weights.shape[0], weights.device)[:, None]
        hit = rows & torch.isin(experts, torch.tensor(self.experts, device=experts.device))
        return torch.where(hit, weights * self.factor, weights)

    def _fields(self):
        return [("layer", _fmt(self.layer)), ("expert", _fmt(self.experts)), ("factor", repr(self.factor)),
                ("positions", _fmt(self.positions))]


class TopK(Intervention):
    """Choose k experts per token (1..E) instead of config.moe_top_k, renormalised as usual."""

    def __init__(self, k: int, layer: LayerSpec = "all") -> None:
        super().__init__(layer)
        if not _is_int(k) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        self.k = operator.index(k)

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        if self.k > cfg.moe_num_experts:
            raise ValueError(f"k={self.k} out of range: this model has k 1..{cfg.moe_num_experts} (moe_num_experts)")

    def edit_top_k(self, k, layer):
        return self.k

    def _fields(self):
        return [("k", str(self.k)), ("layer", _fmt(self.layer))]


class HeadAblation(Intervention):
    """Replace attention heads' per-head output z (before out_proj) at a layer.

    mode "zero": z of those heads becomes 0.
    mode "mean": z becomes its mean over the prompt's non-padding positions, per batch row and head.
    The mean is taken in every prefill forward (a plain forward, or the prompt forward of a generation,
    from z before this edit) over the whole prompt, and reused for the decode steps that follow, so a
    generated token gets the prompt's mean; a later forward over prompt + generated text would average
    over all of it instead.
    """

    site = "attn"
    MODES = ("zero", "mean")

    def __init__(self, layer: LayerSpec, heads: IntSpec, mode: str = "zero",
                 positions: IntSpec | None = None) -> None:
        super().__init__(layer, positions)
        self.heads = _ints("heads", heads)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.needs_every_token = mode == "mean"      # the prompt's mean z needs every prompt token
        self.means: dict[int, torch.Tensor] = {}   # layer -> [B, h, D] prompt means (mode "mean")

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        _in_range("heads", self.heads, cfg.n_heads, "heads")
        self.means = {}

    def edit_z(self, z, layer, ctx):
        B, T, H, D = z.shape
        heads = torch.tensor(self.heads, device=z.device)
        if self.mode == "zero":
            replacement = torch.zeros((), dtype=z.dtype, device=z.device)
        else:
            if ctx.is_prefill:
                valid = torch.ones(B, T, dtype=torch.bool, device=z.device)
                if ctx.attention_mask is not None:
                    valid = ctx.attention_mask[:, -T:].to(device=z.device, dtype=torch.bool)
                w = valid.float()[:, :, None, None]                                         # [B, T, 1, 1]
                picked = z.index_select(2, heads).float()                                   # [B, T, h, D]
                self.means[layer] = (picked * w).sum(1) / w.sum(1).clamp_min(1.0)           # [B, h, D]
            mean = self.means.get(layer)
            if mean is None or mean.shape[0] != B:
                raise RuntimeError(f"{self!r}: decode step without the prompt's mean; the prompt's forward "
                                   "(prefill) must run inside the same intervene block")
            replacement = mean[:, None].to(z.dtype)                                         # [B, 1, h, D]
        mask = self.token_mask(ctx)
        picked = z.index_select(2, heads)
        if mask is None:
            new = replacement.expand_as(picked)
        else:
            new = torch.where(mask.to(z.device)[:, :, None, None], replacement, picked)
        return z.index_copy(2, heads, new.contiguous())

    def _fields(self):
        return [("layer", _fmt(self.layer)), ("heads", _fmt(self.heads)), ("mode", repr(self.mode)),
                ("positions", _fmt(self.positions))]


class RoutingPatch(Intervention):
    """Replay another run's routing: at the given layers and positions, the chosen experts and applied
    weights are the source trace's `topk_experts` / `topk_weights` at the same absolute position.

    The source batch must equal the input batch or be 1 (broadcast to every row); positions past the
    source's length (or where the source has no expert, id -1) keep their own routing. A patched layer
    chooses as many experts as the source did there (a trace of a TopK run pads its smaller k with -1).
    """

    def __init__(self, source_trace, layers: LayerSpec = "all", positions: IntSpec | None = None) -> None:
        super().__init__(layers, positions)
        experts = getattr(source_trace, "topk_experts", None)
        weights = getattr(source_trace, "topk_weights", None)
        if experts is None or weights is None:
            raise ValueError("source trace has no routing (topk_experts/topk_weights): record it with "
                             "Record(router=True)")
        if experts.ndim != 4 or tuple(weights.shape) != tuple(experts.shape):
            raise ValueError(f"source trace routing must be [layers, batch, positions, k], got topk_experts "
                             f"{tuple(experts.shape)} and topk_weights {tuple(weights.shape)}")
        if experts.dtype.is_floating_point or experts.dtype == torch.bool:
            raise ValueError(f"source trace topk_experts must hold integer expert ids, got dtype {experts.dtype}")
        if experts.numel() and int(experts.min()) < -1:
            raise ValueError(f"source trace topk_experts has id {int(experts.min())}; ids are >= 0 (-1: no expert)")
        if not bool(torch.isfinite(weights.detach().float()).all()):
            raise ValueError("source trace topk_weights has NaN or infinite values")
        self.source_experts = experts.detach().long().cpu()                                # [L, Bs, Ts, k]
        self.source_weights = weights.detach().float().cpu()
        used = (self.source_experts >= 0).flatten(1, 2).any(1)                              # [L, k]
        self.source_k = [int(u.sum()) for u in used]                                        # k per layer

    def attach(self, cfg: DbrxConfig) -> None:
        super().attach(cfg)
        L = self.source_experts.shape[0]
        if L != cfg.n_layers:
            raise ValueError(f"source trace has {L} layers, this model has {cfg.n_layers}")
        if int(self.source_experts.max()) >= cfg.moe_num_experts:
            raise ValueError(f"source trace routes to expert {int(self.source_experts.max())}; this model has "
                             f"experts 0..{cfg.moe_num_experts - 1}")

    def edit_top_k(self, k, layer):
        return self.source_k[layer]

    def _lookup(self, layer: int, ctx: ForwardContext, n: int, k: int, device):
        """-> (patched rows [N] bool, experts [N, k], weights [N, k]) from the source at ctx.positions."""
        ks = self.source_k[layer]
        src_e = self.source_experts[layer, ..., :ks]                                        # [Bs, Ts, ks]
        src_w = self.source_weights[layer, ..., :ks]
        Bs, Ts, _ = src_e.shape
        if ctx.positions is None:
            raise RuntimeError(f"{self!r} needs ctx.positions: call it through DbrxLM.forward")
        B, T = ctx.positions.shape
        if B * T != n:
            raise RuntimeError(f"{self!r}: ctx.positions has {B * T} tokens, the MoE got {n}")
        if Bs not in (1, B):
            raise ValueError(f"source trace batch {Bs} must equal the input batch {B} or be 1")
        if ks != k:
            raise ValueError(f"layer {layer}: the source trace chose k={ks} experts per token, this run k={k}")
        cols = ctx.positions.to(device)                                                     # [B, T]
        idx = cols.clamp(max=Ts - 1)[..., None].expand(B, T, ks)
        e = src_e.to(device).expand(B, Ts, ks).gather(1, idx)                              # [B, T, k]
        w = src_w.to(device).expand(B, Ts, ks).gather(1, idx)
        rows = (cols < Ts) & (e >= 0).all(-1)
        mask = self.token_mask(ctx)
        if mask is not None:
            rows = rows & mask.to(device)
        return rows.reshape(-1), e.reshape(n, ks), w.reshape(n, ks)

    def edit_experts(self, experts, probs, layer, ctx):
        rows, e, _ = self._lookup(layer, ctx, *experts.shape, experts.device)
        return torch.where(rows[:, None], e, experts)

    def edit_weights(self, weights, experts, probs, layer, ctx):
        rows, _, w = self._lookup(layer, ctx, *weights.shape, weights.device)
        return torch.where(rows[:, None], w.to(weights.dtype), weights)

    def _fields(self):
        L, Bs, Ts, k = self.source_experts.shape
        return [("source", f"<trace batch={Bs} positions={Ts} k={k}>"), ("layers", _fmt(self.layer)),
                ("positions", _fmt(self.positions))]


# ------------------------------------------------------------------------------------------------
def _check_layer(edits: list, cfg: DbrxConfig, layer: int) -> None:
    """Combinations on one MoE that cannot work: too few experts left, double or contradictory forcing."""
    k = cfg.moe_top_k
    for edit in edits:
        k = edit.edit_top_k(k, layer)
    rerouted = [e for e in edits if e.removes_experts]      # ExpertAblation "reroute", RouterSteer "forbid"
    gone = set().union(*(e.experts for e in rerouted)) if rerouted else set()
    if cfg.moe_num_experts - len(gone) < k:
        raise ValueError(f"layer {layer}: rerouting experts {sorted(gone)} leaves "
                         f"{cfg.moe_num_experts - len(gone)} experts, fewer than top_k={k}")
    forces = [e for e in edits if isinstance(e, ExpertForce)]
    for i, a in enumerate(forces):
        if len(a.experts) > k:
            raise ValueError(f"layer {layer}: cannot force {len(a.experts)} experts with top_k={k}")
        for b in forces[i + 1:]:
            if _overlap(a.positions, b.positions):
                raise ValueError(f"layer {layer}: {a!r} and {b!r} overlap; force several experts with one "
                                 f"ExpertForce(layer, [e1, e2, ...])")
        for r in rerouted:
            both = set(a.experts) & set(r.experts)
            if both and _overlap(a.positions, r.positions):
                raise ValueError(f"layer {layer}: experts {sorted(both)} are both forced by {a!r} and "
                                 f"rerouted by {r!r}")
    for patch in (e for e in edits if isinstance(e, RoutingPatch)):
        if patch.source_k[layer] != k:
            raise ValueError(f"layer {layer}: the source trace chose k={patch.source_k[layer]} experts per "
                             f"token, but this layer chooses k={k} (an intervention after the patch changes k)")


def _flatten(interventions) -> list[Intervention]:
    items: list[Intervention] = []
    for item in interventions:
        if isinstance(item, (list, tuple)):
            items.extend(_flatten(item))
        elif isinstance(item, Intervention):
            items.append(item)
        else:
            raise TypeError(f"not an Intervention: {item!r} (use ExpertAblation, ExpertForce, ExpertScale, "
                            "TopK, HeadAblation or RoutingPatch)")
    return items


@contextlib.contextmanager
def attach_all(model: "DbrxLM", interventions: Iterable[Intervention]) -> Iterator[list[Intervention]]:
    """Validate and attach interventions to `model`'s modules for the block, in the calling thread (context)
    only; exactly they are detached on exit, even on error."""
    items = _flatten(interventions)
    cfg = model.config
    for iv in items:
        iv.attach(cfg)
    pairs = []
    for iv in items:
        for layer in iv.layers(cfg):
            block = model.transformer.blocks[layer]
            pairs.append((block.ffn if iv.site == "ffn" else block.norm_attn_norm.attn, iv))
    with scoped("edits", pairs):
        for i, block in enumerate(model.transformer.blocks):
            if block.ffn.edits:
                _check_layer(list(block.ffn.edits), cfg, i)
        yield items


@contextlib.contextmanager
def intervene(model: "DbrxLM", *interventions: Intervention) -> Iterator["DbrxLM"]:
    """Apply interventions inside the block (forward, traces, generate) in this thread (context); removed on
    exit, even on error."""
    with attach_all(model, interventions):
        yield model


def active_interventions(model: "DbrxLM") -> list[Intervention]:
    """The interventions attached in the calling context, each once, in attachment order."""
    seen: list = []
    for block in model.transformer.blocks:
        for edit in block.ffn.edits + block.norm_attn_norm.attn.edits:
            if not any(edit is s for s in seen):
                seen.append(edit)
    return seen
