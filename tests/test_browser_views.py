"""RoutingExplorer and AttentionExplorer in a real browser (issue #22 items 5, 6 and 7): JupyterLab on localhost
driven by headless Chromium, every control of both widgets used the way a person uses it (clicks on the plotly
maps, dropdowns, sliders by keyboard, the span control, the prompt, the chat box and Run), each checked by what
the page then shows. Plus figures rendered standalone in Chromium: axis titles never overlap tick labels, and
a long routing map opens on a window with expert numbers written in its cells.

Reuses test_browser's fixtures and helpers (JupyterLab server, Chromium, page, notebook runner). The widgets'
notebooks are written into the served folder by the tests themselves, on the bundled demo model; nothing here
depends on the demo's trained numbers, only on the structure of what is shown.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import dataclasses

import nbformat
import plotly.io as pio
import pytest
import torch

from test_browser import CHROMIUM_ARGS, SHOTS, assert_no_cell_errors, browser, lab, open_and_run, page, shot  # noqa: F401

from dbrx_lab import Trace, figures

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHAT_QUESTION = "What is the capital of France?"


def write_notebook(lab, name: str, source: str) -> str:
    """A one-cell notebook in the served folder; returns its file name."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = Path(lab["root"]) / name
    nbformat.write(nb, path)
    return name


# the token path names position n (and not n followed by more digits)
PATH_AT = "n => new RegExp('position ' + n + '(?!\\d)').test(document.querySelector('.dbrx-token-path')?.innerText || '')"


def plot_js(name: str, expr: str) -> str:
    """A JS function reading `expr` (with `g` the plotly div of the widget's figure `name`)."""
    return (f"() => {{ const g = document.querySelector('.dbrx-fig-{name}.js-plotly-plot'); "
            f"try {{ return g && ({expr}); }} catch (e) {{ return false; }} }}")          # mid-redraw: not yet


def option_values(box, selector: str) -> list[str]:
    """The values of a widget dropdown's options (ipywidgets: the option labels, with plain spaces)."""
    return box.locator(f"{selector} select option").evaluate_all("os => os.map(o => o.value)")


def wait_js(page, js: str, arg=None, timeout: int = 60_000):
    page.wait_for_function(js, arg=arg, timeout=timeout)


def text_of(page, selector: str) -> str:
    return page.evaluate(f"() => document.querySelector('{selector}')?.innerText || ''")


def click_plot(page, name: str, dx: float = 6, dy: float = 6, subplot: str | None = None) -> None:
    """Hover, then click near the top-left corner of a widget figure's plot area (plotly reports the point under
    the mouse from its hover state)."""
    sel = f".dbrx-fig-{name}.js-plotly-plot .nsewdrag" + (f'[data-subplot="{subplot}"]' if subplot else "")
    drag = page.locator(sel).first
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    page.mouse.move(box["x"] + dx, box["y"] + dy)
    page.wait_for_timeout(400)
    page.mouse.click(box["x"] + dx, box["y"] + dy)


def press_on(page, selector: str, key: str, times: int = 1) -> None:
    """Focus a slider handle and press a key (noUiSlider moves one step per arrow key)."""
    handle = page.locator(selector).first
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(times):
        handle.press(key)
        page.wait_for_timeout(150)


@contextlib.contextmanager
def shot_on_failure(page, name: str):
    """A screenshot of the page when the block fails (what the widget showed at that moment)."""
    try:
        yield
    except BaseException:
        shot(page, f"{name}_failure")
        raise


def no_widget_error(box) -> None:
    errors = box.locator(".dbrx-error-box")
    assert errors.count() == 0, errors.first.inner_text()


# --- figures rendered standalone --------------------------------------------------------------------------
OVERLAPS_JS = """() => {
  const out = [];
  for (const ax of ['x', 'y']) {
    const title = document.querySelector('.g-' + ax + 'title text');
    if (!title) continue;
    const t = title.getBoundingClientRect();
    for (const el of document.querySelectorAll('.' + ax + 'tick text')) {
      const b = el.getBoundingClientRect();
      if (!b.width) continue;
      // x: the title must lie wholly below every label; y: wholly left of every label (2 px clear)
      const clear = ax === 'x' ? t.top >= b.bottom + 2 : t.right <= b.left - 2;
      if (!clear) out.push(`${ax} title ${title.textContent} vs label ${el.textContent}`);
    }
  }
  return out;
}"""


def _trace(tokens: list[str], layers: int = 4, seed: int = 0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, 1, len(tokens), 16, generator=g)
    tr = Trace.from_routing(logits.topk(4, -1).indices, router_logits=logits, tokens=[tokens])
    T = len(tokens)
    scores = torch.randn(1, 2, T, T, generator=g).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e9)
    return dataclasses.replace(tr, attention={0: scores.softmax(-1)}, attention_heads={0: [0, 1]})


CODE = ["def", " add", "(a", ",", " b", "):\\n", "   ", " return", " a", " +", " b", "\\n", "The", " cat", "."]
CHAT = (["<|im_start|>", "system", "\\n"] + [f" word{i}" for i in range(180)] + ["<|im_end|>", "\\n", "<|im_start|>",
        "user", "\\n", "Hi", " there", "<|im_end|>", "\\n", "<|im_start|>", "assistant", "\\n", "Hello", "!"])


def test_axis_titles_clear_tick_labels_and_long_maps_open_on_a_window(browser, tmp_path):
    """Issue #22 item 6: on short and long prompts no axis title overlaps a tick label (plotly.js draws the
    titles over the labels when a horizontal colorbar has a title). Item 7: a long map opens on a 64-position
    window, its cells carry readable expert numbers, and the range slider pans it."""
    plotly_js = Path(pio.__file__).parent.parent / "package_data" / "plotly.min.js"
    short, code, chat = _trace(["Hi", " there", "!"]), _trace(CODE), _trace(CHAT)
    figs = {"map_short": figures.routing_map(short), "map_code": figures.routing_map(code),
            "map_chat": figures.routing_map(chat), "map_chat_span": figures.routing_map(chat, span=figures.chat_span(chat)),
            "attention_short": figures.attention_heatmap(short, 0, 1), "attention_code": figures.attention_heatmap(code, 0, 0)}
    ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
    p = ctx.new_page()
    try:
        for name, fig in figs.items():
            path = tmp_path / f"{name}.html"
            path.write_text(pio.to_html(fig, include_plotlyjs=False, full_html=True, div_id="g")
                            .replace("<head>", f"<head><script>{plotly_js.read_text()}</script>", 1))
            p.goto(path.as_uri())
            p.wait_for_selector("#g .main-svg")
            p.wait_for_timeout(200)
            assert p.evaluate(OVERLAPS_JS) == [], name
            shot(p, f"figure_{name}")
        # the long chat map opens on its last 64 positions, with expert numbers in the cells in view
        p.goto((tmp_path / "map_chat.html").as_uri())
        p.wait_for_selector("#g .main-svg")
        labels = p.evaluate("() => [...document.querySelectorAll('.cartesianlayer .heatmap-label text')]"
                            ".map(t => [t.textContent, parseFloat(t.style.fontSize || t.getAttribute('font-size'))])")
        assert len(labels) >= 4 * 60, len(labels)                        # 4 layers x the 64 positions in view
        assert all(s.isdigit() and 0 <= int(s) < 16 for s, _ in labels) and min(f for _, f in labels) >= 8
        before = p.evaluate("() => document.getElementById('g')._fullLayout.xaxis.range[0]")
        assert before == pytest.approx(len(CHAT) - 64 - 0.5)
        box = p.locator(".rangeslider-slidebox").bounding_box()
        p.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        p.mouse.down()
        p.mouse.move(box["x"] + box["width"] / 2 - 300, box["y"] + box["height"] / 2, steps=8)
        p.mouse.up()
        after = p.evaluate("() => document.getElementById('g')._fullLayout.xaxis.range[0]")
        assert after < before - 20, (before, after)                     # panned left by the slider
        shot(p, "figure_map_chat_panned")
    finally:
        ctx.close()


# --- RoutingExplorer ------------------------------------------------------------------------------------------
ROUTING_NB = f"""import dbrx_lab
from dbrx_lab.widgets import RoutingExplorer
model = dbrx_lab.load_model("demo")
explorer = RoutingExplorer(model, prompt={CHAT_QUESTION!r}, chat=True)
explorer"""


def test_routing_explorer_every_control(page, lab):
    with shot_on_failure(page, "views_routing"):
        _routing_explorer_every_control(page, lab)


def _routing_explorer_every_control(page, lab) -> None:
    nb = write_notebook(lab, "views_routing.ipynb", ROUTING_NB)
    open_and_run(page, lab, nb)
    assert_no_cell_errors(page, nb)
    box = page.locator(".dbrx-lab").first
    wait_js(page, plot_js("routing-map", "g.data && g.data.length && g.querySelector('.main-svg')"), timeout=120_000)
    n_shown = "g.data[0].x.length"

    # a chat opens on the user message and the reply: a few dozen positions of ~200, the last one selected
    mode = box.locator(".dbrx-span-mode select")
    assert mode.input_value() == "user message + reply"
    shown = page.evaluate(plot_js("routing-map", "g.data[0].x.map(Number)"))
    total = int(box.locator(".dbrx-status").inner_text().split()[0])                       # "N tokens · ..."
    assert len(shown) < 40 < total and shown == list(range(shown[0], shown[-1] + 1)) and shown[-1] == total - 1
    assert page.evaluate(PATH_AT, shown[-1])
    shot(page, "views_routing_chat_span", box)

    # a click on the top-left cell selects the span's first token at layer 0
    click_plot(page, "routing-map")
    wait_js(page, PATH_AT, shown[0])

    # the token dropdown
    box.locator(".dbrx-token select").select_option(index=3)
    wait_js(page, PATH_AT, shown[3])

    # the layer slider (keyboard on its handle): the routed text and the path's current row follow
    press_on(page, ".dbrx-layer .noUi-handle", "ArrowRight")
    wait_js(page, "() => document.querySelector('.dbrx-routed-text').innerText.includes('layer 1 ')")
    assert page.evaluate("() => document.querySelector('.dbrx-token-path tr[style*=\"font-weight\"] td').innerText") == "L1"

    # top-1 / top-k toggle
    box.locator(".dbrx-view button", has_text="top-1").click()
    wait_js(page, "() => document.querySelector('.dbrx-token-path').innerText.includes('top-1 expert (width')")
    box.locator(".dbrx-view button", has_text="top-k").click()
    wait_js(page, "() => /top-\\d+ experts \\(width/.test(document.querySelector('.dbrx-token-path').innerText)")

    # span: all tokens (the map windows them, with a range slider), then a custom range by the slider's keys
    mode.select_option("all tokens")
    wait_js(page, plot_js("routing-map", f"{n_shown} === {total}"))
    assert page.evaluate(plot_js("routing-map", "!!g.querySelector('.rangeslider-slidebox')"))
    assert page.evaluate(PATH_AT, shown[3])                                                # selection kept
    mode.select_option("custom range")
    rng = box.locator(".dbrx-span-range")
    rng.wait_for(state="visible", timeout=30_000)
    press_on(page, ".dbrx-span-range .noUi-handle-lower", "ArrowRight", times=3)
    wait_js(page, plot_js("routing-map", f"g.data[0].x[0] == {shown[0] + 3}"))
    press_on(page, ".dbrx-span-range .noUi-handle-upper", "ArrowLeft", times=2)
    wait_js(page, plot_js("routing-map", f"g.data[0].x[g.data[0].x.length - 1] == {total - 3}"))
    options = box.locator(".dbrx-token select option")
    assert options.count() == total - 3 - (shown[0] + 3) + 1
    no_widget_error(box)
    shot(page, "views_routing_custom_span", box)

    # the prompt, the chat box and Run: a plain prompt has no chat span and shows all its tokens
    box.locator("textarea").fill("import os")
    box.locator(".widget-checkbox input").uncheck()
    box.locator(".dbrx-run").click()
    wait_js(page, plot_js("routing-map", f"{n_shown} === 2"))
    wait_js(page, "() => ![...document.querySelectorAll('.dbrx-span-mode option')].some(o => o.textContent.includes('user'))")
    assert page.evaluate(PATH_AT, 1)
    no_widget_error(box)


# --- AttentionExplorer ------------------------------------------------------------------------------------------
ATTENTION_NB = f"""import dbrx_lab
from dbrx_lab.widgets import AttentionExplorer
model = dbrx_lab.load_model("demo")
explorer = AttentionExplorer(model, prompt={CHAT_QUESTION!r}, chat=True, layers=[0, model.config.n_layers - 1])
explorer"""


def test_attention_explorer_every_control(page, lab):
    with shot_on_failure(page, "views_attention"):
        _attention_explorer_every_control(page, lab)


def _attention_explorer_every_control(page, lab) -> None:
    nb = write_notebook(lab, "views_attention.ipynb", ATTENTION_NB)
    open_and_run(page, lab, nb)
    assert_no_cell_errors(page, nb)
    box = page.locator(".dbrx-lab").first
    for name in ("attention-head", "attention-grid"):
        wait_js(page, plot_js(name, "g.data && g.data.length && g.querySelector('.main-svg')"), timeout=120_000)
    row = lambda: text_of(page, ".dbrx-attention-row")                                     # noqa: E731
    row_has = "t => (document.querySelector('.dbrx-attention-row')?.innerText || '').includes(t)"

    # a chat opens on the user message and the reply, as queries and keys
    labels = page.evaluate(plot_js("attention-head", "g.data[0].y"))
    first, last = (int(labels[i].rsplit("·", 1)[1]) for i in (0, -1))
    total = int(box.locator(".dbrx-status").inner_text().split()[0])
    assert len(labels) < 40 < total and last == total - 1 and f"query {last} " in row()
    shot(page, "views_attention_chat_span", box)

    # a click on the pattern's first row selects that query; a click on head 1's panel selects head 1
    click_plot(page, "attention-head")
    wait_js(page, row_has, f"query {first} ")
    click_plot(page, "attention-grid", subplot="x2y2")
    wait_js(page, row_has, f"head 1 · query {first} ")

    # head, query and layer dropdowns
    head = option_values(box, ".dbrx-head")[-1]                                 # "head H-1"
    box.locator(".dbrx-head select").select_option(head)
    wait_js(page, row_has, f"{head} · ")
    wait_js(page, "t => (document.querySelector('.dbrx-fig-attention-head .gtitle')?.textContent || '').includes(t)",
            f"{head} (")
    box.locator(".dbrx-query select").select_option(index=4)
    wait_js(page, row_has, f"query {first + 4} ")
    layer = option_values(box, ".dbrx-layer")[-1]                               # "layer L-1"
    box.locator(".dbrx-layer select").select_option(layer)
    wait_js(page, row_has, f"{layer} · {head} · query {first + 4} ")

    # span: all tokens, then a custom range by the slider's keys
    mode = box.locator(".dbrx-span-mode select")
    mode.select_option("all tokens")
    wait_js(page, plot_js("attention-head", f"g.data[0].y.length === {total}"))
    wait_js(page, plot_js("attention-grid", f"g.data[0].y.length === {total}"))
    mode.select_option("custom range")
    box.locator(".dbrx-span-range").wait_for(state="visible", timeout=30_000)
    press_on(page, ".dbrx-span-range .noUi-handle-lower", "ArrowRight", times=2)
    wait_js(page, plot_js("attention-head", f"g.data[0].y[0].endsWith('·{first + 2}')"))
    press_on(page, ".dbrx-span-range .noUi-handle-upper", "ArrowLeft", times=1)
    wait_js(page, plot_js("attention-head", f"g.data[0].y[g.data[0].y.length - 1].endsWith('·{total - 2}')"))
    wait_js(page, row_has, f"query {first + 4} ")                                # still inside: kept
    no_widget_error(box)
    shot(page, "views_attention_custom_span", box)

    # prompt, chat box and Run
    box.locator("textarea").fill("The cat sat")
    box.locator(".widget-checkbox input").uncheck()
    box.locator(".dbrx-run").click()
    wait_js(page, plot_js("attention-head", "g.data[0].y.length === 3"))
    wait_js(page, row_has, "query 2 ")
    assert option_values(box, ".dbrx-span-mode") == ["all tokens", "custom range"]       # no chat span
    no_widget_error(box)
