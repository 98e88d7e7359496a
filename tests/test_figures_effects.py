"""dbrx_lab.figures_effects: each figure shows exactly the numbers of its table (hand-made lens tables; the
attribution, sweeps and curves of a tiny random model), and bad input fails with a message naming what is valid."""
import numpy as np
import pandas as pd
import pytest
import torch

from dbrx_lab import DbrxConfig, DbrxLM, analysis
from dbrx_lab import figures_effects as fe


@pytest.fixture(scope="module")
def model() -> DbrxLM:
    cfg = DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, ffn_hidden_size=48, max_seq_len=64,
                     vocab_size=512, moe_num_experts=8, moe_top_k=2, torch_dtype="float32")
    torch.manual_seed(0)
    m = DbrxLM(cfg).eval()
    m.reset_parameters(std=0.3)                                                      # decisive, varied routing
    m.requires_grad_(False)
    return m


TEXTS_A = [[1, 20, 33, 400, 5, 67, 8, 90], [11, 2, 300, 45, 6]]
TEXTS_B = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [100, 200, 300, 400]]


def lens_table() -> pd.DataFrame:
    """3 layers (embed, 0, 1) x 4 positions; prob = (layer + 2) / 10 + position / 100, rank = 10 ** position."""
    rows = []
    for layer in (1, -1, 0):                                                          # not in order on purpose
        for p in (3, 0, 2, 1):
            rows.append(dict(layer=layer, position=p, token=f"t{p}", target=f"t{p + 1}",
                             prob=(layer + 2) / 10 + p / 100, rank=10 ** p, top_token=f"L{layer}P{p}",
                             top_prob=0.9))
    return pd.DataFrame(rows)


def test_logit_lens_heatmap_puts_each_cell_in_place():
    fig = fe.logit_lens_heatmap(lens_table())
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (3, 4)
    for i, layer in enumerate((-1, 0, 1)):                                            # embeddings at the bottom (y = 0)
        for p in range(4):
            assert z[i, p] == pytest.approx((layer + 2) / 10 + p / 100)
            assert heat.text[i][p] == f"L{layer}P{p}"
            assert f"t{p + 1}" in heat.hovertext[i][p] and f"rank {10 ** p}" in heat.hovertext[i][p]
    assert list(fig.layout.yaxis.ticktext) == ["embed", "0", "1"]
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.xaxis.ticktext) == ["t0", "t1", "t2", "t3"]
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)


def test_logit_lens_heatmap_rank_is_log_scaled_and_a_missing_cell_stays_blank():
    df = lens_table()
    df = df[~((df.layer == 0) & (df.position == 2))]
    fig = fe.logit_lens_heatmap(df, value="rank")
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z[0], [0, 1, 2, 3])
    assert np.isnan(z[1, 2]) and fig.data[0].hovertext[1][2] == ""
    assert fig.data[0].reversescale and fig.data[0].zmax == pytest.approx(3.0)


def test_logit_lens_heatmap_rejects_bad_input():
    with pytest.raises(ValueError, match="'prob' or 'rank'"):
        fe.logit_lens_heatmap(lens_table(), value="logit")
    with pytest.raises(ValueError, match="top_token"):
        fe.logit_lens_heatmap(lens_table().drop(columns="top_token"))
    with pytest.raises(ValueError, match="one row per"):
        fe.logit_lens_heatmap(pd.concat([lens_table(), lens_table()]))


def test_lens_top_tokens_shows_tokens_by_layer_and_rank_and_outlines_the_target():
    rows = [dict(layer=l, rank=r, token=f"tok{l}{r}", prob=1 / (r + 1 + l), is_target=(l == 1 and r == 2))
            for l in (1, 0, -1) for r in (1, 2, 3)]
    top = pd.DataFrame(rows)
    top.attrs.update(position=4, token="a", target="b")
    fig = fe.lens_top_tokens(top)
    heat, marks = fig.data
    z = np.asarray(heat.z, dtype=float)
    for i, l in enumerate((-1, 0, 1)):
        for j, r in enumerate((1, 2, 3)):
            assert z[i, j] == pytest.approx(1 / (r + 1 + l)) and heat.text[i][j] == f"tok{l}{r}"
    assert list(marks.x) == [2] and list(marks.y) == [2]                             # layer 1 is row 2
    assert "position 4" in fig.layout.title.text
    with pytest.raises(ValueError, match="one row per"):
        fe.lens_top_tokens(pd.concat([top, top]))
    with pytest.raises(ValueError, match="prob"):
        fe.lens_top_tokens(top.drop(columns="prob"))


def test_attribution_heatmap_shows_the_chosen_experts_contributions(model):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35], [2, 71, 82, 81, 82, 8]])
    att = analysis.logit_attribution(model, ids, target="next", positions="all")
    L, E, k = model.config.n_layers, model.config.moe_num_experts, model.config.moe_top_k
    fig = fe.attribution_heatmap(att, batch=1, position=3)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (L, E)
    comp = att.components.query("batch == 1 and position == 3")
    experts = comp[comp.component == "expert"]
    for layer in range(L):
        chosen = experts[experts.layer == layer]
        assert set(np.flatnonzero(np.isfinite(z[layer]))) == set(chosen.expert)           # blank = not chosen
        for e, c in zip(chosen.expert, chosen.contribution):
            assert z[layer, e] == pytest.approx(c)
    attn_bars, expert_bars = fig.data[1], fig.data[2]
    embed = float(comp[comp.component == "embed"].contribution.sum())
    total = att.totals.query("batch == 1 and position == 3").iloc[0]
    assert np.nansum(z) == pytest.approx(sum(expert_bars.x), abs=1e-5)
    assert embed + sum(attn_bars.x) + sum(expert_bars.x) == pytest.approx(total["logit"], abs=1e-3)
    assert "position 3" in fig.layout.title.text
    assert np.isfinite(z).sum() == L * k


def test_attribution_heatmap_mean_averages_over_positions(model):
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    att = analysis.logit_attribution(model, ids, target="next", positions="all")
    fig = fe.attribution_heatmap(att, position="mean")
    z = np.asarray(fig.data[0].z, dtype=float)
    experts = att.components[att.components.component == "expert"]
    n = att.totals.position.nunique()
    assert n == 5
    expected = experts.groupby(["layer", "expert"]).contribution.sum() / n
    for (l, e), v in expected.items():
        assert z[l, e] == pytest.approx(v)
    assert np.isfinite(z).sum() == len(expected)
    default = fe.attribution_heatmap(att)                                                # last attributed position
    assert "position 4" in default.layout.title.text


def test_attribution_heatmap_rejects_bad_input(model):
    att = analysis.logit_attribution(model, torch.tensor([[3, 14, 15, 92]]), target="next", positions=[1, 2])
    with pytest.raises(ValueError, match=r"attributed position \[1, 2\]"):
        fe.attribution_heatmap(att, position=0)
    with pytest.raises(ValueError, match=r"attributed batch rows: \[0\]"):
        fe.attribution_heatmap(att, batch=1)
    with pytest.raises(ValueError, match="LogitAttribution"):
        fe.attribution_heatmap(att.components)
    with pytest.raises(ValueError, match="n_experts=2"):
        fe.attribution_heatmap(att, n_experts=2)


@pytest.fixture(scope="module")
def sweeps(model):
    kw = dict(layers=[0, 1], experts=[0, 3, 5], progress=False)
    return {"a": analysis.ablation_sweep(model, TEXTS_A, **kw), "b": analysis.ablation_sweep(model, TEXTS_B, **kw)}


def test_ablation_comparison_panels_share_one_symmetric_scale(sweeps):
    fig = fe.ablation_comparison(sweeps, difference=True)
    assert len(fig.data) == 3
    a, b = sweeps["a"].to_numpy(), sweeps["b"].to_numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), a)
    np.testing.assert_allclose(np.asarray(fig.data[1].z, dtype=float), b)
    np.testing.assert_allclose(np.asarray(fig.data[2].z, dtype=float), b - a)
    lim = max(np.abs(a).max(), np.abs(b).max(), np.abs(b - a).max())
    assert lim > 0 and fig.layout.coloraxis.cmax == pytest.approx(lim)
    assert fig.layout.coloraxis.cmin == pytest.approx(-lim)
    assert all(t.coloraxis == "coloraxis" for t in fig.data)
    assert list(fig.data[0].x) == [0, 3, 5] and list(fig.data[0].y) == [0, 1]
    assert f"{sweeps['a'].attrs['baseline_loss']:.3f}" in fig.layout.annotations[0].text


def test_ablation_comparison_rejects_bad_input(sweeps, model):
    other = analysis.ablation_sweep(model, TEXTS_A, layers=[0], experts=[0, 3, 5], progress=False)
    with pytest.raises(ValueError, match="sweep the same cells"):
        fe.ablation_comparison({"a": sweeps["a"], "c": other})
    with pytest.raises(ValueError, match="exactly 2 sweeps"):
        fe.ablation_comparison({"a": sweeps["a"]}, difference=True)
    with pytest.raises(ValueError, match="not an analysis.ablation_sweep"):
        fe.ablation_comparison({"a": pd.DataFrame({"x": [1.0]}, index=["row"])})
    with pytest.raises(ValueError, match="non-empty dict"):
        fe.ablation_comparison({})


def test_loss_curves_plot_each_curve_with_its_baseline(model):
    curves = {"a": analysis.top_k_curve(model, TEXTS_A, k_values=[1, 2, 8], progress=False),
              "b": analysis.top_k_curve(model, TEXTS_B, k_values=[1, 2, 8], progress=False)}
    fig = fe.loss_curves(curves, trained_k=2)
    lines = [t for t in fig.data if t.showlegend is not False]
    assert [t.name for t in lines] == ["a", "b"]
    for t, (name, df) in zip(lines, curves.items()):
        assert list(t.x) == [1, 2, 8] and np.allclose(t.y, df["loss"])
        assert df.loc[df.k == 2, "delta"].abs().max() < 1e-6                           # trained k is the baseline
    baselines = [t for t in fig.data if t.showlegend is False]
    assert [b.y[0] for b in baselines] == pytest.approx([curves["a"].baseline_loss[0], curves["b"].baseline_loss[0]])
    assert any(s.x0 == 2 for s in fig.layout.shapes)
    delta = fe.loss_curves(curves["a"], value="delta")
    assert np.allclose(delta.data[0].y, curves["a"]["delta"]) and list(delta.data[1].y) == [0.0, 0.0]
    drop = analysis.drop_top_curve(model, TEXTS_A, r_values=[0, 1, 3], progress=False)
    fig = fe.loss_curves({"a": drop})
    assert list(fig.data[0].x) == [0, 1, 3] and "r" in fig.layout.xaxis.title.text
    with pytest.raises(ValueError, match="mix of"):
        fe.loss_curves({"k": curves["a"], "r": drop})
    with pytest.raises(ValueError, match="trained_k"):
        fe.loss_curves(drop, trained_k=2)
    with pytest.raises(ValueError, match="'loss' or 'delta'"):
        fe.loss_curves(drop, value="ppl")
    with pytest.raises(ValueError, match="columns of analysis.top_k_curve"):
        fe.loss_curves({"x": drop.drop(columns="baseline_loss")})


def test_every_mark_has_hover_text(model, sweeps):
    att = analysis.logit_attribution(model, torch.tensor([[3, 14, 15, 92]]), target="next", positions="all")
    figs = [fe.logit_lens_heatmap(lens_table()), fe.attribution_heatmap(att), fe.ablation_comparison(sweeps),
            fe.loss_curves(analysis.top_k_curve(model, TEXTS_A, k_values=[1, 2], progress=False))]
    for fig in figs:
        assert fig.layout.template.layout.font is not None or fig.layout.font is not None
        for t in fig.data:
            assert t.hoverinfo == "skip" or t.hovertext is not None, f"{type(t).__name__} without hover text"
