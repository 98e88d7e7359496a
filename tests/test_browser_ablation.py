"""Issue #22 item 5 for the AblationLab: every control of the lab driven in real Chromium through
JupyterLab (notebook 04), each click checked by what it changes on the page: cell and column toggles,
clear, suggest, mode, sampling settings (sample, temperature, top-k, top-p, seed, new tokens), the chat
checkbox, the prompt, Generate, Stop (of a generation and of a sweep), sweep, the "cells show" view and the
export bar. Fixtures and helpers come from test_browser."""
from __future__ import annotations

import pytest

from test_browser import (assert_no_cell_errors, browser, generated_text, lab, open_and_run, page,  # noqa: F401
                          shot, wait_for_plots)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NOTEBOOK = "04_ablation_lab.ipynb"


def active(page) -> int:
    return page.evaluate("() => document.querySelectorAll('.dbrx-cell.mod-active').length")


def wait_js(page, expr: str, arg=None, timeout: int = 30_000) -> None:
    page.wait_for_function(expr, arg=arg, timeout=timeout)


def text_of(page, selector: str) -> str:
    return page.evaluate("s => document.querySelector(s)?.innerText || ''", selector)


def set_slider(box, selector: str, value: str) -> None:
    """Type a value into an ipywidgets slider's editable readout (Enter sends it)."""
    readout = box.locator(f"{selector} .widget-readout")
    readout.click()
    readout.press("Control+A")
    readout.type(value)
    readout.press("Enter")


def no_error(box) -> None:
    errors = box.locator(".dbrx-error-box")
    assert errors.count() == 0, errors.first.inner_text()


def test_every_ablation_lab_control(page, lab):  # noqa: F811
    open_and_run(page, lab, NOTEBOOK)
    assert_no_cell_errors(page, NOTEBOOK)
    box = page.locator(".dbrx-lab").first
    box.wait_for(timeout=60_000)
    n_layers = page.evaluate("() => new Set([...document.querySelectorAll('.dbrx-cell')].map(b => "
                             "[...b.classList].find(c => c.startsWith('dbrx-cell-L')).split('-E')[0])).size")
    assert n_layers >= 2

    # the grid carries numbers: the notebook swept layer 0, so the view is "ablation effect"
    assert "Δ loss (nats/token)" in text_of(page, ".dbrx-grid-note")
    assert page.locator(".dbrx-cell[class*='dbrx-up-'], .dbrx-cell[class*='dbrx-down-']").count() >= 1
    # "cells show": usage -> every cell a % of routed slots, coloured
    box.locator(".dbrx-grid-view button", has_text="usage").click()
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('routed slots')")
    wait_js(page, "() => document.querySelectorAll('.dbrx-cell[class*=\"dbrx-use-\"]').length == "
                  "document.querySelectorAll('.dbrx-cell').length")
    shares = page.evaluate("() => [...document.querySelectorAll('.dbrx-cell-L0-E0, .dbrx-cell-L1-E1')]"
                           ".map(b => b.innerText.trim())")
    assert all(s.isdigit() for s in shares), shares
    box.locator(".dbrx-grid-view button", has_text="ablation effect").click()
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('Δ loss')")
    box.locator(".dbrx-grid-view button", has_text="usage").click()
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('routed slots')")

    # clear, one cell, a column (on, then off), suggest
    assert active(page) >= 1, "the lab starts with suggested experts selected"
    box.locator(".dbrx-clear").click()
    wait_js(page, "() => document.querySelectorAll('.dbrx-cell.mod-active').length == 0")
    wait_js(page, "() => document.querySelector('.dbrx-selection')?.innerText.includes('nothing selected')")
    box.locator(".dbrx-cell-L0-E3").click()
    wait_js(page, "() => document.querySelector('.dbrx-selection')?.innerText.includes('layer 0: 3')")
    assert active(page) == 1
    box.locator(".dbrx-col-E5").click()
    wait_js(page, f"() => document.querySelectorAll('.dbrx-cell.mod-active').length == {1 + n_layers}")
    assert page.locator(".dbrx-col-E5.mod-active").count() == 1
    box.locator(".dbrx-col-E5").click()
    wait_js(page, "() => document.querySelectorAll('.dbrx-cell.mod-active').length == 1")
    box.locator(".dbrx-suggest").click()
    wait_js(page, "() => document.querySelector('.dbrx-lab').innerText.includes('suggested (reroute)')",
            timeout=120_000)
    wait_js(page, "() => document.querySelectorAll('.dbrx-cell.mod-active').length == 2")

    # mode: the help text and the ablated pane's title follow
    box.locator(".dbrx-mode button", has_text="zero").click()
    wait_js(page, "() => document.querySelector('.dbrx-lab').innerText.includes('their outputs are dropped, "
                  "other weights kept')")
    assert "ablated · zero" in box.inner_text().lower()                 # (section titles are upper-cased)
    box.locator(".dbrx-mode button", has_text="reroute").click()
    wait_js(page, "() => document.querySelector('.dbrx-lab').innerText.toLowerCase().includes('ablated · reroute')")

    # sampling settings: greyed out until "sample" is ticked, then editable
    top_k = box.locator(".dbrx-top-k input")
    assert top_k.is_disabled()
    box.locator(".dbrx-sample input").click()
    wait_js(page, "() => !document.querySelector('.dbrx-top-k input').disabled")
    top_k.fill("20")
    top_k.press("Enter")
    set_slider(box, ".dbrx-temperature", "0.7")
    wait_js(page, "() => document.querySelector('.dbrx-temperature .widget-readout').innerText.trim() == '0.70'")
    set_slider(box, ".dbrx-top-p", "0.9")
    wait_js(page, "() => document.querySelector('.dbrx-top-p .widget-readout').innerText.trim() == '0.90'")
    seed = box.locator(".dbrx-seed input")
    seed.fill("3")
    seed.press("Enter")
    assert top_k.input_value() == "20" and seed.input_value() == "3"

    # Generate (sampled, many tokens) and Stop it early
    set_slider(box, ".dbrx-new-tokens", "200")
    wait_js(page, "() => document.querySelector('.dbrx-new-tokens .widget-readout').innerText.trim() == '200'")
    box.locator(".dbrx-generate").click()
    wait_js(page, "() => document.querySelectorAll('.dbrx-ablated-text .gen').length >= 3", timeout=120_000)
    assert page.locator(".dbrx-stop").is_enabled() and page.locator(".dbrx-generate").is_disabled()
    assert page.locator(".dbrx-sweep").is_disabled()
    box.locator(".dbrx-stop").click()
    wait_js(page, "() => document.querySelector('.dbrx-summary')?.innerText.includes('Stopped early')",
            timeout=120_000)
    n = len(page.locator(".dbrx-ablated-text .gen").all())
    assert n < 200, "Stop should end the generation early"
    wait_js(page, "() => !document.querySelector('.dbrx-generate').disabled")
    no_error(box)

    # greedy again, a short complete run: aligned panes, labelled summary, the aligned diff figure
    box.locator(".dbrx-sample input").click()
    wait_js(page, "() => document.querySelector('.dbrx-top-k input').disabled")
    set_slider(box, ".dbrx-new-tokens", "16")
    wait_js(page, "() => document.querySelector('.dbrx-new-tokens .widget-readout').innerText.trim() == '16'")
    box.locator(".dbrx-generate").click()
    wait_js(page, "() => { const s = document.querySelector('.dbrx-summary')?.innerText || '';"
                  " return s.includes('Teacher-forced') && !s.includes('Stopped early')"
                  " && !document.querySelector('.dbrx-generate').disabled; }", timeout=180_000)
    summary = text_of(page, ".dbrx-summary")
    assert "Free-running" in summary and "Teacher-forced on the baseline's tokens" in summary, summary
    assert "Per-step token agreement" in summary and "the baseline model gives the ablated text" in summary
    assert "intervened" not in summary
    baseline, ablated = generated_text(page, ".dbrx-baseline-text"), generated_text(page, ".dbrx-ablated-text")
    assert baseline and ablated
    if "First divergence at step" in summary:
        assert page.locator(".dbrx-ablated-text .first, .dbrx-baseline-text .first").count() >= 1
    wait_for_plots(page, 3)
    wait_js(page, "() => document.querySelector('.dbrx-fig-generation-diff .gtitle')?.textContent"
                  ".includes('baseline vs ablated')", timeout=60_000)
    titles = page.evaluate("() => [...document.querySelectorAll('.dbrx-fig-generation-diff .annotation-text')]"
                           ".map(a => a.textContent).join(' | ')")
    assert "aligned" in titles and "teacher-forced" in titles, titles
    # Generate measured usage on prompt + baseline continuation
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('baseline continuation')")
    shot(page, "04_ablation_controls_generated", box)

    # sweep: the view switches to the ablation effect, cells are painted as they come; Stop ends it
    box.locator(".dbrx-sweep").click()
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('Δ loss')", timeout=60_000)
    wait_js(page, "() => /sweep \\(reroute\\): layer 0, expert [2-9]/.test(document.querySelector('.dbrx-lab')"
                  ".innerText)", timeout=120_000)
    assert page.locator(".dbrx-generate").is_disabled() and page.locator(".dbrx-stop").is_enabled()
    box.locator(".dbrx-stop").click()
    wait_js(page, "() => document.querySelector('.dbrx-lab').innerText.includes('sweep (reroute) stopped')",
            timeout=120_000)
    assert "cells measured" in text_of(page, ".dbrx-grid-note")
    painted = page.evaluate("() => [...document.querySelectorAll('.dbrx-cell-L0-E0, .dbrx-cell-L0-E1')]"
                            ".map(b => b.innerText.trim())")
    assert all(p not in ("", "·") for p in painted), painted
    unmeasured = page.evaluate(f"() => document.querySelector('.dbrx-cell-L{n_layers - 1}-E15').innerText.trim()")
    assert unmeasured == "·"
    wait_js(page, "() => !document.querySelector('.dbrx-sweep').disabled")
    shot(page, "04_ablation_controls_sweep", box)

    # export bar (when the widget has one): the shown table is written, the note names the file
    csv = box.locator(".dbrx-export-csv")
    if csv.count():
        csv.click()
        wait_js(page, "() => document.querySelector('.dbrx-export-path')?.innerText.includes('sweep')")

    # chat: the prompt goes through the template (the panes show the ChatML prompt); the grid's numbers
    # are marked as measured before the prompt changed
    box.locator(".dbrx-chat input").click()
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('before the prompt changed')")
    set_slider(box, ".dbrx-new-tokens", "3")
    box.locator(".dbrx-generate").click()
    # (Generate empties the summary before it writes the ChatML prompt: a summary after that is this run's)
    wait_js(page, "() => document.querySelector('.dbrx-baseline-text .prompt')?.innerText.includes('<|im_start|>')"
                  " && (document.querySelector('.dbrx-summary')?.innerText || '').includes('Free-running')"
                  " && !document.querySelector('.dbrx-generate').disabled", timeout=180_000)
    # the prompt box: an edit marks the numbers stale again
    assert "before the prompt changed" not in text_of(page, ".dbrx-grid-note")
    box.locator(".dbrx-prompt textarea").fill("import numpy as np")
    wait_js(page, "() => document.querySelector('.dbrx-grid-note')?.innerText.includes('before the prompt changed')")
    no_error(box)
    shot(page, "04_ablation_controls_done", box)
