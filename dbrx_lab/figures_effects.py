"""Figures for layer and expert effects (notebook 09): pure functions from tables to plotly Figures.

    logit_lens_heatmap(lens)                 per layer and position: the actual next token's prob / rank
    lens_top_tokens(top)                     per layer: the top-n tokens the residual stream predicts at one position
    attribution_heatmap(analysis.logit_attribution(...))   layer x expert direct logit attribution
    ablation_comparison({"prose": sweep_a, "code": sweep_b})   analysis.ablation_sweep tables side by side
    loss_curves({"prose": curve_a, "code": curve_b})           analysis.top_k_curve / drop_top_curve

Same look as dbrx_lab.figures (shared template, diverging scale centred on 0, token axes with visible
whitespace). Figures never run the model: the logit lens tables are built from captured residuals (see the
docstrings for their columns).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import DIVERGING, SEQUENTIAL, _finish, _token_axis, _width, plotly_text, readable_token

__all__ = ["LENS_COLUMNS", "TOP_TOKEN_COLUMNS", "logit_lens_heatmap", "lens_top_tokens", "attribution_heatmap",
           "ablation_comparison", "loss_curves"]

LENS_COLUMNS = ["layer", "position", "token", "target", "prob", "rank", "top_token", "top_prob"]
TOP_TOKEN_COLUMNS = ["layer", "rank", "token", "prob"]
SERIES_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]   # Okabe & Ito
MAX_CELL_TEXT = 48          # positions up to which a lens cell shows its top token as text


def _need(df, columns, name: str, what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame) or df.empty or not set(columns) <= set(df.columns):
        got = list(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ValueError(f"{name} needs a non-empty table of {what} with columns {list(columns)}; got {got}")
    return df


def _short(n: int) -> str:
    """1, 10, 100, 1k, 10k, 100k, 1M: compact colourbar labels."""
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)


def _layer_label(layer: int) -> str:
    return "embed" if layer < 0 else str(layer)


# --- 1. logit lens -------------------------------------------------------------------------------
def logit_lens_heatmap(lens: pd.DataFrame, value: str = "prob") -> go.Figure:
    """Logit lens: what the residual stream predicts after each layer, read with the model's own final norm
    and unembedding. One row per layer (bottom: embeddings, layer -1; top: the last layer, whose prediction is
    the model's), one column per position; the colour is the probability (or rank) of the actual next token,
    and each cell's text is the layer's top prediction (up to MAX_CELL_TEXT positions).

    lens: one row per (layer, position) with LENS_COLUMNS: layer (-1 = embeddings), position, token (the
    input token there), target (the next token), prob and rank (1 = top) of the target, top_token and top_prob
    (the layer's top prediction). value: "prob" or "rank" (coloured on log10, rank 1 darkest).
    """
    if value not in ("prob", "rank"):
        raise ValueError(f"value must be 'prob' or 'rank', got {value!r}")
    df = _need(lens, LENS_COLUMNS, "logit_lens_heatmap", "logit-lens rows (one per layer and position)")
    if df.duplicated(["layer", "position"]).any():
        raise ValueError("logit_lens_heatmap needs one row per (layer, position): filter one batch row first")
    layers = sorted(int(x) for x in df["layer"].unique())
    positions = sorted(int(x) for x in df["position"].unique())
    grid = df.set_index(["layer", "position"]).reindex(pd.MultiIndex.from_product([layers, positions]))
    shape = (len(layers), len(positions))
    prob = grid["prob"].to_numpy(float).reshape(shape)
    rank = grid["rank"].to_numpy(float).reshape(shape)
    by_pos = df.drop_duplicates("position").set_index("position")
    tokens = [str(by_pos.loc[p, "token"]) for p in positions]
    hover, text = [], []
    for i, layer in enumerate(layers):
        row_h, row_t = [], []
        for j, p in enumerate(positions):
            r = grid.loc[(layer, p)]
            if pd.isna(r["prob"]):
                row_h.append("")
                row_t.append("")
                continue
            row_h.append(f"layer {_layer_label(layer)} · position {p} {plotly_text(readable_token(tokens[j]))!s}"
                         f"<br>next token {plotly_text(readable_token(str(r['target'])))}: p = {r['prob']:.3f},"
                         f" rank {int(r['rank'])}<br>top prediction {plotly_text(readable_token(str(r['top_token'])))}"
                         f" (p = {r['top_prob']:.3f})")
            row_t.append(plotly_text(readable_token(str(r["top_token"]), 6)))
        hover.append(row_h)
        text.append(row_t)
    if value == "prob":
        z, colorbar, extra = prob, dict(title=dict(text="p(next token)")), dict(zmin=0.0, zmax=1.0,
                                                                               colorscale=SEQUENTIAL)
    else:
        top = max(1.0, float(np.nanmax(np.log10(rank)))) if np.isfinite(rank).any() else 1.0
        ticks = [10 ** t for t in range(int(np.ceil(top)) + 1)]
        z = np.log10(rank)
        colorbar = dict(title=dict(text="rank of the next token", side="right"), tickvals=np.log10(ticks).tolist(),
                        ticktext=[_short(t) for t in ticks])
        extra = dict(zmin=0.0, zmax=top, colorscale=SEQUENTIAL, reversescale=True)
    heat = go.Heatmap(z=z, x=positions, y=list(range(len(layers))), hovertext=hover, hoverinfo="text", xgap=1,
                      ygap=1, colorbar=colorbar, **extra)
    if len(positions) <= MAX_CELL_TEXT:
        heat.update(text=text, texttemplate="%{text}", textfont=dict(size=10))
    fig = go.Figure(heat)
    fig.update_xaxes(**_token_axis(positions, tokens, "position (input token)"))
    fig.update_yaxes(title="residual stream after layer", tickmode="array", tickvals=list(range(len(layers))),
                     ticktext=[_layer_label(l) for l in layers], showgrid=False)
    what = "probability" if value == "prob" else "rank"
    return _finish(fig, f"Logit lens: {what} of the actual next token after each layer (text: top prediction)",
                   height=max(360, 120 + 36 * len(layers)), width=_width(140 + 46 * len(positions)))


def lens_top_tokens(top: pd.DataFrame) -> go.Figure:
    """The top-n tokens each layer's residual stream predicts at one position (logit lens): rows are layers
    (embeddings at the bottom), columns ranks 1..n, colour the probability, text the token. When the table has
    a boolean `is_target` column, the actual next token is outlined.

    top: one row per (layer, rank) with TOP_TOKEN_COLUMNS (rank 1 = top); attrs may name the position,
    token and target for the title.
    """
    df = _need(top, TOP_TOKEN_COLUMNS, "lens_top_tokens", "top tokens per layer at one position")
    if df.duplicated(["layer", "rank"]).any():
        raise ValueError("lens_top_tokens needs one row per (layer, rank): one position of one batch row")
    layers = sorted(int(x) for x in df["layer"].unique())
    ranks = sorted(int(x) for x in df["rank"].unique())
    grid = df.set_index(["layer", "rank"]).reindex(pd.MultiIndex.from_product([layers, ranks]))
    z = grid["prob"].to_numpy(float).reshape(len(layers), len(ranks))
    toks = grid["token"].to_numpy(object).reshape(len(layers), len(ranks))
    text = [[plotly_text(readable_token(str(t), 10)) if isinstance(t, str) else "" for t in row] for row in toks]
    hover = [[f"layer {_layer_label(l)} · rank {r}<br>{plotly_text(readable_token(str(toks[i, j]), 40))}: "
              f"p = {z[i, j]:.3f}" if isinstance(toks[i, j], str) else ""
              for j, r in enumerate(ranks)] for i, l in enumerate(layers)]
    fig = go.Figure(go.Heatmap(z=z, x=ranks, y=list(range(len(layers))), zmin=0.0, zmax=max(1e-9, float(np.nanmax(z))),
                               colorscale=SEQUENTIAL, text=text, texttemplate="%{text}", textfont=dict(size=11),
                               hovertext=hover, hoverinfo="text", xgap=1, ygap=1,
                               colorbar=dict(title=dict(text="probability"))))
    if "is_target" in df.columns:
        hit = df[df["is_target"].astype(bool)]
        fig.add_trace(go.Scatter(x=hit["rank"], y=[layers.index(int(l)) for l in hit["layer"]], mode="markers",
                                 marker=dict(symbol="square-open", size=30, color="#D55E00", line_width=3),
                                 hoverinfo="skip", name="actual next token", showlegend=len(hit) > 0))
    fig.update_xaxes(title="rank", tickmode="array", tickvals=ranks, showgrid=False)
    fig.update_yaxes(title="residual stream after layer", tickmode="array", tickvals=list(range(len(layers))),
                     ticktext=[_layer_label(l) for l in layers], showgrid=False)
    a = top.attrs
    where = f" at position {a['position']}" if "position" in a else ""
    if "token" in a:
        where += f" ({plotly_text(readable_token(str(a['token'])))}"
        where += f" → {plotly_text(readable_token(str(a['target'])))})" if "target" in a else ")"
    return _finish(fig, f"Logit lens: top {len(ranks)} predictions per layer{where}",
                   height=max(320, 120 + 40 * len(layers)), width=max(640, 120 + 90 * len(ranks)),
                   legend=dict(orientation="h", y=-0.2))


# --- 2. direct logit attribution -----------------------------------------------------------------
def attribution_heatmap(attr, batch: int = 0, position: int | str | None = None,
                        n_experts: int | None = None) -> go.Figure:
    """Direct logit attribution of `analysis.logit_attribution`: left, a layer x expert heatmap of each chosen
    expert's weighted contribution to the target's logit (red pushes it up, blue down, blank = not chosen);
    right, per layer, the attention output's and the experts' totals. Contributions hold the final norm's
    scale fixed, so they sum to the logit but are not ablation effects.

    position: an attributed column, None (the last one) or "mean" (each cell averaged over the attributed
    positions of the batch row, counting 0 where the expert was not chosen: mean push towards each position's
    own target). n_experts: the expert axis length (default: the largest expert seen + 1).
    """
    if not (hasattr(attr, "components") and hasattr(attr, "totals")):
        raise ValueError("attribution_heatmap needs the LogitAttribution returned by analysis.logit_attribution")
    comp, totals = attr.components, attr.totals
    batches = sorted(int(b) for b in totals["batch"].unique())
    if batch not in batches:
        raise ValueError(f"batch {batch!r} not attributed; attributed batch rows: {batches}")
    comp, totals = comp[comp["batch"] == batch], totals[totals["batch"] == batch]
    attributed = sorted(int(p) for p in totals["position"].unique())
    if position is None:
        position = attributed[-1]
    if position == "mean":
        n_pos = len(attributed)
        sel, tot = comp, totals
    elif isinstance(position, (int, np.integer)) and not isinstance(position, bool) and int(position) in attributed:
        n_pos = 1
        sel, tot = comp[comp["position"] == position], totals[totals["position"] == position]
    else:
        raise ValueError(f"position must be None, 'mean' or an attributed position {attributed}, got {position!r}")
    experts = sel[sel["component"] == "expert"]
    E = int(comp.loc[comp["component"] == "expert", "expert"].max()) + 1 if n_experts is None else int(n_experts)
    if experts["expert"].max() >= E:
        raise ValueError(f"n_experts={E} but the table has expert {int(experts['expert'].max())}")
    layers = sorted(int(l) for l in comp.loc[comp["component"] != "embed", "layer"].unique())
    summed = experts.groupby(["layer", "expert"]).agg(contribution=("contribution", "sum"),
                                                      weight=("weight", "mean"), chosen=("rank", "size"))
    z = np.full((len(layers), E), np.nan)
    hover = [[f"layer {l} · expert {e}: not chosen" for e in range(E)] for l in layers]
    for (l, e), r in summed.iterrows():
        i, value = layers.index(int(l)), r["contribution"] / n_pos
        z[i, int(e)] = value
        hover[i][int(e)] = (f"layer {l} · expert {e}<br>contribution {value:+.3f} logits" +
                            (f"<br>chosen at {int(r['chosen'])} of {n_pos} positions, mean weight {r['weight']:.3f}"
                             if n_pos > 1 else f"<br>weight {r['weight']:.3f}"))
    attn = sel[sel["component"] == "attn"].groupby("layer")["contribution"].sum().reindex(layers).fillna(0) / n_pos
    exp_tot = experts.groupby("layer")["contribution"].sum().reindex(layers).fillna(0) / n_pos
    embed = float(sel.loc[sel["component"] == "embed", "contribution"].sum()) / n_pos
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
    fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=("each chosen expert", "per layer"))
    fig.add_trace(go.Heatmap(z=z, x=list(range(E)), y=layers, zmid=0, zmin=-lim, zmax=lim, colorscale=DIVERGING,
                             hovertext=hover, hoverinfo="text", xgap=1, ygap=1,
                             colorbar=dict(title=dict(text="logit<br>contribution"))), 1, 1)
    for name, values, color in (("attention", attn, "#999999"), ("experts", exp_tot, "#0072B2")):
        fig.add_trace(go.Bar(y=layers, x=values.to_numpy(), orientation="h", name=name, marker_color=color,
                             hovertext=[f"layer {l} · {name}: {v:+.3f} logits" for l, v in zip(layers, values)],
                             hoverinfo="text"), 1, 2)
    fig.update_xaxes(title="expert", tickmode="array", tickvals=list(range(E)), showgrid=False, row=1, col=1)
    fig.update_xaxes(title="logits", zeroline=True, zerolinecolor="#444", row=1, col=2)
    fig.update_yaxes(title="layer", autorange="reversed", tickmode="array", tickvals=layers, showgrid=False,
                     row=1, col=1)
    if position == "mean":
        title = (f"Direct logit attribution, mean over {n_pos} positions (each to its own target): embed "
                 f"{embed:+.2f}, mean logit {tot['logit'].mean():.2f}")
    else:
        t = tot.iloc[0]
        title = (f"Direct logit attribution to {plotly_text(readable_token(str(t['target'])))} at position "
                 f"{position}: logit {t['logit']:.2f} = embed {embed:+.2f} + attention {t['attn']:+.2f} + experts "
                 f"{t['experts']:+.2f} (error {t['error']:+.1e})")
    return _finish(fig, title, barmode="group", height=max(420, 170 + 30 * len(layers)),
                   width=_width(260 + 38 * E + 260), margin=dict(l=70, r=30, t=90, b=110),
                   legend=dict(orientation="h", y=-0.3, yanchor="top", x=1, xanchor="right"))


# --- 3. ablation sweeps --------------------------------------------------------------------------
def _check_sweep(name: str, sweep) -> pd.DataFrame:
    if not isinstance(sweep, pd.DataFrame) or sweep.empty or not all(
            pd.api.types.is_number(v) for v in [*sweep.index, *sweep.columns]):
        raise ValueError(f"ablation_comparison: {name!r} is not an analysis.ablation_sweep layer x expert "
                         f"DataFrame (index: layers, columns: experts, values: loss change in nats per token)")
    return sweep


def ablation_comparison(sweeps: Mapping[str, pd.DataFrame], difference: bool = False) -> go.Figure:
    """`analysis.ablation_sweep` tables for several text sets side by side, on one colour scale (Δ loss in
    nats per token; red: the loss rises without the expert), so a cell that is red for code and white for
    prose marks an expert that code needs. difference=True (two sweeps) adds a panel: second minus first.
    """
    if not isinstance(sweeps, Mapping) or not sweeps:
        raise ValueError("ablation_comparison needs a non-empty dict {name: ablation_sweep table}")
    items = [(str(k), _check_sweep(str(k), v)) for k, v in sweeps.items()]
    first = items[0][1]
    for name, s in items[1:]:
        if list(s.index) != list(first.index) or list(s.columns) != list(first.columns):
            raise ValueError(f"ablation_comparison: {name!r} covers layers {list(s.index)} x experts "
                             f"{list(s.columns)}, {items[0][0]!r} layers {list(first.index)} x experts "
                             f"{list(first.columns)}: sweep the same cells")
    if difference and len(items) != 2:
        raise ValueError(f"difference=True needs exactly 2 sweeps, got {len(items)}")
    panels = []
    for name, s in items:
        base = s.attrs.get("baseline_loss")
        label = f"{plotly_text(name)}" + (f" (baseline {base:.3f})" if base is not None else "")
        panels.append((label, name, s.to_numpy(float)))
    if difference:
        (a, sa), (b, sb) = items
        panels.append((f"{plotly_text(b)} − {plotly_text(a)}", f"{b} − {a}",
                       sb.to_numpy(float) - sa.to_numpy(float)))
    zs = np.stack([p[2] for p in panels])
    lim = float(np.nanmax(np.abs(zs))) if np.isfinite(zs).any() and np.nanmax(np.abs(zs)) > 0 else 1.0
    layers, experts = list(first.index), list(first.columns)
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[p[0] for p in panels])
    for c, (_, name, z) in enumerate(panels, start=1):
        hover = [[f"{plotly_text(name)}: layer {l} · expert {e}<br>Δ loss {z[i, j]:+.4f} nats/token"
                  for j, e in enumerate(experts)] for i, l in enumerate(layers)]
        fig.add_trace(go.Heatmap(z=z, x=experts, y=layers, coloraxis="coloraxis", hovertext=hover, hoverinfo="text",
                                 xgap=1, ygap=1), 1, c)
        fig.update_xaxes(title="expert", tickmode="array", tickvals=experts, showgrid=False, row=1, col=c)
    fig.update_yaxes(title="layer", autorange="reversed", tickmode="array", tickvals=layers, showgrid=False,
                     row=1, col=1)
    mode = first.attrs.get("mode", "ablation")
    return _finish(fig, f"Ablation sweep ({mode}): change in loss when one expert is ablated (nats per token)",
                   coloraxis=dict(colorscale=DIVERGING, cmid=0, cmin=-lim, cmax=lim,
                                  colorbar=dict(title=dict(text="Δ loss<br>(nats/token)"))),
                   height=max(360, 110 + 26 * len(layers)), width=_width(120 + len(panels) * (40 + 22 * len(experts))))


# --- 4. top-k / vary-k and drop-top-r curves -----------------------------------------------------
def loss_curves(curves, value: str = "loss", trained_k: int | None = None) -> go.Figure:
    """Loss vs k from `analysis.top_k_curve` (every token uses k experts) or vs r from
    `analysis.drop_top_curve` (every token loses its r most probable experts), one line per text set, each
    with its baseline (no intervention) dashed in the same colour. trained_k marks the model's own k.

    curves: one curve table or a dict {name: table} (all of one kind); value: "loss" or "delta" (loss minus
    the baseline, nats per token).
    """
    if value not in ("loss", "delta"):
        raise ValueError(f"value must be 'loss' or 'delta', got {value!r}")
    if isinstance(curves, pd.DataFrame):
        curves = {"": curves}
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("loss_curves needs a top_k_curve / drop_top_curve table or a non-empty dict of them")
    kinds = set()
    for name, df in curves.items():
        if not isinstance(df, pd.DataFrame) or df.empty:
            raise ValueError(f"loss_curves: {name!r} is not a non-empty curve table")
        x = [c for c in ("k", "r") if c in df.columns]
        if len(x) != 1 or not {"loss", "delta", "baseline_loss"} <= set(df.columns):
            raise ValueError(f"loss_curves: {name!r} needs the columns of analysis.top_k_curve (k, loss, delta, "
                             f"baseline_loss) or drop_top_curve (r, ...); got {list(df.columns)}")
        kinds.add(x[0])
    if len(kinds) != 1:
        raise ValueError("loss_curves: mix of top_k_curve (k) and drop_top_curve (r) tables; plot them separately")
    xcol = kinds.pop()
    if trained_k is not None and xcol != "k":
        raise ValueError("trained_k marks a top_k_curve; these are drop_top_curve tables (r)")
    fig = go.Figure()
    for i, (name, df) in enumerate(curves.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        base = float(df["baseline_loss"].iloc[0])
        label = str(name) or value
        fig.add_trace(go.Scatter(x=df[xcol], y=df[value], mode="lines+markers", name=plotly_text(label),
                                 line=dict(color=color, width=2), marker=dict(size=7),
                                 hovertext=[f"{plotly_text(label)}: {xcol} = {x}<br>loss {l:.4f} (Δ {d:+.4f} "
                                            f"vs baseline {base:.4f})"
                                            for x, l, d in zip(df[xcol], df["loss"], df["delta"])],
                                 hoverinfo="text"))
        ref = base if value == "loss" else 0.0
        fig.add_trace(go.Scatter(x=[df[xcol].min(), df[xcol].max()], y=[ref, ref], mode="lines",
                                 line=dict(color=color, dash="dash", width=1), hoverinfo="text",
                                 hovertext=f"{plotly_text(label)} baseline {base:.4f}", showlegend=False))
    if trained_k is not None:
        fig.add_vline(x=trained_k, line_dash="dot", line_color="#555", annotation_text=f"trained k = {trained_k}")
    if xcol == "k":
        fig.update_xaxes(title="k (experts per token)", dtick=1)
        title = "Vary k: loss when every token uses k experts (dashed: the model as trained)"
    else:
        fig.update_xaxes(title="r (top experts removed per token)", dtick=1)
        title = "Drop the top r: loss when every token loses its r most probable experts (dashed: r = 0)"
    fig.update_yaxes(title="loss (nats/token)" if value == "loss" else "Δ loss (nats/token)")
    return _finish(fig, title, height=420, width=720)
