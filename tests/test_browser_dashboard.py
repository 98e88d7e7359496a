"""Issue #22 items 5, 9, 10 in a real browser (JupyterLab + headless Chromium, fixtures of test_browser):
every control of ExpertUsageDashboard (each view, the value dropdown, the layer slider, the min-tokens box,
the min-link-share slider) and every export button of the dashboard and of CardBrowser (the rest of the card
browser's handlers are driven by test_browser.test_card_browser_search_sort_pick_and_partner). Exported files
are checked on disk, through their download links, and the HTML export is opened in a page of its own.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from test_browser import assert_no_cell_errors, browser, lab, open_and_run, page, shot  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOK = "dashboard_export_check.ipynb"
CELLS = [
    """import json, tempfile
from pathlib import Path
import torch
from dbrx_lab import Record, analysis, load_model
from dbrx_lab.route_stats import route_stats
from dbrx_lab.widgets import CardBrowser, ExpertUsageDashboard
torch.set_num_threads(1)
model = load_model("demo")
texts = ["The fox jumped over the fence while the children watched.", "The bird flew over the lake at dawn.",
         "def inc(x):\\n    return x + 1\\n", "for i in range(3):\\n    print(i)\\n"]
labels = ["prose", "prose", "code", "code"]
_, trace = model.run_with_trace(texts, record=Record(router=True))
dash = ExpertUsageDashboard(trace, labels=labels, n_boot=200)
dash""",
    """work = Path(tempfile.mkdtemp(prefix="cards-"))
(work / "texts.jsonl").write_text("".join(json.dumps({"text": t, "label": l}) + "\\n" for t, l in zip(texts, labels)))
route_stats(model, work / "texts.jsonl", work / "stats", min_count=1, predictions=False, progress=False)
cards = analysis.expert_cards(work / "stats", model, layers=[1], n_contexts=2)
CardBrowser(cards)""",
]

FIGURE = "document.querySelector('.dbrx-fig-dashboard .js-plotly-plot')"


def write_notebook(root: Path) -> None:
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                     "source": src} for i, src in enumerate(CELLS)],
          "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                      "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    (root / NOTEBOOK).write_text(json.dumps(nb))


def wait_layout(page, js_condition: str, arg=None) -> None:
    """Wait until the dashboard's figure satisfies a condition on its layout `l` (and data `d`)."""
    page.wait_for_function(f"a => {{ const p = {FIGURE}; if (!p || !p.layout) return false; "
                           f"const l = p.layout, d = p.data; return {js_condition}; }}", arg=arg, timeout=60_000)


def title_has(page, text: str) -> None:
    wait_layout(page, "(l.title?.text || '').includes(a)", text)


def set_readout(slider, value) -> None:
    """Type a value into an ipywidgets slider's readout (contenteditable; sent on Enter)."""
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+A")
    readout.type(str(value))
    readout.press("Enter")


def export_and_check(page, box, kind: str, lab) -> Path:
    """Click an export button: the note names a new file under the notebook's ./exports, whose download link
    gives the same bytes."""
    note = box.locator(".dbrx-export-path")
    before = note.all_inner_texts()
    box.locator(f".dbrx-export-{kind}").click()
    deadline = time.time() + 60
    while note.all_inner_texts() == before or not note.all_inner_texts():
        assert time.time() < deadline, f"no new file named after clicking {kind}"
        page.wait_for_timeout(200)
    path = Path(note.inner_text())
    assert path.parent == lab["root"] / "exports" and path.is_file(), path
    link = box.locator(".dbrx-export-link")
    if link.count():
        with page.expect_download() as dl:
            link.click()
        assert Path(dl.value.path()).read_bytes() == path.read_bytes()
    assert box.locator(".dbrx-error-box").count() == 0, box.locator(".dbrx-error-box").inner_text()
    return path


def check_html_opens(browser, path: Path, title: str) -> None:  # noqa: F811 (the fixture's value)
    """The standalone HTML draws its figure offline (no server, plotly.js inside the file)."""
    ctx = browser.new_context()
    p = ctx.new_page()
    p.route("http*://**", lambda route: route.abort())                  # nothing may come from the network
    p.goto(path.as_uri())
    p.wait_for_function("t => document.querySelector('.js-plotly-plot .main-svg') && "
                        "(document.querySelector('.js-plotly-plot').layout.title.text || '').includes(t)",
                        arg=title, timeout=60_000)
    ctx.close()


def test_dashboard_and_card_browser_controls_and_exports(page, lab, browser):  # noqa: F811
    write_notebook(lab["root"])
    open_and_run(page, lab, NOTEBOOK)
    assert_no_cell_errors(page, NOTEBOOK)
    dash = page.locator(".dbrx-lab", has=page.locator(".dbrx-dashboard-view")).first
    dash.wait_for(timeout=60_000)
    title_has(page, "Expert usage")
    wait_layout(page, "(d[0].hovertext?.[0]?.[0] || '').includes('CI [')")       # n and intervals in hover

    # usage: each value of the dropdown
    value = dash.locator(".dbrx-dashboard-value select")
    for option, text in (("share as top-1", "as top-1"), ("mean weight", "mean routing weight"),
                         ("share of tokens (top-k)", "(top-k)")):
        value.select_option(label=option)
        title_has(page, text)
    usage_csv = export_and_check(page, dash, "csv", lab)
    assert {"share", "share_lo", "share_hi", "n_units"} <= set(pd.read_csv(usage_csv).columns)

    # co-activation: value, layer slider, min-tokens box
    dash.locator(".dbrx-dashboard-view button", has_text="Co-activation").click()
    title_has(page, "co-activation at layer 0")
    value.select_option(label="P(j | i)")
    wait_layout(page, "l.title.text.includes('co-activation') && !l.title.text.includes('/ random')")
    set_readout(dash.locator(".dbrx-dashboard-layer"), 2)
    title_has(page, "co-activation at layer 2")
    min_count = dash.locator(".dbrx-dashboard-min-count input")
    min_count.fill("37")
    min_count.press("Enter")
    title_has(page, "fewer than 37 tokens")
    assert "saturates" in dash.locator(".dbrx-dashboard-note").inner_text()
    co_parquet = export_and_check(page, dash, "parquet", lab)
    co = pd.read_parquet(co_parquet)
    assert (co["low_count"] == (co["count_i"] < 37)).all() and {"lift_lo", "lift_hi", "lift_max"} <= set(co.columns)

    # repetition
    dash.locator(".dbrx-dashboard-view button", has_text="Repetition").click()
    title_has(page, "repetition")

    # specialization: values, layer, the saturation note and the top-rows table
    dash.locator(".dbrx-dashboard-view button", has_text="Specialization").click()
    title_has(page, "Domain specialization at layer 2")
    for option, text in (("lift vs uniform", "lift vs uniform"), ("share of tokens", "share of tokens"),
                         ("lift vs all domains", "lift vs all")):
        value.select_option(label=option)
        title_has(page, text)
    wait_layout(page, "d.some(t => t.error_y && t.error_y.array)")                 # whiskers
    set_readout(dash.locator(".dbrx-dashboard-layer"), 1)
    title_has(page, "Domain specialization at layer 1")
    assert "lift_max" in dash.locator(".dbrx-dashboard-note").inner_text()
    assert "log_odds" in dash.locator(".dbrx-dashboard-rows").inner_text()
    spec_html = export_and_check(page, dash, "html", lab)
    check_html_opens(browser, spec_html, "Domain specialization at layer 1")

    # flow: the min-link-share slider hides thin links (4 layers: no layer window)
    dash.locator(".dbrx-dashboard-view button", has_text="Flow").click()
    title_has(page, "Cross-layer routing")
    assert not dash.locator(".dbrx-dashboard-flow-start").is_visible()
    wait_layout(page, "d[0].arrangement === 'fixed'")
    links = page.evaluate(f"() => {FIGURE}.data[0].link.value.length")
    set_readout(dash.locator(".dbrx-dashboard-min-share"), "0.30")
    wait_layout(page, "d[0].link.value.length < a", links)
    wait_layout(page, "l.annotations.some(x => x.text.includes('under 30%'))")
    trace_file = export_and_check(page, dash, "trace", lab)
    import dbrx_lab

    assert dbrx_lab.Trace.load(trace_file).input_ids.shape[0] == 4
    assert dash.locator(".dbrx-error-box").count() == 0
    shot(page, "dashboard_flow_exported", dash)

    # the card browser's export buttons
    cards = page.locator(".dbrx-lab", has=page.locator(".dbrx-card-list")).first
    cards.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('.dbrx-card-view [data-card]')", timeout=60_000)
    listed = cards.locator(".dbrx-card-list option").count()
    csv = pd.read_csv(export_and_check(page, cards, "csv", lab))
    assert len(csv) == listed and "card" in csv.columns
    assert len(pd.read_parquet(export_and_check(page, cards, "parquet", lab))) == listed
    if cards.locator(".dbrx-fig-card-logits .js-plotly-plot").count():
        check_html_opens(browser, export_and_check(page, cards, "html", lab), "")
    shot(page, "card_browser_exported", cards)
