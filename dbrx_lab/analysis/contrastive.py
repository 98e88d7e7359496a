"""Contrastive experts and steering (SteerMoE, arXiv 2509.09660): which experts a behaviour uses, and what
happens when the router is pushed towards or away from them.

`contrastive_experts` is SteerMoE's detection step: for two labelled sets of texts (A: with the behaviour,
B: without; paired or not), each expert's activation rate (share of tokens that route to it, top-k) per
set and their risk difference RD = rate_A - rate_B, with significance from a permutation test over texts
(texts, not tokens, are the independent units) and Benjamini-Hochberg adjustment over all experts.
`steering_effect` measures what a steering intervention (e.g. `RouterSteer(layer, experts, mode="max")`)
changes: a label's log-probability, or a classifier's score of generated text, against the unsteered model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..interventions import Intervention, _flatten
from .ablation import encode_texts
from .audit import benjamini_hochberg
from .causal import _check_batch, _layers_experts, final_hidden, one_text

__all__ = ["expert_activation_counts", "contrastive_experts", "SteeringEffect", "steering_effect"]


@torch.no_grad()
def expert_activation_counts(model, texts, batch_size: int = 8, progress: bool = False):
    """Per text: how many of its tokens route to each expert (top-k) -> (counts [n_texts, L, E], tokens [n_texts]).
    Cost: ceil(n_texts / batch_size) forwards (texts batched by length, left-padded; padding never counts)."""
    _check_batch(batch_size)
    rows = encode_texts(model, texts)
    cfg = model.config
    L, E = cfg.n_layers, cfg.moe_num_experts
    counts = np.zeros((len(rows), L, E), dtype=np.int64)
    tokens = np.array([len(r) for r in rows], dtype=np.int64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in tqdm(range(0, len(rows), batch_size), desc="routing", disable=not progress):
        idx = order[start:start + batch_size]
        T = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for b, i in enumerate(idx):
            ids[b, T - len(rows[i]):] = torch.tensor(rows[i])
            mask[b, T - len(rows[i]):] = 1
        got: dict[int, torch.Tensor] = {}

        def keep(layer):
            def fn(x, hook):
                got[layer] = x.detach().cpu()
            return fn

        final_hidden(model, ids, None if bool(mask.all()) else mask,
                     hooks=[(f"blocks.{i}.ffn.hook_topk_experts", keep(i)) for i in range(L)])
        real = mask.bool()
        for layer in range(L):
            ex = got[layer]                                                         # [B, T, k]
            hit = torch.zeros(*ex.shape[:2], E + 1, dtype=torch.long)
            hit.scatter_(-1, torch.where(ex < 0, E, ex), 1)                         # -1 (fewer than k) -> spare
            per_row = (hit[..., :E] * real[..., None]).sum(1)                      # [B, E]
            counts[idx, layer] = per_row.numpy()
    return counts, tokens


def _rd(counts: np.ndarray, tokens: np.ndarray, in_a: np.ndarray) -> np.ndarray:
    """Risk differences for group masks in_a [P, n] (True: group A) -> [P, L*E] (token-weighted rates)."""
    a, b = in_a.astype(float), (~in_a).astype(float)
    return (a @ counts) / (a @ tokens)[:, None] - (b @ counts) / (b @ tokens)[:, None]


def contrastive_experts(model, texts_a, texts_b, paired: bool = False, layers=None, n_perm: int = 2000,
                        n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, batch_size: int = 8,
                        progress: bool = True) -> pd.DataFrame:
    """Risk difference of each expert's activation between texts A and B (module doc).

    paired: texts_a[i] and texts_b[i] are a pair (same length lists); the permutation test then swaps
    within pairs and the bootstrap resamples pairs; unpaired, it shuffles texts between the groups and
    resamples texts within each group. Columns: layer, expert, rate_a, rate_b (token-level activation
    rates), risk_diff (rate_a - rate_b), rd_lo / rd_hi (bootstrap CI over texts), p_value (two-sided
    permutation), p_adjusted (Benjamini-Hochberg over the experts of the chosen layers), significant,
    tokens_a, tokens_b. Sorted by risk_diff, descending. Cost: (n_a + n_b) / batch_size forwards.
    """
    na, nb = len(texts_a) if isinstance(texts_a, (list, tuple)) else -1, \
        len(texts_b) if isinstance(texts_b, (list, tuple)) else -1
    if na < 1 or nb < 1:
        raise ValueError("texts_a and texts_b must be non-empty lists of texts (strings or token-id lists)")
    if paired and na != nb:
        raise ValueError(f"paired texts need equal counts: texts_a has {na}, texts_b {nb}")
    if na + nb < 3:
        raise ValueError("need at least 3 texts in all for a permutation test")
    cfg = model.config
    layers, _ = _layers_experts(cfg, layers, None)
    counts, tokens = expert_activation_counts(model, list(texts_a) + list(texts_b), batch_size, progress)
    E = cfg.moe_num_experts
    counts = counts[:, layers].reshape(na + nb, -1).astype(float)                  # [n, l*E]
    tokens = tokens.astype(float)
    group = np.r_[np.ones(na, bool), np.zeros(nb, bool)]
    observed = _rd(counts, tokens, group[None])[0]
    rng = np.random.default_rng(seed)
    if paired:
        flip = rng.random((n_perm, na)) < 0.5
        perm = np.concatenate([~flip, flip], 1)                                    # pair i: a_i or b_i in group A
        boot = rng.integers(0, na, (n_boot, na))
        bmask = np.zeros((n_boot, na + nb))
        np.add.at(bmask, (np.arange(n_boot)[:, None], boot), 1)
        np.add.at(bmask, (np.arange(n_boot)[:, None], boot + na), 1)
    else:
        perm = np.argsort(rng.random((n_perm, na + nb)), 1) < na
        bmask = np.zeros((n_boot, na + nb))
        np.add.at(bmask, (np.arange(n_boot)[:, None], rng.integers(0, na, (n_boot, na))), 1)
        np.add.at(bmask, (np.arange(n_boot)[:, None], na + rng.integers(0, nb, (n_boot, nb))), 1)
    null = _rd(counts, tokens, perm)
    p = (1 + (np.abs(null) >= np.abs(observed) - 1e-12).sum(0)) / (1 + n_perm)
    wa, wb = bmask * group, bmask * ~group                                         # bootstrap weights per text
    boot_rd = (wa @ counts) / (wa @ tokens)[:, None] - (wb @ counts) / (wb @ tokens)[:, None]
    lo, hi = np.percentile(boot_rd, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    ta, tb = tokens[group].sum(), tokens[~group].sum()
    df = pd.DataFrame({"layer": np.repeat(layers, E), "expert": np.tile(np.arange(E), len(layers)),
                       "rate_a": counts[group].sum(0) / ta, "rate_b": counts[~group].sum(0) / tb,
                       "risk_diff": observed, "rd_lo": lo, "rd_hi": hi, "p_value": p})
    df["p_adjusted"] = benjamini_hochberg(df["p_value"].to_numpy())
    df["significant"] = df["p_adjusted"] < alpha
    df["tokens_a"], df["tokens_b"] = int(ta), int(tb)
    df.attrs.update(paired=paired, texts_a=na, texts_b=nb, n_perm=n_perm, alpha=alpha)
    return df.sort_values("risk_diff", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
@dataclass
class SteeringEffect:
    """table: one row per prompt: baseline, steered, delta (= steered - baseline) of the score, and the
    texts when generated. summary: mean_baseline, mean_steered, mean_delta, delta_lo / delta_hi (paired
    bootstrap CI), p_value (two-sided sign-flip permutation test of the mean delta), prompts, score."""

    table: pd.DataFrame
    summary: pd.Series
    interrupted: bool = False


@torch.no_grad()
def _label_logprob(model, prompt: torch.Tensor, label: list[int]) -> float:
    """log p(label | prompt): the sum of the label tokens' log-probs (one forward, logits of the label only)."""
    ids = torch.cat([prompt, torch.tensor([label])], 1)
    h = final_hidden(model, ids)[0, prompt.shape[1] - 1:-1]                       # [n_label, d]
    logits = model.lm_head(h[None])[0].float()
    return float(F.log_softmax(logits, -1).gather(-1, torch.tensor(label, device=logits.device)[:, None]).sum())


def steering_effect(model, prompts, steer, label=None, classifier: Callable | None = None,
                    max_new_tokens: int = 20, do_sample: bool = False, seed: int = 0, n_boot: int = 2000,
                    alpha: float = 0.05, progress: bool = True) -> SteeringEffect:
    """Behaviour change under a steering intervention, against the unsteered model on the same prompts.

    steer: an Intervention (e.g. RouterSteer) or a list of them. Give exactly one of
      label: a string or token ids; score = log p(label | prompt) (2 forwards per prompt), or
      classifier: fn(continuation) -> number or bool, where continuation is the generated text (decoded
        when the model has a tokenizer, else the list of generated ids); the same seed is used with and
        without steering (2 generations of max_new_tokens per prompt).
    Interrupting (KeyboardInterrupt) keeps the prompts finished so far.
    """
    if (label is None) == (classifier is None):
        raise ValueError("give exactly one of label (a string or token ids) or classifier (a function)")
    if classifier is not None and not callable(classifier):
        raise ValueError(f"classifier must be callable, got {classifier!r}")
    steers = _flatten([steer])
    if not steers:
        raise ValueError("steer must be an Intervention or a non-empty list of them")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    ids = [one_text(model, p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    label_ids = None if label is None else encode_texts(model, [label] if isinstance(label, str) else [list(label)])[0]
    if label_ids is not None and not label_ids:
        raise ValueError("label is empty")
    tok = model.tokenizer
    rows, interrupted = [], False

    def generated(p: torch.Tensor):
        out = model.generate(p, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)[0, p.shape[1]:]
        new = out.tolist()
        return new, (tok.decode(new) if tok is not None else new)

    with tqdm(total=len(ids), desc="steering effect", disable=not progress) as bar:
        try:
            for i, p in enumerate(ids):
                row = {"prompt": i}
                for name, steering in (("baseline", []), ("steered", steers)):
                    with model.intervene(*steering):
                        if label_ids is not None:
                            row[name] = _label_logprob(model, p, label_ids)
                        else:
                            new, shown = generated(p)
                            row[name] = float(classifier(shown))
                            row[f"{name}_text"] = shown if isinstance(shown, str) else " ".join(map(str, new))
                row["delta"] = row["steered"] - row["baseline"]
                rows.append(row)
                bar.update()
        except KeyboardInterrupt:
            interrupted = True
    table = pd.DataFrame(rows)
    delta = table["delta"].to_numpy(float) if len(table) else np.zeros(0)
    rng = np.random.default_rng(seed)
    if len(delta):
        boot = delta[rng.integers(0, len(delta), (n_boot, len(delta)))].mean(1)
        signs = np.where(rng.random((n_boot, len(delta))) < 0.5, -1.0, 1.0)
        null = (signs * delta).mean(1)
        p_value = (1 + np.sum(np.abs(null) >= abs(delta.mean()) - 1e-12)) / (1 + n_boot)
        lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    else:
        p_value = lo = hi = np.nan
    summary = pd.Series({"score": "label_logprob" if label_ids is not None else "classifier",
                         "prompts": len(table),
                         "mean_baseline": table["baseline"].mean() if len(table) else np.nan,
                         "mean_steered": table["steered"].mean() if len(table) else np.nan,
                         "mean_delta": delta.mean() if len(delta) else np.nan,
                         "delta_lo": lo, "delta_hi": hi, "p_value": p_value,
                         "steer": "; ".join(repr(s) for s in steers)})
    return SteeringEffect(table, summary, interrupted)
