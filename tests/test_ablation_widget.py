"""AblationLab (issue #22 items 6, 8, 10, 12): the grid's numbers (usage, ablation effect from a sweep),
the sweep in the background with Stop, aligned text panes, the labelled summary and the export contract.
In plain Python, through the same handlers the browser uses; numbers checked against independent code."""
from __future__ import annotations

import re
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from dbrx_lab import Record, analysis, load_model
from dbrx_lab.widgets import AblationLab

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def model():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


def usage_of(model, ids: list[int]) -> np.ndarray:
    """[L, E] share of routed slots, counted from a trace."""
    _, t = model.run_with_trace(torch.tensor([ids]), record=Record(router=True))
    top = t.topk_experts[:, 0]                                           # [L, T, k]
    return np.stack([(top == e).sum((1, 2)).numpy() for e in range(model.config.moe_num_experts)], 1) / \
        (top >= 0).sum((1, 2)).numpy()[:, None]


def heat(button) -> list[str]:
    return [c for c in button._dom_classes if re.fullmatch(r"dbrx-(use|up|down)-\d", c)]


def test_grid_cells_show_usage_after_suggest(model):
    lab = AblationLab(model, prompt=PROMPT, n_suggest=2, background=False)
    want = usage_of(model, model.tokenizer.encode(PROMPT))
    np.testing.assert_allclose(lab.usage, want)
    L, E = want.shape
    for (l, e), b in lab.cells.items():
        assert b.description == f"{100 * want[l, e]:.0f}"
        assert f"{want[l, e]:.1%} of the layer's routed slots" in b.tooltip
        assert len(heat(b)) == 1
    top = np.unravel_index(want.argmax(), want.shape)
    assert heat(lab.cells[top]) == ["dbrx-use-9"]                      # the most used expert: darkest
    unused = [(l, e) for l in range(L) for e in range(E) if want[l, e] == 0]
    assert all(heat(lab.cells[c]) == ["dbrx-use-0"] for c in unused)
    assert "routed slots" in lab.grid_note.value
    lab.prompt.value = "x = 1"                                           # the numbers are now for an old prompt
    assert "before the prompt changed" in lab.grid_note.value


def test_grid_without_numbers_shows_expert_ids_and_says_how_to_get_them(model):
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    assert lab.usage is None and lab.cells[(1, 7)].description == "7"
    assert "after suggest, Generate or sweep" in lab.grid_note.value
    lab.grid_view.value = "effect"
    assert "no sweep yet" in lab.grid_note.value


@torch.no_grad()
def test_sweep_paints_the_loss_change_of_each_expert_ablated_alone(model):
    lab = AblationLab(model, prompt=PROMPT, experts={0: [1]}, mode="zero", max_new_tokens=6, background=False)
    lab.generate_button.click()
    assert lab.last_error is None, lab.error.value
    text = lab.result.prompt_ids.tolist() + lab.result.baseline_ids.tolist()
    np.testing.assert_allclose(lab.usage, usage_of(model, text))        # Generate measured usage on the text
    lab.run_sweep_sync(layers=[1])
    assert lab.last_error is None, lab.error.value
    ref = analysis.ablation_sweep(model, [text], mode="zero", layers=[1], progress=False)
    got = lab.sweep_table
    np.testing.assert_allclose(got.loc[1].to_numpy(float), ref.loc[1].to_numpy(float), atol=2e-5)
    assert got.loc[0].isna().all()                                       # not swept
    assert got.attrs["baseline_loss"] == pytest.approx(ref.attrs["baseline_loss"], abs=1e-5)
    assert got.attrs["text_tokens"] == len(text) and got.attrs["mode"] == "zero"
    assert lab.grid_view.value == "effect"
    worst = int(ref.loc[1].idxmax())
    b = lab.cells[(1, worst)]
    assert heat(b) == ["dbrx-up-9"] and b.description.startswith("+")
    assert f"Δ loss {ref.loc[1, worst]:+.4f}" in b.tooltip
    assert lab.cells[(0, 3)].description == "·" and heat(lab.cells[(0, 3)]) == []     # not measured
    assert "Δ loss (nats/token) on" in lab.grid_note.value and "cells measured" in lab.grid_note.value
    assert "sweep (zero) done" in lab.status.value
    # switching the view back shows usage; no ablation is left attached
    lab.grid_view.value = "usage"
    assert heat(lab.cells[(1, worst)])[0].startswith("dbrx-use-")
    assert not model.active_interventions()
    # exports follow what is shown
    comparison = lab.export_table()
    assert {"op", "baseline_token", "ablated_token", "kl", "ablated_text_baseline_logprob"} <= set(comparison)
    assert len(comparison) == len(lab.result.alignment)
    assert lab.export_figure().layout.title.text.startswith("Generation diff")
    lab.grid_view.value = "effect"
    table = lab.export_table()
    assert list(table.columns) == ["layer", "expert", "share", "delta_loss"]
    assert len(table) == model.config.n_layers * 16
    np.testing.assert_allclose(table.query("layer == 1")["delta_loss"], ref.loc[1].to_numpy(float), atol=2e-5)
    assert "reroute" not in lab.export_figure().layout.title.text and "zero" in lab.export_figure().layout.title.text


def test_sweep_runs_in_the_background_and_stops(model):
    lab = AblationLab(model, prompt=PROMPT, experts=None, mode="zero")
    painted = threading.Event()
    lab.cells[(0, 0)].observe(lambda change: painted.set() if change["new"] not in ("0", "·") else None,
                              "description")
    hold, release = threading.Event(), threading.Event()

    def slow(change):                 # runs in the worker: hold it after the second measured cell
        if "layer 0, expert 2" in change["new"] and not hold.is_set():
            hold.set()
            release.wait(60)

    lab.status.observe(slow, "value")
    lab.sweep_button.click()
    try:
        assert hold.wait(60), "the sweep should report progress"
        assert lab.busy and not lab.stop_button.disabled and lab.generate_button.disabled
        assert lab.sweep_button.disabled and lab.suggest_button.disabled
        assert lab.progress.layout.display == "flex"
        lab.stop_button.click()
    finally:
        release.set()
    lab.wait(60)
    assert not lab.busy and lab.last_error is None, lab.error.value
    measured = int(lab.sweep_table.notna().sum().sum())
    assert 1 <= measured < lab.sweep_table.size, "Stop should leave the rest unmeasured"
    assert lab.sweep_table.attrs["complete"] is False and "stopped" in lab.status.value
    assert not lab.sweep_button.disabled and lab.stop_button.disabled and not lab.generate_button.disabled
    assert not model.active_interventions()


def test_sweep_rejects_bad_input_in_the_widget(model):
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    L = model.config.n_layers
    with pytest.raises(ValueError, match=rf"layer must be in \[0, {L - 1}\], got {L}"):
        lab.sweep(layers=[L])
    with pytest.raises(ValueError, match=r"expert must be in \[0, 15\]"):
        lab.sweep(experts=[-1])
    lab.prompt.value = "x"
    lab.sweep_button.click()
    assert "a loss needs at least 2" in lab.error.value and lab.error.layout.display == "block"
    assert not lab.sweep_button.disabled


def spans(pane) -> list[tuple[str, str]]:
    """(class, text) of each generated token span of a pane, and ("gap", "") for a gap caret."""
    out = []
    for m in re.finditer(r'<span(?: data-op="\w+")? class="(gen [^"]*|gap[^"]*)"[^>]*>([^<]*)<', pane.value):
        out.append((m.group(1), m.group(2)))
    return out


def test_text_panes_are_aligned_not_positional(model):
    """Issue #22 item 6: one inserted token made every later token 'different'; aligned, only it is."""
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    tok = model.tokenizer
    base = tok.encode(" the cat sat on the mat")
    abl = base[:2] + tok.encode(" big") + base[2:]
    lab._ids = {"baseline": base, "ablated": abl}
    lab._pieces = {"baseline": [tok.decode([t]) for t in base], "ablated": [tok.decode([t]) for t in abl]}
    lab._render_texts()
    a, b = spans(lab.ablated_text), spans(lab.baseline_text)
    assert [c for c, _ in a] == ["gen same"] * 2 + ["gen diff first"] + ["gen same"] * (len(base) - 2)
    assert 'data-op="only" class="gen diff first" data-step="2"> big<' in lab.ablated_text.value
    assert [c for c, _ in b] == ["gen same"] * 2 + ["gap first"] + ["gen same"] * (len(base) - 2)
    assert 'title="the other run has 1 token here"' in lab.baseline_text.value


def test_summary_labels_free_running_and_teacher_forced_numbers(model):
    lab = AblationLab(model, prompt=PROMPT, experts={0: [1, 2, 3, 4], 1: [5, 6]}, max_new_tokens=8,
                      background=False)
    lab.generate_button.click()
    res, summary = lab.result, lab.summary.value
    free, forced = summary.split('<div class="dbrx-forced"')
    assert "<b>Free-running</b>" in free and "Teacher-forced on the baseline" in forced
    m = res.metrics()
    same = int(res.per_step["same"].sum())
    assert f"Per-step token agreement: {same} of {len(res.per_step)} steps" in free
    assert f"the baseline model gives the ablated text {m['logp_ablated_text_under_baseline']:.3g} nats" in free
    assert f"the ablated model gives the baseline text {m['logp_baseline_text_under_ablated']:.3g}" in free
    assert f"{m['aligned_agreement']:.0%} of the tokens match" in free
    assert "KL(baseline ‖ ablated)" in forced and "KL" not in free
    assert "intervened" not in summary                                   # one word throughout: ablated
    assert "intervened" not in str(lab.diff_pane.figure.layout)


def test_export_before_anything_is_empty(model):
    lab = AblationLab(model, prompt=PROMPT, experts=None, background=False)
    assert lab.export_table() is None and lab.export_figure() is None


def test_export_bar_writes_the_comparison_and_the_sweep(model, tmp_path):
    lab = AblationLab(model, prompt=PROMPT, experts={0: [1, 2, 3, 4]}, max_new_tokens=4, background=False)
    lab.generate_button.click()
    csv = pd.read_csv(lab.export("csv", tmp_path))
    assert "comparison" in lab._export_name() and len(csv) == len(lab.result.alignment)
    assert csv["op"].tolist() == lab.result.alignment["op"].tolist()
    parquet = pd.read_parquet(lab.export("parquet", tmp_path))
    assert parquet["ablated_token"].tolist() == lab.result.alignment["ablated_token"].tolist()
    assert "Generation diff" in lab.export("html", tmp_path).read_text()
    lab.run_sweep_sync(layers=[0], experts=[1, 2])
    assert "sweep-reroute" in lab._export_name()
    sweep = pd.read_csv(lab.export("csv", tmp_path))
    assert sweep["delta_loss"].notna().sum() == 2
