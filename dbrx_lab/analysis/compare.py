"""Baseline vs ablated generation from the same prompt and seed, step by step (streamable), compared two
ways: teacher-forced on the baseline's tokens (both models read the same context) and free-running (each
model continues its own text: token agreement, an aligned diff, each text's log-probability under both)."""
from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from ..generation import prepare_prompt
from ..hooks import suspended
from ..trace import Record, run_with_trace
from .routing import set_overlap

__all__ = ["CompareStep", "GenerationComparison", "align_tokens", "compare_generations", "routing_cascade"]


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
    alignment: the free-running texts aligned token by token (`align_tokens`), one row per aligned column:
        column, op, baseline_step, ablated_step, the tokens and ids, and the per-step numbers of each side
        (kl, baseline_logprob, ablated_logprob at the baseline step; ablated_text_baseline_logprob,
        ablated_text_ablated_logprob at the ablated step). Empty when built without it.
    text_logprob: the free-running cross log-probabilities, index text ("baseline", "ablated"): tokens,
        baseline_model / ablated_model (sum of the log-probabilities, nats, that each model gives that text's
        generated tokens in its own context) and their *_per_token means. Empty when built without it.
    routing: top-k experts [L, S, k] of prompt + baseline generation without the intervention (the
        teacher-forced pass the cascade compares; -1 where a layer chose fewer), or None.
    `metrics()` gathers the headline numbers with their labels.
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
    alignment: pd.DataFrame = field(default_factory=pd.DataFrame)
    text_logprob: pd.DataFrame = field(default_factory=pd.DataFrame)
    routing: torch.Tensor | None = None

    def metrics(self) -> dict:
        """Headline numbers, named by how they were measured.

        free-running: token_agreement (share of steps of the longer generation where both runs chose the
        same token), aligned_agreement (share of both texts' tokens that the alignment matches:
        2 * matched / (len baseline + len ablated); 1.0 for two empty texts), first_divergence, and the
        cross log-probabilities (nats per token) logp_ablated_text_under_baseline, logp_ablated_text_under_ablated,
        logp_baseline_text_under_ablated, logp_baseline_text_under_baseline.
        teacher-forced on the baseline's tokens: kl_mean, kl_max (nats), top_token_changed (steps).
        """
        steps = self.per_step
        n_b, n_a = len(self.baseline_ids), len(self.ablated_ids)
        same = steps["same"].astype(bool) if len(steps) else pd.Series([], dtype=bool)
        if len(self.alignment):
            matched = int((self.alignment["op"] == "equal").sum())
        else:
            matched = int(same.sum())
        out = {"token_agreement": float(same.mean()) if len(same) else 1.0,
               "aligned_agreement": 2 * matched / (n_b + n_a) if n_b + n_a else 1.0,
               "first_divergence": self.first_divergence}
        for text in ("ablated", "baseline"):
            for m in ("baseline", "ablated"):
                value = np.nan
                if len(self.text_logprob) and text in self.text_logprob.index:
                    value = float(self.text_logprob.loc[text, f"{m}_model_per_token"])
                out[f"logp_{text}_text_under_{m}"] = value
        kl = steps["kl"].astype(float) if len(steps) else pd.Series([], dtype=float)
        out.update(kl_mean=float(kl.mean()) if kl.notna().any() else np.nan,
                   kl_max=float(kl.max()) if kl.notna().any() else np.nan,
                   top_token_changed=int(steps["top_token_changed"].fillna(False).astype(bool).sum())
                   if len(steps) else 0)
        return out


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


def _token_ops(a, b) -> list[tuple[str, int | None, int | None]]:
    """(op, i, j) per aligned column of token sequences a and b: the common prefix as "equal", then
    difflib.SequenceMatcher's opcodes on the rest (autojunk off), a replace block paired element by element
    and its surplus reported as "delete" (only in a) or "insert" (only in b)."""
    a, b = [int(t) if not isinstance(t, str) else t for t in a], [int(t) if not isinstance(t, str) else t for t in b]
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    ops: list[tuple[str, int | None, int | None]] = [("equal", i, i) for i in range(p)]
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a[p:], b[p:], autojunk=False).get_opcodes():
        i1, i2, j1, j2 = i1 + p, i2 + p, j1 + p, j2 + p
        if tag == "equal":
            ops += [("equal", i1 + d, j1 + d) for d in range(i2 - i1)]
            continue
        paired = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        ops += [("replace", i1 + d, j1 + d) for d in range(paired)]
        ops += [("delete", i, None) for i in range(i1 + paired, i2)]
        ops += [("insert", None, j) for j in range(j1 + paired, j2)]
    return ops


def align_tokens(baseline, ablated, baseline_tokens=None, ablated_tokens=None) -> pd.DataFrame:
    """Align two generated token sequences (ids or strings) for a diff, instead of comparing by position.

    One row per aligned column: column, op ("equal" | "replace" | "delete": only in the baseline |
    "insert": only in the ablated run), baseline_step, ablated_step (nullable: the gap side), and, when
    given, baseline_token / ablated_token (the strings of each step). The common prefix is equal, so the
    first non-equal column is the first divergence; after it, runs that agree again are "equal".
    """
    baseline, ablated = list(baseline), list(ablated)
    for name, toks, ids in (("baseline_tokens", baseline_tokens, baseline), ("ablated_tokens", ablated_tokens,
                                                                              ablated)):
        if toks is not None and len(toks) != len(ids):
            raise ValueError(f"{name} has {len(toks)} entries for {len(ids)} tokens")
    ops = _token_ops(baseline, ablated)
    df = pd.DataFrame({"column": np.arange(len(ops)), "op": [o for o, _, _ in ops],
                       "baseline_step": pd.array([i for _, i, _ in ops], dtype="Int64"),
                       "ablated_step": pd.array([j for _, _, j in ops], dtype="Int64")})
    if baseline_tokens is not None:
        df["baseline_token"] = [None if i is None else baseline_tokens[i] for _, i, _ in ops]
    if ablated_tokens is not None:
        df["ablated_token"] = [None if j is None else ablated_tokens[j] for _, _, j in ops]
    return df


def _logprobs_of(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Log-probability [n] of each of `tokens` after prompt [1, T] and the tokens before it (one forward)."""
    if not tokens:
        return torch.zeros(0)
    full = torch.cat([prompt.cpu(), torch.tensor([tokens], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0, prompt.shape[1] - 1:-1].float().log_softmax(-1).cpu()
    return logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def compare_generations(model, prompt, interventions, max_new_tokens: int = 30, seed: int | None = 0,
                        do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None, on_step: Callable[[CompareStep], None] | None = None,
                        stop: Callable[[], bool] | None = None) -> GenerationComparison:
    """Generate from one prompt twice, without and with the intervention(s), with the same sampling seed.

    The two generations advance in lock step (baseline token i, then ablated token i); `on_step` gets a
    CompareStep for each, so a widget can stream both side by side; `stop()` returning True ends both.
    With the same seed, sampled generations differ only where the intervention changed the distribution.

    Definitions, teacher-forced on the baseline's tokens (each step compares the two models on the same
    context, so after a divergence these numbers say how the distributions differ there, not how far
    the texts drifted apart):
    kl[i] = KL(P_base || P_ablated) in nats of the next-token distributions that predict baseline token i;
    top_token_changed[i]: the two distributions' argmax differ there; baseline_logprob / ablated_logprob:
    log-probability of baseline token i under each; cascade: for every layer and position of prompt +
    baseline generation, jaccard = |A & B| / |A | B| of the top-k sets without (A) and with (B) the
    intervention, changed_fraction = 1 - |A & B| / |A|, top1_changed = highest-weighted expert differs
    (positions before the intervention's first effect show 0 change; later layers and tokens show how
    the change cascades).
    Free-running (each run continues its own text): same[i] (per-step token agreement),
    first_divergence, `alignment` (see `align_tokens`), and per step of the ablated run
    ablated_text_baseline_logprob / ablated_text_ablated_logprob: log-probability of ablated token i, in
    the ablated run's own context, under the baseline / ablated model; `text_logprob` sums both texts
    under both models (temperature 1, no top-k/top-p: the models' own distributions).
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
        free = {("ablated", "ablated"): _logprobs_of(model, ids, generated["ablated"])}
        with _without_interventions(model):
            base_logp, base_experts = _teacher_forced(model, full)
            free["ablated", "baseline"] = _logprobs_of(model, ids, generated["ablated"])

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
        if i < len(abl):
            row.update(ablated_text_baseline_logprob=float(free["ablated", "baseline"][i]),
                       ablated_text_ablated_logprob=float(free["ablated", "ablated"][i]))
        rows.append(row)
    per_step = pd.DataFrame(rows, columns=["step", "position", "baseline_id", "baseline_token", "ablated_id",
                                           "ablated_token", "same", "kl", "top_token_changed",
                                           "baseline_logprob", "ablated_logprob", "ablated_text_baseline_logprob",
                                           "ablated_text_ablated_logprob"])
    per_step = per_step.astype({"baseline_id": "Int64", "ablated_id": "Int64"})
    diverged = [i for i in range(n) if i >= min(len(base), len(abl)) or base[i] != abl[i]]
    return GenerationComparison(
        prompt_ids=ids[0].cpu(), baseline_ids=torch.tensor(base, dtype=torch.long),
        ablated_ids=torch.tensor(abl, dtype=torch.long), baseline_text=tok.decode(base), ablated_text=tok.decode(abl),
        per_step=per_step, first_divergence=diverged[0] if diverged else None,
        cascade=routing_cascade(base_experts, abl_experts, T), interventions=ivs,
        alignment=_aligned_table(per_step, base, abl), text_logprob=_text_logprob(per_step, len(base), len(abl)),
        routing=torch.as_tensor(base_experts).clone())


def _aligned_table(per_step: pd.DataFrame, base: list[int], abl: list[int]) -> pd.DataFrame:
    """align_tokens over the two runs, with each side's per-step numbers joined in (see GenerationComparison)."""
    df = align_tokens(base, abl)
    by_step = per_step.set_index("step")

    def take(side: str, column: str, dtype=None) -> list:
        values = [None if pd.isna(s) else by_step.at[int(s), column] for s in df[f"{side}_step"]]
        return pd.array(values, dtype=dtype) if dtype else values

    for side in ("baseline", "ablated"):
        df[f"{side}_id"] = take(side, f"{side}_id", "Int64")
        df[f"{side}_token"] = take(side, f"{side}_token")
    for column in ("kl", "baseline_logprob", "ablated_logprob"):
        df[column] = np.asarray(take("baseline", column, "Float64").to_numpy(dtype=float, na_value=np.nan))
    for column in ("ablated_text_baseline_logprob", "ablated_text_ablated_logprob"):
        df[column] = np.asarray(take("ablated", column, "Float64").to_numpy(dtype=float, na_value=np.nan))
    return df


def _text_logprob(per_step: pd.DataFrame, n_base: int, n_abl: int) -> pd.DataFrame:
    """Both free-running texts' log-probabilities (sums, nats) under both models, and per-token means."""
    sums = {"baseline": (per_step["baseline_logprob"].iloc[:n_base].sum(),
                         per_step["ablated_logprob"].iloc[:n_base].sum()),
            "ablated": (per_step["ablated_text_baseline_logprob"].iloc[:n_abl].sum(),
                        per_step["ablated_text_ablated_logprob"].iloc[:n_abl].sum())}
    n = {"baseline": n_base, "ablated": n_abl}
    rows = [{"tokens": n[t], "baseline_model": float(b), "ablated_model": float(a),
             "baseline_model_per_token": float(b) / n[t] if n[t] else np.nan,
             "ablated_model_per_token": float(a) / n[t] if n[t] else np.nan} for t, (b, a) in sums.items()]
    return pd.DataFrame(rows, index=pd.Index(["baseline", "ablated"], name="text"))


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
