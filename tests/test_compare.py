"""analysis.compare: the token alignment behind the aligned diff, and compare_generations' free-running
metrics (issue #22 items 6 and 8), each checked against an independent computation."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import dbrx_lab
from dbrx_lab import analysis, load_model
from dbrx_lab.analysis.compare import align_tokens

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def model():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


def ops(a, b) -> list[tuple]:
    df = align_tokens(a, b)
    return [(op, None if pd.isna(i) else int(i), None if pd.isna(j) else int(j))
            for op, i, j in zip(df["op"], df["baseline_step"], df["ablated_step"])]


def test_align_tokens_realigns_after_an_insertion():
    # by position, everything after step 1 would differ; aligned, only the inserted 9 does
    assert ops([1, 2, 3, 4], [1, 9, 2, 3, 4]) == [("equal", 0, 0), ("insert", None, 1), ("equal", 1, 2),
                                                  ("equal", 2, 3), ("equal", 3, 4)]
    assert ops([1, 2, 3, 4], [1, 3, 4]) == [("equal", 0, 0), ("delete", 1, None), ("equal", 2, 1), ("equal", 3, 2)]
    # a replace block of unequal length: paired, then the surplus is one-sided
    assert ops([7, 1, 2, 5], [7, 3, 5]) == [("equal", 0, 0), ("replace", 1, 1), ("delete", 2, None),
                                            ("equal", 3, 2)]
    assert ops([], []) == [] and ops([1], []) == [("delete", 0, None)]
    assert ops([5, 5], [5, 5]) == [("equal", 0, 0), ("equal", 1, 1)]


def test_align_tokens_keeps_the_common_prefix_equal():
    """The first non-equal column is the first divergence (difflib alone would match the 5 later)."""
    df = align_tokens([5, 1, 2, 3], [5, 7, 5, 1, 2, 3])
    assert df["op"].iloc[0] == "equal" and df["op"].iloc[1] != "equal"
    first = next(i for i, op in enumerate(df["op"]) if op != "equal")
    assert first == 1


def test_align_tokens_carries_token_strings_and_checks_lengths():
    df = align_tokens([1, 2], [1, 3], baseline_tokens=["a", "b"], ablated_tokens=["a", "c"])
    assert df["baseline_token"].tolist() == ["a", "b"] and df["ablated_token"].tolist() == ["a", "c"]
    with pytest.raises(ValueError, match="baseline_tokens has 1 entries for 2 tokens"):
        align_tokens([1, 2], [1], baseline_tokens=["a"])


@torch.no_grad()
def test_free_running_log_probs_match_separate_forwards(model):
    ivs = [dbrx_lab.ExpertAblation(0, [1, 2, 3, 4]), dbrx_lab.ExpertAblation(1, [5, 6])]
    res = analysis.compare_generations(model, PROMPT, ivs, max_new_tokens=10)
    assert not model.active_interventions()
    prompt = res.prompt_ids[None]
    T = prompt.shape[1]

    def logprobs(tokens: torch.Tensor) -> torch.Tensor:
        full = torch.cat([prompt, tokens[None]], dim=1)
        lp = model(full).logits[0].float().log_softmax(-1)
        return lp[T - 1:-1].gather(-1, tokens[:, None])[:, 0]

    base_on_abl = logprobs(res.ablated_ids)
    with model.intervene(*ivs):
        abl_on_abl = logprobs(res.ablated_ids)
        abl_on_base = logprobs(res.baseline_ids)
    base_on_base = logprobs(res.baseline_ids)
    n = len(res.ablated_ids)
    steps = res.per_step
    torch.testing.assert_close(torch.tensor(steps["ablated_text_baseline_logprob"][:n].to_numpy(float)),
                               base_on_abl.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(steps["ablated_text_ablated_logprob"][:n].to_numpy(float)),
                               abl_on_abl.double(), rtol=1e-4, atol=1e-4)
    tl = res.text_logprob
    assert tl.loc["ablated", "baseline_model"] == pytest.approx(float(base_on_abl.sum()), abs=1e-3)
    assert tl.loc["ablated", "ablated_model"] == pytest.approx(float(abl_on_abl.sum()), abs=1e-3)
    assert tl.loc["baseline", "ablated_model"] == pytest.approx(float(abl_on_base.sum()), abs=1e-3)
    assert tl.loc["baseline", "baseline_model"] == pytest.approx(float(base_on_base.sum()), abs=1e-3)
    m = res.metrics()
    assert m["logp_ablated_text_under_baseline"] == pytest.approx(float(base_on_abl.mean()), abs=1e-4)
    assert m["logp_baseline_text_under_ablated"] == pytest.approx(float(abl_on_base.mean()), abs=1e-4)
    # each model prefers its own greedy text
    assert m["logp_ablated_text_under_ablated"] > m["logp_ablated_text_under_baseline"]
    assert m["token_agreement"] == pytest.approx(steps["same"].mean())
    # the alignment: one row per column, both runs' steps each appear exactly once, in order
    al = res.alignment
    for side, ids in (("baseline", res.baseline_ids), ("ablated", res.ablated_ids)):
        present = al[f"{side}_step"].dropna().astype(int).tolist()
        assert present == list(range(len(ids)))
        assert al[f"{side}_id"].dropna().astype(int).tolist() == ids.tolist()
    matched = int((al["op"] == "equal").sum())
    assert m["aligned_agreement"] == pytest.approx(2 * matched / (len(res.baseline_ids) + n))
    kl_cols = al.dropna(subset=["baseline_step"])
    assert kl_cols["kl"].tolist() == pytest.approx(steps["kl"][:len(res.baseline_ids)].tolist())
    assert res.routing is not None and res.routing.shape[:2] == (model.config.n_layers, T + len(res.baseline_ids))


def test_identical_generations_have_full_agreement(model):
    res = analysis.compare_generations(model, [5, 6, 7], dbrx_lab.ExpertScale(0, 1, 1.0), max_new_tokens=4)
    m = res.metrics()
    assert res.first_divergence is None and (res.alignment["op"] == "equal").all()
    assert m["token_agreement"] == 1.0 and m["aligned_agreement"] == 1.0
    assert m["logp_ablated_text_under_baseline"] == pytest.approx(m["logp_ablated_text_under_ablated"], abs=1e-4)
