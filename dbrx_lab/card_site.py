"""`dbrx-lab cards`: expert cards as an offline HTML site, and the HTML of one card (the widget shows it too).

    dbrx-lab cards --model demo --stats runs/demo-routing --out cards/

The site opens from the file system with no network: index.html (every card in a table that sorts by any
column and filters by token, plus the most frequent routing paths and their purity), cards/L{l}-e{e}.html
(one page per card) and one shared plotly.min.js copied from the installed plotly package. A manifest
(.dbrx-lab-cards.json) lists what was written: `--out` must be empty, missing, or an earlier cards site
(whose listed files are replaced); any other folder is refused, so nothing the user wrote is overwritten.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

__all__ = ["card_html", "context_html", "write_card_site", "demo_texts", "add_arguments", "run", "MANIFEST",
           "CARD_CSS"]

MANIFEST = ".dbrx-lab-cards.json"
MONO = "'JetBrains Mono', 'DejaVu Sans Mono', Menlo, Consolas, monospace"
CARD_CSS = f"""
.dbrx-xcard {{ font-family: Inter, 'Helvetica Neue', Arial, sans-serif; color: #222; font-size: 13px; }}
.dbrx-xcard h3 {{ font-size: 17px; margin: 2px 0 4px; color: #2F3E55; }}
.dbrx-xcard h4 {{ font-size: 12px; letter-spacing: .04em; text-transform: uppercase; color: #667; margin: 12px 0 3px; }}
.dbrx-xcard .sub {{ color: #666; font-size: 12px; }}
.dbrx-xcard table {{ border-collapse: collapse; font-size: 12px; }}
.dbrx-xcard td, .dbrx-xcard th {{ padding: 2px 8px 2px 0; border-bottom: 1px solid #EEF0F3; text-align: left; }}
.dbrx-xcard th {{ color: #667; font-weight: 600; }}
.dbrx-xcard td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.dbrx-xcard .ctx {{ font-family: {MONO}; font-size: 12px; line-height: 1.9; white-space: pre-wrap; margin: 2px 0;
  word-break: break-word; }}
.dbrx-xcard .ctx span {{ border-radius: 2px; }}
.dbrx-xcard .ctx span.top {{ outline: 2px solid #B2182B; }}
.dbrx-xcard .tok {{ font-family: {MONO}; background: #F1F3F6; border-radius: 3px; padding: 0 3px; }}
.dbrx-xcard .cols {{ display: flex; flex-wrap: wrap; gap: 10px 28px; }}
.dbrx-xcard .na {{ color: #999; }}
"""


def _token(t) -> str:
    from .figures import readable_token

    return html.escape(readable_token("" if t is None else str(t), 28))


def _num(x, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '<span class="na">–</span>'
    return format(x, fmt)


def context_html(row) -> str:
    """One top context: its window of tokens, each shaded by the expert's weight on it (the top token
    outlined); hover a token for its weight."""
    from .figures import _display_text

    peak = max(max(row["weights"]), 1e-9)
    spans = []
    for i, (t, w) in enumerate(zip(row["tokens"], row["weights"])):
        alpha = 0.85 * w / peak
        cls = ' class="top"' if i == row["center"] else ""
        spans.append(f'<span{cls} style="background:rgba(214,96,77,{alpha:.2f})" title="weight {w:.3f}">'
                     f'{html.escape(_display_text(str(t)))}</span>')
    where = f'text {row["text"]}, position {row["position"]}' + (f', {html.escape(str(row["label"]))}'
                                                                  if row.get("label") is not None else "")
    return (f'<div class="ctx" title="{where}"><b style="color:#B2182B">{row["weight"]:.3f}</b> '
            f'{"".join(spans)}</div>')


def _int(x) -> str:
    return f"{int(x):,}"


def _table(df: pd.DataFrame | None, columns: list[tuple[str, str, Callable]], empty: str) -> str:
    if df is None or df.empty:
        return f'<div class="na">{html.escape(empty)}</div>'
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    body = "".join("<tr>" + "".join(f'<td class="num">{fmt(r[c])}</td>' if fmt is not _token else
                                    f"<td>{fmt(r[c])}</td>" for c, _, fmt in columns) + "</tr>"
                   for _, r in df.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def card_html(card, partner_link: Callable[[int, int], str] | None = None, meta: dict | None = None) -> str:
    """An expert card as an HTML fragment (styles in CARD_CSS). partner_link(layer, expert) -> href (or None)
    turns partners into links (the site); without it partners are plain text."""
    s = card.stats
    meta = meta or {}
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    head = (f'<h3>Layer {card.layer} · expert {card.expert}</h3><div class="sub">routed {s["count"]:,} of '
            f'{s["tokens"]:,} tokens ({pct(s["share"])}; uniform {pct(s["baseline_share"])}, lift '
            f'{s["lift_uniform"]:.2f}) · top-1 for {s["top1_count"]:,} · mean weight when chosen '
            f'{s["mean_weight"]:.3f}, max {s["max_weight"]:.3f}</div>')
    ctx = "".join(context_html(r) for _, r in card.contexts.iterrows()) or '<div class="na">never chosen</div>'
    contexts = (f'<h4>Top activating contexts ({len(card.contexts)}; shade = this expert\'s weight on each '
                f'token at layer {card.layer}, outlined = the top token)</h4>{ctx}')
    tok = lambda df: None if df is None else df  # noqa: E731
    logit_cols = [("token", "token", _token), ("logit", "logit", lambda x: f"{x:+.3f}")]
    logits = (f'<div><h4>Promotes (mean direct logit effect, {card.dla_positions} positions)</h4>'
              f'{_table(tok(card.promoted), logit_cols, "needs the model")}</div>'
              f'<div><h4>Suppresses</h4>{_table(tok(card.suppressed), logit_cols, "needs the model")}</div>')

    def partner(e) -> str:
        label = f"L{card.layer} e{int(e)}"
        href = partner_link(card.layer, int(e)) if partner_link else None
        return f'<a href="{href}">{label}</a>' if href else label

    partners = _table(card.partners, [("expert", "partner", partner), ("count_both", "tokens together", _int),
                                      ("p_given_this", "P(partner | this)", lambda x: f"{x:.2f}"),
                                      ("lift", "lift", lambda x: f"{x:.2f}")], "no partner")
    tokens = _table(card.tokens, [("token", "token", _token), ("count", "routed", _int),
                                  ("occurrences", "seen", _int), ("share_of_token", "share", lambda x: f"{x:.0%}"),
                                  ("lift", "lift", lambda x: f"{x:.2f}")], "no token seen often enough")
    group_cols = lambda name: [(name, name, _token), ("count", "routed", _int), ("tokens", "of", _int),  # noqa: E731
                               ("share", "share", lambda x: f"{x:.1%}"), ("lift", "lift", lambda x: f"{x:.2f}")]
    classes = _table(card.classes, group_cols("class"), "")
    labels = _table(card.labels, group_cols("label"), "the data has no label field")
    a = card.ablation
    if a is None:
        ablation = '<div class="na">needs the model</div>'
    else:
        ablation = (f'<table><tr><td>mode</td><td>{a["mode"]}</td></tr><tr><td>next-token loss change at the top '
                    f'token</td><td class="num">{_num(a["delta_loss"], "+.3f")} nats (over {a["contexts"]} '
                    f'contexts; baseline {_num(a["base_loss"], ".3f")})</td></tr><tr><td>KL(baseline ‖ ablated)'
                    f'</td><td class="num">{_num(a["kl"], ".3f")} nats (over {a["runs"]})</td></tr></table>')
    if getattr(card, "audit", None):
        rows = "".join(f'<tr><td>dataset-wide, {html.escape(m)} (expert_audit)</td><td class="num">'
                       f'{_num(v["effect"], "+.4f")} nats per token [{_num(v["lo"], "+.4f")}, {_num(v["hi"], "+.4f")}]'
                       f' over {card.audit["tokens"]} tokens</td></tr>' for m, v in card.audit["effects"].items())
        ablation += f"<table>{rows}</table>"
    return (f'<div class="dbrx-xcard" data-card="{card.name}">{head}{contexts}'
            f'<div class="cols">{logits}</div>'
            f'<div class="cols"><div><h4>Co-activated partners (same layer)</h4>{partners}</div>'
            f'<div><h4>Ablation on the contexts</h4>{ablation}</div></div>'
            f'<div class="cols"><div><h4>Top tokens (share of the token\'s occurrences routed here, ranked '
            f'smoothed towards k/E)</h4>{tokens}</div>'
            f'<div><h4>Token classes</h4>{classes}</div><div><h4>Dataset labels</h4>{labels}</div></div></div>')


# ------------------------------------------------------------------------------------------------
# the site
_PAGE_CSS = """
body { margin: 0; background: #FAFAFA; } main { max-width: 1300px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font: 600 22px Inter, 'Helvetica Neue', Arial, sans-serif; margin: 0 0 4px; color: #2F3E55; }
h2 { font: 600 17px Inter, 'Helvetica Neue', Arial, sans-serif; margin: 28px 0 6px; color: #2F3E55; }
.box { background: white; border: 1px solid #E3E6EB; border-radius: 6px; padding: 10px 14px; margin: 10px 0;
  overflow-x: auto; }
p, .note { font: 13px Inter, 'Helvetica Neue', Arial, sans-serif; color: #555; }
#cards th { cursor: pointer; user-select: none; white-space: nowrap; } #cards th.sorted { color: #B2182B; }
#cards td:first-child { white-space: nowrap; }
#search { font-size: 13px; padding: 4px 8px; width: 260px; }
"""

_INDEX_JS = """
const table = document.getElementById('cards'), body = table.tBodies[0];
let sortCol = -1, asc = true;
table.querySelectorAll('th').forEach((th, i) => th.addEventListener('click', () => {
  asc = sortCol === i ? !asc : th.dataset.type !== 'num';  sortCol = i;
  table.querySelectorAll('th').forEach(h => h.classList.toggle('sorted', h === th));
  const rows = [...body.rows], num = th.dataset.type === 'num';
  rows.sort((a, b) => { let x = a.cells[i].dataset.v, y = b.cells[i].dataset.v;
    if (num) { x = x === '' ? -Infinity : +x; y = y === '' ? -Infinity : +y; return asc ? x - y : y - x; }
    return asc ? x.localeCompare(y) : y.localeCompare(x); });
  rows.forEach(r => body.appendChild(r)); }));
document.getElementById('search').addEventListener('input', e => {
  const q = e.target.value.toLowerCase();
  [...body.rows].forEach(r => r.style.display = !q || r.dataset.tokens.includes(q) ? '' : 'none'); });
"""

_SUMMARY_HEAD = [("card", "card"), ("count", "routed"), ("share", "share"), ("lift_uniform", "lift vs k/E"),
                 ("top1_count", "top-1"), ("mean_weight", "mean weight"), ("top_token", "top token"),
                 ("top_token_share", "token share"), ("top_class", "top class"), ("class_lift", "class lift"),
                 ("top_label", "top label"), ("label_lift", "label lift"), ("top_partner", "partner"),
                 ("partner_lift", "partner lift"), ("promoted", "promotes"), ("suppressed", "suppresses"),
                 ("ablation_delta", "ablation Δloss"), ("ablation_kl", "ablation KL"),
                 ("audit_effect", "audit effect")]
_TEXT_COLUMNS = ("card", "top_token", "top_class", "top_label", "promoted", "suppressed")


def _card_file(layer: int, expert: int) -> str:
    return f"cards/L{layer}-e{expert}.html"


def _page(title: str, body: str, root: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_PAGE_CSS}{CARD_CSS}</style><script src="{root}plotly.min.js"></script></head>'
            f'<body><main>{body}</main></body></html>\n')


def _figure_div(fig) -> str:
    import plotly.io as pio

    return pio.to_html(fig, include_plotlyjs=False, full_html=False, include_mathjax=False,
                       config={"displaylogo": False, "responsive": True})


def _cell(value) -> tuple[str, str]:
    """(sort key, shown text) of a summary cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", '<span class="na">–</span>'
    if isinstance(value, (float, np.floating)):
        return repr(float(value)), f"{value:.3g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value)), f"{int(value):,}"
    return html.escape(str(value).lower()), _token(value)


def _index(cards, paths_html: str) -> str:
    m = cards.meta
    head = "".join(f'<th data-type="{"text" if c in _TEXT_COLUMNS else "num"}">'
                   f"{html.escape(t)}</th>" for c, t in _SUMMARY_HEAD)
    rows = []
    for _, r in cards.summary.iterrows():
        card = cards[int(r["layer"]), int(r["expert"])]
        words = set(card.tokens["token"].astype(str)) | set(card.contexts["token"].astype(str))
        for df in (card.promoted, card.suppressed):
            if df is not None:
                words |= set(df["token"].astype(str))
        cells = []
        for c, _ in _SUMMARY_HEAD:
            key, shown = _cell(r[c])
            if c == "card":
                key, shown = f'{int(r["layer"]):04d}-{int(r["expert"]):04d}', (
                    f'<a href="{_card_file(int(r["layer"]), int(r["expert"]))}">{html.escape(r["card"])}</a>')
            cells.append(f'<td data-v="{key}">{shown}</td>')
        tokens = html.escape("\u0001".join(sorted(words)).lower(), quote=True)
        rows.append(f'<tr data-tokens="{tokens}">{"".join(cells)}</tr>')
    info = (f'{m.get("tokens", 0):,} tokens in {m.get("texts", 0):,} texts · {m.get("n_layers")} layers · '
            f'{m.get("n_experts")} experts, top-{m.get("top_k")} · source {html.escape(str(m.get("source")))} · '
            f'model {html.escape(str(m.get("model")))}')
    body = (f'<h1>Expert cards</h1><p>{info}. Click a column to sort, type a token to filter, click a card '
            f'to open it.</p><div class="box"><input id="search" placeholder="search by token (e.g. def)">'
            f'<table id="cards" class="dbrx-xcard"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            f'</tbody></table></div>{paths_html}<script>{_INDEX_JS}</script>')
    return _page("dbrx-lab expert cards", body, "")


def _paths_section(paths_table: pd.DataFrame | None, purity: pd.DataFrame | None) -> str:
    if paths_table is None:
        return ""
    from . import figures

    out = ['<h2>Routing paths</h2><p class="note">A path is the sequence of expert sets a token takes over the '
           "layers. Purity: share of tokens whose group's most common label is theirs; baseline: the same "
           "groups with the labels shuffled. Single experts (one layer's top-1 expert) and path clusters "
           "(k-medoids on the Jaccard distance of paths) make the same number of groups.</p>"]
    if purity is not None:
        cols = ["grouping", "groups", "purity", "baseline", "gain", "majority"]
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" if isinstance(r[c], str) else
                                        f'<td class="num">{r[c]:.3f}</td>' if isinstance(r[c], float) else
                                        f'<td class="num">{r[c]}</td>' for c in cols) + "</tr>"
                       for _, r in purity.iterrows())
        out.append(f'<div class="box dbrx-xcard"><b>Purity against {html.escape(purity.attrs.get("labels", "labels"))}'
                   f'</b><table><tr>{"".join(f"<th>{c}</th>" for c in cols)}</tr>{rows}</table></div>')
    out.append(f'<div class="box">{_figure_div(figures.path_sankey(paths_table))}</div>')
    return "".join(out)


def _write(path: Path, data: bytes) -> None:
    """Write atomically (a temporary name in the same folder, then rename); open() honours the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_out(out: Path) -> list[str]:
    """Files an earlier site in `out` wrote (to replace); refuses a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, empty, or an earlier cards site)")
    if not out.exists() or not any(out.iterdir()):
        return []
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"--out {out} is not empty and is not a cards site written by dbrx-lab (no {MANIFEST}); "
                         f"give a new or empty folder")
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest} is damaged ({err}); give a new or empty folder") from None
    return [f for f in listed if isinstance(f, str) and ".." not in Path(f).parts and not Path(f).is_absolute()]


def write_card_site(cards, out: str | os.PathLike, paths_table: pd.DataFrame | None = None,
                    purity: pd.DataFrame | None = None) -> dict:
    """Write the offline site for `cards` (analysis.expert_cards) to `out`; paths_table (analysis.path_counts
    or routing_paths) and purity (analysis.path_purity) add the routing-paths section. Returns
    {"out", "files", "bytes", "pages", "plotly_bytes"}."""
    import plotly
    from . import figures

    out = Path(out)
    old = _check_out(out)
    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not plotly_js.is_file():
        raise FileNotFoundError(f"the installed plotly package has no {plotly_js}; reinstall plotly")
    written: dict[str, int] = {}

    def put(rel: str, text: str | bytes) -> None:
        data = text.encode("utf-8") if isinstance(text, str) else text
        _write(out / rel, data)
        written[rel] = len(data)

    put("plotly.min.js", plotly_js.read_bytes())
    link = lambda l, e: f"L{l}-e{e}.html" if (l, e) in cards.cards else None  # noqa: E731
    for card in cards:
        parts = [f'<p><a href="../index.html">← all cards</a></p><div class="box">'
                 f'{card_html(card, link, cards.meta)}</div>']
        if card.promoted is not None:
            parts.append(f'<div class="box">{_figure_div(figures.card_logits(card))}</div>')
        put(_card_file(card.layer, card.expert), _page(f"{card.name} · dbrx-lab expert card", "".join(parts), "../"))
    put("index.html", _index(cards, _paths_section(paths_table, purity)))
    for rel in old:                                    # files of the earlier site that this one did not write
        if rel not in written and rel != MANIFEST:
            (out / rel).unlink(missing_ok=True)
    put(MANIFEST, json.dumps({"written_by": "dbrx-lab cards", "files": sorted(written) + [MANIFEST],
                              "meta": cards.meta}, indent=1, default=str) + "\n")
    return {"out": out, "files": len(written), "bytes": sum(written.values()), "pages": len(cards) + 1,
            "plotly_bytes": written["plotly.min.js"]}


def demo_texts(path: str | os.PathLike) -> Path:
    """Write the demo model's evaluation texts (dbrx_lab/data/demo_eval, never trained on) as labelled JSONL for
    route-stats: each prose paragraph and each top-level block of the Python file is a text ("prose" / "code")."""
    folder = Path(__file__).parent / "data" / "demo_eval"
    rows = [{"text": p.strip(), "label": "prose"} for p in (folder / "prose.txt").read_text().split("\n\n")
            if p.strip()]
    rows += [{"text": b.strip("\n"), "label": "code"} for b in (folder / "code.py").read_text().split("\n\n\n")
             if b.strip()]
    path = Path(path)
    _write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


# ------------------------------------------------------------------------------------------------
# CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help='the model that made the routing: "demo", a preset or a '
                                                       "checkpoint folder (logit effects and ablations)")
    parser.add_argument("--stats", required=True, help="a route-stats output folder")
    parser.add_argument("--out", required=True, help="folder for the site (new, empty, or an earlier cards site)")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    parser.add_argument("--contexts", type=int, default=8, help="top contexts per card (default 8)")
    parser.add_argument("--ablation", default="reroute", choices=["reroute", "zero", "renormalize", "none"],
                        help="ExpertAblation mode for the ablation effect (default reroute; none: skip)")
    parser.add_argument("--labels", default="class",
                        help='labels for path purity: "class" (token classes, default) or a per-token column '
                             'of the routing table, e.g. "label"')
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for models under 100M parameters, whose many small "
                             "forwards run several times slower with two threads on a shared CPU; else torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


SMALL_MODEL_PARAMS = 100_000_000


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from .analysis.cards import expert_cards
    from .analysis.paths import path_counts, path_purity, routing_paths
    from .analysis.routing import _read_meta
    from .loading import load_model

    stats = Path(args.stats)
    if not stats.is_dir():
        raise FileNotFoundError(f"--stats {stats} is not a folder; give a route-stats output folder")
    _read_meta(stats)
    _check_out(Path(args.out))                        # refuse a foreign folder before the slow part
    start = time.perf_counter()
    if args.threads is not None and (not isinstance(args.threads, int) or args.threads < 1):
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads!r}")
    model = load_model(args.model)
    if args.threads is not None or model.config.n_params < SMALL_MODEL_PARAMS:
        import torch

        torch.set_num_threads(args.threads or 1)
    cards = expert_cards(stats, model, layers=_layers(args.layers), n_contexts=args.contexts,
                         ablation=None if args.ablation == "none" else args.ablation, progress=not args.no_progress)
    purity = path_purity(routing_paths(stats, labels=args.labels))
    top1 = routing_paths(stats, labels=args.labels, rank="top1")      # top-1 paths repeat often enough to show
    info = write_card_site(cards, args.out, path_counts(top1), purity)
    print(f"wrote {info['pages']} pages ({len(cards)} cards) to {info['out']}: {info['bytes'] / 1e6:.1f} MB, of which "
          f"plotly.js {info['plotly_bytes'] / 1e6:.1f} MB; {time.perf_counter() - start:.1f} s")
    return 0
