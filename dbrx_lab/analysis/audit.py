"""Observational vs causal audit of experts: do load, routing weight or direct logit attribution predict what
ablating an expert does to the next-token loss? (A 2026 audit, arXiv 2606.10703, found they do not:
|d| < 0.17 in every metric x layer cell on three MoE models.)

Per (layer, expert), on a dataset:
  observational: load (share of tokens that route to it; uniform k/E), mean_weight (its mean applied weight
      when chosen), weight_share (applied weight per token; uniform 1/E), dla (mean direct logit attribution
      to the correct next token per token, 0 where not chosen; `logit_attribution`), dla_abs (mean |DLA|);
  causal: effect_<mode> = mean next-token loss change when the expert alone is ablated (ExpertAblation mode
      reroute | zero | renormalize), with a bootstrap CI over tokens.
Then, per layer and pooled ("all"), for each observational metric and ablation mode: Spearman's rho
between the metric and the effect across experts (permutation p-value, bootstrap CI over experts), Cohen's d
of the effect between the experts in the metric's top half and its bottom half (bootstrap CI), and
Benjamini-Hochberg adjusted p-values over every cell (the family of comparisons).

Costs: 1 forward per batch for the observational metrics (`logit_attribution`), 1 for the baseline loss,
and units x modes passes over the texts for the effects (the bulk: e.g. 64 units x 3 modes = 192 passes).
On a model as big as DBRX (40 x 16 = 640 experts) `sample_experts` draws units and `max_tokens` caps the
tokens; the draw is stated in `audit.sampling`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..interventions import ExpertAblation
from .ablation import LossEvaluator, encode_texts
from .attribution import logit_attribution
from .causal import _layers_experts

__all__ = ["CausalAudit", "expert_audit", "audit_statistics", "spearman", "average_ranks", "benjamini_hochberg",
           "cohens_d", "OBSERVATIONAL", "MODES"]

OBSERVATIONAL = ("load", "mean_weight", "weight_share", "dla", "dla_abs")
MODES = ("reroute", "zero", "renormalize")


# ------------------------------------------------------------------------------------------------
# statistics (numpy only)
def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (0-based; ties get their average rank), for 1-D or 2-D arrays."""
    a = np.asarray(a, dtype=float)
    flat = a.reshape(-1, a.shape[-1])
    out = np.empty_like(flat)
    step = max(1, 2_000_000 // max(1, flat.shape[1] ** 2))
    for i in range(0, len(flat), step):
        x = flat[i:i + step]
        less = (x[:, :, None] > x[:, None, :]).sum(-1)
        equal = (x[:, :, None] == x[:, None, :]).sum(-1)
        out[i:i + step] = less + (equal - 1) / 2.0
    return out.reshape(a.shape)


def _rowcorr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair (NaN where a row is constant)."""
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN if either is constant."""
    return float(_rowcorr(average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))))


def cohens_d(a, b) -> float:
    """(mean a - mean b) / pooled standard deviation; NaN with fewer than 2 values in a group or zero spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    return float((a.mean() - b.mean()) / np.sqrt(pooled)) if pooled > 0 else float("nan")


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate); NaNs are left out of the family."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = len(q)
    if m == 0:
        return out
    order = np.argsort(q)
    scaled = q[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def _split_d(metric: np.ndarray, effect: np.ndarray) -> float:
    """Cohen's d of the effect between experts above and below the metric's median (ties to the bottom)."""
    top = metric > np.median(metric)
    return cohens_d(effect[top], effect[~top])


def _cell(metric: np.ndarray, effect: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int,
          alpha: float) -> dict:
    n = len(metric)
    rho = spearman(metric, effect)
    rm, re = average_ranks(metric), average_ranks(effect)
    perm = np.argsort(rng.random((n_perm, n)), axis=1)
    null = _rowcorr(np.broadcast_to(rm, (n_perm, n)), re[perm])
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_perm) if np.isfinite(rho) else np.nan
    idx = rng.integers(0, n, (n_boot, n))
    boot_rho = _rowcorr(average_ranks(metric[idx]), average_ranks(effect[idx]))
    boot_d = np.array([_split_d(metric[i], effect[i]) for i in idx])
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    q = lambda v: (np.nanpercentile(v, lo), np.nanpercentile(v, hi)) if np.isfinite(v).any() else (np.nan, np.nan)
    (rlo, rhi), (dlo, dhi) = q(boot_rho), q(boot_d)
    return dict(n_experts=n, rho=rho, rho_lo=rlo, rho_hi=rhi, p_value=p, d=_split_d(metric, effect), d_lo=dlo,
                d_hi=dhi)


def audit_statistics(experts: pd.DataFrame, metrics=OBSERVATIONAL, modes=MODES, n_boot: int = 1000,
                     n_perm: int = 2000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Rank correlations and effect sizes between observational metrics and ablation effects (module doc).

    experts: a table with layer, the metric columns and effect_<mode> columns (`CausalAudit.experts`).
    -> one row per (layer | "all", metric, mode): n_experts, rho, rho_lo, rho_hi (bootstrap CI over experts),
    p_value (two-sided permutation test of rho), p_adjusted (Benjamini-Hochberg over all rows),
    significant (p_adjusted < alpha), d, d_lo, d_hi (Cohen's d of the effect, metric top half vs bottom half).
    Layers with fewer than 4 experts are skipped; "all" pools the layers (only when there are several). d is
    NaN when a half has fewer than 2 experts (e.g. a metric that is 0 for all but one expert).
    """
    rng = np.random.default_rng(seed)
    rows = []
    scopes = [(int(l), g) for l, g in experts.groupby("layer")]
    if len(scopes) > 1:
        scopes.append(("all", experts))
    for scope, g in scopes:
        for mode in modes:
            col = f"effect_{mode}"
            if col not in g:
                continue
            g2 = g[np.isfinite(g[col])]
            if len(g2) < 4:
                continue
            for metric in metrics:
                cell = _cell(g2[metric].to_numpy(float), g2[col].to_numpy(float), rng, n_boot, n_perm, alpha)
                rows.append(dict(layer=scope, metric=metric, mode=mode, **cell))
    out = pd.DataFrame(rows, columns=["layer", "metric", "mode", "n_experts", "rho", "rho_lo", "rho_hi", "p_value",
                                      "d", "d_lo", "d_hi"])
    out["p_adjusted"] = benjamini_hochberg(out["p_value"].to_numpy(float))
    out["significant"] = out["p_adjusted"] < alpha
    return out


# ------------------------------------------------------------------------------------------------
@dataclass
class CausalAudit:
    """experts: one row per audited (layer, expert): the observational metrics, effect_<mode> and its bootstrap
    CI (effect_<mode>_lo / _hi, nats per token), tokens. correlations: `audit_statistics`. sampling: how
    experts and tokens were chosen (stated in words too: `sampling["text"]`). baseline_loss: nats per token.
    notes: passes (over the texts), alpha, rows (the token ids audited)."""

    experts: pd.DataFrame
    correlations: pd.DataFrame
    sampling: dict
    baseline_loss: float
    interrupted: bool = False
    notes: dict = field(default_factory=dict)


def _dataset_rows(model, texts) -> tuple[list[list[int]], str]:
    """Texts, token-id lists, or a route-stats folder (its texts' token ids are read back) -> id lists."""
    if isinstance(texts, (str, os.PathLike)) and Path(texts).is_dir():
        from .routing import load_routing

        df = load_routing(texts, columns=["text", "position", "token_id", "layer"])
        df = df[df["layer"] == df["layer"].min()].sort_values(["text", "position"])
        return [g["token_id"].astype(int).tolist() for _, g in df.groupby("text", sort=True)], \
            f"route-stats folder {Path(texts).name}"
    return encode_texts(model, texts), "texts"


def expert_audit(model, texts, layers=None, experts=None, modes=MODES, sample_experts: int | None = None,
                 max_tokens: int | None = None, seed: int = 0, n_boot: int = 1000, n_perm: int = 2000,
                 alpha: float = 0.05, batch_size: int = 4, progress: bool = True) -> CausalAudit:
    """Audit observational metrics against causal ablation effects per expert (see the module doc).

    texts: strings, token-id lists, or a route-stats output folder. layers / experts: the candidate units
    (default all); sample_experts: audit that many units drawn uniformly (without replacement, `seed`)
    from the candidates instead of all; max_tokens: keep texts, in a seeded random order, until this many
    predicted tokens (the last one cut). Cost: 2 + units x len(modes) passes over the texts (module doc).
    Interrupting (KeyboardInterrupt) keeps the units finished so far (the statistics use those).
    """
    cfg = model.config
    layers, experts = _layers_experts(cfg, layers, experts)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    rng = np.random.default_rng(seed)
    units = [(l, e) for l in layers for e in experts]
    if sample_experts is not None:
        if not isinstance(sample_experts, int) or not 4 <= sample_experts <= len(units):
            raise ValueError(f"sample_experts must be an integer in [4, {len(units)}] (the candidate units), got "
                             f"{sample_experts!r}")
        pick = np.sort(rng.choice(len(units), sample_experts, replace=False))
        units = [units[i] for i in pick]
    rows, source = _dataset_rows(model, texts)
    total = sum(len(r) - 1 for r in rows)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        kept, n = [], 0
        for i in rng.permutation(len(rows)):
            if n >= max_tokens:
                break
            row = rows[i][:max_tokens - n + 1]
            if len(row) >= 2:
                kept.append(row)
                n += len(row) - 1
        rows = kept
    ev = LossEvaluator(model, rows, batch_size)
    sampling = dict(source=source, units=len(units), candidate_units=len(layers) * len(experts),
                    tokens=ev.n_targets, available_tokens=total, texts=len(rows), seed=seed)
    sampling["text"] = (f"{sampling['units']} of {sampling['candidate_units']} experts "
                        f"({'all' if sample_experts is None else f'drawn uniformly without replacement, seed {seed}'}); "
                        f"{ev.n_targets} of {total} predicted tokens from {len(rows)} texts "
                        f"({'all' if max_tokens is None else f'texts in seeded random order up to max_tokens={max_tokens}'})")

    obs = _observational(model, ev, cfg)
    table = pd.DataFrame(units, columns=["layer", "expert"]).merge(obs, on=["layer", "expert"], how="left")
    base = ev.baseline
    idx = rng.integers(0, len(base), (n_boot, len(base)))
    effects = {m: np.full((len(units), 3), np.nan) for m in modes}
    interrupted, done = False, 0
    with torch.no_grad(), tqdm(total=len(units) * len(modes), desc="expert audit (ablations)",
                               disable=not progress) as bar:
        try:
            for i, (l, e) in enumerate(units):
                for m in modes:
                    delta = (ev.token_losses(ExpertAblation(l, [e], m)) - base).numpy().astype(np.float64)
                    boot = delta[idx].mean(1)
                    effects[m][i] = (delta.mean(), *np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
                    bar.update()
                done = i + 1
        except KeyboardInterrupt:
            interrupted = True
    for m in modes:
        table[f"effect_{m}"], table[f"effect_{m}_lo"], table[f"effect_{m}_hi"] = effects[m].T
    table = table.iloc[:done].reset_index(drop=True) if interrupted else table
    table["tokens"] = ev.n_targets
    corr = audit_statistics(table, OBSERVATIONAL, modes, n_boot, n_perm, alpha, seed)
    return CausalAudit(table, corr, sampling, ev.baseline_loss, interrupted,
                       {"passes": 2 + done * len(modes), "alpha": alpha, "rows": rows})


@torch.no_grad()
def _observational(model, ev: LossEvaluator, cfg) -> pd.DataFrame:
    """Per (layer, expert) over the evaluator's predicted tokens: load, mean_weight, weight_share, dla, dla_abs."""
    L, E = cfg.n_layers, cfg.moe_num_experts
    count, wsum, csum, asum = (np.zeros((L, E)) for _ in range(4))
    n = 0
    for ids, mask in ev.batches:
        attr = logit_attribution(model, ids, target="next", positions="all", attention_mask=mask)
        c = attr.components
        c = c[(c["component"] == "expert") & (c["expert"] >= 0)]
        n += len(attr.totals)
        li, ei = c["layer"].to_numpy(int), c["expert"].to_numpy(int)
        np.add.at(count, (li, ei), 1)
        np.add.at(wsum, (li, ei), c["weight"].to_numpy(float))
        np.add.at(csum, (li, ei), c["contribution"].to_numpy(float))
        np.add.at(asum, (li, ei), np.abs(c["contribution"].to_numpy(float)))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_weight = np.where(count > 0, wsum / np.maximum(count, 1), 0.0)
    return pd.DataFrame({"layer": np.repeat(np.arange(L), E), "expert": np.tile(np.arange(E), L),
                         "load": (count / n).ravel(), "mean_weight": mean_weight.ravel(),
                         "weight_share": (wsum / n).ravel(), "dla": (csum / n).ravel(), "dla_abs": (asum / n).ravel()})
