"""Regenerate the README's expert-card screenshots (docs/img/expert_cards_*.png) from the demo model.

    .venv/bin/python scripts/card_screenshots.py [OUT_DIR]      (`make screenshots` runs it after the widgets)

Runs route-stats on the demo's evaluation texts, builds every card, writes the offline site to a temporary
folder and photographs its index and the card with the largest token-class lift (at least 50 tokens) in
headless Chromium (/usr/bin/chromium, or $DBRX_LAB_CHROMIUM) through playwright.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dbrx_lab  # noqa: E402
from dbrx_lab import analysis  # noqa: E402
from dbrx_lab.card_site import demo_texts, write_card_site  # noqa: E402


def main(out: Path | None = None) -> None:
    torch.set_num_threads(1)
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="card-shots-"))
    model = dbrx_lab.load_model("demo")
    dbrx_lab.route_stats(model, demo_texts(work / "texts.jsonl"), work / "stats", min_count=2, predictions=False,
                         progress=False)
    start = time.perf_counter()
    cards = analysis.expert_cards(work / "stats", model)
    paths = analysis.routing_paths(work / "stats", labels="class")
    top1 = analysis.routing_paths(work / "stats", labels="class", rank="top1")
    info = write_card_site(cards, work / "site", analysis.path_counts(top1), analysis.path_purity(paths))
    print(f"cards and site: {time.perf_counter() - start:.1f} s, {info['bytes'] / 1e6:.1f} MB in {info['out']}")
    best = cards.summary[cards.summary["count"] >= 50].sort_values("class_lift", ascending=False).iloc[0]
    out = Path(out) if out else ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    chromium = os.environ.get("DBRX_LAB_CHROMIUM", "/usr/bin/chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((work / "site" / "index.html").as_uri())
        page.wait_for_function("() => document.querySelector('.js-plotly-plot')?.data?.length")
        page.screenshot(path=str(out / "expert_cards_index.png"))
        page.set_viewport_size({"width": 1100, "height": 1250})
        page.goto((work / "site" / "cards" / f"L{best['layer']}-e{best['expert']}.html").as_uri())
        page.wait_for_function("() => document.querySelector('.js-plotly-plot')?.data?.length")
        page.screenshot(path=str(out / "expert_card.png"))
        browser.close()
    print(f"wrote {out / 'expert_cards_index.png'} and {out / 'expert_card.png'} ({best['card']})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
