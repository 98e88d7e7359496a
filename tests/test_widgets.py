"""Widgets in plain Python: construct them, set controls, press buttons and click figures through the same
handlers the browser uses, and check their state, their figures and that errors land in the error area.

The model is tiny-vocab (real DBRX vocabulary, so text prompts work) with a widened random init, so that
routing is decisive and ablating experts visibly changes greedy generations.
"""
from __future__ import annotations

import html
import json
import re
import threading

import pandas as pd
import pytest
import torch

import dbrx_lab
from dbrx_lab import Record, analysis, figures, load_model
from dbrx_lab.widgets import AblationLab, AttentionExplorer, ExpertUsageDashboard, RoutingExplorer
from dbrx_lab.widgets._base import clicked_position, figure_bundle

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def model():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


@pytest.fixture(scope="module")
def trace(model):
    return model.run_with_trace(PROMPT, record=Record(router=True, attention=True))[1]


def plotly_click(clickable, trace_index: int, x, y) -> None:
    """What the browser sends when a point is clicked (anywidget message -> FigureWidget callbacks)."""
    clickable.widget._js2py_pointsCallback = {
        "event_type": "plotly_click", "selector": None, "device_state": None,
        "points": {"trace_indexes": [trace_index], "point_indexes": [[0, 0]], "xs": [x], "ys": [y]}}


def generated(pane) -> str:
    """The generated text in a baseline / ablated pane (the prompt excluded)."""
    return html.unescape("".join(re.findall(r'class="gen [^"]*" data-step="\d+">([^<]*)<', pane.value)))


def shown_error(widget) -> str:
    assert widget.error.layout.display == "block", "the error area should be visible"
    return widget.error.value


# --- RoutingExplorer -----------------------------------------------------------------------------------
def test_routing_explorer_runs_prompt_and_follows_clicked_token(model):
    ex = RoutingExplorer(model, prompt=PROMPT, background=False)
    assert ex.last_error is None
    T = len(model.tokenizer.encode(PROMPT))
    assert ex.trace.seq_len == T and ex.position == T - 1               # last token selected
    assert [p for _, p in ex.token.options] == list(range(T))
    assert ex.map.figure.data[0].type == "heatmap" and len(ex.map.widget.data) == 1
    plotly_click(ex.map, 0, 2, 1)                                       # position 2, layer 1
    assert (ex.position, ex.layer.value, ex.token.value) == (2, 1, 2)
    path = ex.path.value
    assert "position 2" in path and path.count("<tr") == 1 + model.config.n_layers
    experts = ex.trace.topk_experts[:, 0, 2]                            # [L, k]
    for l in range(model.config.n_layers):
        for e in experts[l].tolist():
            assert f"expert {e}: weight" in path
    assert ex.map.widget.layout.shapes[-1].x0 == 1.5                    # the clicked cell is outlined
    assert "top-1 expert at layer 1" in ex.text.value


def test_routing_explorer_top1_view_shows_only_the_top_expert(model):
    ex = RoutingExplorer(model, prompt=PROMPT, background=False)
    k = model.config.moe_top_k
    assert ex.path.value.count("title=\"expert ") == k * model.config.n_layers
    ex.view.value = "top1"
    assert ex.path.value.count("title=\"expert ") == model.config.n_layers
    assert "others" in ex.path.value


def test_routing_explorer_shows_errors_instead_of_raising(model):
    ex = RoutingExplorer(model, prompt=PROMPT, background=False)
    plotly_click(ex.map, 0, 500, 0)                                      # no such position
    assert "position must be a real token column" in shown_error(ex)
    ex.prompt.value = "   "
    ex.run_button.click()
    assert "the prompt is empty" in shown_error(ex)
    assert not ex.run_button.disabled                                   # usable again after the error


def test_routing_explorer_shows_a_given_trace_without_a_model(trace):
    ex = RoutingExplorer(trace=trace)
    assert ex.prompt.disabled and ex.run_button.disabled
    assert ex.trace is trace and ex.last_error is None
    ex.run_button.click()
    assert "pass model=" in shown_error(ex)
    with pytest.raises(ValueError, match="needs a model"):
        RoutingExplorer()


def test_routing_explorer_background_run_and_wait(model):
    ex = RoutingExplorer(model, prompt="hello", background=False)
    ex.background = True
    ex.prompt.value = PROMPT
    ex.run_button.click()
    ex.wait(60)
    assert not ex.busy and ex.last_error is None
    assert ex.trace.seq_len == len(model.tokenizer.encode(PROMPT))
    assert not ex.run_button.disabled


# --- AttentionExplorer ---------------------------------------------------------------------------------
def test_attention_explorer_head_click_and_query_row(model, trace):
    ex = AttentionExplorer(trace=trace)
    L, H = model.config.n_layers, model.config.n_heads
    assert [l for _, l in ex.layer.options] == list(range(L))
    assert len(ex.grid.figure.data) == H
    plotly_click(ex.grid, 2, 1, 3)                                      # head 2's panel, query 3
    assert (ex.head_index, ex.query) == (2, 3) and ex.last_error is None
    row = trace.attention[0][0, 2, 3, :4]
    best = trace.tokens[0][int(row.argmax())]
    assert "query 3" in ex.row.value and figures.readable_token(best) in ex.row.value
    assert ex.row.value.count("title=\"key ") == 4                      # keys 0..3: causal
    ex.layer.value = L - 1
    assert "layer " + str(L - 1) in ex.pattern.figure.layout.title.text
    plotly_click(ex.pattern, 0, 0, 1)
    assert ex.query == 1 and ex.pattern.widget.layout.shapes[-1].y0 == 0.5


def test_attention_explorer_clicks_with_category_labels(trace):
    """Issue #22 item 5: plotly sends the category label ("␣The·7") of a clicked row, not a number; the
    clicks select that row, and a label naming no position shows in the error box instead of escaping."""
    ex = AttentionExplorer(trace=trace)
    labels = list(ex.pattern.figure.data[0].y)
    plotly_click(ex.grid, 1, labels[4], labels[2])                     # head 1's panel, query row 2
    assert (ex.head_index, ex.query, ex.last_error) == (1, 2, None)
    plotly_click(ex.pattern, 0, labels[0], labels[3])
    assert ex.query == 3 and ex.last_error is None and "query 3" in ex.row.value
    plotly_click(ex.pattern, 0, labels[0], "no position here")           # must not raise out of the handler
    assert ex.query == 3 and "names no position" in shown_error(ex)


def test_clicked_position_reads_labels_and_numbers():
    """Category labels "token·position" (the token itself may contain ·) and numbers map to positions."""
    assert clicked_position("␣The·7") == 7
    assert clicked_position("a·b·12") == 12
    assert clicked_position(3) == 3 and clicked_position(2.9999) == 3 and clicked_position("4") == 4
    for bad in ("␣The", "x·y", None, True, float("nan"), [1]):
        with pytest.raises(ValueError, match="names no position"):
            clicked_position(bad)


def test_attention_explorer_needs_attention(model):
    _, no_attention = model.run_with_trace("hello there", record=Record(router=True))
    ex = AttentionExplorer(trace=no_attention)
    assert "no attention patterns" in shown_error(ex)


def test_attention_explorer_runs_only_requested_layers(model):
    ex = AttentionExplorer(model, prompt="the cat sat on the mat", layers=[1], background=False)
    assert sorted(ex.trace.attention) == [1] and ex.layer.value == 1


# --- ExpertUsageDashboard -----------------------------------------------------------------------------
def test_dashboard_views_use_the_analysis_tables(model):
    _, t = model.run_with_trace(["The cat sat on the mat.", "for i in range(3): print(i)"],
                                record=Record(router=True))
    dash = ExpertUsageDashboard(t, labels=["prose", "code"])
    pd.testing.assert_frame_equal(dash.tables["usage"], analysis.expert_load(t))
    assert "Expert usage" in dash.pane.figure.layout.title.text
    titles = {}
    for view in ("coactivation", "repetition", "specialization", "flow"):
        dash.view.value = view
        assert dash.last_error is None, dash.error.value
        titles[view] = dash.pane.figure.layout.title.text
    assert "co-activation" in titles["coactivation"] and "repetition" in titles["repetition"]
    assert "specialization" in titles["specialization"]
    dash.view.value = "coactivation"
    dash.layer.value = 2
    assert "layer 2" in dash.pane.figure.layout.title.text
    out = dash.pane.widget.outputs[0]["data"]
    assert "application/vnd.plotly.v1+json" in out and "text/html" not in out      # no plotly.js copies


def test_dashboard_without_labels_explains_specialization(trace):
    dash = ExpertUsageDashboard([trace])
    dash.view.value = "specialization"
    assert dash.pane.figure is None and "needs a domain label" in dash.note.value
    assert dash.last_error is None


def test_dashboard_reads_the_route_stats_tables_of_a_folder(model, tmp_path, monkeypatch):
    from dbrx_lab.route_stats import route_stats

    data = tmp_path / "texts.jsonl"
    rows = [{"text": "The cat sat on the mat.", "label": "prose"}, {"text": "A dog ran in the park.", "label": "prose"},
            {"text": "x = [i for i in range(3)]", "label": "code"},
            {"text": "def f(a):\n    return a", "label": "code"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    route_stats(model, data, out, min_count=1, predictions=False, progress=False)
    for name in ("expert_load", "coactivation", "routing_repetition", "layer_transitions", "domain_specialization"):
        monkeypatch.setattr(analysis, name, lambda *a, **k: pytest.fail("the folder's stored tables should be read"))
    dash = ExpertUsageDashboard(out)
    pd.testing.assert_frame_equal(dash.tables["usage"], pd.read_parquet(out / "load.parquet"))
    for view in ("coactivation", "repetition", "specialization", "flow"):
        dash.view.value = view
        assert dash.last_error is None and dash.pane.figure is not None, dash.error.value
    assert set(dash.tables["specialization"]["label"]) == {"prose", "code"}
    assert "route-stats folder" in dash.ui.children[0].value


def test_dashboard_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ExpertUsageDashboard(tmp_path / "nope")


# --- AblationLab ---------------------------------------------------------------------------------------
def test_ablation_lab_suggests_the_cells_that_move_the_next_token(model):
    lab = AblationLab(model, prompt=PROMPT, n_suggest=2, background=False)
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    _, t = model.run_with_trace(ids, record=Record(router=True))
    with torch.no_grad():
        base = model(ids).logits[0, -1].float().log_softmax(-1)

    @torch.no_grad()
    def kl(l, e):
        with model.intervene(dbrx_lab.ExpertAblation(l, [e], mode="reroute")):
            q = model(ids).logits[0, -1].float().log_softmax(-1)
        return float((base.exp() * (base - q)).sum())

    candidates = {(l, e): kl(l, e) for l in range(model.config.n_layers) for e in t.topk_experts[l, 0, -1].tolist()}
    chosen = [(l, e) for l, es in lab.selection.items() for e in es]
    assert len(chosen) == 2 and set(chosen) <= set(candidates)
    assert min(candidates[c] for c in chosen) >= max(v for c, v in candidates.items() if c not in chosen)
    assert "suggested (reroute)" in lab.status.value


def test_ablation_lab_grid_and_interventions(model):
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    assert lab.selection == {} and "nothing selected" in lab.selection_label.value
    lab.columns[5].value = True                                         # expert 5 in every layer
    assert lab.selection == {l: [5] for l in range(model.config.n_layers)}
    lab.toggle(0, 5)
    assert not lab.columns[5].value                                     # no longer in every layer
    lab.toggle(1, 9)
    lab.mode.value = "zero"
    ivs = lab.interventions()
    assert [(iv.layer, iv.experts, iv.mode) for iv in ivs] == [((1,), (5, 9), "zero"), ((2,), (5,), "zero")]
    lab.set_selection({"all": [3]})
    assert lab.columns[3].value
    with pytest.raises(ValueError, match=r"expert must be in \[0, 15\]"):
        lab.set_selection({0: [16]})


def test_ablation_lab_generate_matches_compare_generations(model):
    lab = AblationLab(model, prompt=PROMPT, experts={0: [1, 2, 3, 4], 1: [5, 6]}, max_new_tokens=12,
                      background=False)
    lab.generate_button.click()
    assert lab.last_error is None, lab.error.value
    ref = analysis.compare_generations(model, model.tokenizer.encode(PROMPT), lab.interventions(),
                                       max_new_tokens=12, seed=0)
    res = lab.result
    assert res.baseline_ids.tolist() == ref.baseline_ids.tolist()
    assert res.ablated_ids.tolist() == ref.ablated_ids.tolist()
    assert res.first_divergence is not None, "this ablation should change the widened model's generation"
    assert "First divergence at step" in lab.summary.value
    assert generated(lab.ablated_text) == ref.ablated_text
    assert generated(lab.baseline_text) == ref.baseline_text
    assert 'class="gen diff first"' in lab.ablated_text.value
    assert lab.diff_pane.figure is not None and lab.cascade_pane.figure is not None
    assert not lab.generate_button.disabled and lab.stop_button.disabled


def test_ablation_lab_errors_show_in_the_widget(model, monkeypatch):
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    lab.generate_button.click()
    assert "no expert selected" in shown_error(lab)
    assert not lab.generate_button.disabled
    lab.toggle(0, 1)
    lab.background = True

    def boom(*args, **kwargs):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(analysis, "compare_generations", boom)
    lab.generate_button.click()
    lab.wait(30)
    assert "the model fell over" in shown_error(lab)
    assert not lab.generate_button.disabled and lab.stop_button.disabled   # no dead buttons


def test_ablation_lab_streams_and_stops_in_the_background(model):
    lab = AblationLab(model, prompt=PROMPT, experts={0: [1]}, max_new_tokens=60)
    seen: list[str] = []
    started = threading.Event()

    def watch(change):
        seen.append(change["new"])
        if change["new"].count('class="gen') >= 2:
            started.set()

    lab.ablated_text.observe(watch, "value")
    lab.generate_button.click()
    assert lab.busy and lab.stop_button.disabled is False
    assert started.wait(60), "tokens should stream in while generating"
    lab.stop_button.click()
    lab.wait(60)
    assert not lab.busy and lab.last_error is None, lab.error.value
    n = len(lab.result.ablated_ids)
    assert 1 <= n < 60, "Stop should end the generation early"
    assert "stopped" in lab.status.value.lower() and "Stopped early" in lab.summary.value
    assert len(seen) >= 3                                               # several partial renders, then the final one
    assert not lab.generate_button.disabled and lab.stop_button.disabled


def test_ablation_lab_background_generation_never_touches_foreground_calls(model):
    experts, n = {0: [1, 2, 3, 4], 1: [5, 6]}, 8
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    T = ids.shape[1]
    ivs = [dbrx_lab.ExpertAblation(l, es, mode="reroute") for l, es in experts.items()]
    with torch.no_grad():
        plain = model(ids).logits
        with model.intervene(*ivs):
            ablated = model(ids).logits
            ablated_gen = model.generate(ids, max_new_tokens=n)
    assert not torch.equal(plain, ablated)
    plain_gen = model.generate(ids, max_new_tokens=n)
    _, plain_trace = model.run_with_trace(ids, record=Record(router=True))

    lab = AblationLab(model, prompt=PROMPT, experts=experts, max_new_tokens=n)
    held, release = threading.Event(), threading.Event()

    def hold(change):       # runs in the lab's worker, inside its intervene block, after 2 ablated tokens
        if change["new"].count('class="gen') >= 2 and not held.is_set():
            held.set()
            release.wait(60)

    lab.ablated_text.observe(hold, "value")
    lab.generate_button.click()
    try:
        assert held.wait(60), "the lab should stream ablated tokens"
        assert lab.busy
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain), "the foreground sees the lab's ablation"
        assert not model.active_interventions()
        assert torch.equal(model.generate(ids, max_new_tokens=n), plain_gen)
        _, trace = model.run_with_trace(ids, record=Record(router=True))
        assert torch.equal(trace.topk_experts, plain_trace.topk_experts)
        # another widget runs the model meanwhile: no ablation, and no waiting for the lab
        box = {}
        other = threading.Thread(target=lambda: box.update(ex=RoutingExplorer(model, prompt=PROMPT,
                                                                              background=False)))
        other.start()
        other.join(30)
        assert not other.is_alive(), "a widget's run waited for the lab's generation"
        assert box["ex"].last_error is None
        assert torch.equal(box["ex"].trace.topk_weights, plain_trace.topk_weights)
        assert lab.busy                                                 # the lab still holds in the middle
    finally:
        release.set()
    lab.wait(60)
    assert not lab.busy and lab.last_error is None, lab.error.value
    res = lab.result
    assert res.ablated_ids.tolist() == ablated_gen[0, T:].tolist()     # = the ablated generation run alone
    assert res.baseline_ids.tolist() == plain_gen[0, T:].tolist()
    assert res.first_divergence is not None
    ref = analysis.compare_generations(model, ids[0].tolist(), ivs, max_new_tokens=n, seed=0)
    assert res.ablated_ids.tolist() == ref.ablated_ids.tolist()
    pd.testing.assert_frame_equal(res.per_step, ref.per_step)
    pd.testing.assert_frame_equal(res.cascade, ref.cascade)
    with torch.no_grad():
        assert not model.active_interventions() and torch.equal(model(ids).logits, plain)


def test_ablation_lab_chat_prompt_uses_the_template(model):
    lab = AblationLab(model, prompt="hi", experts={0: [0]}, chat=True, max_new_tokens=2, background=False)
    ids = lab._prompt_ids()
    assert ids == model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                      add_generation_prompt=True, tokenize=True)
    lab.generate_button.click()
    assert lab.last_error is None and lab.result.prompt_ids.tolist() == ids


def test_figure_bundle_is_json_only(trace):
    bundle = figure_bundle(figures.routing_map(trace))
    assert set(bundle["data"]) == {"application/vnd.plotly.v1+json", "text/plain"}
    assert bundle["data"]["application/vnd.plotly.v1+json"]["data"][0]["type"] == "heatmap"


def test_widgets_are_exported():
    import dbrx_lab.widgets as w

    assert set(w.__all__) == {"RoutingExplorer", "AttentionExplorer", "ExpertUsageDashboard", "AblationLab",
                              "CardBrowser"}
