"""dbrx_lab.analysis: every statistic against a hand-computed crafted trace; interventional ones on a tiny model."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from dbrx_lab import DbrxConfig, DbrxLM, analysis
from dbrx_lab.analysis import DropTopExperts, LossEvaluator
from dbrx_lab.interventions import ExpertAblation, ExpertScale, HeadAblation, TopK
from dbrx_lab.trace import Record, Trace

# ------------------------------------------------------------------------------------------------
# crafted routing: E = 4, k = 2, L = 2, B = 2, T = 3; row 1 column 0 is padding with routing [3, 2]
# (and token 9) that must never be counted.
EXPERTS = torch.tensor([
    [[[0, 1], [0, 2], [1, 3]], [[3, 2], [0, 1], [0, 1]]],     # layer 0
    [[[2, 3], [2, 3], [0, 1]], [[3, 2], [1, 0], [2, 3]]],     # layer 1
])
WEIGHTS = torch.tensor([0.75, 0.25]).expand(2, 2, 3, 2)
IDS = torch.tensor([[5, 6, 5], [9, 5, 6]])
MASK = torch.tensor([[True, True, True], [False, True, True]])


@pytest.fixture
def trace():
    return Trace.from_routing(EXPERTS, WEIGHTS, input_ids=IDS, attention_mask=MASK, n_experts=4)


def row(df, **where):
    sel = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        sel &= (df[k] == v).to_numpy()
    assert sel.sum() == 1, where
    return df[sel].iloc[0]


def test_expert_load_hand_computed(trace):
    load = analysis.expert_load(trace)
    assert len(load) == 2 * 4 and (load["tokens"] == 5).all()                      # padding not counted
    assert load.query("layer == 0")["count"].tolist() == [4, 4, 1, 1]
    assert load.query("layer == 0")["top1_count"].tolist() == [4, 1, 0, 0]
    assert load.query("layer == 1")["count"].tolist() == [2, 2, 3, 3]
    assert load.query("layer == 1")["top1_count"].tolist() == [1, 1, 3, 0]
    np.testing.assert_allclose(load.query("layer == 0")["share"], [0.8, 0.8, 0.2, 0.2])
    np.testing.assert_allclose(load.query("layer == 0")["weight_share"], [0.6, 0.3, 0.05, 0.05])
    assert (load["baseline_share"] == 0.5).all() and (load["baseline_top1"] == 0.25).all()
    np.testing.assert_allclose(load.groupby("layer")["share"].sum(), [2.0, 2.0])   # k per token


def test_expert_load_by_label_and_domain_specialization(trace):
    dom = analysis.domain_specialization(trace, labels=["a", "b"])
    a0 = row(dom, label="a", layer=0, expert=0)
    assert a0["tokens"] == 3 and a0["count"] == 2
    assert a0["share"] == pytest.approx(2 / 3) and a0["share_all"] == pytest.approx(4 / 5)
    assert a0["lift"] == pytest.approx((2 / 3) / (4 / 5)) and a0["lift_uniform"] == pytest.approx(4 / 3)
    b2 = row(dom, label="b", layer=0, expert=2)
    assert b2["tokens"] == 2 and b2["share"] == 0
    with pytest.raises(ValueError, match="one per batch row"):
        analysis.expert_load(trace, by="label", labels=["a"])
    with pytest.raises(ValueError, match="no per-token column 'label'"):
        analysis.expert_load(trace, by="label")


def test_repetition_hand_computed(trace):
    rep = analysis.routing_repetition(trace)
    assert rep["pairs"].tolist() == [3, 3]                         # (0, 1), (1, 2) of row 0; (1, 2) of row 1
    np.testing.assert_allclose(rep["same_top1"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(rep["overlap"], [2 / 3, 1 / 3])
    np.testing.assert_allclose(rep["shared"], [1.0, 2 / 3])
    np.testing.assert_allclose(rep["jaccard"], [4 / 9, 1 / 3])
    assert rep["baseline_same_top1"][0] == pytest.approx(1 / 4)
    assert rep["baseline_overlap"][0] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))
    assert rep["baseline_jaccard"][0] == pytest.approx(7 / 18)


def test_repetition_baselines_match_simulation():
    rng = np.random.default_rng(0)
    E, k, n = 16, 4, 40000
    a = np.argsort(rng.random((n, E)), axis=1)[:, :k]
    b = np.argsort(rng.random((n, E)), axis=1)[:, :k]
    shared = (a[:, :, None] == b[:, None, :]).sum((1, 2))
    base = analysis.repetition_baselines(E, k)
    assert (a[:, 0] == b[:, 0]).mean() == pytest.approx(base["same_top1"], abs=0.01)
    assert (shared > 0).mean() == pytest.approx(base["overlap"], abs=0.01)
    assert (shared / (2 * k - shared)).mean() == pytest.approx(base["jaccard"], abs=0.01)


def test_coactivation_hand_computed(trace):
    co = analysis.coactivation(trace)
    assert len(co) == 2 * 4 * 3                                                      # ordered pairs i != j
    r = row(co, layer=0, expert_i=0, expert_j=1)
    assert (r["count_both"], r["count_i"]) == (3, 4) and r["p_j_given_i"] == pytest.approx(3 / 4)
    assert row(co, layer=0, expert_i=0, expert_j=2)["p_j_given_i"] == pytest.approx(1 / 4)
    assert row(co, layer=0, expert_i=2, expert_j=0)["p_j_given_i"] == 1.0
    assert row(co, layer=0, expert_i=3, expert_j=2)["count_both"] == 0             # only the padding had {3, 2}
    np.testing.assert_allclose(co["baseline"], 1 / 3)


def test_layer_transitions_hand_computed(trace):
    tr = analysis.layer_transitions(trace)
    nz = {(r.expert_a, r.expert_b): r.count for r in tr.itertuples() if r.count}
    assert nz == {(0, 2): 3, (1, 0): 1, (0, 1): 1}
    r = row(tr, expert_a=0, expert_b=2)
    assert r["share"] == pytest.approx(3 / 4) and r["expected"] == pytest.approx(4 * 3 / 5)
    topk = analysis.layer_transitions(trace, rank="topk")
    assert topk["count"].sum() == 5 * 2 * 2                                          # k^2 per token
    with pytest.raises(ValueError, match="not in the routing's layers"):
        analysis.layer_transitions(trace, layer_pairs=[(0, 5)])


def test_router_confidence_hand_computed():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    t = Trace.from_routing(torch.tensor([[[[0, 1], [0, 1]]]]), router_logits=probs.log()[None, None])
    conf = analysis.router_confidence(t)
    p = probs[0].double()
    assert conf["entropy"][0] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    assert conf["entropy"][1] == pytest.approx(math.log(4), abs=1e-6)
    np.testing.assert_allclose(conf["margin"], [0.15, 0.0], atol=1e-6)
    np.testing.assert_allclose(conf["topk_mass"], [0.8, 0.5], atol=1e-6)
    np.testing.assert_allclose(conf["top1_weight"], [0.5 / 0.8, 0.5], atol=1e-6)
    assert conf["runner_up"][0] == 2
    summary = analysis.confidence_summary(t, fragile_threshold=0.1)
    assert summary["fragile_share"][0] == 0.5
    assert summary["margin_mean"][0] == pytest.approx(0.075, abs=1e-6)
    assert summary["entropy_uniform"][0] == pytest.approx(math.log(4))
    assert summary["topk_mass_uniform"][0] == 0.5 and summary["top1_weight_uniform"][0] == 0.5
    assert summary["topk_mass_p50"][0] == pytest.approx(0.5, abs=1e-3)             # histogram quantile
    fragile = analysis.fragile_tokens(t, n=1)
    assert len(fragile) == 1 and fragile["position"][0] == 1 and fragile["margin"][0] == pytest.approx(0)
    with pytest.raises(ValueError, match="router probabilities are missing"):
        analysis.router_confidence(Trace.from_routing(torch.tensor([[[[0, 1]]]])))


def test_vocab_specialization_hand_computed(trace):
    vs = analysis.vocab_specialization(trace, min_count=3)
    assert set(vs["token_id"]) == {5}                                                # 6 seen twice; pad 9 never
    r0, r1 = row(vs, layer=0), row(vs, layer=1)
    assert (r0["occurrences"], r0["top_expert"], r0["top_count"]) == (3, 1, 3) and r0["top_share"] == 1.0
    assert (r1["top_expert"], r1["top_share"]) == (0, pytest.approx(2 / 3))
    assert r0["baseline"] == 0.5 and r0["lift"] == 2.0
    top1 = analysis.vocab_specialization(trace, min_count=3, rank="top1")
    assert row(top1, layer=0)["top_share"] == pytest.approx(2 / 3) and row(top1, layer=0)["baseline"] == 0.25
    nxt = analysis.vocab_specialization(trace, by="next", min_count=2)
    assert set(nxt["token_id"]) == {6}                                               # next of r0t0 and r1t1
    assert row(nxt, layer=0)["occurrences"] == 2
    with pytest.raises(ValueError, match="predicted_id"):
        analysis.vocab_specialization(trace, by="predicted")


def test_top_tokens_per_expert_hand_computed(trace):
    top = analysis.top_tokens_per_expert(trace, n=2, min_count=2)
    e0 = top.query("layer == 0 and expert == 0")
    assert e0["token_id"].tolist() == [6, 5] and e0["rank"].tolist() == [0, 1]       # share 1.0, then 2/3
    np.testing.assert_allclose(e0["share_of_token"], [1.0, 2 / 3])
    np.testing.assert_allclose(e0["share_of_expert"], [0.5, 0.5])
    by_count = analysis.top_tokens_per_expert(trace, n=1, min_count=1, sort="count")
    assert row(by_count, layer=0, expert=1)["token_id"] == 5                          # 3 of expert 1's 4


def test_dataframe_and_list_sources_agree(trace):
    wide = analysis.routing_frame(trace)
    assert len(wide) == 5 * 2 and {"expert_0", "weight_1", "layer", "text", "position"} <= set(wide.columns)
    tidy = trace.to_frame()
    for fn in (analysis.expert_load, analysis.routing_repetition, analysis.coactivation,
               analysis.layer_transitions):
        want = fn(trace)
        pd.testing.assert_frame_equal(fn(wide), want, check_dtype=False)
        pd.testing.assert_frame_equal(fn(tidy), want, check_dtype=False)
    # two traces: texts stay apart (no pair across them), counts add up, labels run over both
    both = [trace, trace]
    rep = analysis.routing_repetition(both)
    assert rep["pairs"].tolist() == [6, 6]
    load = analysis.expert_load(both, by="label", labels=["a", "b", "a", "b"])
    assert row(load, label="a", layer=0, expert=0)["count"] == 4
    with pytest.raises(ValueError, match="cannot read routing"):
        analysis.expert_load(42)


def test_smaller_k_padding_is_ignored():
    # layer 1 chose one expert (TopK(1) there): the trace pads with -1 / weight 0
    experts = torch.tensor([[[[0, 1], [2, 3]]], [[[1, -1], [1, -1]]]])
    weights = torch.tensor([[[[0.6, 0.4], [0.6, 0.4]]], [[[1.0, 0.0], [1.0, 0.0]]]])
    t = Trace(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.bool),
              tokens=[["a", "b"]], topk_experts=experts, topk_weights=weights, metadata={"n_experts": 4})
    load = analysis.expert_load(t)
    assert load.query("layer == 1")["count"].tolist() == [0, 2, 0, 0]
    rep = analysis.routing_repetition(t)
    assert rep["jaccard"].tolist() == [0.0, 1.0] and rep["shared"].tolist() == [0.0, 1.0]
    co = analysis.coactivation(t)
    assert co.query("layer == 1")["count_both"].sum() == 0


# ------------------------------------------------------------------------------------------------
# interventional analyses on a tiny model
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, ffn_hidden_size=48, max_seq_len=64,
                     vocab_size=512, moe_num_experts=8, moe_top_k=2, torch_dtype="float32")
    m = DbrxLM(cfg).eval()
    m.reset_parameters(std=0.3)                                                      # decisive, varied routing
    m.requires_grad_(False)
    return m


TEXTS = [[1, 20, 33, 400, 5, 67, 8, 90], [11, 2, 300, 45, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def test_logit_attribution_sums_to_the_logit(model):
    ids = torch.tensor([[0, 0, 3, 14, 15, 92, 65], [2, 71, 82, 81, 82, 8, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    att = analysis.logit_attribution(model, ids, target="next", positions="all", attention_mask=mask)
    totals = att.totals
    assert len(totals) == 4 + 6                                                       # real positions with a next token
    assert not ((totals["batch"] == 0) & (totals["position"] < 2)).any()             # padding skipped
    np.testing.assert_allclose(totals["attributed"], totals["logit"], rtol=1e-4, atol=1e-4)
    assert totals["logit"].abs().max() > 1.0                                          # a non-trivial check
    with torch.no_grad():
        logits = model(ids, mask).logits
    r = totals.iloc[-1]
    assert r["logit"] == pytest.approx(float(logits[1, 5, 4]), abs=1e-4) and r["target_id"] == 4
    comp = att.components
    k, L = model.config.moe_top_k, model.config.n_layers
    per_pos = comp.groupby(["batch", "position"])["component"].value_counts().unstack()
    assert (per_pos["expert"] == L * k).all() and (per_pos["attn"] == L).all() and (per_pos["embed"] == 1).all()
    # the experts listed are the ones the model chose, with the applied weights
    _, tr = model.run_with_trace(ids, attention_mask=mask, record=Record(router=True))
    e = comp.query("component == 'expert' and batch == 1 and position == 5 and layer == 1")
    assert e["expert"].tolist() == tr.topk_experts[1, 1, 5].tolist()
    np.testing.assert_allclose(e["weight"], tr.topk_weights[1, 1, 5].numpy(), rtol=1e-5)
    mat = att.expert_matrix(batch=1, position=5)
    assert mat.shape[0] == L and mat.to_numpy().sum() == pytest.approx(float(r["experts"]), abs=1e-4)
    default = analysis.logit_attribution(model, ids[1])                               # last position, top prediction
    assert default.totals["target_id"][0] == int(logits[1, -1].argmax())


def test_loss_evaluator_matches_model_loss_and_ignores_padding(model):
    ev = LossEvaluator(model, TEXTS, batch_size=2)
    with torch.no_grad():
        per_text = [float(model(torch.tensor([t]), labels=torch.tensor([t])).loss) for t in TEXTS]
    weights = [len(t) - 1 for t in TEXTS]
    assert ev.n_targets == sum(weights)
    assert ev.baseline_loss == pytest.approx(np.average(per_text, weights=weights), rel=1e-5)
    iv = ExpertAblation(0, [1], "zero")
    with model.intervene(iv), torch.no_grad():
        per_text = [float(model(torch.tensor([t]), labels=torch.tensor([t])).loss) for t in TEXTS]
    assert ev.loss(iv) == pytest.approx(np.average(per_text, weights=weights), rel=1e-5)
    with pytest.raises(ValueError, match="text 1 has 1 tokens"):
        LossEvaluator(model, [[1, 2], [3]])


def test_ablation_sweep(model):
    ev = LossEvaluator(model, TEXTS, batch_size=2)
    sweep = analysis.ablation_sweep(model, ev, mode="reroute", progress=False)
    L, E = model.config.n_layers, model.config.moe_num_experts
    assert sweep.shape == (L, E) and sweep.index.name == "layer" and sweep.columns.name == "expert"
    assert sweep.attrs["baseline_loss"] == pytest.approx(ev.baseline_loss)
    assert sweep.loc[1, 3] == pytest.approx(ev.delta(ExpertAblation(1, [3], "reroute")), abs=1e-6)
    # rerouting an expert no token chose changes nothing; one that was chosen changes the loss
    rows = []
    for t in TEXTS:
        _, tr = model.run_with_trace(torch.tensor([t]), record=Record(router=True))
        rows.append(tr.topk_experts[:, 0].reshape(L, -1))
    used = torch.cat(rows, dim=1)                                                     # [L, all slots]
    for layer in range(L):
        for e in range(E):
            if (used[layer] == e).any():
                assert abs(sweep.loc[layer, e]) > 1e-6
            else:
                assert abs(sweep.loc[layer, e]) < 1e-5
    zero = analysis.ablation_sweep(model, TEXTS, mode="zero", layers=[1], experts=[0, 2], progress=False)
    assert zero.shape == (1, 2)
    with pytest.raises(ValueError, match="experts"):
        analysis.ablation_sweep(model, ev, experts=[E], progress=False)


def test_drop_top_experts_routes_to_the_next_ones(model):
    ids = torch.tensor([TEXTS[0]])
    _, base = model.run_with_trace(ids, record=Record(router=True))
    with model.intervene(DropTopExperts(2, layer=0)):
        _, dropped = model.run_with_trace(ids, record=Record(router=True))
    ranked = base.router_logits[0, 0].argsort(-1, descending=True)                   # [T, E]
    k = model.config.moe_top_k
    assert torch.equal(dropped.topk_experts[0, 0].sort(-1).values, ranked[:, 2:2 + k].sort(-1).values)
    with pytest.raises(ValueError, match="valid r are 0..6"):
        with model.intervene(DropTopExperts(7)):
            pass
    curve = analysis.drop_top_curve(model, TEXTS, r_values=[0, 1, 3], progress=False)
    assert curve["r"].tolist() == [0, 1, 3] and curve["delta"][0] == 0.0
    assert curve["delta"][2] == pytest.approx(LossEvaluator(model, TEXTS).delta(DropTopExperts(3)), abs=1e-6)
    assert abs(curve["delta"][2]) > 1e-3


def test_top_k_curve(model):
    curve = analysis.top_k_curve(model, TEXTS, k_values=[1, 2, 8], progress=False)
    assert curve["k"].tolist() == [1, 2, 8]
    assert curve["delta"][1] == pytest.approx(0.0, abs=1e-5)                         # the trained k
    assert curve["delta"][0] != pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="k=9 out of range"):
        analysis.top_k_curve(model, TEXTS, k_values=[9], progress=False)


def test_compare_generations_matches_separate_generations(model):
    prompt = [3, 14, 15, 92]
    iv = ExpertAblation(1, [0, 1, 2], "reroute")
    events = []
    res = analysis.compare_generations(model, prompt, iv, max_new_tokens=12, seed=3, do_sample=True,
                                       temperature=1.5, on_step=events.append)
    base = model.generate(torch.tensor([prompt]), 12, do_sample=True, temperature=1.5, seed=3)[0, 4:]
    with model.intervene(iv):
        abl = model.generate(torch.tensor([prompt]), 12, do_sample=True, temperature=1.5, seed=3)[0, 4:]
    assert not model.active_interventions()
    assert res.baseline_ids.tolist() == base.tolist() and res.ablated_ids.tolist() == abl.tolist()
    diff = [i for i in range(12) if base[i] != abl[i]]
    assert diff and res.first_divergence == diff[0]
    assert [e.branch for e in events[:4]] == ["baseline", "ablated", "baseline", "ablated"]
    assert events[-1].text == res.ablated_text or events[-2].text == res.ablated_text
    # KL at step 0, computed independently from the prompt's last position
    p = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    with model.intervene(iv):
        q = model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    assert res.per_step["kl"][0] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4, abs=1e-6)
    assert res.per_step["top_token_changed"][0] == bool(p.argmax() != q.argmax())
    assert len(res.per_step) == 12 and (res.per_step["kl"] >= -1e-6).all()
    # cascade: layer 0 is upstream of the ablation; layer 1 changes exactly where experts 0-2 were chosen
    casc = res.cascade
    assert len(casc) == 2 * (4 + 12)
    assert (casc.query("layer == 0")["jaccard"] == 1.0).all()
    full = torch.cat([torch.tensor(prompt), res.baseline_ids])[None]
    _, tr = model.run_with_trace(full, record=Record(router=True))
    hit = torch.isin(tr.topk_experts[1, 0], torch.tensor([0, 1, 2])).any(-1).numpy()
    assert ((casc.query("layer == 1")["jaccard"] < 1).to_numpy() == hit).all()


def test_compare_generations_identity_and_stateful_interventions(model):
    same = analysis.compare_generations(model, [5, 6, 7], ExpertScale(0, 1, 1.0), max_new_tokens=5)
    assert same.first_divergence is None and same.baseline_text == same.ablated_text
    assert same.per_step["kl"].abs().max() < 1e-5 and same.per_step["same"].all()
    assert (same.cascade["changed_fraction"] == 0).all()
    # HeadAblation "mean" keeps prompt means between steps; TopK(1) changes k in one layer only
    ivs = [HeadAblation(0, [1, 2], "mean"), TopK(1, layer=1)]
    res = analysis.compare_generations(model, [5, 6, 7], ivs, max_new_tokens=6)
    with model.intervene(*ivs):
        abl = model.generate(torch.tensor([[5, 6, 7]]), 6)[0, 3:]
    assert res.ablated_ids.tolist() == abl.tolist()
    assert (res.cascade.query("layer == 1")["changed_fraction"] >= 0.5).all()        # one of two experts left
    with pytest.raises(ValueError, match="one prompt"):
        analysis.compare_generations(model, torch.tensor([[1, 2], [3, 4]]), ivs, max_new_tokens=2)
