"""Attention kernels: torch's scaled_dot_product_attention (fused, GQA without copying K/V)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import ATTENTION


@ATTENTION.register("sdpa")
def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, D], k, v [B, K, S, D], mask [B|1, 1, T, S] bool or None (causal) -> z [B, H, T, D]."""
    gqa = q.shape[1] != k.shape[1]
    T, S = q.shape[2], k.shape[2]
    if mask is None and T in (1, S):                  # torch's is_causal aligns the queries top-left
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


ATTENTION.chooser = lambda q, k: "sdpa"
