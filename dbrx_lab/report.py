"""`dbrx-lab report`: one self-contained HTML page of routing, attention and expert usage for a prompt.

For headless servers: run the model once on the prompt (optionally generating), then write a single HTML
file with plotly.js embedded once (no network needed to open it) and a small header (model, prompt,
tokens, config).

    dbrx-lab report --model demo --prompt "The capital of France is" --out report.html
"""
from __future__ import annotations

import argparse
import datetime
import html
import os
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from . import figures

__all__ = ["add_arguments", "run", "make_report", "write_report"]

PLOTLY_CONFIG = {"displaylogo": False, "responsive": False}

_CSS = """
body { font-family: Inter, 'Helvetica Neue', Arial, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1500px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 6px; border-bottom: 1px solid #ddd;
padding-bottom: 4px; }
.sub { color: #666; font-size: 13px; margin-bottom: 16px; }
.note { color: #555; font-size: 13px; margin: 2px 0 10px; max-width: 1000px; }
.card { background: white; border: 1px solid #e3e3e3; border-radius: 6px; padding: 12px 16px; margin: 10px 0;
overflow-x: auto; }
table.meta { border-collapse: collapse; font-size: 13px; }
table.meta td { padding: 3px 14px 3px 0; vertical-align: top; } table.meta td:first-child { color: #666; }
pre.prompt { white-space: pre-wrap; font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 13px;
background: #f4f4f4; padding: 8px 10px; border-radius: 4px; margin: 0; max-height: 240px; overflow-y: auto; }
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo",
                        help='"demo" (default), a preset (tiny-vocab, tiny, bench, ...) or a checkpoint folder')
    parser.add_argument("--prompt", required=True, help="the text to run through the model")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=0,
                        help="also generate this many tokens (greedy) and include them (default 0)")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer for the coloured text and the attention patterns (default: the middle layer)")
    parser.add_argument("--head", type=int, default=0, help="head shown large (default 0)")
    parser.add_argument("--max-attention-tokens", type=int, default=96,
                        help="attention figures show the last this many tokens (default 96)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="device for the whole model, e.g. cuda:0 (default cpu)")
    parser.add_argument("--device-map", default=None, help='accelerate device map for big checkpoints, e.g. "auto"')
    parser.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights (default 0)")


def run(args: argparse.Namespace) -> int:
    from .loading import load_model

    model = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map, seed=args.seed)
    prompt: Any = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    path = write_report(args.out, model, prompt, model_name=str(args.model), layer=args.layer, head=args.head,
                        max_new_tokens=args.max_new_tokens, max_attention_tokens=args.max_attention_tokens)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def write_report(path: str | os.PathLike, model, prompt, **kwargs) -> Path:
    """make_report(model, prompt, **kwargs) written to `path` (parent folders created, replaced atomically)."""
    path = Path(path)
    page = make_report(model, prompt, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def make_report(model, prompt, model_name: str | None = None, layer: int | None = None, head: int = 0,
                max_new_tokens: int = 0, max_attention_tokens: int = 96) -> str:
    """Run `model` once on `prompt` (a string or chat messages; generating max_new_tokens greedily when > 0)
    recording routing at every layer and attention at `layer` (default: the middle one), and return the
    report page as one HTML string with plotly.js embedded once."""
    from .trace import Record

    cfg = model.config
    layer = cfg.n_layers // 2 if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"--layer must be in [0, {cfg.n_layers - 1}], got {layer!r}")
    if not isinstance(head, int) or not 0 <= head < cfg.n_heads:
        raise ValueError(f"--head must be in [0, {cfg.n_heads - 1}], got {head!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(prompt, str) and not prompt:
        raise ValueError("--prompt is empty: give some text")
    record = Record(router=True, attention=[layer])
    if max_new_tokens:
        _, trace = model.generate_with_trace(prompt, max_new_tokens=max_new_tokens, record=record)
    else:
        _, trace = model.run_with_trace(prompt, record=record)

    sections = [
        ("Routing", "Each token on the colour of its top-1 expert at layer "
                    f"{layer}; hover a token for its top-{cfg.moe_top_k} experts, their weights and the router "
                    "margin p(k) − p(k+1) (small: a little push changes the chosen set).",
         [figures.routed_text_html(trace, layer)]),
        ("", "Top-1 expert of every token at every layer (same colours).", [figures.routing_map(trace)]),
    ]
    if cfg.n_layers > 1:
        sections.append(("", "How tokens move between top-1 experts from one layer to the next.",
                         [figures.routing_sankey(trace)]))
    sections += [
        ("Expert usage", f"Share of this text's tokens that route to each expert (top-{cfg.moe_top_k}); white is "
                         f"a uniform router (k/E = {cfg.moe_top_k / cfg.moe_num_experts:.3g}), red above, blue "
                         "below. One prompt is a small sample: use route-stats for dataset-level usage.",
         [figures.usage_heatmap(trace)]),
        ("Attention", f"Layer {layer}: head {head} with token labels, then all heads; rows are queries, columns "
                      f"keys, real tokens only.",
         [figures.attention_heatmap(trace, layer, head, max_tokens=max_attention_tokens),
          figures.attention_grid(trace, layer, max_tokens=max_attention_tokens)]),
    ]
    body = [_header(model, trace, model_name)]
    first_figure = True
    for title, note, parts in sections:
        if title:
            body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(f'<p class="note">{html.escape(note)}</p>')
        for part in parts:
            if isinstance(part, go.Figure):
                part = part.to_html(full_html=False, include_plotlyjs=first_figure, config=PLOTLY_CONFIG)
                first_figure = False
            body.append(f'<div class="card">{part}</div>')
    title = f"dbrx-lab report: {model_name or _model_name(model)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><main>" + "\n".join(body) + "</main></body></html>\n")


def _model_name(model) -> str:
    return getattr(model, "name_or_path", None) or type(model).__name__


def _header(model, trace, model_name: str | None) -> str:
    from .version import __version__

    cfg = model.config
    n_prompt = int(trace.attention_mask[0, :trace.prompt_length].sum())
    n_new = int(trace.attention_mask[0, trace.prompt_length:].sum())
    ids = trace.input_ids[0][trace.attention_mask[0]].tolist()
    text = model.tokenizer.decode(ids) if model.tokenizer is not None else " ".join(map(str, ids))
    rows = {
        "model": f"{model_name or _model_name(model)} ({cfg.n_params / 1e6:,.1f}M parameters, "
                 f"{str(model.dtype).removeprefix('torch.')})",
        "tokens": f"{n_prompt} prompt" + (f" + {n_new} generated (greedy)" if n_new else ""),
        "config": f"{cfg.n_layers} layers · d_model {cfg.d_model} · {cfg.n_heads} heads ({cfg.kv_n_heads} KV) · "
                  f"{cfg.moe_num_experts} experts, top-{cfg.moe_top_k} · vocab {cfg.vocab_size:,} · "
                  f"rope θ {cfg.rope_theta:g} · clip_qkv {cfg.clip_qkv}",
        "recorded": f"routing at every layer; attention at layer {sorted(trace.attention)[0]}",
    }
    table = "".join(f"<tr><td>{k}</td><td>{html.escape(v)}</td></tr>" for k, v in rows.items())
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"<h1>dbrx-lab report</h1><div class=\"sub\">generated {when} by dbrx-lab {__version__} · "
            f"interactive: hover any mark; drag to zoom, double-click to reset</div>"
            f'<div class="card"><table class="meta">{table}</table>'
            f'<div style="margin-top:8px;font-size:13px;color:#666">text (tokens as the model saw them)</div>'
            f'<pre class="prompt">{html.escape(text)}</pre></div>')
