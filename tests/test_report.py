"""`dbrx-lab report`: one self-contained HTML file (plotly.js embedded once, nothing fetched) from the CLI."""
from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest

from dbrx_lab import cli
from dbrx_lab.report import make_report

PROMPT = 'Tom & Jerry said "<hi>"\nthe end'
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    code = cli.main(["report", "--model", "tiny-vocab", "--prompt", PROMPT, "--out", str(out),
                     "--max-new-tokens", "3", "--layer", "1", "--head", "2"])
    assert code == 0
    return out, out.read_text(encoding="utf-8")


def test_report_is_one_self_contained_html_file(report):
    path, page = report
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]           # no side files, no .tmp left
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1 and page.rstrip().endswith("</html>")
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1                     # the library, embedded once
    assert not re.search(r"<script[^>]*\bsrc=", page)                          # no external scripts
    assert not re.search(r"<link[^>]*\bhref=", page)                           # nor stylesheets
    assert not re.search(r"""src=["']?(https?:)?//""", page)                  # nothing loaded from the web


def test_report_has_header_and_routing_attention_usage_figures(report):
    _, page = report
    assert "tiny-vocab" in page
    assert html.escape(PROMPT) in page and PROMPT not in page                   # the prompt, escaped
    assert "prompt + 3 generated" in page and "16 experts, top-4" in page and "3 layers" in page
    for title in ("Token routing map", "Cross-layer routing", "Expert usage", "Attention pattern: layer 1, head 2",
                  "Attention patterns of layer 1"):
        assert title in page
    assert page.count("Plotly.newPlot(") == 5
    n_tokens = int(re.search(r"(\d+) prompt \+ 3 generated", page).group(1)) + 3
    assert len(re.findall(r'<span class="tok[^"]*" data-position=', page)) == n_tokens


def test_report_rejects_bad_layer_and_head(tiny_vocab_model):
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        make_report(tiny_vocab_model, "hi", layer=3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        make_report(tiny_vocab_model, "hi", head=4)


def test_report_cli_reports_errors_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert cli.main(["report", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--out", str(out)]) == 2
    assert "neither a preset" in capsys.readouterr().err and not out.exists()


@pytest.mark.browser
@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian's chromium (make test installs it)")
def test_report_renders_offline_in_chromium(report):
    sync_api = pytest.importorskip("playwright.sync_api")
    path, _ = report
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(path.as_uri())
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 5",
                                   timeout=30_000)
            assert page.locator(".plotly-graph-div").count() == 5
            assert page.locator(".dbrx-routed-text .tok").count() > 3
        finally:
            browser.close()
    assert errors == [] and requests == []
