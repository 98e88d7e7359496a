"""RouterSteer: steer a model by editing its router logits (SteerMoE, arXiv 2509.09660), like any intervention.

    with model.intervene(RouterSteer(layer=2, experts=[5], mode="max")):
        ids = model.generate(prompt, max_new_tokens=20)       # expert 5 chosen at every token of layer 2

It edits the logits before softmax and top-k (the `edit_logits` stage), so top-k, the renormalised weights
and traces all follow from the steered logits; `hook_router_logits` still shows the raw ones.
"""
from __future__ import annotations

import math

import torch

from .interventions import Intervention, _fmt, _in_range, _ints

__all__ = ["RouterSteer"]


class RouterSteer(Intervention):
    """Edit router logits of expert(s) at a layer (or layers), every position or chosen ones.

    mode "bias":   logits[e] += bias (bias > 0 makes the expert likelier, < 0 less).
    mode "max":    SteerMoE's activation rule: logits[e] = max over all experts + margin, so the expert is
                   chosen (with up to k such experts) and weighted like the router's favourite.
    mode "forbid": logits[e] = -inf (never chosen; SteerMoE's deactivation, same as ExpertAblation reroute).
    """

    MODES = ("bias", "max", "forbid")

    def __init__(self, layer, experts, bias: float = 0.0, mode: str = "bias", positions=None,
                 margin: float = 1e-2) -> None:
        super().__init__(layer, positions)
        self.experts = _ints("experts", experts)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        for name, value in (("bias", bias), ("margin", margin)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.mode, self.bias, self.margin = mode, float(bias), float(margin)

    def attach(self, cfg) -> None:
        super().attach(cfg)
        _in_range("experts", self.experts, cfg.moe_num_experts, "experts")
        if self.mode == "forbid" and cfg.moe_num_experts - len(self.experts) < cfg.moe_top_k:
            raise ValueError(f"forbidding {len(self.experts)} experts leaves {cfg.moe_num_experts - len(self.experts)}"
                             f", fewer than top_k={cfg.moe_top_k}: forbid at most "
                             f"{cfg.moe_num_experts - cfg.moe_top_k}")

    @property
    def removes_experts(self) -> bool:
        return self.mode == "forbid"

    def edit_logits(self, logits, layer, ctx):
        cols = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        cols[list(self.experts)] = True
        hit = self.row_mask(ctx, logits.shape[0], logits.device)[:, None] & cols               # [N, E]
        if self.mode == "bias":
            return torch.where(hit, logits + self.bias, logits)
        if self.mode == "forbid":
            return logits.masked_fill(hit, float("-inf"))
        top = logits.max(dim=-1, keepdim=True).values + self.margin                           # [N, 1]
        return torch.where(hit, top.expand_as(logits), logits)

    def _fields(self):
        fields = [("layer", _fmt(self.layer)), ("experts", _fmt(self.experts)), ("mode", repr(self.mode))]
        if self.mode == "bias":
            fields.append(("bias", repr(self.bias)))
        if self.mode == "max":
            fields.append(("margin", repr(self.margin)))
        return fields + [("positions", _fmt(self.positions))]
