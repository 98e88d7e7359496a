"""Baseline vs intervention generation from the same prompt and seed, step by step (streamable)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ..generation import prepare_prompt
from ..hooks import suspended
from ..trace import Record, run_with_trace
from .routing import set_overlap

__all__ = ["CompareStep", "GenerationComparison", "compare_generations"]


@dataclass
class CompareStep:
    """One generated token of one branch, as passed to `on_step`. branch: "baseline" | "ablated";
    index: 0 for the first new token; text: the branch's generated text so far; finished: it stopped."""

    branch: str
    index: int
    token_id: int
    token: str
    text: str
    finished: bool


@dataclass
class GenerationComparison:
    """Result of `compare_generations`.

    prompt_ids [T]; baseline_ids / ablated_ids: the generated ids (stop token included, if reached).
    per_step: step, position (column of the generated token), baseline_id, baseline_token, ablated_id,
        ablated_token, same, kl, top_token_changed, baseline_logprob, ablated_logprob (see
        compare_generations for the definitions); one row per step of the longer generation.
    first_divergence: first step whose tokens differ (None if the generations are identical).
    cascade: layer, position, is_generated, jaccard, changed_fraction, top1_changed: routing of the
        baseline sequence with vs without the intervention (teacher forced).
    """

    prompt_ids: torch.Tensor
    baseline_ids: torch.Tensor
    ablated_ids: torch.Tensor
    baseline_text: str
    ablated_text: str
    per_step: pd.DataFrame
    first_divergence: int | None
    cascade: pd.DataFrame
    interventions: list = field(default_factory=list)


@contextlib.contextmanager
def _without_interventions(model) -> Iterator[None]:
    """Detach every attached intervention for the block, keeping their state (e.g. HeadAblation means)."""
    owners = [m for b in model.transformer.blocks for m in (b.ffn, b.norm_attn_norm.attn)]
    with suspended("edits", owners):
        yield


def _teacher_forced(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [1, S] -> (log-probs [S, V] float32, top-k experts [L, S, k], -1 where a layer chose fewer)."""
    out, trace = run_with_trace(model, ids, record=Record(router=True))
    return out.logits[0].float().log_softmax(-1).cpu(), trace.topk_experts[:, 0]


def compare_generations(model, prompt, interventions, max_new_tokens: int = 30, seed: int | None = 0,
                        do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, on_step: Callable[[CompareStep], None] | None = None,
                        stop: Callable[[], bool] | None = None) -> GenerationComparison:
    """Generate from one prompt twice, without and with the intervention(s), with the same sampling seed.

    The two generations advance in lock step (baseline token i, then ablated token i); `on_step` gets a
    CompareStep for each, so a widget can stream both side by side; `stop()` returning True ends both.
    With the same seed, sampled generations differ only where the intervention changed the distribution.

    Definitions (teacher forcing on the baseline tokens, so each step compares the two models on the same
    context; the free-running ablated tokens are reported but not used for these):
    kl[i] = KL(P_base || P_ablated) in nats of the next-token distributions that predict baseline token i;
    top_token_changed[i]: the two distributions' argmax differ there; baseline_logprob / ablated_logprob:
    log-probability of baseline token i under each; cascade: for every layer and position of prompt +
    baseline generation, jaccard = |A & B| / |A | B| of the top-k sets without (A) and with (B) the
    intervention, changed_fraction = 1 - |A & B| / |A|, top1_changed = highest-weighted expert differs
    (positions before the intervention's first effect show 0 change; later layers and tokens show how
    the change cascades).
    prompt: a string, token ids [T] / [1, T] or chat messages (one prompt only).
    """
    ids, _ = prepare_prompt(model, prompt)
    if ids.shape[0] != 1:
        raise ValueError(f"compare_generations takes one prompt, got a batch of {ids.shape[0]}")
    ivs = list(interventions) if isinstance(interventions, (list, tuple)) else [interventions]
    tok = model.tokenizer
    if tok is None:
        from ..tokenizer import load_tokenizer

        tok = model.tokenizer = load_tokenizer()
    kwargs = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    generated: dict[str, list[int]] = {"baseline": [], "ablated": []}
    with model.intervene(*ivs):
        streams = {"baseline": model.stream(ids, max_new_tokens, **kwargs),
                   "ablated": model.stream(ids, max_new_tokens, **kwargs)}
        while streams:
            for branch in list(streams):
                with _without_interventions(model) if branch == "baseline" else contextlib.nullcontext():
                    step = next(streams[branch], None)
                if step is None:
                    del streams[branch]
                    continue
                token = int(step.tokens[0])
                generated[branch].append(token)
                if on_step is not None:
                    on_step(CompareStep(branch, step.index, token, tok.token_strings([token])[0],
                                        tok.decode(generated[branch]), bool(step.finished[0])))
        full = torch.cat([ids.cpu(), torch.tensor([generated["baseline"]], dtype=torch.long)], dim=1)
        abl_logp, abl_experts = _teacher_forced(model, full)
        with _without_interventions(model):
            base_logp, base_experts = _teacher_forced(model, full)

    base, abl = generated["baseline"], generated["ablated"]
    T, n = ids.shape[1], max(len(base), len(abl))

    def token(row: list[int], i: int) -> tuple[int | None, str | None]:
        return (row[i], tok.token_strings([row[i]])[0]) if i < len(row) else (None, None)

    rows = []
    for i in range(n):
        (b_id, b_tok), (a_id, a_tok) = token(base, i), token(abl, i)
        row = {"step": i, "position": T + i, "baseline_id": b_id, "baseline_token": b_tok, "ablated_id": a_id,
               "ablated_token": a_tok, "same": b_id == a_id}
        if i < len(base):
            p, q = base_logp[T - 1 + i], abl_logp[T - 1 + i]
            row.update(kl=float((p.exp() * (p - q)).sum()), top_token_changed=bool(p.argmax() != q.argmax()),
                       baseline_logprob=float(p[b_id]), ablated_logprob=float(q[b_id]))
        rows.append(row)
    per_step = pd.DataFrame(rows, columns=["step", "position", "baseline_id", "baseline_token", "ablated_id",
                                           "ablated_token", "same", "kl", "top_token_changed",
                                           "baseline_logprob", "ablated_logprob"])
    per_step = per_step.astype({"baseline_id": "Int64", "ablated_id": "Int64"})
    diverged = [i for i in range(n) if i >= min(len(base), len(abl)) or base[i] != abl[i]]
    return GenerationComparison(
        prompt_ids=ids[0].cpu(), baseline_ids=torch.tensor(base, dtype=torch.long),
        ablated_ids=torch.tensor(abl, dtype=torch.long), baseline_text=tok.decode(base), ablated_text=tok.decode(abl),
        per_step=per_step, first_divergence=diverged[0] if diverged else None,
        cascade=routing_cascade(base_experts, abl_experts, T), interventions=ivs)


def routing_cascade(a: torch.Tensor, b: torch.Tensor, prompt_length: int = 0) -> pd.DataFrame:
    """Per (layer, position): how two routings of the same tokens differ. a, b: top-k experts [L, S, k].
    jaccard = |A & B| / |A | B| (identical: 1; random k-sets: see repetition_baselines), changed_fraction =
    1 - |A & B| / |A| (the share of a's experts that b dropped), top1_changed: the highest-weighted experts
    differ. Experts -1 (a layer that chose fewer than k) are ignored."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"routings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    L, S, _ = a.shape
    shared, union = set_overlap(a, b)                                                   # [L, S]
    layer, position = np.meshgrid(np.arange(L), np.arange(S), indexing="ij")
    return pd.DataFrame({"layer": layer.ravel(), "position": position.ravel(),
                         "is_generated": position.ravel() >= prompt_length,
                         "jaccard": (shared / union).ravel(),
                         "changed_fraction": (1 - shared / (a >= 0).sum(-1)).ravel(),
                         "top1_changed": (a[..., 0] != b[..., 0]).ravel()})
