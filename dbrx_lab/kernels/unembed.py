"""Greedy decoding's unembedding: an int8 screen of lm_head with a proven error bound (docs/design-notes.md).

`UnembedScreen.logits(x, weight)` returns [B, V] float32 logits that hold the exact logit (the float32
product) of every vocabulary row that can still be the row's maximum and -inf elsewhere: the argmax equals
the full product's. `lm_head` uses it only for a greedy generation step whose logits nobody observes.
"""
from __future__ import annotations

import math
import threading

import torch

from .linear import linear

_BUILD = threading.Lock()


class UnembedScreen:
    """Greedy next tokens from final hidden states without the full float32 product with lm_head.

    A decoding step at batch 1 spends about a third of its time streaming lm_head (float32 [V, d]). The
    screen keeps an int8 copy (one bfloat16 scale per row, a quarter of the bytes; built once, 0.06-0.5 s)
    and multiplies with it (torch's `_weight_int8pack_mm`, gpt-fast's int8 weight-only kernel). A bound on
    that product's error (int8 rounding of the weights, bfloat16 rounding of x and of the output, float32
    sums) leaves the few rows that can still hold the maximum; their float32 logits are computed exactly and
    the first maximum wins. The token is thus the argmax of the float32 logits, as with the full product, up
    to the float32 rounding any two matrix-vector kernels differ by. An x that is not finite, or more than
    `MAX_CANDIDATES` candidates per row, takes the full product. Bound and tests: docs/design-notes.md.
    """

    MIN_ENTRIES = 1 << 22           # 16 MB in float32; smaller ones gain nothing here (benchmarks/README.md)
    MAX_CANDIDATES = 4096           # per row
    OUT_REL = 2.0 ** -6             # bound on the relative error of the bfloat16 output (its rounding is 2^-8)

    def __init__(self, weight: torch.Tensor) -> None:
        """weight: lm_head's [V, d] float32 CPU matrix, finite, d a multiple of 8."""
        V, d = weight.shape
        w = weight.detach()
        amax = w.abs().amax(1).clamp_(min=1e-30)                                        # [V]
        self.scale = (amax * ((1 + 2.0 ** -7) / 127)).to(torch.bfloat16)               # [V] >= amax / 127
        scale = self.scale.float()
        self.q = torch.div(w, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)   # [V, d]
        # |w - q * scale| <= scale / 2 (plus float32 rounding of the division); |q * scale| rows <= |w| + that
        self.half_step = float(scale.max()) / 2 * (1 + 2.0 ** -10)
        row_norm = float((w.norm(dim=1) + scale * (d ** 0.5 / 2)).max())
        self.norm_rel = row_norm * (2.0 ** -8 + 4 * d * 2.0 ** -24)   # x in bfloat16; float32 sums here and in full
        self.probe = torch.linspace(-1.0, 1.0, d, dtype=w.dtype)
        self.fingerprint = self._fingerprint(w)
        self.key = self._key(w)

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device

    def _fingerprint(self, weight: torch.Tensor) -> torch.Tensor:
        return linear(self.probe[None], weight)[0]                                       # [V]

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether `weight` still holds the values the screen was built from (any in-place edit shows)."""
        w = weight.detach()
        return self._key(w) == self.key and torch.equal(self._fingerprint(w), self.fingerprint)

    @staticmethod
    def applies(weight: torch.Tensor) -> bool:
        """float32 on CPU with d a multiple of 8 (what the int8 kernel handles; it reads out of bounds else)."""
        return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[1] % 8 == 0
                and hasattr(torch, "_weight_int8pack_mm"))

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [B, d] float32 (lm_head's input), weight lm_head's [V, d] -> [B, V] float32: the exact logits
        x @ weight.T of the rows that can hold a row's maximum, -inf elsewhere (all exact on a fallback)."""
        B = x.shape[0]
        a = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)   # [B, V] bf16
        tops = a.amax(-1).tolist()
        bounds = (self.half_step * x.abs().sum(-1) + self.norm_rel * x.norm(dim=-1)).tolist()   # [B]
        thresholds = []
        for top, c in zip(tops, bounds):
            # logit_v lies within a_v +- (c + OUT_REL |a_v|); the largest is >= top - c - OUT_REL |top|
            low = top - 2 * c - self.OUT_REL * abs(top)
            t = low / (1 + math.copysign(self.OUT_REL, low))                    # a candidate has a_v >= t
            thresholds.append(t - abs(t) * 2.0 ** -20 - 1e-30)                  # margin for t in float32
        if not all(map(math.isfinite, thresholds)):
            return linear(x, weight)
        candidates = a >= torch.tensor(thresholds).view(B, 1)                    # [B, V], compared in float32
        rows, cols = candidates.nonzero(as_tuple=True)                            # ascending per row
        if cols.numel() > B * self.MAX_CANDIDATES:
            return linear(x, weight)
        if B == 1:
            exact = weight.index_select(0, cols) @ x[0]                                           # [n]
        else:
            exact = torch.bmm(weight.index_select(0, cols)[:, None], x[rows][:, :, None]).view(-1)  # [n]
        out = torch.full((B, weight.shape[0]), float("-inf"), dtype=x.dtype, device=x.device)
        out[rows, cols] = exact
        return out


def screen_for(module: torch.nn.Module) -> UnembedScreen | None:
    """The module's UnembedScreen for its `weight`, built (once, under a lock) or rebuilt if the weight
    changed; None where it does not apply: float32 on CPU, finite, at least MIN_ENTRIES entries unless
    `module.screen_greedy` is True (False turns it off)."""
    weight = module.weight
    wanted = getattr(module, "screen_greedy", None)
    if wanted is None:
        wanted = weight.numel() >= UnembedScreen.MIN_ENTRIES
    if not (wanted and UnembedScreen.applies(weight)):
        return None
    with _BUILD:
        screen = module.__dict__.get("_unembed_screen")
        if screen is None or not screen.matches(weight):
            module.__dict__.pop("_unembed_screen", None)        # stale: free it before building another
            if not bool(torch.isfinite(weight).all()):
                return None
            screen = module.__dict__["_unembed_screen"] = UnembedScreen(weight)
    return screen
