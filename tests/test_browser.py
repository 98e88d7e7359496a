"""The notebooks in a real browser: JupyterLab on localhost, driven by headless Chromium (Debian's package)
through playwright.

Opens the ablation lab notebook, runs all cells, waits for the widgets and plotly figures, toggles an
expert, presses Generate and checks that an ablated generation streams in and differs from the baseline;
checks that notebooks 01 and 02 render their figures and widgets; drives the card browser of notebook 08. Screenshots go to
test-artifacts/screenshots/ (gitignored). Needs /usr/bin/chromium (apt: chromium) and the playwright
Python package; playwright's own browser download is not used.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("DBRX_LAB_CHROMIUM", "/usr/bin/chromium"))
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
RUN_TIMEOUT_MS = 240_000          # a notebook's cells (2 CPU cores, cold imports)

if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: install it (Debian/Ubuntu: apt-get install chromium; macOS: brew install "
                "--cask chromium, then DBRX_LAB_CHROMIUM=/Applications/Chromium.app/Contents/MacOS/Chromium) or set "
                "DBRX_LAB_CHROMIUM to a Chromium executable", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (pip install -e '.[dev]')")

# JupyterLab settings for a quiet, fully rendered notebook: no news / update pop-ups, and every cell kept in
# the DOM (windowed rendering detaches off-screen outputs, which would hide figures from the checks).
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a random free port with a random token, serving a copy of notebooks/."""
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name, value in SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(home / 'jupyterlab.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail("JupyterLab did not answer within 120 s")
            time.sleep(0.5)
    yield {"url": url, "token": token, "root": root}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def _shutdown_kernels(lab) -> None:
    """Stop every kernel of the server (each test's notebook ran one), freeing the CPU for the next test."""
    api = f"{lab['url']}/api/kernels"
    headers = {"Authorization": f"token {lab['token']}"}
    with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10) as r:
        kernels = json.load(r)
    for k in kernels:
        req = urllib.request.Request(f"{api}/{k['id']}", method="DELETE", headers=headers)
        urllib.request.urlopen(req, timeout=30).close()


@pytest.fixture
def page(browser, lab):
    context = browser.new_context(viewport={"width": 1440, "height": 2400}, device_scale_factor=1)
    p = context.new_page()
    p.console_errors = []
    p.on("console", lambda m: p.console_errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: p.console_errors.append(str(e)))
    yield p
    context.close()
    _shutdown_kernels(lab)


def shot(page, name: str, locator=None) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    (locator or page).screenshot(path=str(path))
    return path


def open_and_run(page, lab, notebook: str) -> None:
    """Open a notebook, wait for its kernel, run all cells and wait until every code cell has run."""
    workspace = notebook.removesuffix(".ipynb")              # a fresh workspace: only this notebook open
    page.goto(f"{lab['url']}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=120_000)
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=120_000)   # status bar
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    try:
        page.wait_for_function(
            """() => {
                const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')];
                return cells.length > 0 && cells.every(c => /\\[\\d+\\]/.test(
                    c.querySelector('.jp-InputArea-prompt')?.textContent || ''));
            }""", timeout=RUN_TIMEOUT_MS)
    except sync_api.TimeoutError:
        shot(page, f"{notebook.removesuffix('.ipynb')}_timeout")
        raise


def assert_no_cell_errors(page, notebook: str) -> None:
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, f"{notebook}: a cell raised:\n{errors.first.inner_text()[:2000]}"
    widget_errors = page.locator(".dbrx-error-box")
    assert widget_errors.count() == 0, f"{notebook}: a widget shows an error:\n{widget_errors.first.inner_text()}"


def wait_for_plots(page, n: int) -> int:
    """Wait until at least n plotly figures have drawn (an svg with data in it)."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.data && p.data.length"
        f" && p.querySelector('.main-svg')).length >= {n}", timeout=120_000)
    return page.evaluate("() => document.querySelectorAll('.js-plotly-plot').length")


def generated_text(page, selector: str) -> str:
    return page.evaluate(f"() => [...document.querySelectorAll('{selector} .gen')].map(s => s.textContent).join('')")


def test_ablation_lab_generates_and_diverges(page, lab):
    open_and_run(page, lab, "04_ablation_lab.ipynb")
    assert_no_cell_errors(page, "04_ablation_lab.ipynb")
    lab_box = page.locator(".dbrx-lab").first
    lab_box.wait_for(timeout=60_000)
    page.locator(".dbrx-generate").wait_for(timeout=60_000)
    shot(page, "04_ablation_lab_ready", lab_box)

    # the suggested cells are on; toggle one more expert off (an unselected cell of the last layer)
    selected = page.locator(".dbrx-cell.mod-active")
    assert selected.count() >= 1, "the lab should start with suggested experts selected"
    before = selected.count()
    free = page.locator(".dbrx-cell:not(.mod-active)").last
    free.scroll_into_view_if_needed()
    free.click()
    page.wait_for_function(f"() => document.querySelectorAll('.dbrx-cell.mod-active').length == {before + 1}",
                           timeout=10_000)

    page.locator(".dbrx-generate").click()
    # tokens stream in while it runs; Stop is enabled meanwhile
    page.wait_for_function("() => document.querySelectorAll('.dbrx-ablated-text .gen').length >= 1",
                           timeout=120_000)
    page.wait_for_selector(".dbrx-summary .dbrx-card", timeout=180_000)
    wait_for_plots(page, 3)                                   # diff + cascade (+ the notebook's own figure)
    assert page.locator(".dbrx-error-box").count() == 0, page.locator(".dbrx-error-box").first.inner_text()
    baseline = generated_text(page, ".dbrx-baseline-text")
    ablated = generated_text(page, ".dbrx-ablated-text")
    assert baseline and ablated, "both generations should have appeared"
    assert ablated != baseline, f"the ablated generation should differ from the baseline: {baseline!r}"
    assert page.locator(".dbrx-ablated-text .diff").count() >= 1
    summary = page.locator(".dbrx-summary").inner_text()
    assert "First divergence at step" in summary, summary
    assert page.locator(".dbrx-generate").is_enabled()
    assert page.locator(".dbrx-stop").is_disabled()
    shot(page, "04_ablation_lab_result", lab_box)
    page.locator(".dbrx-fig-generation-diff").scroll_into_view_if_needed()
    shot(page, "04_ablation_lab_viewport")


@pytest.mark.parametrize("notebook, min_plots", [("01_quickstart.ipynb", 2), ("02_expert_routing.ipynb", 5),
                                                 ("03_attention_maps.ipynb", 4)])
def test_notebook_renders_figures(page, lab, notebook, min_plots):
    open_and_run(page, lab, notebook)
    assert_no_cell_errors(page, notebook)
    n = wait_for_plots(page, min_plots)
    assert n >= min_plots
    widgets = page.locator(".dbrx-lab")
    widgets.first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    stem = notebook.removesuffix(".ipynb")
    for i in range(widgets.count()):
        widgets.nth(i).scroll_into_view_if_needed()
        shot(page, f"{stem}_widget{i}", widgets.nth(i))
    plots = page.locator(".js-plotly-plot")
    plots.first.scroll_into_view_if_needed()
    shot(page, f"{stem}_first_figure", plots.first)
    if notebook.startswith("02"):
        check_dashboard_views(page, stem)
    real_errors = [e for e in page.console_errors if "favicon" not in e]
    assert not [e for e in real_errors if "Failed to load model class" in e or "anywidget" in e.lower()], real_errors


def check_dashboard_views(page, stem: str) -> None:
    """Click through the dashboard's views: each draws its figure (its title changes), without an error."""
    dash = page.locator(".dbrx-lab", has=page.locator(".dbrx-dashboard-view")).first
    for view, title in [("Co-activation", "co-activation"), ("Repetition", "repetition"),
                        ("Specialization", "specialization"), ("Flow", "Cross-layer"), ("Usage", "Expert usage")]:
        dash.locator(".dbrx-dashboard-view button", has_text=view).click()
        page.wait_for_function(
            "t => document.querySelector('.dbrx-fig-dashboard .js-plotly-plot .gtitle')?.textContent.includes(t)",
            arg=title, timeout=30_000)
        assert dash.locator(".dbrx-error-box").count() == 0, dash.locator(".dbrx-error-box").inner_text()
        shot(page, f"{stem}_dashboard_{view.lower()}", dash)


def test_routing_explorer_click_follows_token(page, lab):
    """Clicking a cell of the routing map (a plotly FigureWidget through anywidget) selects that token."""
    open_and_run(page, lab, "01_quickstart.ipynb")
    explorer = page.locator(".dbrx-lab").first
    explorer.wait_for(timeout=60_000)
    fig = page.locator(".dbrx-fig-routing-map.js-plotly-plot")           # the FigureWidget (anywidget) view
    fig.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('.dbrx-fig-routing-map.js-plotly-plot')?.data?.length",
                           timeout=60_000)
    before = page.locator(".dbrx-token-path").inner_text()
    # click the first heatmap cell: position 0 at layer 0 (the plot area's top-left corner); plotly reports
    # the point under the mouse from its hover state, so hover first
    fig.scroll_into_view_if_needed()
    box = fig.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + 10, box["y"] + 10)
    page.wait_for_timeout(500)
    page.mouse.click(box["x"] + 10, box["y"] + 10)
    page.wait_for_function("() => document.querySelector('.dbrx-token-path').innerText.includes('position 0')",
                           timeout=30_000)
    after = page.locator(".dbrx-token-path").inner_text()
    assert after != before
    shot(page, "01_routing_explorer_clicked", explorer)

    # a new prompt runs in a background thread and redraws the map (FigureWidget updated from the thread)
    explorer.locator("textarea").fill("import os")
    explorer.locator(".dbrx-run").click()
    page.wait_for_function("() => document.querySelector('.dbrx-fig-routing-map.js-plotly-plot')"
                           "?.data?.[0]?.z?.[0]?.length === 2", timeout=60_000)
    page.wait_for_function("() => document.querySelector('.dbrx-token-path').innerText.includes('position 1')",
                           timeout=30_000)
    assert explorer.locator(".dbrx-error-box").count() == 0


def _click_cell(page, drag, dx: float = 4, dy: float = 4) -> None:
    """Hover, then click near the top-left of a plotly subplot (plotly reports the hovered point)."""
    drag.scroll_into_view_if_needed()
    box = drag.bounding_box()
    page.mouse.move(box["x"] + dx, box["y"] + dy)
    page.wait_for_timeout(400)
    page.mouse.click(box["x"] + dx, box["y"] + dy)


def test_attention_explorer_clicks_select_query_and_head(page, lab):
    """Issue #22 item 5: clicking a query row of the pattern or a head in the grid (plotly sends category
    labels "token·position") selects that query and head, with no error box."""
    open_and_run(page, lab, "03_attention_maps.ipynb")
    explorer = page.locator(".dbrx-lab").first
    explorer.wait_for(timeout=60_000)
    for name in ("attention-head", "attention-grid"):
        page.wait_for_function(f"() => document.querySelector('.dbrx-fig-{name}.js-plotly-plot')?.data?.length",
                               timeout=60_000)
    row_has = "t => (document.querySelector('.dbrx-attention-row')?.innerText || '').includes(t)"
    assert not page.evaluate(row_has, "query 0 ")                         # the last query is selected first
    _click_cell(page, page.locator(".dbrx-fig-attention-head.js-plotly-plot .nsewdrag").first)   # query row 0
    page.wait_for_function(row_has, arg="query 0 ", timeout=30_000)
    _click_cell(page, page.locator('.dbrx-fig-attention-grid.js-plotly-plot .nsewdrag[data-subplot="x2y2"]'))
    page.wait_for_function(row_has, arg="head 1 · query 0 ", timeout=30_000)                   # head 1's panel
    assert explorer.locator(".dbrx-error-box").count() == 0
    shot(page, "03_attention_explorer_clicked", explorer)


def test_card_browser_search_sort_pick_and_partner(page, lab):
    """Notebook 08's card browser: every handler driven from the browser (token search, sort column, order
    toggle, picking a card in the list, a partner button) changes what the widget shows."""
    open_and_run(page, lab, "08_expert_cards.ipynb")
    assert_no_cell_errors(page, "08_expert_cards.ipynb")
    wait_for_plots(page, 3)                                   # card logits, path Sankey (+ the browser's pane)
    box = page.locator(".dbrx-lab", has=page.locator(".dbrx-card-list")).first
    box.wait_for(timeout=60_000)
    view = box.locator(".dbrx-card-view")
    page.wait_for_function("() => document.querySelector('.dbrx-card-view [data-card]')", timeout=60_000)
    shot(page, "08_card_browser", box)
    listing = box.locator(".dbrx-card-list select")
    assert listing.locator("option").count() == 64

    def shown() -> str:
        return view.locator("[data-card]").get_attribute("data-card")

    def first_option() -> str:
        return listing.locator("option").first.inner_text()

    # sort by another column, then flip the order: the first listed card changes
    before = first_option()
    box.locator(".dbrx-card-sort select").select_option("count")
    page.wait_for_function("t => document.querySelector('.dbrx-card-list option')?.textContent !== t",
                           arg=before, timeout=30_000)
    by_count = first_option()
    box.locator(".dbrx-card-order").click()
    page.wait_for_function("t => document.querySelector('.dbrx-card-list option')?.textContent !== t",
                           arg=by_count, timeout=30_000)
    # pick the last listed card: the card view follows
    last = listing.locator("option").last
    name = last.inner_text().split()[0] + " " + last.inner_text().split()[1]
    listing.select_option(index=listing.locator("option").count() - 1)
    page.wait_for_function("n => document.querySelector('.dbrx-card-view [data-card]')?.dataset.card === n",
                           arg=name, timeout=30_000)
    # a partner button opens the partner's card (once the new card's buttons are drawn)
    partner = box.locator(f".dbrx-partner-of-{name.replace(' ', '-')}:not([disabled])").first
    partner.wait_for(timeout=30_000)
    target = " ".join(partner.inner_text().split()[:2])
    partner.click()
    page.wait_for_function("n => document.querySelector('.dbrx-card-view [data-card]')?.dataset.card === n",
                           arg=target, timeout=30_000)
    assert shown() == target
    # token search (sent on Enter) narrows the list to the cards that mention the token
    search = box.locator(".dbrx-card-search input")
    search.fill("def")
    search.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.dbrx-card-list option').length < 64", timeout=30_000)
    assert "mention" in box.inner_text() and box.locator(".dbrx-error-box").count() == 0
    shot(page, "08_card_browser_partner", box)
