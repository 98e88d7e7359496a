"""`make screenshots`: redraw the README's pictures (docs/img/*.png) from the real widgets in a real browser.

    .venv/bin/python scripts/screenshots.py [--only routing_explorer ...] [--no-cards] [--out docs/img]

Starts JupyterLab on a temporary copy of notebooks/ (the tracked notebooks are never opened), runs each
widget's notebook in headless Chromium (/usr/bin/chromium, or $DBRX_LAB_CHROMIUM) through playwright, and
photographs the widget: RoutingExplorer (01), ExpertUsageDashboard (02), AttentionExplorer (03), AblationLab
(04, after one ablated generation), CardBrowser (08); then scripts/card_screenshots.py draws the offline card
site (expert_cards_index.png, expert_card.png). The test suite never writes tracked files; this script is the
only thing that writes docs/img, and only the file names listed here. 13.5 minutes on a busy 2-core machine
(widgets ~9, card site ~4).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("DBRX_LAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SETTINGS = {   # no news pop-ups; every cell kept in the DOM (windowed rendering detaches off-screen outputs)
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
RUN_TIMEOUT_MS = 420_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a temporary copy of notebooks/, random port and token; stopped on exit."""

    def __enter__(self):
        self.home = Path(tempfile.mkdtemp(prefix="dbrx-lab-shots-"))
        self.root = self.home / "notebooks"
        shutil.copytree(ROOT / "notebooks", self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        for name, value in SETTINGS.items():
            path = self.home / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.port, self.token = _free_port(), secrets.token_hex(16)
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(self.home / "settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.home / "workspaces"),
                   JUPYTER_RUNTIME_DIR=str(self.home / "runtime"), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=",
               "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(self.home / "jupyterlab.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}: see {self.home / 'jupyterlab.log'}")
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError("JupyterLab did not answer within 180 s") from None
                time.sleep(0.5)

    def shutdown_kernels(self) -> None:
        api, headers = f"{self.url}/api/kernels", {"Authorization": f"token {self.token}"}
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10) as r:
            kernels = json.load(r)
        for k in kernels:
            urllib.request.urlopen(urllib.request.Request(f"{api}/{k['id']}", method="DELETE", headers=headers),
                                   timeout=30).close()

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


def open_and_run(page, lab: Lab, notebook: str) -> None:
    """Open a notebook in a fresh workspace, run all cells, wait until every code cell has run without error."""
    workspace = notebook.removesuffix(".ipynb")
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={lab.token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=180_000)
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=180_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => {
            const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')];
            return cells.length > 0 && cells.every(c => /\\[\\d+\\]/.test(
                c.querySelector('.jp-InputArea-prompt')?.textContent || ''));
        }""", timeout=RUN_TIMEOUT_MS)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    if errors.count():
        raise RuntimeError(f"{notebook}: a cell raised:\n{errors.first.inner_text()[:2000]}")


def wait_for_figures(page, box) -> None:
    """Every plotly figure inside the widget has drawn, then a moment for fonts and transitions."""
    box.wait_for(timeout=120_000)
    page.wait_for_function(
        "el => { const p = [...el.querySelectorAll('.js-plotly-plot')];"
        " return p.length > 0 && p.every(f => f.data && f.data.length && f.querySelector('.main-svg')); }",
        arg=box.element_handle(), timeout=120_000)
    page.wait_for_timeout(1500)


def widget(page, marker: str | None = None):
    """The first widget box (.dbrx-lab), or the first one holding `marker`."""
    boxes = page.locator(".dbrx-lab")
    return (boxes.filter(has=page.locator(marker)) if marker else boxes).first


def shoot_routing_explorer(page):
    box = widget(page)
    wait_for_figures(page, box)
    drag = page.locator(".dbrx-fig-routing-map.js-plotly-plot .nsewdrag").first   # select a token: its path shows
    drag.scroll_into_view_if_needed()
    b = drag.bounding_box()
    page.mouse.move(b["x"] + b["width"] * 0.3, b["y"] + 10)
    page.wait_for_timeout(400)
    page.mouse.click(b["x"] + b["width"] * 0.3, b["y"] + 10)
    page.wait_for_timeout(1500)
    page.mouse.move(0, 0)
    page.wait_for_timeout(2500)                         # the plotly mode bar fades out
    return box


def shoot_dashboard(page):
    box = widget(page, ".dbrx-dashboard-view")
    wait_for_figures(page, box)
    return box


def shoot_attention(page):
    box = widget(page)
    wait_for_figures(page, box)
    return box


def shoot_ablation(page):
    box = widget(page, ".dbrx-generate")
    box.wait_for(timeout=120_000)
    page.locator(".dbrx-generate").click()
    page.wait_for_selector(".dbrx-summary .dbrx-card", timeout=300_000)
    wait_for_figures(page, box)
    return box


def shoot_card_browser(page):
    box = widget(page, ".dbrx-card-list")
    page.wait_for_function("() => document.querySelector('.dbrx-card-view [data-card]')", timeout=120_000)
    wait_for_figures(page, box)
    return box


# name (docs/img/<name>.png), notebook, function returning the widget's locator once it shows what to show,
# the picture's largest height in pixels (the top of a taller widget)
SHOTS = [
    ("routing_explorer", "01_quickstart.ipynb", shoot_routing_explorer, 2000),
    ("expert_usage_dashboard", "02_expert_routing.ipynb", shoot_dashboard, 2000),
    ("attention_explorer", "03_attention_maps.ipynb", shoot_attention, 2000),
    ("ablation_lab", "04_ablation_lab.ipynb", shoot_ablation, 2000),
    ("card_browser", "08_expert_cards.ipynb", shoot_card_browser, 1250),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [s[0] for s in SHOTS]
    parser.add_argument("--only", nargs="+", choices=names, help="only these widget pictures")
    parser.add_argument("--no-cards", action="store_true", help="skip the card-site pictures (card_screenshots.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNGs (docs/img)")
    opts = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"error: no Chromium at {CHROMIUM}: install it (Debian/Ubuntu: apt-get install chromium; macOS: brew "
              "install --cask chromium) or set DBRX_LAB_CHROMIUM to a Chromium executable", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    opts.out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in SHOTS if not opts.only or s[0] in opts.only]
    with Lab() as lab, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        for name, notebook, shoot, max_height in todo:
            start = time.perf_counter()
            context = browser.new_context(viewport={"width": 1280, "height": 2400}, device_scale_factor=1)
            page = context.new_page()
            try:
                open_and_run(page, lab, notebook)
                box = shoot(page)
                error = box.locator(".dbrx-error-box")
                if error.count():
                    raise RuntimeError(f"{name}: the widget shows an error: {error.first.inner_text()}")
                path = opts.out / f"{name}.png"
                box.evaluate("e => e.scrollIntoView({block: 'start'})")
                page.wait_for_timeout(500)
                b = box.bounding_box()           # JupyterLab scrolls inside its panel: viewport = page coordinates
                page.screenshot(path=str(path), clip={"x": b["x"], "y": b["y"], "width": b["width"],
                                                      "height": min(b["height"], max_height, 2400 - b["y"])})
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                      f"({notebook}, {time.perf_counter() - start:.0f} s)", flush=True)
            finally:
                context.close()
                lab.shutdown_kernels()
        browser.close()
    if not opts.no_cards and not opts.only:
        runpy.run_path(str(ROOT / "scripts" / "card_screenshots.py"))["main"](opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
