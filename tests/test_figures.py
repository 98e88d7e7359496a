"""Figures: each one builds from a crafted trace or an analysis table and shows what the data says."""
from __future__ import annotations

import dataclasses
import html
import itertools
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from dbrx_lab import Trace, analysis, figures
from dbrx_lab.analysis import GenerationComparison

L, B, T, E, K = 3, 2, 6, 16, 4
TOKENS = [["The", " cat", "\\n", " the", "<b>", " the"],
          ["<|pad|>", "<|pad|>", "A", " dog", " the", "."]]
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
HEADS = [0, 3]


@pytest.fixture(scope="module")
def trace() -> Trace:
    """Routing drawn from random router logits (top-k consistent with them); row 1 has 2 padding columns;
    attention at layer 1 for heads 0 and 3 (causal, rows sum to 1 over real keys)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(L, B, T, E, generator=g) * 2
    experts = logits.topk(K, dim=-1).indices
    tr = Trace.from_routing(experts, router_logits=logits, input_ids=torch.arange(B * T).view(B, T),
                            tokens=TOKENS, attention_mask=MASK)
    scores = torch.randn(B, len(HEADS), T, T, generator=g)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & MASK[:, None, None, :]
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return dataclasses.replace(tr, attention={1: pattern}, attention_heads={1: list(HEADS)})


def real(b: int) -> np.ndarray:
    return np.flatnonzero(MASK[b].numpy())


def colour_at(colorscale, frac: float) -> str:
    """The colour a step colourscale gives at frac in [0, 1] (steps: equal colours at both ends)."""
    for (a, ca), (b, cb) in zip(colorscale[:-1], colorscale[1:]):
        if a <= frac <= b:
            assert ca == cb, f"not a step colourscale at {frac}"
            return ca
    raise AssertionError(f"{frac} outside the colourscale")


def midpoint(heatmap) -> float:
    """The z value where a two-slope colourscale is white."""
    pos = [p for p, c in heatmap.colorscale if c == figures.MIDPOINT_COLOR]
    assert len(pos) == 1
    return heatmap.zmin + pos[0] * (heatmap.zmax - heatmap.zmin)


# --- palette ------------------------------------------------------------------------------------
def _lab(rgb_linear: np.ndarray) -> np.ndarray:
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ \
        np.clip(rgb_linear, 0, 1) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


SIMULATIONS = {   # Machado, Oliveira & Fernandes (2009), severity 1, on linear RGB
    "normal": np.eye(3),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
}


def test_palette_has_16_distinct_colours_also_for_colour_blind_readers():
    colours = figures.EXPERT_COLORS
    assert len(colours) == 16 and len({c.upper() for c in colours}) == 16
    assert all(re.fullmatch(r"#[0-9A-Fa-f]{6}", c) for c in colours)
    for name, matrix in SIMULATIONS.items():
        labs = []
        for c in colours:
            srgb = np.array([int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)])
            lin = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
            labs.append(_lab(matrix @ lin))
        closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(labs, 2))
        assert closest >= 12, f"two expert colours are only ΔE {closest:.1f} apart under {name}"


def test_expert_color_cycles_and_rejects_bad_ids():
    assert [figures.expert_color(e) for e in range(16)] == figures.EXPERT_COLORS
    assert figures.expert_color(16) == figures.expert_color(0)
    assert figures.expert_color(37) == figures.expert_color(5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="expert"):
            figures.expert_color(bad)


def test_readable_token_makes_whitespace_visible():
    assert figures.readable_token(" the") == "␣the"
    assert figures.readable_token("\n") == "↵" == figures.readable_token("\\n")   # raw or tokenizer-escaped
    assert figures.readable_token("\t x") == "⇥␣x"
    assert figures.readable_token("") == "∅"
    assert figures.readable_token("x" * 40) == "x" * 15 + "…"


# --- colours are the same everywhere ------------------------------------------------------------
def test_same_expert_same_colour_across_figures(trace):
    top1_l1 = trace.topk_experts[1, 0, :, 0].tolist()
    seen: dict[str, dict[int, str]] = {}
    rmap = figures.routing_map(trace).data[0]
    seen["routing_map"] = {int(e): colour_at(rmap.colorscale, (e - rmap.zmin) / (rmap.zmax - rmap.zmin))
                           for e in np.unique(rmap.z)}
    page = figures.routed_text_html(trace, layer=1)
    seen["routed_text_html"] = {int(e): c for e, c in re.findall(r'data-expert="(\d+)"[^>]*background:(#\w+)', page)}
    seen["routed_text"] = {int(t.name.split()[-1]): t.marker.color for t in figures.routed_text(trace, 1).data}
    node = figures.routing_sankey(trace).data[0].node
    seen["sankey"] = {int(label.split("e")[-1]): c for label, c in zip(node.label, node.color)}
    spec = analysis.domain_specialization(trace, labels=["prose", "other"])
    bars = figures.specialization_bars(spec, layer=0).data[0]
    seen["specialization_bars"] = dict(zip(map(int, bars.x), bars.marker.color))
    assert set(seen["routed_text_html"]) == set(top1_l1)
    for name, colours in seen.items():
        assert colours, name
        for e, c in colours.items():
            assert c.upper() == figures.expert_color(e).upper(), f"{name}: expert {e} drawn in {c}"


# --- usage --------------------------------------------------------------------------------------
def test_usage_heatmap_is_expert_load_with_uniform_midpoint(trace):
    load = analysis.expert_load(trace)
    for source in (trace, load):
        hm = figures.usage_heatmap(source).data[0]
        expected = load.pivot(index="layer", columns="expert", values="share").to_numpy()
        np.testing.assert_allclose(np.asarray(hm.z, dtype=float), expected)
        assert midpoint(hm) == pytest.approx(K / E)
        assert "tokens" in hm.hovertext[0][0] and "uniform" in hm.hovertext[0][0]
    hm = figures.usage_heatmap(load, value="top1_share").data[0]
    assert midpoint(hm) == pytest.approx(1 / E)
    n_real = int(MASK.sum())
    np.testing.assert_allclose(np.asarray(hm.z).sum(1), 1.0)                    # every real token has one top-1
    assert load["tokens"].iloc[0] == n_real                                     # padding never counted


def test_usage_heatmap_needs_a_group_for_split_tables(trace):
    split = analysis.expert_load(trace, by="text")
    with pytest.raises(ValueError, match="group="):
        figures.usage_heatmap(split)
    fig = figures.usage_heatmap(split, group=1)
    one = analysis.expert_load(trace.select(1))
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float),
                               one.pivot(index="layer", columns="expert", values="share").to_numpy())
    with pytest.raises(ValueError, match="value"):
        figures.usage_heatmap(trace, value="bogus")


# --- routing map, routed text -------------------------------------------------------------------
def test_routing_map_has_one_cell_per_layer_and_real_position(trace):
    for b in range(B):
        hm = figures.routing_map(trace, batch=b).data[0]
        z = np.asarray(hm.z)
        assert z.shape == (L, len(real(b)))
        assert list(hm.x) == list(real(b))
        np.testing.assert_array_equal(z, trace.topk_experts[:, b, real(b), 0].numpy())
    conf = analysis.router_confidence(trace.select(1))
    hm = figures.routing_map(trace, batch=1).data[0]
    for l, i in [(0, 0), (2, 3)]:
        p = real(1)[i]
        text = hm.hovertext[l][i]
        assert figures.readable_token(TOKENS[1][p]) in text and f"position {p}" in text
        for e, w in zip(trace.topk_experts[l, 1, p].tolist(), trace.topk_weights[l, 1, p].tolist()):
            assert f"e{e}:{w:.2f}" in text
        margin = conf[(conf.layer == l) & (conf.position == p)]["margin"].item()
        assert f"margin p(k)−p(k+1): {margin:.3f}" in text


def test_routing_map_labels_keep_repeated_tokens_apart(trace):
    fig = figures.routing_map(trace)
    axis = fig.layout.xaxis
    assert list(axis.tickvals) == list(range(T))                               # numeric: never merged
    assert list(axis.ticktext).count("␣the") == 2
    assert "&lt;b&gt;" in axis.ticktext and "↵" in axis.ticktext               # escaped, whitespace visible
    assert fig.layout.yaxis.title.text == "layer" and fig.layout.xaxis.title.text == "position"


def test_routing_map_layers_and_errors(trace):
    hm = figures.routing_map(trace, layers=[2]).data[0]
    np.testing.assert_array_equal(np.asarray(hm.z), trace.topk_experts[[2], 0, :, 0].numpy())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        figures.routing_map(trace, batch=2)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        figures.routing_map(trace, layers=[3])
    no_routing = dataclasses.replace(trace, topk_experts=None)
    with pytest.raises(ValueError, match="Record"):
        figures.routing_map(no_routing)


def test_routed_text_html_colours_each_real_token(trace):
    page = figures.routed_text_html(trace, layer=2, batch=1)
    spans = re.findall(r'<span class="tok[^"]*" data-position="(\d+)" data-expert="(\d+)"', page)
    assert [int(p) for p, _ in spans] == list(real(1))
    assert [int(e) for _, e in spans] == trace.topk_experts[2, 1, real(1), 0].tolist()
    assert "|pad|" not in page
    page0 = figures.routed_text_html(trace, layer=0)
    assert "&lt;b&gt;" in page0 and "<b>" not in page0                         # token text is escaped
    assert ">↵\n</span>" in page0                                              # a newline shows and breaks the line
    e = trace.topk_experts[0, 0, 1, 0].item()
    w = trace.topk_weights[0, 0, 1, 0].item()
    assert f"e{e}:{w:.2f}" in re.search(r'data-position="1"[^>]*title="([^"]*)"', page0).group(1)


def test_routed_text_figure_wraps_tokens_in_lines(trace):
    fig = figures.routed_text(trace, layer=0)
    texts = [t for bar in fig.data for t in bar.text]
    assert sorted(texts) == sorted(["The", " cat", "↵", " the", "<b>", " the"])
    line_of = {t: y for bar in fig.data for t, y in zip(bar.text, bar.y)}
    assert line_of["The"] == 0 and line_of["<b>"] == 1                         # the newline token ends line 0
    assert all(bar.hovertext for bar in fig.data)


# --- attention ----------------------------------------------------------------------------------
def test_attention_heatmap_shows_the_recorded_pattern_of_real_tokens(trace):
    for b in range(B):
        for i, head in enumerate(HEADS):
            hm = figures.attention_heatmap(trace, layer=1, head=head, batch=b).data[0]
            r = real(b)
            np.testing.assert_allclose(np.asarray(hm.z), trace.attention[1][b, i][r][:, r].numpy(), rtol=1e-6)
            labels = [f"{html.escape(figures.readable_token(TOKENS[b][p]))}·{p}" for p in r]
            assert list(hm.x) == list(hm.y) == labels
    hm = figures.attention_heatmap(trace, 1, 3, batch=0).data[0]
    assert list(hm.x) == ["The·0", "␣cat·1", "↵·2", "␣the·3", "&lt;b&gt;·4", "␣the·5"]   # repeats apart
    assert "%{y}" in hm.hovertemplate and "%{x}" in hm.hovertemplate and "head 3" in hm.hovertemplate


def test_attention_window_and_grid(trace):
    hm = figures.attention_heatmap(trace, 1, 0, max_tokens=3).data[0]
    np.testing.assert_allclose(np.asarray(hm.z), trace.attention[1][0, 0, 3:, 3:].numpy(), rtol=1e-6)
    grid = figures.attention_grid(trace, layer=1, batch=1)
    assert [t.type for t in grid.data] == ["heatmap"] * len(HEADS)
    for i, t in enumerate(grid.data):
        expected = trace.attention[1][1, i][real(1)][:, real(1)].numpy()
        np.testing.assert_allclose(np.asarray(t.z), expected, rtol=1e-6)
        assert t.coloraxis == "coloraxis"
    assert [a.text for a in grid.layout.annotations] == [f"head {h}" for h in HEADS]


def test_attention_errors_name_what_was_recorded(trace):
    with pytest.raises(ValueError, match=r"recorded layers: \[1\]"):
        figures.attention_heatmap(trace, layer=0, head=0)
    with pytest.raises(ValueError, match=r"recorded heads: \[0, 3\]"):
        figures.attention_heatmap(trace, layer=1, head=1)


# --- co-activation, repetition, specialization, Sankey ------------------------------------------
def test_coactivation_heatmap(trace):
    co = analysis.coactivation(trace)
    with pytest.raises(ValueError, match="layer="):
        figures.coactivation_heatmap(co)
    hm = figures.coactivation_heatmap(co, layer=2).data[0]
    z = np.asarray(hm.z, dtype=float)
    assert np.isnan(np.diag(z)).all()
    row = co[(co.layer == 2) & (co.expert_i == 3) & (co.expert_j == 7)].iloc[0]
    assert z[3, 7] == pytest.approx(row.lift, nan_ok=True)
    assert midpoint(hm) == pytest.approx(1.0)
    p = figures.coactivation_heatmap(trace, layer=2, value="p_j_given_i").data[0]
    assert midpoint(p) == pytest.approx((K - 1) / (E - 1))


def test_repetition_bars_against_baselines(trace):
    rep = analysis.routing_repetition(trace)
    fig = figures.repetition_bars(rep)
    bars = [t for t in fig.data if t.type == "bar"]
    lines = [t for t in fig.data if t.type == "scatter"]
    base = analysis.repetition_baselines(E, K)
    for bar, line, m in zip(bars, lines, ("same_top1", "overlap", "jaccard")):
        np.testing.assert_allclose(np.asarray(bar.y, dtype=float), rep[m].to_numpy())
        assert list(line.y) == [pytest.approx(base[m])] * 2
    assert fig.layout.xaxis.title.text == "layer"
    with pytest.raises(ValueError, match="metrics"):
        figures.repetition_bars(rep, metrics=["nope"])


def test_specialization_bars_one_panel_per_domain(trace):
    spec = analysis.domain_specialization(trace, labels=["prose", "code"])
    fig = figures.specialization_bars(spec, layer=1)
    assert [a.text for a in fig.layout.annotations] == ["label = code", "label = prose"]
    code = spec[(spec.label == "code") & (spec.layer == 1)].sort_values("expert")
    np.testing.assert_allclose(np.asarray(fig.data[0].y, dtype=float), code["lift"].to_numpy())
    with pytest.raises(ValueError, match="domain_specialization"):
        figures.specialization_bars(trace)


def test_sankey_links_carry_every_real_token_once_per_layer_pair(trace):
    fig = figures.routing_sankey(trace)
    link, node = fig.data[0].link, fig.data[0].node
    n_real = int(MASK.sum())
    pairs: dict[tuple[str, str], int] = {}
    for s, t, v in zip(link.source, link.target, link.value):
        key = (node.label[s].split()[0], node.label[t].split()[0])
        pairs[key] = pairs.get(key, 0) + v
    assert pairs == {("L0", "L1"): n_real, ("L1", "L2"): n_real}
    # a flow's width is the number of tokens with that top-1 pair
    top1 = trace.topk_experts[:, MASK][..., 0]                                  # [L, N]
    s, t, v = link.source[0], link.target[0], link.value[0]
    a, b = (int(node.label[i].split("e")[-1]) for i in (s, t))
    la, lb = (int(node.label[i][1]) for i in (s, t))
    assert v == int(((top1[la] == a) & (top1[lb] == b)).sum())
    only = figures.routing_sankey(trace, layers=[0, 2]).data[0]
    assert sum(only.link.value) == n_real


# --- interventions ------------------------------------------------------------------------------
def test_ablation_impact_matrix():
    sweep = pd.DataFrame(np.arange(L * E, dtype=float).reshape(L, E) / 100 - 0.1,
                         index=pd.Index(range(L), name="layer"), columns=pd.Index(range(E), name="expert"))
    sweep.attrs.update(baseline_loss=2.0, mode="reroute", n_targets=40)
    fig = figures.ablation_impact(sweep)
    hm = fig.data[0]
    np.testing.assert_allclose(np.asarray(hm.z), sweep.to_numpy())
    assert hm.zmid == 0 and hm.zmin == -hm.zmax == -sweep.abs().to_numpy().max()
    assert "reroute" in fig.layout.title.text and "+0.0500" in hm.hovertext[0][15]
    with pytest.raises(ValueError, match="ablation_sweep"):
        figures.ablation_impact(pd.DataFrame({"a": ["x"]}))


def _comparison() -> GenerationComparison:
    """Prompt of 5 tokens, 4 steps; the ablated run diverges at step 1; routing over 9 positions x 3 layers
    where the intervention changes one expert of every token from position 6 on at layers >= 1."""
    base = torch.arange(L * 9 * K).view(L, 9, K) % E
    abl = base.clone()
    abl[1:, 6:, 3] = (abl[1:, 6:, 3] + 1) % E
    per_step = pd.DataFrame({
        "step": [0, 1, 2, 3], "position": [5, 6, 7, 8],
        "baseline_token": [" the", " cat", " sat", None], "ablated_token": [" the", " dog", " ran", "."],
        "same": [True, False, False, False], "kl": [0.001, 0.4, 1.2, np.nan],
        "top_token_changed": [False, True, True, None]})
    empty = torch.zeros(0, dtype=torch.long)
    return GenerationComparison(prompt_ids=torch.arange(5), baseline_ids=empty, ablated_ids=empty,
                                baseline_text=" the cat sat", ablated_text=" the dog ran.", per_step=per_step,
                                first_divergence=1,
                                cascade=analysis.routing_cascade(base, abl, prompt_length=5))


def test_generation_diff_aligns_tokens_and_plots_kl():
    fig = figures.generation_diff(_comparison())
    tokens, kl = fig.data
    # aligned: the cat sat / the dog ran . -> equal, replace, replace, insert ("." only in the ablated run)
    np.testing.assert_array_equal(np.asarray(tokens.z), [[0, 1, 1, 3], [0, 1, 1, 2]])
    assert list(tokens.text[0]) == ["␣the", "␣cat", "␣sat", ""] and tokens.text[1][3] == "."
    np.testing.assert_allclose(np.asarray(kl.y, dtype=float), [0.001, 0.4, 1.2, np.nan])
    assert [s.x0 for s in fig.layout.shapes] == [1]                             # first divergence marked
    assert "first divergence" in fig.layout.annotations[-1].text
    with pytest.raises(ValueError, match="compare_generations"):
        figures.generation_diff(pd.DataFrame())


def test_generation_diff_aligns_after_an_insertion_and_cuts_long_tokens():
    """Issue #22 item 6: the strip compared by position, so one inserted token made every later cell orange,
    and long tokens overflowed their cells. Aligned, the run that agrees again is grey; labels fit."""
    base = [" a", " b", " c", " d", " e"]
    abl = [" a", " X", " b", " c", " d", " e"]
    per_step = pd.DataFrame({"step": range(6), "position": range(5, 11), "baseline_token": base + [None],
                             "ablated_token": abl, "same": [b == a for b, a in zip(base + [None], abl)],
                             "kl": [0.0, 0.5, 0.1, 0.1, 0.1, np.nan],
                             "top_token_changed": [False, True, False, False, False, None]})
    empty = torch.zeros(0, dtype=torch.long)
    res = GenerationComparison(prompt_ids=torch.arange(5), baseline_ids=empty, ablated_ids=empty,
                               baseline_text="", ablated_text="", per_step=per_step, first_divergence=1,
                               cascade=pd.DataFrame())
    tokens, kl = figures.generation_diff(res).data
    z = np.asarray(tokens.z)
    np.testing.assert_array_equal(z, [[0, 3, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0]])   # only " X" is marked
    assert list(tokens.text[1]) == ["␣a", "␣X", "␣b", "␣c", "␣d", "␣e"] and tokens.text[0][1] == ""
    np.testing.assert_allclose(np.asarray(kl.y, dtype=float), [0.0, np.nan, 0.5, 0.1, 0.1, 0.1])  # at its column
    # long tokens are cut to what a cell holds, whatever the number of columns
    for n in (4, 40, 400):
        long = pd.DataFrame({"step": range(n), "position": range(n), "baseline_token": ["x" * 30] * n,
                             "ablated_token": ["y" * 30] * n, "same": [False] * n, "kl": [0.1] * n,
                             "top_token_changed": [True] * n})
        fig = figures.generation_diff(dataclasses.replace(res, per_step=long))
        limit = figures.diff_cell_chars(n, fig.layout.width)
        texts = [t for row in fig.data[0].text for t in row]
        assert all(len(t) <= limit for t in texts), (n, limit, texts[:2])
        width = fig.layout.width or 960
        assert limit * 7.5 <= (width - 100) / n                               # the cut text fits its cell
        assert all(t.endswith("…") for t in texts if t)


def test_routing_cascade_shows_where_routing_changed():
    fig = figures.routing_cascade(_comparison())
    hm = fig.data[0]
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == (L, 9) and list(hm.x) == list(range(9))
    expected = np.zeros((L, 9))
    expected[1:, 6:] = 1 / K
    np.testing.assert_allclose(z, expected)
    assert [s.x0 for s in fig.layout.shapes] == [4.5]                           # generated tokens start at 5
    assert "generated <b>␣sat</b>" in hm.hovertext[1][7] and "prompt" in hm.hovertext[0][0]


# --- every figure ---------------------------------------------------------------------------------
def test_every_mark_has_hover_text_and_the_shared_look(trace):
    spec = analysis.domain_specialization(trace, labels=["a", "b"])
    sweep = pd.DataFrame(np.zeros((L, E)), index=range(L), columns=range(E))
    figs = [figures.usage_heatmap(trace), figures.routing_map(trace), figures.routed_text(trace, 0),
            figures.attention_heatmap(trace, 1, 0), figures.attention_grid(trace, 1),
            figures.coactivation_heatmap(trace, layer=0), figures.repetition_bars(trace),
            figures.specialization_bars(spec, layer=0), figures.routing_sankey(trace),
            figures.ablation_impact(sweep), figures.generation_diff(_comparison()),
            figures.routing_cascade(_comparison())]
    for fig in figs:
        assert isinstance(fig, go.Figure)
        assert fig.layout.title.text and fig.layout.template.layout.paper_bgcolor == "white"
        for t in fig.data:
            if t.type == "sankey":
                assert t.node.hovertemplate and t.link.hovertemplate
                continue
            assert t.hoverinfo not in ("skip", "none")
            assert t.hovertemplate or (t.hovertext is not None and len(t.hovertext)), (fig.layout.title.text, t.type)


def test_quote_tokens_are_escaped_once_on_plotly_axes(trace):
    """Issue #22 item 6: a \"\"\" token read &quot;&quot;&quot; on the axes (plotly decodes &lt; &gt; &amp;
    but not &quot;); quotes stay literal, markup characters are still escaped (once)."""
    tokens = [['"""', " '", "a&b", "<b>", " x", "y"], list(TOKENS[1])]
    tr = dataclasses.replace(trace, tokens=tokens)
    assert figures.plotly_text('"""\'<&>') == '"""\'&lt;&amp;&gt;'
    ticks = list(figures.routing_map(tr, batch=0).layout.xaxis.ticktext)
    assert ticks[:4] == ['"""', "␣'", "a&amp;b", "&lt;b&gt;"]
    hm = figures.attention_heatmap(tr, 1, 0, batch=0).data[0]
    assert list(hm.x)[:4] == ['"""·0', "␣'·1", "a&amp;b·2", "&lt;b&gt;·3"]
    assert not any("&quot;" in s or "&#x27;" in s or "&amp;amp;" in s for s in ticks + list(hm.x))


# --- long sequences: span crop, window, cell text, chat span (issue #22 items 6 and 7) -------------
def _long_trace(tokens: list[str], layers: int = 3, seed: int = 1) -> Trace:
    """A one-row trace of the given tokens with random routing (router logits consistent with the top-k)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, 1, len(tokens), E, generator=g)
    return Trace.from_routing(logits.topk(K, dim=-1).indices, router_logits=logits, tokens=[tokens])


CHAT = (["<|im_start|>", "system", "\\n"] + [f" s{i}" for i in range(190)] + ["<|im_end|>", "\\n", "<|im_start|>",
        "user", "\\n", "What", " is", " 2", "+", "2", "?", "<|im_end|>", "\\n", "<|im_start|>", "assistant", "\\n",
        "4", ".", "<|im_end|>"])


def test_chat_span_is_the_last_user_turn_and_the_reply():
    tr = _long_trace(CHAT)
    start, stop = figures.chat_span(tr)
    assert (CHAT[start], CHAT[start + 1]) == ("<|im_start|>", "user")
    assert stop == len(CHAT)
    two_turns = CHAT[:-1] + ["\\n", "<|im_start|>", "user", "\\n", "again", "<|im_end|>"]
    assert figures.chat_span(_long_trace(two_turns))[0] == len(CHAT)                  # the last user turn
    with pytest.raises(ValueError, match="no user turn"):
        figures.chat_span(_long_trace(["plain", " text"]))


def test_routing_map_span_crops_positions_and_hover(trace):
    fig = figures.routing_map(trace, span=(2, 5))
    hm = fig.data[0]
    assert list(hm.x) == [2, 3, 4]
    np.testing.assert_array_equal(np.asarray(hm.z), trace.topk_experts[:, 0, 2:5, 0].numpy())
    assert "position 3" in hm.hovertext[0][1] and "positions 2–4 of 6" in fig.layout.title.text
    assert list(figures.routing_map(trace, span=slice(-2, None)).data[0].x) == [4, 5]
    assert list(figures.routing_map(trace, batch=1, span=(0, 3)).data[0].x) == [2]     # padding never drawn
    for bad, msg in [((4, 2), r"0 <= start < stop <= 6"), ((0, 7), r"<= 6"), (slice(0, 4, 2), "step"),
                     ("all", "slice or a"), ((0.5, 3), "integer"), ((0, 2), "no real token")]:
        with pytest.raises(ValueError, match=msg):
            figures.routing_map(trace, batch=1 if msg == "no real token" else 0, span=bad)


def test_routing_map_windows_long_sequences_with_a_range_slider():
    tr = _long_trace(CHAT)
    n = len(CHAT)
    fig = figures.routing_map(tr)                                      # window=64 by default
    axis = fig.layout.xaxis
    assert axis.rangeslider.visible and tuple(axis.range) == (n - 64 - 0.5, n - 0.5)
    assert len(fig.data[0].x) == n                                     # every position is there, to pan to
    assert all(v in axis.tickvals for v in range(n - 64, n))           # the opening view is fully labelled
    assert "showing 64 of" in axis.title.text
    whole = figures.routing_map(tr, window=None)
    assert not whole.layout.xaxis.rangeslider.visible and whole.layout.xaxis.range is None
    short = figures.routing_map(tr, span=figures.chat_span(tr))         # fits: no slider
    assert short.layout.xaxis.range is None and not short.layout.xaxis.rangeslider.visible
    with pytest.raises(ValueError, match="window"):
        figures.routing_map(tr, window=0)


def test_routing_map_cells_show_the_expert_number_where_it_fits(trace):
    hm = figures.routing_map(trace).data[0]                            # 6 positions: wide cells
    assert hm.texttemplate == "%{text}"
    np.testing.assert_array_equal(np.asarray(hm.text).astype(int), trace.topk_experts[:, 0, :, 0].numpy())
    dense = figures.routing_map(_long_trace(CHAT), window=None).data[0]  # 200+ positions in one view
    assert dense.texttemplate is None and dense.text is None
    assert figures.routing_map(trace, cell_text=False).data[0].texttemplate is None
    with pytest.raises(ValueError, match="cell_text"):
        figures.routing_map(trace, cell_text="yes")


def test_routing_map_axis_titles_stand_off_their_labels(trace):
    """Issue #22 item 6: titles never overlap tick labels. plotly.js 3.8 places an axis title over the labels
    whenever a horizontal colorbar has any title (even unset), so the colorbar's title must be exactly ""
    (the browser test measures the rendered boxes)."""
    for fig in (figures.routing_map(trace), figures.routing_map(_long_trace(CHAT))):
        for axis in (fig.layout.xaxis, fig.layout.yaxis):
            assert axis.automargin and axis.title.standoff >= 10
        assert fig.data[0].colorbar.title.text == ""
        assert any("top-1 expert" in a.text for a in fig.layout.annotations)
    fig = figures.attention_heatmap(trace, 1, 0)
    assert fig.layout.xaxis.automargin and fig.layout.yaxis.automargin and fig.layout.xaxis.title.standoff >= 10


def test_routed_text_html_span(trace):
    page = figures.routed_text_html(trace, layer=0, span=(3, 6))
    assert re.findall(r'data-position="(\d+)"', page) == ["3", "4", "5"]
    assert "positions 3–5 of 6" in page


def test_attention_span_crops_queries_and_keys(trace):
    fig = figures.attention_heatmap(trace, 1, 3, span=(1, 4))
    hm = fig.data[0]
    np.testing.assert_allclose(np.asarray(hm.z), trace.attention[1][0, 1, 1:4, 1:4].numpy(), rtol=1e-6)
    assert list(hm.y) == ["␣cat·1", "↵·2", "␣the·3"] and "positions 1–3 of 6" in fig.layout.title.text
    grid = figures.attention_grid(trace, 1, batch=1, span=(0, 4))                  # row 1: real from 2
    np.testing.assert_allclose(np.asarray(grid.data[0].z), trace.attention[1][1, 0, 2:4, 2:4].numpy(), rtol=1e-6)
    pattern, heads, q, k = figures.attention_pattern(trace, 1, 0, max_tokens=2, span=(0, 5))
    assert list(k) == [3, 4] and list(q) == [3, 4]
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 6"):
        figures.attention_heatmap(trace, 1, 0, span=(5, 9))
