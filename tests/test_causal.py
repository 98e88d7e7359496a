"""Causal expert analysis (issue 20): patching and coalitions, audits, counterfactual routing, steering.

Known answers come from a *planted* model (`planted_model`): the tiny preset with attention outputs and
every expert's output zeroed except the planted "carrier" experts of layer 0, and router weights solved so
that chosen tokens route exactly as specified. Each position then depends on its own token only, and the
carriers alone write the direction c that the answer token's unembedding reads:
  X (clean):   carriers at logit +s (chosen, weights split evenly), the other experts at 0
  Y (corrupt): experts 0-3 at +s (chosen, zero output), carriers at -s
  Z:           experts 0-3 at +2 (chosen), the first carrier at +1.9 (rank 5), the rest at -10
  A, B:        experts 0-3 at +s, carriers at -s
Embeddings: X = base + r, Y = base - r (orthogonal, zero-mean, same norm), so that restoring the carriers'
contribution at the last position restores the clean logit difference exactly.
"""
from __future__ import annotations

import dataclasses
import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
import torch

import dbrx_lab
from dbrx_lab import PRESETS, DbrxLM
from dbrx_lab.analysis import causal

from conftest import widen_

X, Y, Z, A, B = 10, 11, 12, 20, 21


@pytest.fixture(autouse=True)
def no_inference_scratch():
    """Tests here call the model under torch.inference_mode: drop any CPU-kernel scratch buffer created there
    (an inference tensor), which a later forward outside inference mode could not write into."""
    yield
    from dbrx_lab.kernels.experts import SCRATCH

    if any(b.is_inference() for b in SCRATCH.buffers.values()):
        SCRATCH.clear()


@pytest.fixture(scope="module")
def demo_model():
    """The bundled demo model (read-only: tests attach hooks and interventions with context managers only)."""
    return dbrx_lab.load_model("demo")


@torch.no_grad()
def planted_model(carriers=(5,), s: float = 30.0, seed: int = 0) -> DbrxLM:
    """See the module doc. carriers: layer-0 experts that write c = 10 q3 at X, Y and Z."""
    cfg = dataclasses.replace(PRESETS["tiny"])
    model = widen_(DbrxLM(cfg).eval(), seed=seed)
    d, E = cfg.d_model, cfg.moe_num_experts
    g = torch.Generator().manual_seed(seed + 1)
    basis = torch.cat([torch.ones(d, 1), torch.randn(d, d - 1, generator=g)], 1)
    q = torch.linalg.qr(basis).Q[:, 1:].T                      # [d-1, d] orthonormal, zero-mean rows
    base, r, c_dir = 3 * q[0], q[1], q[2]
    for block in model.transformer.blocks:
        block.norm_attn_norm.attn.out_proj.weight.zero_()
        block.ffn.experts.mlp.w2.zero_()
        block.norm_attn_norm.norm_1.weight.fill_(1.0)
        block.norm_attn_norm.norm_2.weight.fill_(1.0)
    model.transformer.norm_f.weight.fill_(1.0)
    wte = model.transformer.wte.weight
    wte[X], wte[Y] = base + r, base - r
    wte[Z], wte[A], wte[B] = 3 * q[3] + q[4], 3 * q[5], 3 * q[6]
    U = model.lm_head.weight
    U[A], U[B] = 5 * c_dir, -5 * c_dir
    toks = [X, Y, Z, A, B]
    block = model.transformer.blocks[0]
    zs = torch.stack([block.norm_attn_norm.norm_2(wte[t]) for t in toks], 1)     # [d, n] the router's inputs
    a = torch.zeros(E, len(toks))
    others = [e for e in range(E) if e not in carriers and e not in (0, 1, 2, 3)]
    a[list(carriers), 0] = s                                                      # X
    for j in (1, 3, 4):                                                           # Y, A, B
        a[[0, 1, 2, 3], j], a[list(carriers), j] = s, -s
    a[[0, 1, 2, 3], 2], a[carriers[0], 2] = 2.0, 1.9                              # Z
    a[others + list(carriers[1:]), 2] = -10.0
    block.ffn.router.layer.weight.copy_(a @ torch.linalg.pinv(zs))
    mlp = block.ffn.experts.mlp
    for e in carriers:
        h = torch.stack([mlp.expert(zs[:, j][None], e)[1][0] for j in range(3)])     # [3, F] at X, Y, Z
        mlp.w2[e * mlp.ffn:(e + 1) * mlp.ffn] = torch.linalg.pinv(h) @ (10 * c_dir).expand(3, d)
    return model


def test_planted_model_routes_as_designed():
    model = planted_model(carriers=(5, 9))
    _, trace = model.run_with_trace(torch.tensor([[X, Y, Z, A]]))
    chosen = trace.topk_experts[0, 0]
    assert set(chosen[0, :2].tolist()) == {5, 9}
    assert torch.allclose(trace.topk_weights[0, 0, 0, :2], torch.tensor([0.5, 0.5]), atol=1e-6)
    assert set(chosen[1].tolist()) == {0, 1, 2, 3} and set(chosen[2].tolist()) == {0, 1, 2, 3}


# ------------------------------------------------------------------------------------------------
# 1. expert patching, coalitions, attribution patching
def test_patching_recovers_exactly_the_planted_expert():
    model = planted_model(carriers=(5,))
    clean, corrupt = [A, B, X], [A, B, Y]
    df = causal.expert_patching(model, clean, corrupt, answer=A, wrong=B, progress=False)
    assert len(df) == 2 * 16 and df.attrs["forwards"] == 2 + 32
    assert df.attrs["clean_metric"] > 10 and abs(df.attrs["corrupted_metric"]) < 1e-4
    planted = df[(df.layer == 0) & (df.expert == 5)].iloc[0]
    assert planted.recovery == pytest.approx(1.0, abs=1e-4)
    assert planted.routed_clean and not planted.routed_corrupt
    rest = df[~((df.layer == 0) & (df.expert == 5))]
    assert rest.recovery.abs().max() < 1e-5                 # no other unit carries anything


def test_patching_only_at_positions_without_the_signal_recovers_nothing():
    model = planted_model(carriers=(5,))
    df = causal.expert_patching(model, [A, B, X], [A, B, Y], A, B, layers=[0], experts=[5], positions=[0, 1],
                                progress=False)
    assert df.recovery.abs().max() < 1e-5


def test_coalition_needs_both_carriers():
    model = planted_model(carriers=(5, 9))
    single = causal.expert_patching(model, [A, X], [A, Y], A, B, layers=[0], progress=False)
    best_single = single.recovery.max()
    assert 0.1 < best_single < 0.9                          # each carrier writes half of c
    curve = causal.expert_coalition(model, [A, X], [A, Y], A, B, max_size=4, progress=False)
    assert list(curve["size"]) == [0, 1, 2]                 # stops at recovery >= 0.95
    assert {(int(r.layer), int(r.expert)) for r in curve.iloc[1:].itertuples()} == {(0, 5), (0, 9)}
    assert curve.recovery.iloc[1] == pytest.approx(best_single, abs=1e-6)
    assert curve.recovery.iloc[2] == pytest.approx(1.0, abs=1e-4)
    assert curve.attrs["forwards"] == 2 + 32 + 31


def test_attribution_patching_agrees_with_exact_on_the_planted_model():
    model = planted_model(carriers=(5,))
    exact = causal.expert_patching(model, [A, X], [A, Y], A, wrong=None, progress=False)     # log-prob metric
    with torch.inference_mode():                             # gradients are taken anyway
        approx = causal.attribution_patching(model, [A, X], [A, Y], A)
    top = approx.loc[approx.attribution.abs().idxmax()]
    assert (top.layer, top.expert) == (0, 5) and top.attribution > 0
    assert approx[~((approx.layer == 0) & (approx.expert == 5))].attribution.abs().max() < 1e-6
    agree = causal.patching_agreement(exact, approx)
    assert agree["top_overlap"] >= 0.2 and agree["pearson"] > 0.99
    assert all(p.grad is None for p in model.parameters())
    assert model.kernels()["experts"] == "auto"             # reference kernels restored


def test_patching_rejects_bad_input():
    model = planted_model()
    with pytest.raises(ValueError, match="clean has 3 tokens and corrupted 2"):
        causal.expert_patching(model, [A, B, X], [A, Y], A, B, progress=False)
    with pytest.raises(ValueError, match=r"answer must be a token id in \[0, 511\]"):
        causal.expert_patching(model, [A, X], [A, Y], 512, B, progress=False)
    with pytest.raises(ValueError, match=r"layers \[2\] out of range: this model has layers 0..1"):
        causal.expert_patching(model, [A, X], [A, Y], A, B, layers=[2], progress=False)
    with pytest.raises(ValueError, match=r"positions \[5\] out of range"):
        causal.expert_patching(model, [A, X], [A, Y], A, B, positions=[5], progress=False)
    with pytest.raises(ValueError, match="same token"):
        causal.expert_patching(model, [A, X], [A, Y], A, A, progress=False)
    with pytest.raises(ValueError, match="max_size must be an integer >= 1"):
        causal.expert_coalition(model, [A, X], [A, Y], A, B, max_size=0, progress=False)
    with pytest.raises(ValueError, match="stop_at must be None or a finite number"):
        causal.expert_coalition(model, [A, X], [A, Y], A, B, stop_at="all", progress=False)
    with pytest.raises(ValueError, match=r"experts \[16\] out of range: this model has experts 0..15"):
        causal.expert_coalition(model, [A, X], [A, Y], A, B, candidates=[(0, 16)], progress=False)


def test_patching_interrupted_keeps_finished_units(monkeypatch):
    model = planted_model()
    setup_cls = causal.PatchSetup
    real = setup_cls.patched_metric
    calls = []

    def flaky(self, units, extra_hooks=()):
        calls.append(len(units))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, units, extra_hooks)

    monkeypatch.setattr(setup_cls, "patched_metric", flaky)
    df = causal.expert_patching(model, [A, X], [A, Y], A, B, batch_size=8, progress=False)
    assert len(df) == 8 and df.attrs["interrupted"]
    assert not model.transformer.blocks[0].ffn.edits and not dbrx_lab.hooks.current_scope().fns


# ------------------------------------------------------------------------------------------------
# 4. RouterSteer
def test_router_steer_modes_in_forward_and_generation(tiny_model, make_ids):
    from dbrx_lab import Record, RouterSteer

    ids = make_ids(2, 6)
    _, base = tiny_model.run_with_trace(ids, record=Record(router=True))
    never = int(base.topk_experts[1].flatten().bincount(minlength=16).argmin())
    with tiny_model.intervene(RouterSteer(1, [never], mode="max")):
        out, trace = tiny_model.generate_with_trace(ids, max_new_tokens=4)
    assert (trace.topk_experts[1] == never).any(-1).all()                    # chosen at every token, also generated
    assert torch.allclose(trace.router_logits[:, :, :6], base.router_logits, atol=1e-5)   # raw logits recorded
    w = trace.topk_weights[1][(trace.topk_experts[1] == never)]
    top = trace.topk_weights[1][..., 0].flatten()
    assert torch.allclose(w, top, atol=1e-6)                                 # weighted like the router's favourite
    favourite = int(base.topk_experts[0, ..., 0].flatten().mode().values)
    with tiny_model.intervene(RouterSteer("all", [favourite], mode="forbid")):
        _, trace = tiny_model.generate_with_trace(ids, max_new_tokens=3)
    assert not (trace.topk_experts == favourite).any()
    with tiny_model.intervene(RouterSteer(0, [never], bias=1e4)):
        _, trace = tiny_model.run_with_trace(ids)
    assert (trace.topk_experts[0, ..., 0] == never).all()                    # a huge bias: top-1 everywhere
    with tiny_model.intervene(RouterSteer(0, [never], bias=-1e4)):
        _, trace = tiny_model.run_with_trace(ids)
    assert not (trace.topk_experts[0] == never).any()
    with tiny_model.intervene(RouterSteer(0, [never], bias=0.0)):
        assert torch.equal(tiny_model(ids).logits, tiny_model(ids).logits)
    _, after = tiny_model.run_with_trace(ids, record=Record(router=True))
    assert torch.equal(after.topk_experts, base.topk_experts)                # removed on exit


def test_router_steer_positions_and_errors(tiny_model, make_ids):
    from dbrx_lab import RouterSteer

    ids = make_ids(1, 5)
    with tiny_model.intervene(RouterSteer(0, [3], mode="max", positions=[4])):
        _, trace = tiny_model.run_with_trace(ids)
    assert (trace.topk_experts[0, 0, 4] == 3).any()
    with pytest.raises(ValueError, match="mode must be one of"):
        RouterSteer(0, [1], mode="boost")
    with pytest.raises(ValueError, match="bias must be a finite number"):
        RouterSteer(0, [1], bias=float("inf"))
    with pytest.raises(ValueError, match=r"experts \[16\] out of range: this model has experts 0..15"):
        with tiny_model.intervene(RouterSteer(0, [16])):
            pass
    with pytest.raises(ValueError, match="fewer than top_k=4: forbid at most 12"):
        with tiny_model.intervene(RouterSteer(0, list(range(13)), mode="forbid")):
            pass
    with pytest.raises(RuntimeError):
        with tiny_model.intervene(RouterSteer(0, [1], mode="max")):
            raise RuntimeError("boom")
    assert not tiny_model.transformer.blocks[0].ffn.edits


# ------------------------------------------------------------------------------------------------
# 3. counterfactual routing
@pytest.mark.parametrize("variant", ["downstream", "frozen"])
def test_counterfactual_routing_known_regret(variant):
    from dbrx_lab.analysis.counterfactual import counterfactual_routing

    model = planted_model(carriers=(5,))
    result = counterfactual_routing(model, [Z, A, X, A], positions=[0, 2], variant=variant, progress=False)
    t = result.table.set_index(["position", "layer"])
    assert result.losses.shape == (2, 2, math.comb(16, 4)) and (t.n_sets == 1820).all()
    # Z: the router picks four experts that write nothing; expert 5 (its 5th choice) carries the answer
    z = t.loc[(0, 0)]
    assert z.router_set == "{0,1,2,3}" and z["rank"] == 1 + math.comb(15, 3) and z.regret > 5
    assert "5" in z.best_set.strip("{}").split(",")
    # X: the router gives expert 5 weight 1; no set does better (all sets with 5 tie exactly)
    x = t.loc[(2, 0)]
    assert x["rank"] == 1 and x.regret == 0.0 and x.router_loss < 1e-3
    assert "5" in x.router_set.strip("{}").split(",")
    # layer 1 writes nothing: every set is equivalent
    assert (t.xs(1, level="layer").regret == 0).all() and (t.xs(1, level="layer")["rank"] == 1).all()
    by = result.by_layer().set_index("layer")
    assert by.loc[1, "mean_regret"] == 0 and by.loc[0, "mean_regret"] > 0
    assert list(result.by_layer().layer) == [1, 0]                          # most optimal first
    if variant == "downstream":
        assert result.forwards == 1 + 4 and result.rescore_error < 1e-4


def test_counterfactual_routing_on_the_demo_model(demo_model):
    import torch.nn.functional as F
    from dbrx_lab.analysis.counterfactual import counterfactual_routing

    ids = demo_model.tokenizer.encode("def add(a, b):\n    return a + b\n")
    result = counterfactual_routing(demo_model, ids, positions=[4], layers=[1], progress=False)
    row = result.table.iloc[0]
    with torch.no_grad():
        loss = F.cross_entropy(demo_model(torch.tensor([ids])).logits[0, 4], torch.tensor(ids[5]))
    assert row.router_loss == pytest.approx(float(loss), abs=1e-4)          # the router's set is the real forward
    assert row.regret >= 0 and row.best_loss <= row.router_loss and 1 <= row["rank"] <= 1820
    assert row.mean_loss > row.best_loss
    assert np.isfinite(result.losses).all()


def test_counterfactual_routing_errors_and_interrupt(monkeypatch):
    from dbrx_lab.analysis import counterfactual as cf

    model = planted_model()
    with pytest.raises(ValueError, match=r"positions \[3\] out of range: valid positions \(with a next token\) are 0..2"):
        cf.counterfactual_routing(model, [Z, A, X, A], positions=[3], progress=False)
    with pytest.raises(ValueError, match="variant must be one of"):
        cf.counterfactual_routing(model, [Z, A], variant="local", progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        cf.counterfactual_routing(model, [Z], progress=False)
    real, calls = cf.DedupUnembed.loss, []

    def flaky(self, hidden, target, chunk=256):
        calls.append(1)
        if len(calls) == 4:                                   # clean, (0, 0), (0, 1), then interrupted
            raise KeyboardInterrupt
        return real(self, hidden, target, chunk)

    monkeypatch.setattr(cf.DedupUnembed, "loss", flaky)
    result = cf.counterfactual_routing(model, [Z, A, X, A], positions=[0, 2], progress=False)
    assert result.interrupted and len(result.table) == 2 and np.isnan(result.losses[1]).all()
    assert not model.transformer.blocks[0].ffn.edits


# ------------------------------------------------------------------------------------------------
# 2. observational vs causal audit
def test_audit_finds_the_planted_expert_and_nothing_else():
    from dbrx_lab.analysis.audit import expert_audit

    model = planted_model(carriers=(5,))
    texts = [[X, A, Y, B, X, A], [Y, B, X, A, A, B, X, A]]
    audit = expert_audit(model, texts, layers=[0], n_boot=200, n_perm=500, progress=False)
    t = audit.experts.set_index("expert")
    assert audit.sampling["tokens"] == 12 and audit.sampling["units"] == 16
    assert t.loc[5, "load"] == pytest.approx(4 / 12) and t.loc[5, "mean_weight"] == pytest.approx(1.0)
    assert t.loc[5, "dla"] > 1 and (t.drop(5).dla.abs() < 1e-9).all()
    for mode in ("reroute", "zero", "renormalize"):
        assert t.loc[5, f"effect_{mode}"] > 1 and t.loc[5, f"effect_{mode}_lo"] > 0
        assert (t.drop(5)[f"effect_{mode}"].abs() < 1e-6).all()
    # high-load experts 0-3 (2/3 of tokens) do nothing: load does not predict the effect, DLA does
    c = audit.correlations.set_index(["metric", "mode"])
    assert c.loc[("dla", "zero"), "rho"] == pytest.approx(1.0) and c.loc[("load", "zero"), "rho"] < 0.5
    assert set(audit.correlations.layer) == {0}                             # one layer: no pooled rows


def test_audit_on_the_demo_model_matches_ablation_sweep(demo_model):
    from dbrx_lab.analysis import ablation_sweep
    from dbrx_lab.analysis.audit import expert_audit

    texts = ["The Python interpreter reads the file and runs it.", "def add(a, b):\n    return a + b\n"]
    audit = expert_audit(demo_model, texts, layers=[0, 3], modes=["zero"], sample_experts=6, max_tokens=20,
                         n_boot=100, n_perm=200, progress=False)
    e = audit.experts
    assert len(e) == 6 and audit.sampling["tokens"] == 20
    assert "6 of 32 experts (drawn uniformly without replacement, seed 0)" in audit.sampling["text"]
    assert (e.effect_zero_lo <= e.effect_zero + 1e-12).all() and (e.effect_zero <= e.effect_zero_hi + 1e-12).all()
    # the effects are the existing ablation sweep's cells on the same tokens
    rows = audit.notes["rows"]
    sweep = ablation_sweep(demo_model, rows, mode="zero", layers=[int(e.layer[0])], experts=[int(e.expert[0])],
                           progress=False)
    assert e.effect_zero[0] == pytest.approx(float(sweep.iloc[0, 0]), abs=1e-6)
    assert set(audit.correlations.columns) >= {"rho", "rho_lo", "rho_hi", "p_value", "p_adjusted", "d", "significant"}
    assert (audit.correlations.p_adjusted >= audit.correlations.p_value - 1e-12).all()


def test_audit_statistics_known_values():
    from dbrx_lab.analysis import audit as au

    assert au.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert au.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.allclose(au.average_ranks(np.array([5.0, 1.0, 5.0, 0.0])), [2.5, 1, 2.5, 0])
    # Benjamini-Hochberg by hand: p sorted 0.01, 0.02, 0.03, 0.5 with m = 4 -> 0.04, 0.04, 0.04, 0.5
    assert np.allclose(au.benjamini_hochberg([0.03, 0.5, 0.01, 0.02]), [0.04, 0.5, 0.04, 0.04])
    assert au.cohens_d([1, 2, 3], [4, 5, 6]) == pytest.approx(-3.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=32)
    strong = pd.DataFrame({"layer": 0, "m": x, "effect_zero": x + 0.05 * rng.normal(size=32)})
    null = pd.DataFrame({"layer": 0, "m": x, "effect_zero": rng.normal(size=32)})
    s = au.audit_statistics(strong, ["m"], ["zero"], n_boot=300, n_perm=500).iloc[0]
    n = au.audit_statistics(null, ["m"], ["zero"], n_boot=300, n_perm=500).iloc[0]
    assert s.rho > 0.9 and s.significant and s.rho_lo > 0.8 and s.d > 1.5
    assert not n.significant and n.rho_lo < 0 < n.rho_hi


def test_audit_rejects_bad_input_and_keeps_partial_work(monkeypatch):
    from dbrx_lab.analysis import audit as au
    from dbrx_lab.analysis.ablation import LossEvaluator

    model = planted_model()
    texts = [[X, A, Y, B, X, A]]
    with pytest.raises(ValueError, match="modes must be a non-empty subset of"):
        au.expert_audit(model, texts, modes=["drop"], progress=False)
    with pytest.raises(ValueError, match=r"sample_experts must be an integer in \[4, 32\]"):
        au.expert_audit(model, texts, sample_experts=40, progress=False)
    real, calls = LossEvaluator.token_losses, []

    def flaky(self, *iv):
        calls.append(1)
        if len(calls) == 7:                                 # baseline + 5 units, then interrupted
            raise KeyboardInterrupt
        return real(self, *iv)

    monkeypatch.setattr(LossEvaluator, "token_losses", flaky)
    audit = au.expert_audit(model, texts, layers=[0], modes=["zero"], n_boot=50, n_perm=50, progress=False)
    assert audit.interrupted and len(audit.experts) == 5 and not model.transformer.blocks[0].ffn.edits


def test_audit_reads_a_route_stats_folder(demo_model, tmp_path):
    import json

    from dbrx_lab import route_stats
    from dbrx_lab.analysis.audit import expert_audit

    texts = ["The Python interpreter reads the file.", "def add(a, b):\n    return a + b"]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    route_stats(demo_model, data, tmp_path / "stats", progress=False)
    audit = expert_audit(demo_model, tmp_path / "stats", layers=[0], experts=[0, 1, 2, 3], modes="zero",
                         n_boot=50, n_perm=50, progress=False)
    assert audit.notes["rows"] == [demo_model.tokenizer.encode(t) for t in texts]
    assert audit.sampling["source"] == "route-stats folder stats"


# ------------------------------------------------------------------------------------------------
# 4. contrastive experts and steering evaluation
def test_contrastive_experts_find_the_planted_expert():
    from dbrx_lab.analysis.contrastive import contrastive_experts

    g = torch.Generator().manual_seed(0)
    texts_a = [[X if b else A for b in torch.rand(8, generator=g) < 0.5] + [X] for _ in range(6)]
    texts_b = [[Y if b else A for b in torch.rand(8, generator=g) < 0.5] + [Y] for _ in range(6)]
    model = planted_model(carriers=(5,))
    df = contrastive_experts(model, texts_a, texts_b, n_perm=1000, n_boot=300, progress=False)
    top = df.iloc[0]
    share_x = sum(t.count(X) for t in texts_a) / sum(len(t) for t in texts_a)
    assert (top.layer, top.expert) == (0, 5) and top.rate_b == 0
    assert top.risk_diff == pytest.approx(share_x) and top.significant and top.rd_lo > 0
    l0 = df[df.layer == 0].set_index("expert")
    assert (l0.loc[[0, 1, 2, 3], "risk_diff"] < 0).all() and l0.loc[[0, 1, 2, 3], "significant"].all()
    unused = l0[(l0.rate_a == 0) & (l0.rate_b == 0)]
    assert len(unused) and (unused.risk_diff == 0).all() and not unused.significant.any()
    paired = contrastive_experts(model, texts_a, texts_b, paired=True, layers=[0], n_perm=500, n_boot=200,
                                 progress=False)
    assert (paired.iloc[0].layer, paired.iloc[0].expert) == (0, 5) and paired.iloc[0].p_value <= 1 / 32 + 1e-9
    with pytest.raises(ValueError, match="paired texts need equal counts"):
        contrastive_experts(model, texts_a, texts_b[:3], paired=True, progress=False)


def test_steering_effect_label_and_classifier():
    from dbrx_lab import RouterSteer
    from dbrx_lab.analysis.contrastive import steering_effect

    model = planted_model(carriers=(5,))
    steer = RouterSteer(0, [5], mode="max")
    prompts = [[A, Y], [B, A, Y], [Y]]
    by_label = steering_effect(model, prompts, steer, label=[A], progress=False)
    assert (by_label.table.delta > 5).all() and by_label.summary.mean_delta > 5
    assert by_label.summary.score == "label_logprob" and by_label.summary.prompts == 3
    by_class = steering_effect(model, prompts, steer, classifier=lambda ids: A in ids[:1], max_new_tokens=2,
                               progress=False)
    assert list(by_class.table.baseline) == [0.0] * 3 and list(by_class.table.steered) == [1.0] * 3
    assert by_class.summary.mean_delta == 1.0
    forbid = steering_effect(model, [[A, X]], RouterSteer(0, [5], mode="forbid"), label=[A], progress=False)
    assert forbid.summary.mean_delta < -5                                     # removing the carrier hurts A
    with pytest.raises(ValueError, match="exactly one of label"):
        steering_effect(model, prompts, steer, progress=False)
    assert not model.transformer.blocks[0].ffn.edits


def test_contrastive_and_steering_on_the_demo_model(demo_model):
    from dbrx_lab import RouterSteer
    from dbrx_lab.analysis.contrastive import contrastive_experts, steering_effect

    code = ["def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)", "import os\nos.getcwd()"]
    prose = ["The river flows to the sea.", "She read the letter twice.", "It rained all day in the town."]
    df = contrastive_experts(demo_model, code, prose, n_perm=300, n_boot=100, progress=False)
    assert len(df) == 4 * 16 and df.risk_diff.is_monotonic_decreasing
    assert np.allclose(df.risk_diff, df.rate_a - df.rate_b)
    assert np.allclose(df.groupby("layer").rate_a.sum(), 4.0)                # k experts per token
    top = df.iloc[0]
    result = steering_effect(demo_model, prose[:2], RouterSteer(int(top.layer), [int(top.expert)], mode="max"),
                             label="(", progress=False)
    assert len(result.table) == 2 and np.isfinite(result.table.delta).all()


# ------------------------------------------------------------------------------------------------
# 5. figures
def test_causal_figures_draw_the_tables():
    from dbrx_lab import RouterSteer
    from dbrx_lab import analysis as an
    from dbrx_lab import figures_causal as fc

    model = planted_model(carriers=(5, 9))
    patch = an.expert_patching(model, [A, X], [A, Y], A, B, progress=False)
    fig = fc.patching_heatmap(patch)
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (2, 16) and z[0, 5] == pytest.approx(patch.recovery[5])
    marked = set(zip(fig.data[1].y, fig.data[1].x))                        # circles: units only the clean run routed
    added = patch.routed_clean & ~patch.routed_corrupt
    assert marked == set(zip(patch.layer[added], patch.expert[added])) >= {(0, 5), (0, 9)}
    assert "Expert patching" in fig.layout.title.text
    curve = fc.coalition_curve(an.expert_coalition(model, [A, X], [A, Y], A, B, progress=False))
    assert list(curve.data[0].text)[:1] == ["corrupted"] and len(curve.data[0].x) == 3
    approx = an.attribution_patching(model, [A, X], [A, Y], A, B)
    assert len(fc.attribution_scatter(patch, approx).data[0].x) == 32
    audit = an.expert_audit(model, [[X, A, Y, B, X, A]], layers=[0], modes=["zero"], n_boot=50, n_perm=50,
                            progress=False)
    fig = fc.audit_figure(audit, metric="dla")
    assert len(fig.data) == 2 and len(fig.data[1].x) == 16
    with pytest.raises(ValueError, match="no correlations for mode 'reroute'"):
        fc.audit_figure(audit, mode="reroute")
    cf = an.counterfactual_routing(model, [Z, A, X, A], positions=[0, 2], progress=False)
    assert len(fc.regret_figure(cf).data) == 2 + 1
    hist = fc.set_losses(cf, 0, 0)
    rank = 1 + 1820 - math.comb(14, 4)                        # every set holding carrier 5 or 9 beats the router's
    assert len(hist.data[0].x) == 1820 and f"router ranks {rank}" in hist.layout.title.text
    with pytest.raises(ValueError, match=r"\(position, layer\) = \(1, 0\) was not scored"):
        fc.set_losses(cf, 1, 0)
    ce = an.contrastive_experts(model, [[X, A]] * 3, [[Y, A]] * 3, n_perm=50, n_boot=50, progress=False)
    assert np.array(fc.contrastive_heatmap(ce).data[0].z, dtype=float).shape == (2, 16)
    se = an.steering_effect(model, [[Y], [A, Y]], RouterSteer(0, [5], mode="max"), label=[A], progress=False)
    assert len(fc.steering_figure(se).data) == 2
    with pytest.raises(ValueError, match="patching_heatmap needs the non-empty table"):
        fc.patching_heatmap(pd.DataFrame())


def test_patching_on_the_demo_model_matches_a_hand_computed_last_layer(demo_model):
    """Last-layer units: restoring one only changes the final residual at the metric position by (clean -
    corrupted contribution), so the patched metric can be computed by hand through norm_f and lm_head."""
    model, L = demo_model, demo_model.config.n_layers
    clean, corrupt = "import os\nimport sys\n\nprint(os.", "import re\nimport sys\n\nprint(re."
    answer, wrong = model.tokenizer.encode("path")[0], model.tokenizer.encode("compile")[0]
    df = causal.expert_patching(model, clean, corrupt, answer, wrong, layers=[L - 1], positions=[-1], progress=False)
    kept = {}

    def run(text):
        names = [f"blocks.{L - 1}.ffn.hook_{h}" for h in ("topk_experts", "topk_weights", "expert_out")]
        names.append(f"blocks.{L - 1}.hook_resid_post")
        with torch.no_grad(), model.hooks([(n, lambda x, hook: kept.__setitem__(hook.name, x[0, -1].clone()))
                                           for n in names]):
            logits = model(torch.tensor([model.tokenizer.encode(text)])).logits[0, -1]
        contrib = torch.zeros(16, model.config.d_model)
        for e, w, y in zip(kept[names[0]], kept[names[1]], kept[names[2]]):
            contrib[int(e)] = w * y
        return logits, kept[names[3]].clone(), contrib

    W = model.lm_head.weight.detach()
    diff = lambda logits: float(logits[answer] - logits[wrong])
    clean_logits, _, c_clean = run(clean)
    corrupt_logits, resid, c_corrupt = run(corrupt)
    assert df.attrs["clean_metric"] == pytest.approx(diff(clean_logits), abs=1e-4)
    assert df.attrs["corrupted_metric"] == pytest.approx(diff(corrupt_logits), abs=1e-4)
    with torch.no_grad():
        by_hand = [diff(W @ model.transformer.norm_f(resid + c_clean[e] - c_corrupt[e])) for e in range(16)]
    assert np.allclose(df.metric, by_hand, atol=1e-4)
    untouched = ~(df.routed_clean | df.routed_corrupt)
    assert np.allclose(df.effect[untouched], 0.0, atol=1e-6)


def test_attribution_agrees_with_exact_patching_on_the_demo_model(demo_model):
    clean, corrupt = "import os\nimport sys\n\nprint(os.", "import re\nimport sys\n\nprint(re."
    exact = causal.expert_patching(demo_model, clean, corrupt, "path", "compile", progress=False)
    approx = causal.attribution_patching(demo_model, clean, corrupt, "path", "compile")
    agree = causal.patching_agreement(exact, approx)
    assert agree["units"] == 64 and agree["spearman"] > 0.5 and agree["pearson"] > 0.3
    assert approx.attrs["forwards"] == 3 and exact.attrs["forwards"] == 66


def test_patching_with_aligned_positions_of_different_lengths():
    model = planted_model(carriers=(5,))
    df = causal.expert_patching(model, [B, A, X], [A, Y], A, B, layers=[0], positions=[1], clean_positions=[2],
                                progress=False)
    assert df.attrs["clean_metric"] > 10 and abs(df.attrs["corrupted_metric"]) < 1e-4
    assert df.set_index("expert").recovery[5] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="positions has 1 columns and clean_positions 2"):
        causal.expert_patching(model, [B, A, X], [A, Y], A, B, positions=[1], clean_positions=[1, 2], progress=False)


def test_frozen_variant_equals_downstream_at_the_last_layer(demo_model):
    """At the last layer nothing is downstream, so the frozen (local) variant is exact there."""
    from dbrx_lab.analysis.counterfactual import counterfactual_routing

    ids = demo_model.tokenizer.encode("def add(a, b):\n    return a + b\n")
    L = demo_model.config.n_layers
    down = counterfactual_routing(demo_model, ids, positions=[6], layers=[L - 1], progress=False)
    frozen = counterfactual_routing(demo_model, ids, positions=[6], layers=[L - 1], variant="frozen", progress=False)
    assert np.allclose(down.losses, frozen.losses, atol=2e-4)
    assert frozen.table.variant[0] == "frozen" and frozen.forwards == 1


def test_coalition_and_router_steer_on_the_demo_model(demo_model):
    from dbrx_lab import RouterSteer

    clean, corrupt = "import os\nimport sys\n\nprint(os.", "import re\nimport sys\n\nprint(re."
    single = causal.expert_patching(demo_model, clean, corrupt, "path", "compile", layers=[0, 2], progress=False)
    top = single.nlargest(4, "recovery")
    curve = causal.expert_coalition(demo_model, clean, corrupt, "path", "compile", max_size=2, candidates=top,
                                    stop_at=None, progress=False)
    assert curve.recovery[1] == pytest.approx(top.recovery.iloc[0], abs=1e-5)      # step 1 = best single unit
    assert (curve.layer[1], curve.expert[1]) == (top.layer.iloc[0], top.expert.iloc[0])
    assert curve.attrs["forwards"] == 2 + 4 + 3 and len(curve) == 3
    with demo_model.intervene(RouterSteer(2, [8], mode="max")):
        _, trace = demo_model.generate_with_trace("The cache keeps", max_new_tokens=4)
    assert (trace.topk_experts[2] == 8).any(-1).all()


def test_counterfactual_routing_in_row_chunks_gives_the_same_losses():
    from dbrx_lab.analysis.counterfactual import counterfactual_routing

    model = planted_model(carriers=(5,))
    whole = counterfactual_routing(model, [Z, A, X, A], positions=[0], progress=False)
    parts = counterfactual_routing(model, [Z, A, X, A], positions=[0], max_rows=500, progress=False)
    assert parts.forwards == 1 + 2 * 4 and np.allclose(whole.losses, parts.losses, atol=1e-5)
    assert list(parts.table["rank"]) == list(whole.table["rank"])
    with pytest.raises(ValueError, match="max_rows must be None or an integer >= 1"):
        counterfactual_routing(model, [Z, A], max_rows=0, progress=False)


def test_router_steer_forbid_counts_as_removing_experts():
    """RouterSteer("forbid") with a rerouting ablation leaving fewer than top-k experts is refused on entry,
    as two rerouting ablations are (nothing stays attached)."""
    from dbrx_lab import ExpertAblation, RouterSteer, load_model

    model = load_model("tiny")
    E, k = model.config.moe_num_experts, model.config.moe_top_k
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="fewer than top_k"):
        with model.intervene(RouterSteer(0, list(range(E - k)), mode="forbid"), ExpertAblation(0, [E - 1])):
            model(ids)
    assert model.active_interventions() == []
    with model.intervene(RouterSteer(0, list(range(E - k)), mode="forbid")):     # exactly k left: fine
        model(ids)
