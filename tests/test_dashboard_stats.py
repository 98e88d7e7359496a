"""Issue #22 item 9: counts, bootstrap intervals, the minimum-count guard and lift saturation
(analysis.routing.*_intervals), the figures that show them, the untangled Flow Sankey and the dashboard's
controls. Built on synthetic routing (numpy), so no number depends on the demo model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dbrx_lab import analysis, figures
from dbrx_lab.analysis import routing as R
from dbrx_lab.analysis.routing import Routing
from dbrx_lab.widgets import ExpertUsageDashboard


def synthetic(n_texts: int = 20, tokens: int = 12, L: int = 2, E: int = 6, k: int = 2, seed: int = 0,
              labels=("a", "b"), p: np.ndarray | None = None) -> Routing:
    """Random routing: each token's top-k drawn without replacement with probabilities p (uniform)."""
    rng = np.random.default_rng(seed)
    N = n_texts * tokens
    experts = np.stack([rng.choice(E, size=k, replace=False, p=p) for _ in range(L * N)]).reshape(L, N, k)
    text = np.repeat(np.arange(n_texts), tokens)
    columns = {"text": text, "position": np.tile(np.arange(tokens), n_texts),
               "label": np.array(labels, dtype=object)[text % len(labels)]}
    return Routing(experts.astype(np.int64), np.full((L, N, k), 1 / k, np.float32), E, np.arange(L), columns)


def split(r: Routing, at_text: int) -> list[Routing]:
    """The same routing as two chunks of whole texts."""
    cut = int(np.searchsorted(r.columns["text"], at_text))
    parts = []
    for sl in (slice(None, cut), slice(cut, None)):
        parts.append(Routing(r.experts[:, sl], r.weights[:, sl], r.n_experts, r.layers,
                             {c: v[sl] for c, v in r.columns.items()}))
    return parts


def saturated_routing() -> Routing:
    """One layer, top-1 of 4 experts. Domain a (10 texts x 10 tokens): expert 1 on 6 tokens per text, expert 2
    on 1 or 2 (15 in all), expert 0 on the rest; domain b (10 texts): experts 0 and 3 only. Experts 1 and 2
    are used by domain a alone, so both sit at the lift ceiling 200/100 = 2 whatever their counts."""
    rows, text, label = [], [], []
    for t in range(20):
        if t < 10:
            n2 = 2 if t < 5 else 1
            seq = [1] * 6 + [2] * n2 + [0] * (10 - 6 - n2)
        else:
            seq = [0] * 5 + [3] * 5
        rows += seq
        text += [t] * 10
        label += ["a" if t < 10 else "b"] * 10
    experts = np.array(rows, dtype=np.int64)[None, :, None]
    cols = {"text": np.array(text), "position": np.tile(np.arange(10), 20), "label": np.array(label, dtype=object)}
    return Routing(experts, np.ones(experts.shape, np.float32), 4, np.arange(1), cols)


# --- the bootstrap ----------------------------------------------------------------------------------
def test_poisson_weights_are_poisson_1_and_depend_only_on_seed_and_unit():
    w = R.poisson_weights(np.arange(20000), 50, seed=3)
    assert w.shape == (50, 20000) and w.dtype == np.float32
    assert abs(w.mean() - 1) < 0.02 and abs(w.var() - 1) < 0.03 and abs((w == 0).mean() - np.exp(-1)) < 0.01
    np.testing.assert_array_equal(R.poisson_weights(np.arange(100, 200), 50, 3), w[:, 100:200])   # chunking
    assert not np.array_equal(R.poisson_weights(np.arange(100), 50, 4), w[:, :100])                 # seed


def test_load_intervals_add_n_and_intervals_to_expert_load():
    r = synthetic()
    point = analysis.expert_load(r)
    df = R.load_intervals(r, n_boot=300)
    pd.testing.assert_frame_equal(df[point.columns], point)
    assert (df["n_units"] == 20).all() and df.attrs["bootstrap"] == "text" and df.attrs["n_boot"] == 300
    for v in ("share", "top1_share", "weight_share"):
        assert (df[f"{v}_lo"] <= df[v] + 1e-12).all() and (df[f"{v}_hi"] >= df[v] - 1e-12).all()
        assert (df[f"{v}_hi"] > df[f"{v}_lo"]).any()
    # deterministic in the seed, the same whether the texts come in one chunk or two
    again = R.load_intervals(split(r, 7), n_boot=300)
    pd.testing.assert_frame_equal(df, again)
    other = R.load_intervals(r, n_boot=300, seed=1)
    assert not np.allclose(other["share_lo"], df["share_lo"])
    by_token = R.load_intervals(r, n_boot=300, unit="token")
    assert (by_token["n_units"] == len(r.columns["text"])).all()
    # by a column: one block of rows per group
    grouped = R.load_intervals(r, by="label", n_boot=100)
    assert set(grouped["label"]) == {"a", "b"} and (grouped["n_units"] == 10).all()


def test_intervals_cover_the_true_share():
    """95% intervals over texts contain the true routing probability in most of 40 independent corpora
    (a broken bootstrap, e.g. zero-width intervals, covers it almost never)."""
    p = np.array([0.3, 0.7])
    hits, widths = 0, []
    for s in range(40):
        r = synthetic(n_texts=30, tokens=10, L=1, E=2, k=1, seed=100 + s, p=p)
        row = R.load_intervals(r, n_boot=200, seed=s).iloc[0]
        hits += row["share_lo"] <= 0.3 <= row["share_hi"]
        widths.append(row["share_hi"] - row["share_lo"])
    assert hits >= 34, hits
    big = R.load_intervals(synthetic(n_texts=300, tokens=10, L=1, E=2, k=1, seed=7, p=p), n_boot=200).iloc[0]
    assert big["share_hi"] - big["share_lo"] < np.mean(widths) / 2            # ~1/sqrt(n)


def test_one_text_gives_no_interval():
    r = synthetic(n_texts=1, tokens=30)
    df = R.load_intervals(r, n_boot=50)
    assert (df["n_units"] == 1).all() and df["share_lo"].isna().all()
    assert R.load_intervals(r, n_boot=50, unit="token")["share_lo"].notna().all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_boot=5), r"n_boot must be an integer in \[10, 100000\]"),
    (dict(level=1.5), r"level must be in \(0, 1\)"),
    (dict(unit="doc"), r"unit must be one of \('text', 'token'\)"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_bad_bootstrap_settings_name_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.load_intervals(synthetic(n_texts=2), **kwargs)


def test_bad_min_count_names_the_valid_range():
    for f in (R.coactivation_intervals, R.specialization_intervals):
        with pytest.raises(ValueError, match="min_count must be an integer >= 0"):
            f(synthetic(n_texts=2), min_count=-3)


# --- saturation and the minimum-count guard --------------------------------------------------------
def test_saturated_lift_ties_and_log_odds_breaks_the_tie():
    spec = R.specialization_intervals(saturated_routing(), n_boot=200, min_count=20)
    point = analysis.domain_specialization(saturated_routing())
    pd.testing.assert_frame_equal(spec[point.columns], point)
    a = spec[spec["label"] == "a"].set_index("expert")
    assert a.loc[1, "lift"] == pytest.approx(2.0) and a.loc[2, "lift"] == pytest.approx(2.0)   # the tie
    assert a.loc[1, "saturated"] and a.loc[2, "saturated"] and not a.loc[0, "saturated"]
    assert np.allclose(a["lift_max"], 2.0)
    assert a.loc[1, "log_odds"] > a.loc[2, "log_odds"] > a.loc[0, "log_odds"]                 # no tie
    assert a.loc[1, "log_odds_lo"] <= a.loc[1, "log_odds"] <= a.loc[1, "log_odds_hi"]
    assert a.loc[1, "lift_uniform_lo"] <= a.loc[1, "lift_uniform"] <= a.loc[1, "lift_uniform_hi"]
    assert not a.loc[1, "low_count"] and a.loc[2, "low_count"]                                # 60 vs 15 tokens
    assert (spec["n_units"] == 10).all() and spec.attrs["min_count"] == 20
    top = spec[~spec["low_count"]].sort_values("log_odds", ascending=False)
    assert list(top["expert"])[:2] == [1, 3]                              # a's 60 tokens, then b's 50
    assert top["lift"].iloc[0] == top["lift"].iloc[1] and top["log_odds"].iloc[0] > top["log_odds"].iloc[1]


def test_coactivation_intervals_flag_few_tokens():
    r = synthetic(n_texts=20, tokens=12, L=1, E=6, k=2, p=np.array([0.02, 0.2, 0.2, 0.2, 0.19, 0.19]))
    co = R.coactivation_intervals(r, n_boot=200, min_count=30)
    point = analysis.coactivation(r)
    pd.testing.assert_frame_equal(co[point.columns], point)
    assert (co["low_count"] == (co["count_i"] < 30)).all() and co["low_count"].any() and not co["low_count"].all()
    assert np.allclose(co["lift_max"], 5.0)                                      # (E-1)/(k-1)
    ok = co[co["count_i"] > 0]
    assert (ok["p_j_given_i_lo"] <= ok["p_j_given_i"] + 1e-12).all() and (ok["lift_hi"] >= ok["lift"] - 1e-12).all()


# --- figures -----------------------------------------------------------------------------------------
def test_figures_show_n_intervals_and_flags():
    spec = R.specialization_intervals(saturated_routing(), n_boot=100, min_count=20)
    fig = figures.specialization_bars(spec, layer=0)
    bar = next(t for t in fig.data if t.name == "a")
    assert bar.error_y.array is not None and len(bar.error_y.array) == 4
    pattern = dict(zip(bar.x, bar.marker.pattern.shape))
    assert pattern[2] == "/" and pattern[1] == ""                                            # low count hatched
    hover = dict(zip(bar.x, bar.customdata[:, 5]))
    assert "saturated" in hover[1] and "CI" in hover[1] and "fewer than 20 tokens" in hover[2]
    assert "saturated" in fig.layout.title.text
    # without interval columns the figure is as before (no whiskers)
    uniform = next(t for t in figures.specialization_bars(spec, layer=0, value="lift_uniform").data if t.name == "a")
    assert uniform.error_y.array is not None
    plain = figures.specialization_bars(analysis.domain_specialization(saturated_routing()), layer=0)
    assert plain.data[0].error_y.array is None

    r = synthetic(n_texts=20, L=1, E=6, k=2, p=np.array([0.02, 0.2, 0.2, 0.2, 0.19, 0.19]))
    co = R.coactivation_intervals(r, n_boot=100, min_count=30)
    hm = figures.coactivation_heatmap(co).data[0]
    z = np.asarray(hm.z, dtype=float)
    low = co[co["low_count"]]
    assert all(np.isnan(z[i, j]) for i, j in zip(low["expert_i"], low["expert_j"]))
    assert "blank" in hm.hovertext[int(low["expert_i"].iloc[0])][int(low["expert_j"].iloc[0])]
    usage = figures.usage_heatmap(R.load_intervals(r, n_boot=100)).data[0]
    assert "95% CI [" in usage.hovertext[0][0] and "n = " in usage.hovertext[0][0]


def test_sankey_fixed_layout_orders_experts_and_never_overlaps():
    r = synthetic(n_texts=30, L=4, E=8, k=2, p=np.array([0.3, 0.25, 0.2, 0.1, 0.05, 0.05, 0.03, 0.02]))
    flows = analysis.layer_transitions(r)
    fig = figures.routing_sankey(flows, min_share=0.05, label_share=0.03)
    s = fig.data[0]
    assert s.arrangement == "fixed"
    node, link = s.node, s.link
    names = [h.split(":")[0] for h in node.customdata]                    # "layer l · expert e"
    layer_of = [int(n.split()[1]) for n in names]
    expert_of = [int(n.split()[-1]) for n in names]
    out = np.bincount(link.source, weights=link.value, minlength=len(names))
    inn = np.bincount(link.target, weights=link.value, minlength=len(names))
    sizes = np.maximum(out, inn)
    assert (sizes > 0).all()                                              # no empty node
    for layer in set(layer_of):
        idx = [i for i, l in enumerate(layer_of) if l == layer]
        assert len({node.x[i] for i in idx}) == 1                          # one column per layer
        idx.sort(key=lambda i: expert_of[i])
        ys = [node.y[i] for i in idx]
        assert ys == sorted(ys)                                           # experts top to bottom by id
        total = sizes[idx].sum()
        for a, b in zip(idx, idx[1:]):                                    # room for both half-heights
            assert node.y[b] - node.y[a] >= 0.6 * (sizes[a] + sizes[b]) / 2 / total
        for i in idx:                                                     # small nodes go unlabelled
            assert (node.label[i] == "") == (sizes[i] < 0.03 * total)
    shares = flows.set_index(["layer_a", "expert_a", "layer_b", "expert_b"])["share"]
    for src, tgt in zip(link.source, link.target):
        assert shares[(layer_of[src], expert_of[src], layer_of[tgt], expert_of[tgt])] >= 0.05
    assert len(link.value) < int((flows["count"] > 0).sum())             # some thin links were hidden
    with pytest.raises(ValueError, match=r"min_share must be in \[0, 1\)"):
        figures.routing_sankey(flows, min_share=1.5)


# --- the dashboard ------------------------------------------------------------------------------------
def test_dashboard_intervals_guard_and_flow_controls():
    r = synthetic(n_texts=24, tokens=10, L=10, E=6, k=2)
    dash = ExpertUsageDashboard(r.to_frame(), n_boot=100, min_count=5)
    assert dash.intervals and dash.unit == "text" and dash.n_texts == 24
    assert "95% bootstrap intervals" in dash.ui.children[0].value
    assert {"share_lo", "share_hi", "n_units"} <= set(dash.export_table().columns)
    assert "95% CI" in dash.pane.figure.data[0].hovertext[0][0]
    dash.view.value = "specialization"
    assert dash.last_error is None, dash.error.value
    assert "lift_max" in dash.note.value and "log_odds" in dash.rows.value
    spec = dash.export_table()
    assert {"lift_lo", "saturated", "low_count", "log_odds"} <= set(spec.columns)
    dash.min_count.value = 10 ** 6                                        # every row under the guard
    assert dash.export_table()["low_count"].all() and dash.last_error is None
    dash.view.value = "coactivation"
    assert dash.export_table()["low_count"].all() and "grey" in dash.pane.figure.layout.title.text
    dash.min_count.value = 0
    assert not dash.export_table()["low_count"].any()
    dash.view.value = "flow"
    assert dash.flow_start.layout.display == "flex" and dash.min_count.layout.display == "none"
    first = dash.pane.figure.layout.title.text
    assert "layers 0–7" in first                                          # a window of 8 of the 10 layers
    dash.flow_start.value = 2
    assert "layers 2–9" in dash.pane.figure.layout.title.text
    before = len(dash.pane.figure.data[0].link.value)
    dash.min_share.value = 0.3
    assert len(dash.pane.figure.data[0].link.value) < before and dash.last_error is None


def test_dashboard_intervals_off_and_token_bootstrap_for_few_texts():
    r = synthetic(n_texts=3, tokens=20, L=2)
    dash = ExpertUsageDashboard(r.to_frame(), n_boot=50)
    assert dash.unit == "token" and "resamples of tokens" in dash.ui.children[0].value
    off = ExpertUsageDashboard(r.to_frame(), intervals=False)
    assert off.stats_table("usage") is None and "share_lo" not in off.export_table().columns
    assert "Intervals off" in off.ui.children[0].value
    with pytest.raises(ValueError, match="intervals must be True, False or None"):
        ExpertUsageDashboard(r.to_frame(), intervals="yes")
    with pytest.raises(ValueError, match="n_boot must be an integer"):
        ExpertUsageDashboard(r.to_frame(), n_boot=1)


# --- repetition ----------------------------------------------------------------------------------------
def sticky(n_texts: int = 30, tokens: int = 10, L: int = 2, E: int = 8, k: int = 2, q: float = 0.4,
           seed: int = 0) -> Routing:
    """Markov routing with a known repetition: each token keeps the previous token's top-1 expert with
    probability q, else draws it uniformly from the other E - 1 (so P(same top-1) = q exactly); the other
    k - 1 experts are uniform among the rest."""
    rng = np.random.default_rng(seed)
    N = n_texts * tokens
    experts = np.zeros((L, N, k), dtype=np.int64)
    for l in range(L):
        for t in range(n_texts):
            top = int(rng.integers(E))
            for p in range(tokens):
                if p and rng.random() >= q:
                    top = int(rng.choice([e for e in range(E) if e != top]))
                rest = rng.choice([e for e in range(E) if e != top], size=k - 1, replace=False)
                experts[l, t * tokens + p] = [top, *rest]
    text = np.repeat(np.arange(n_texts), tokens)
    columns = {"text": text, "position": np.tile(np.arange(tokens), n_texts)}
    return Routing(experts, np.full((L, N, k), 1 / k, np.float32), E, np.arange(L), columns)


def test_repetition_intervals_add_n_and_intervals_to_routing_repetition():
    r = synthetic(n_texts=20, tokens=12, L=3, E=6, k=2)
    point = analysis.routing_repetition(r)
    df = analysis.repetition_intervals(r, n_boot=300)
    pd.testing.assert_frame_equal(df[point.columns], point)                     # the same point estimates
    assert (df["n_pairs"] == 20 * 11).all() and (df["n_units"] == 20).all()
    assert df.attrs == dict(bootstrap="text", n_boot=300, level=0.95, seed=0)
    for m in R.REPETITION_METRICS:
        assert (df[f"{m}_lo"] <= df[m] + 1e-12).all() and (df[f"{m}_hi"] >= df[m] - 1e-12).all()
        assert (df[f"{m}_hi"] > df[f"{m}_lo"]).all()
    pd.testing.assert_frame_equal(df, R.repetition_intervals(split(r, 7), n_boot=300))   # chunking
    assert not np.allclose(R.repetition_intervals(r, n_boot=300, seed=1)["same_top1_lo"], df["same_top1_lo"])
    narrow = R.repetition_intervals(r, n_boot=300, level=0.5)
    assert (narrow["overlap_hi"] - narrow["overlap_lo"] < df["overlap_hi"] - df["overlap_lo"]).all()
    by_pair = R.repetition_intervals(r, n_boot=300, unit="token")
    assert (by_pair["n_units"] == 220).all() and by_pair["same_top1_lo"].notna().all()
    one = R.repetition_intervals(synthetic(n_texts=1, tokens=30), n_boot=50)
    assert (one["n_units"] == 1).all() and one["same_top1_lo"].isna().all()        # no interval from 1 text
    assert R.repetition_intervals(synthetic(n_texts=1, tokens=30), n_boot=50, unit="token")["jaccard_lo"].notna().all()


def test_repetition_intervals_cover_the_known_repetition_probability():
    """P(same top-1) = 0.4 by construction: 95% intervals over texts contain it in most of 30 corpora, and
    shrink ~1/sqrt(n) with 4x the texts."""
    hits, widths = 0, []
    for s in range(30):
        row = R.repetition_intervals(sticky(n_texts=30, L=1, seed=200 + s), n_boot=200, seed=s).iloc[0]
        hits += row["same_top1_lo"] <= 0.4 <= row["same_top1_hi"]
        widths.append(row["same_top1_hi"] - row["same_top1_lo"])
        assert row["same_top1_lo"] > row["baseline_same_top1"]                  # far above 1/E = 0.125
    assert hits >= 25, hits
    big = R.repetition_intervals(sticky(n_texts=120, L=1, seed=7), n_boot=200).iloc[0]
    assert big["same_top1_hi"] - big["same_top1_lo"] < 0.7 * np.mean(widths)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_boot=5), r"n_boot must be an integer in \[10, 100000\]"),
    (dict(n_boot=2.5), r"n_boot must be an integer in \[10, 100000\]"),
    (dict(level=0), r"level must be in \(0, 1\)"),
    (dict(unit="pair"), r"unit must be one of \('text', 'token'\)"),
    (dict(seed=-1), "seed must be an integer >= 0"),
])
def test_repetition_intervals_bad_settings_name_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.repetition_intervals(synthetic(n_texts=2), **kwargs)


def test_repetition_intervals_of_a_route_stats_folder_match_the_same_traces(tmp_path, text_model):
    import json

    import torch

    from dbrx_lab.route_stats import route_stats
    from dbrx_lab.trace import Record

    model = text_model
    tok = model.tokenizer
    words = "the cat sat on a mat while dogs ran in the park and birds sang over trees".split()
    rng = np.random.default_rng(0)
    items = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
    route_stats(model, data, tmp_path / "out", batch_size=3, part_tokens=20, min_count=1, predictions=False,
                progress=False)
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["parts"]) > 1   # several chunks
    traces = [model.run_with_trace(torch.tensor([tok.encode(t)]), record=Record(router=True))[1] for t in items]
    for unit in ("text", "token"):
        folder = R.repetition_intervals(tmp_path / "out", n_boot=200, unit=unit, seed=3)
        direct = R.repetition_intervals(traces, n_boot=200, unit=unit, seed=3)
        pd.testing.assert_frame_equal(folder, direct, check_dtype=False, rtol=1e-6)
        assert folder["same_top1_lo"].notna().all()


def test_repetition_bars_whiskers_and_dashboard_view():
    r = sticky(n_texts=24, L=3)
    rep = R.repetition_intervals(r, n_boot=100)
    fig = figures.repetition_bars(rep)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 3 and all(b.error_y.array is not None and len(b.error_y.array) == 3 for b in bars)
    same = bars[0]
    assert np.allclose(np.asarray(same.y) + np.asarray(same.error_y.array), rep["same_top1_hi"])
    assert np.allclose(np.asarray(same.y) - np.asarray(same.error_y.arrayminus), rep["same_top1_lo"])
    hover = same.customdata[0][2]
    assert "95% CI [" in hover and "bootstrap over 24 texts" in hover and "n = " in same.hovertemplate
    assert "whiskers: 95% bootstrap interval" in fig.layout.title.text
    plain = figures.repetition_bars(analysis.routing_repetition(r))             # the plain table still draws
    assert all(t.error_y.array is None for t in plain.data if t.type == "bar") and "whiskers" not in \
        plain.layout.title.text and "n = " in plain.data[0].hovertemplate

    dash = ExpertUsageDashboard(r.to_frame(), n_boot=100)
    dash.view.value = "repetition"
    assert dash.last_error is None, dash.error.value
    table = dash.export_table()
    assert {"n_pairs", "n_units", "same_top1_lo", "jaccard_hi"} <= set(table.columns)
    pd.testing.assert_frame_equal(table, R.repetition_intervals(r.to_frame(), n_boot=100, unit="text"))
    assert dash.pane.figure.data[0].error_y.array is not None
    assert "95% bootstrap interval" in dash.note.value and "of the 24 texts" in dash.note.value
    assert f"{24 * 9:,} consecutive token pairs" in dash.note.value
    few = ExpertUsageDashboard(sticky(n_texts=3, L=1).to_frame(), n_boot=50)
    few.view.value = "repetition"
    assert few.export_table().attrs["bootstrap"] == "token" and "27 token pairs" in few.note.value
    off = ExpertUsageDashboard(r.to_frame(), intervals=False)
    off.view.value = "repetition"
    assert "n_pairs" not in off.export_table().columns and off.note.value == ""
    assert off.pane.figure.data[0].error_y.array is None
