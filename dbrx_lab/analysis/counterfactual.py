"""Counterfactual routing: score every one of the C(E, k) expert sets the router could have chosen.

DBRX has C(16, 4) = 1820 sets per layer, few enough to score them all (128- or 256-expert models have
~10^7-10^8), so the router's regret is exact, not sampled. For a token at position t and a layer l, each
set S replaces the router's choice at (t, l) only, with weights renormalised as the router would (the
softmax probabilities of S divided by their p-norm); every later layer, routing included, is recomputed
and the score is the real next-token loss at t (cross-entropy of token t+1, nats).

The 1820 rows of one (t, l) run as one batch: the token at t, as a single-token forward from the clean
run's KV cache of positions < t (shared, not copied per row), with S forced at layer l; the router's own set
is one of the rows, so it is rescored in the same batch as its alternatives and rounding cannot show as
regret. The loss needs log-sum-exp over the vocabulary; lm_head rows that are exact duplicates (the demo
model's export copies one "rest" row to ~74k ids) are scored once with log(count) added, which is exact.

variant "downstream" (default): as above. variant "frozen": later layers are not recomputed; the change
of layer l's MoE output is added to the final residual (a cheaper, first-order local approximation: one
forward in all plus the E experts per (t, l); labelled as such in the table).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..interventions import Intervention
from .attribution import _weight
from .causal import _layers_experts, final_hidden, one_text

__all__ = ["CounterfactualRouting", "counterfactual_routing", "expert_sets", "DedupUnembed"]

VARIANTS = ("downstream", "frozen")


def expert_sets(n_experts: int, k: int) -> torch.Tensor:
    """All C(n_experts, k) sets as a LongTensor [n_sets, k], ascending within a set, lexicographic order."""
    return torch.tensor(list(combinations(range(n_experts), k)), dtype=torch.long)


class DedupUnembed:
    """Next-token loss from lm_head's input: log-sum-exp over the distinct rows of lm_head (each counted
    log(count) times), minus the target's logit. Exact; ~4x cheaper on the demo model (25,774 distinct
    rows of 100,352)."""

    def __init__(self, model) -> None:
        W = _weight(model.lm_head).float()
        self.W = W
        unique, counts = torch.unique(W, dim=0, return_counts=True)
        self.unique = unique.contiguous()
        self.log_counts = counts.float().log()

    def loss(self, hidden: torch.Tensor, target: int, chunk: int = 256) -> torch.Tensor:
        """hidden [R, d] -> cross-entropy of `target` [R] float32. Rows in chunks, each log-sum-exp in place in
        one [chunk, rows] buffer (1.7x faster than torch.logsumexp on 1024-row chunks, measured on the demo)."""
        h = hidden.float()
        Ut, logc = self.unique.to(h.device).T, self.log_counts.to(h.device)
        lse = []
        for i in range(0, len(h), chunk):
            x = torch.addmm(logc, h[i:i + chunk], Ut)                                   # [c, rows]
            top = x.max(-1, keepdim=True).values
            lse.append(top[:, 0] + x.sub_(top).exp_().sum(-1).log())
        return torch.cat(lse) - h @ self.W[target].to(h.device)


class _SetRouting(Intervention):
    """At one layer, row r of the batch uses expert set sets[r] (weights renormalised by the MoE as usual)."""

    def __init__(self, layer: int, sets: torch.Tensor) -> None:
        super().__init__(layer)
        self.sets = sets

    def edit_experts(self, experts, probs, layer, ctx):
        if experts.shape != self.sets.shape:
            raise RuntimeError(f"{type(self).__name__}: {tuple(experts.shape)} routed rows, {tuple(self.sets.shape)} sets")
        return self.sets.to(experts.device)


class _PrefixCache:
    """One layer's clean KV of positions < start, shared by every row of a one-token batch (read-only)."""

    def __init__(self, cache, start: int) -> None:
        self.k, self.v = cache.k[:, :, :start], cache.v[:, :, :start]
        self.max_len = start + 1

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        if start == 0:
            return k, v
        B = k.shape[0]
        return (torch.cat([self.k.expand(B, -1, -1, -1), k], 2), torch.cat([self.v.expand(B, -1, -1, -1), v], 2))


@dataclass
class CounterfactualRouting:
    """table: one row per (position, layer): token, target (next token), router_set, router_loss, best_set,
    best_loss, regret (router_loss - best_loss; 0 unless a set is better by more than `tol`), rank (1 + sets
    better than the router's by more than tol), better (that count), percentile ((rank - 1) / (n_sets - 1):
    0 best, 1 worst), mean_loss (a uniformly random set's expected loss), worst_loss, n_sets, variant.
    losses: [positions, layers, n_sets] float32 (the loss of every set; `sets` gives set i).
    attrs-like fields: seconds, forwards, rows, rescore_error (max |router's row - the clean forward's loss|),
    interrupted."""

    table: pd.DataFrame
    losses: np.ndarray
    sets: np.ndarray
    positions: list[int]
    layers: list[int]
    variant: str
    seconds: float
    forwards: int
    rescore_error: float
    interrupted: bool = False
    notes: dict = field(default_factory=dict)

    def by_layer(self) -> pd.DataFrame:
        """Per layer: tokens, mean/median regret, share of tokens where the router's set is optimal (rank 1),
        mean rank and percentile, and mean_gain_vs_random (mean set loss - router loss: what the router
        earns over a random set). Sorted from most to least optimal (mean regret ascending)."""
        t = self.table
        g = t.groupby("layer")
        out = pd.DataFrame({"tokens": g.size(), "mean_regret": g["regret"].mean(), "median_regret": g["regret"].median(),
                            "optimal_share": g["rank"].apply(lambda r: float((r == 1).mean())),
                            "mean_rank": g["rank"].mean(), "mean_percentile": g["percentile"].mean(),
                            "mean_gain_vs_random": (t["mean_loss"] - t["router_loss"]).groupby(t["layer"]).mean()})
        return out.sort_values("mean_regret").reset_index()


def _sets_label(s) -> str:
    return "{" + ",".join(str(int(e)) for e in s) + "}"


@torch.no_grad()
def counterfactual_routing(model, text, positions=None, layers=None, variant: str = "downstream",
                           tol: float = 1e-5, max_rows: int | None = None,
                           progress: bool = True) -> CounterfactualRouting:
    """Score all C(E, k) expert sets at chosen (position, layer) pairs of one text (see the module doc).

    text: a string or token ids; positions: columns t that have a next token (default all, 0..T-2);
    layers: default all. Cost, variant "downstream": 1 forward + positions x layers single-token forwards
    of C(E, k) rows each (1820 for DBRX) plus their unembedding; "frozen": 1 forward + positions x layers
    x E expert evaluations + the unembedding of C(E, k) rows. On the full DBRX a (position, layer) is
    ~1820 x (40 - layer) token-layers of compute (GPUs; or the frozen variant). max_rows: split the sets of
    one (position, layer) into forwards of at most this many rows (memory: each row reads a copy of the
    prefix keys/values); None keeps them in one batch, so the router's set shares its alternatives' kernels. Interrupting (KeyboardInterrupt) returns the
    (position, layer) pairs finished so far (losses of the rest are NaN).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an integer >= 1, got {max_rows!r}")
    cfg = model.config
    ids = one_text(model, text, "text")
    T = ids.shape[1]
    if T < 2:
        raise ValueError("text needs at least 2 tokens (a position and the token it predicts)")
    if positions is None:
        positions = list(range(T - 1))
    positions = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
    bad = [p for p in positions if not isinstance(p, (int, np.integer)) or not 0 <= p < T - 1]
    if bad or not positions:
        raise ValueError(f"positions {bad or '[]'} out of range: valid positions (with a next token) are 0..{T - 2}")
    positions = [int(p) for p in positions]
    layers, _ = _layers_experts(cfg, layers, None)
    E, k = cfg.moe_num_experts, cfg.moe_top_k
    sets = expert_sets(E, k)
    index = {tuple(s): i for i, s in enumerate(sets.tolist())}
    n_sets = len(sets)
    dev = model.device
    unembed = DedupUnembed(model)
    start_time = time.perf_counter()

    # the clean run: KV cache, routing, and what the frozen variant needs
    L = cfg.n_layers
    kept: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x, hook):
            kept[name] = x[0].detach()
        return fn

    names = [f"blocks.{i}.ffn.hook_topk_experts" for i in range(L)]
    if variant == "frozen":
        names += [f"blocks.{i}.{h}" for i in layers for h in ("hook_resid_mid", "ffn.hook_router_logits")]
        names += [f"blocks.{L - 1}.hook_resid_post"]
    cache = model.new_cache(1, T)
    clean_hidden = final_hidden(model, ids, hooks=[(n, keep(n)) for n in names], cache=cache)[0]    # [T, d]
    losses = np.full((len(positions), len(layers), n_sets), np.nan, dtype=np.float32)
    rows, forwards, rescore_error, interrupted = [], 1, 0.0, False
    tokens = (model.tokenizer.token_strings(ids[0].tolist()) if model.tokenizer is not None
              else [str(t) for t in ids[0].tolist()])
    sets_dev = sets.to(dev)
    with tqdm(total=len(positions) * len(layers), desc=f"counterfactual routing ({variant})",
              disable=not progress) as bar:
        try:
            for pi, t in enumerate(positions):
                target = int(ids[0, t + 1])
                clean_loss = float(unembed.loss(clean_hidden[t:t + 1], target)[0])
                for li, layer in enumerate(layers):
                    if variant == "downstream":
                        prefix = [_PrefixCache(c, t) for c in cache]
                        parts = []
                        for chunk in sets_dev.split(max_rows or n_sets):
                            with model.intervene(_SetRouting(layer, chunk)):
                                parts.append(final_hidden(model, ids[:, t:t + 1].to(dev).expand(len(chunk), 1),
                                                          cache=prefix, start=t)[:, 0])
                            forwards += 1
                        h = torch.cat(parts)
                    else:
                        h = _frozen_hidden(model, kept, layer, t, sets_dev)
                    loss = unembed.loss(h, target).cpu().numpy()
                    losses[pi, li] = loss
                    router = tuple(sorted(kept[f"blocks.{layer}.ffn.hook_topk_experts"][t].tolist()))
                    r = index[router]
                    rl = float(loss[r])
                    if variant == "downstream":
                        rescore_error = max(rescore_error, abs(rl - clean_loss))
                    better = int((loss < rl - tol).sum())
                    b = int(np.argmin(loss))
                    rows.append(dict(position=t, token=tokens[t], target=tokens[t + 1], layer=layer,
                                     router_set=_sets_label(router), router_loss=rl,
                                     best_set=_sets_label(sets[b].tolist()), best_loss=float(loss[b]),
                                     regret=rl - float(loss[b]) if better else 0.0, rank=1 + better, better=better,
                                     percentile=better / (n_sets - 1), mean_loss=float(loss.mean()),
                                     worst_loss=float(loss.max()), n_sets=n_sets, variant=variant))
                    bar.update()
        except KeyboardInterrupt:
            interrupted = True
    table = pd.DataFrame(rows)
    return CounterfactualRouting(table, losses, sets.numpy(), positions, layers, variant,
                                 time.perf_counter() - start_time, forwards, rescore_error, interrupted,
                                 {"tol": tol, "tokens": len(positions), "rows_per_forward": n_sets})


def _frozen_hidden(model, kept: dict, layer: int, t: int, sets: torch.Tensor) -> torch.Tensor:
    """lm_head's input for every set at (t, layer) with later layers frozen: final residual + (MoE output
    of the set - MoE output of the router's set), through norm_f. -> [n_sets, d]."""
    block = model.transformer.blocks[layer]
    moe, L = block.ffn, model.config.n_layers
    x = block.norm_attn_norm.norm_2(kept[f"blocks.{layer}.hook_resid_mid"][t:t + 1])                 # [1, d]
    outs = torch.cat([moe.experts.mlp.expert(x, e)[0] for e in range(model.config.moe_num_experts)])  # [E, d]
    probs = torch.softmax(kept[f"blocks.{layer}.ffn.hook_router_logits"][t].float(), -1)            # [E]
    w = probs[sets]                                                                                   # [S, k]
    p = model.config.moe_normalize_expert_weights
    if p is not None:
        w = w / w.norm(p=p, dim=-1, keepdim=True)
    out = (outs[sets].float() * w[..., None]).sum(1)                                                  # [S, d]
    router = kept[f"blocks.{layer}.ffn.hook_topk_experts"][t].sort().values
    match = (sets == router).all(-1)
    resid = kept[f"blocks.{L - 1}.hook_resid_post"][t].float() + out - out[match][0]
    return model.transformer.norm_f(resid.to(x.dtype))
