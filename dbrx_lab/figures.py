"""Figures: pure functions from a Trace or an analysis DataFrame to a plotly Figure (or HTML).

Figures never run the model and never compute statistics themselves: tables come from
`dbrx_lab.analysis` (a function given a Trace calls the analysis function for it). Every expert has one
colour everywhere (`expert_color`); every mark has hover text; positions are trace columns, the same
`position` the analysis tables use, and only real (non-padding) tokens are drawn.

Shapes: L layers, B batch, T positions, E experts, k experts per token, H heads.
"""
from __future__ import annotations

import html
import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["EXPERT_COLORS", "expert_color", "readable_token", "text_color", "attention_pattern", "usage_heatmap", "routing_map", "routed_text",
           "span_bounds", "span_positions", "chat_span",
           "routed_text_html", "attention_heatmap", "attention_grid", "coactivation_heatmap", "repetition_bars",
           "specialization_bars", "routing_sankey", "ablation_impact", "generation_diff", "routing_cascade",
           "path_sankey", "card_logits", "expert_cache_figure"]

# Okabe & Ito (2008) "Color Universal Design" (8 colours, first) + 8 from Paul Tol's muted, light and bright
# schemes (https://personal.sron.nl/~pault/), picked greedily to maximise the smallest pairwise CIE76
# distance under normal vision and simulated deuteranopia and protanopia (Machado et al. 2009):
# every pair differs by ΔE >= 13 in all three (tests/test_figures.py checks it).
EXPERT_COLORS: list[str] = [
    "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
    "#EEDD88", "#332288", "#882255", "#FFAABB", "#99DDFF", "#117733", "#EE6677", "#999933",
]

TEMPLATE = "plotly_white"
FONT = dict(family="Inter, 'Helvetica Neue', Arial, sans-serif", size=13, color="#222")
MONO = "'JetBrains Mono', 'DejaVu Sans Mono', Menlo, Consolas, monospace"
DIVERGING = "RdBu_r"          # blue below the baseline, red above
SEQUENTIAL = "Blues"
_BLUES = ["#053061", "#2166AC", "#4393C3", "#92C5DE", "#D1E5F0"]    # ColorBrewer RdBu, low half
_REDS = ["#FDDBC7", "#F4A582", "#D6604D", "#B2182B", "#67001F"]     # high half
MIDPOINT_COLOR = "#F7F7F7"
MAX_TICKS = 80                # token labels shown on an axis before thinning
AXIS_TITLE_STANDOFF = 16      # px between an axis' tick labels and its title (with automargin: never overlapping)
FIT_WIDTH_GUESS = 960         # px: a figure without a fixed width fills about this much of a notebook
_VISIBLE = {" ": "␣", "\n": "↵", "\r": "␍", "\t": "⇥"}
_ESCAPED = {"\\n": "↵", "\\r": "␍", "\\t": "⇥"}   # tokenizer.token_strings escapes these


def expert_color(e: int) -> str:
    """Hex colour of expert e; cycles through the 16 colours for e >= 16."""
    if not isinstance(e, (int, np.integer)) or isinstance(e, bool) or e < 0:
        raise ValueError(f"expert must be an integer >= 0, got {e!r}")
    return EXPERT_COLORS[int(e) % len(EXPERT_COLORS)]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def text_color(hex_color: str) -> str:
    """Black or white, whichever reads better on the background (WCAG relative luminance)."""
    c = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return "#000000" if float(lin @ [0.2126, 0.7152, 0.0722]) > 0.18 else "#FFFFFF"


def readable_token(token: str, max_len: int = 16) -> str:
    """Token text for labels: whitespace made visible (␣ space, ↵ newline, ⇥ tab), long tokens cut with …."""
    for k, v in _ESCAPED.items():
        token = token.replace(k, v)
    s = "".join(_VISIBLE.get(c, c) for c in token) or "∅"
    return s if len(s) <= max_len else s[:max_len - 1] + "…"


def plotly_text(text: str) -> str:
    """`text` escaped once for plotly's label markup: only &, < and > (plotly decodes &amp; &lt; &gt; but
    not &quot; or &#x27;, so html.escape's quoting would show a \"\"\" token as &quot;&quot;&quot;)."""
    return html.escape(str(text), quote=False)


def _expert_colorscale(n_experts: int) -> list[list]:
    """Step colourscale for z = expert id with zmin = -0.5, zmax = E - 0.5."""
    scale = []
    for e in range(n_experts):
        scale += [[e / n_experts, expert_color(e)], [(e + 1) / n_experts, expert_color(e)]]
    return scale


def _two_slope(mid: float, zmin: float, zmax: float) -> list[list]:
    """Diverging colourscale for [zmin, zmax] that is white exactly at `mid`, with separate slopes below and
    above (like matplotlib's TwoSlopeNorm): usage is >= 0 but may exceed twice the uniform baseline."""
    m = (mid - zmin) / (zmax - zmin)
    return ([[m * i / len(_BLUES), c] for i, c in enumerate(_BLUES)] + [[m, MIDPOINT_COLOR]]
            + [[m + (1 - m) * (i + 1) / len(_REDS), c] for i, c in enumerate(_REDS)])


def _baseline_heatmap(z: np.ndarray, mid: float, **kwargs) -> go.Heatmap:
    """Heatmap of non-negative values coloured blue below `mid`, white at `mid`, red above."""
    zmax = max(float(np.nanmax(z)) if np.isfinite(z).any() else 0.0, 2 * mid)
    return go.Heatmap(z=z, zmin=0, zmax=zmax, colorscale=_two_slope(mid, 0.0, zmax), xgap=1, ygap=1,
                      hoverinfo="text", **kwargs)


def _finish(fig: go.Figure, title: str, **layout) -> go.Figure:
    """The shared look: template, fonts, left-aligned title, monospace hover labels; `layout` overrides."""
    fig.update_layout(**{"template": TEMPLATE, "font": FONT, "margin": dict(l=70, r=30, t=60, b=60),
                         "title": dict(text=title, x=0.01, xanchor="left", font_size=16),
                         "hoverlabel": dict(font_family=MONO, font_size=12, bgcolor="white"), **layout})
    return fig


def _width(natural: int) -> int | None:
    """A fixed figure width for short sequences (cells keep a readable size); None (fill the container)
    once the natural width exceeds a typical notebook or page."""
    return max(720, natural) if natural <= 1200 else None


def _token_axis(positions: Sequence[int], tokens: Sequence[str], title: str, generated_from: int | None = None,
                shown: int | None = None) -> dict:
    """A numeric position axis labelled with tokens (numeric, so repeated tokens are never merged); labels of
    positions >= generated_from in grey italics. More than MAX_TICKS positions in view (`shown`, default all):
    every n-th label. The title stands off the labels (automargin), so the two never overlap."""
    shown = len(positions) if shown is None else shown
    step = max(1, math.ceil(shown / MAX_TICKS))
    text = []
    for p, t in zip(positions[::step], tokens[::step]):
        label = plotly_text(readable_token(t))
        generated = generated_from is not None and p >= generated_from
        text.append(f'<span style="color:#888"><i>{label}</i></span>' if generated else label)
    return dict(title=dict(text=title, standoff=AXIS_TITLE_STANDOFF), automargin=True, tickmode="array",
                tickvals=list(positions[::step]), ticktext=text, tickangle=-60 if shown > 6 else 0,
                tickfont=dict(family=MONO, size=11), showgrid=False, zeroline=False)


# --- inputs --------------------------------------------------------------------------------------
def _table(data, compute: Callable, required: Sequence[str], name: str, **kwargs) -> pd.DataFrame:
    """`data` itself when it is the analysis table (has the required columns), else compute(data)."""
    if isinstance(data, pd.DataFrame) and set(required) <= set(data.columns):
        return data
    try:
        return compute(data, **kwargs)
    except ValueError as err:
        raise ValueError(f"{name} needs a table with columns {list(required)} or a routing source (Trace, list "
                         f"of Traces, routing DataFrame, route-stats folder): {err}") from None


def _one_layer(df: pd.DataFrame, layer: int | None) -> tuple[pd.DataFrame, int]:
    """The rows of one layer (layer=None: the table's only layer)."""
    layers = sorted(int(x) for x in df["layer"].unique())
    if layer is None:
        if len(layers) != 1:
            raise ValueError(f"the table has layers {layers}: pass layer= one of them")
        layer = layers[0]
    if layer not in layers:
        raise ValueError(f"layer {layer} not in the table; its layers are {layers}")
    return df[df["layer"] == layer], layer


def _check_batch(trace, batch: int) -> None:
    if not isinstance(batch, int) or not 0 <= batch < trace.batch_size:
        raise ValueError(f"batch must be in [0, {trace.batch_size - 1}], got {batch!r}")


def _check_routing(trace) -> None:
    if trace.topk_experts is None:
        raise ValueError("this trace has no routing; record it with Record(router=True)")


def _real_positions(trace, batch: int) -> np.ndarray:
    """Trace columns of the real (non-padding) tokens of one row."""
    return np.flatnonzero(trace.attention_mask[batch].cpu().numpy())


def _n_experts(trace) -> int:
    E = trace.n_experts
    return int(E) if E else int(trace.topk_experts.max()) + 1


# --- spans: a crop over positions (long sequences) ------------------------------------------------
def span_bounds(span, seq_len: int) -> tuple[int, int]:
    """(start, stop) trace columns of a crop: None (all), a slice (step 1) or a (start, stop) pair; negative
    values count from the end as in Python. Anything else, or an empty / out-of-range span, is a ValueError."""
    if span is None:
        return 0, seq_len
    if isinstance(span, slice):
        if span.step not in (None, 1):
            raise ValueError(f"span {span!r}: a slice with step 1 (or None) selects positions; got step {span.step}")
        start, stop = span.start, span.stop
    elif isinstance(span, (tuple, list)) and len(span) == 2:
        start, stop = span
    else:
        raise ValueError(f"span must be None, a slice or a (start, stop) pair of positions, got {span!r}")
    start = 0 if start is None else start
    stop = seq_len if stop is None else stop
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"span {name} must be an integer position, got {v!r}")
    start, stop = int(start), int(stop)
    start += seq_len if start < 0 else 0
    stop += seq_len if stop < 0 else 0
    if not 0 <= start < stop <= seq_len:
        raise ValueError(f"span {span!r} must satisfy 0 <= start < stop <= {seq_len} (the trace's positions are "
                         f"0..{seq_len - 1})")
    return start, stop


def span_positions(trace, batch: int = 0, span=None) -> np.ndarray:
    """The real (non-padding) trace columns of row `batch` inside `span` (see `span_bounds`); at least one."""
    _check_batch(trace, batch)
    start, stop = span_bounds(span, trace.seq_len)
    pos = _real_positions(trace, batch)
    inside = pos[(pos >= start) & (pos < stop)]
    if not inside.size:
        raise ValueError(f"span {start}..{stop - 1} holds no real token of batch row {batch} (its real tokens are "
                         f"positions {int(pos[0])}..{int(pos[-1])})" if pos.size else f"batch row {batch} is all padding")
    return inside


def chat_span(trace, batch: int = 0) -> tuple[int, int]:
    """(start, stop) of a chat's last user message and everything after it (the assistant prompt and any
    generated reply): from the last `<|im_start|>` followed by `user` to the last real token. This is what to
    look at in a chat trace, whose default system prompt is most of the tokens. ValueError without a user turn."""
    from .tokenizer import SPECIAL_TOKENS

    _check_batch(trace, batch)
    pos = _real_positions(trace, batch)
    tokens = trace.tokens[batch]
    ids = trace.input_ids[batch].tolist()
    im_start = SPECIAL_TOKENS["<|im_start|>"]
    start = None
    for i, p in enumerate(pos[:-1]):
        if (tokens[p] == "<|im_start|>" or ids[p] == im_start) and tokens[pos[i + 1]].strip() == "user":
            start = int(p)
    if start is None:
        raise ValueError(f"batch row {batch} has no user turn (`<|im_start|>user`): chat_span needs a trace of a chat "
                         "prompt (run the prompt as chat / with apply_chat_template)")
    return start, int(pos[-1]) + 1


def _span_note(trace, batch: int, positions: np.ndarray) -> str:
    """' · positions a–b of n' when positions are a crop of the row's real tokens, else ''."""
    n = int(trace.attention_mask[batch].sum())
    return "" if len(positions) == n else f" · positions {int(positions[0])}–{int(positions[-1])} of {n} tokens"


# --- expert usage --------------------------------------------------------------------------------
_USAGE_BASELINE = {"share": "baseline_share", "top1_share": "baseline_top1", "weight_share": "baseline_top1"}
_LOAD_COLUMNS = {"layer", "expert", "tokens", "count", "share", "top1_count", "top1_share", "weight_share",
                 "baseline_share", "baseline_top1"}


def usage_heatmap(load, value: str = "share", group: Any = None) -> go.Figure:
    """Expert usage per layer: layer x expert heatmap of `expert_load` (or of a routing source).

    value: "share" (tokens with the expert in their top-k / tokens; uniform k/E), "top1_share" (uniform 1/E)
    or "weight_share" (mean applied weight; uniform 1/E). The colour midpoint is the uniform baseline: blue
    cells are used less than a uniform router would, red more. group: the group to show when the table was
    split with `expert_load(..., by=...)`.
    """
    from .analysis import expert_load

    if value not in _USAGE_BASELINE:
        raise ValueError(f"value must be one of {sorted(_USAGE_BASELINE)}, got {value!r}")
    df = _table(load, expert_load, ["layer", "expert", value, _USAGE_BASELINE[value]], "usage_heatmap")
    group_cols = [c for c in df.columns if c not in _LOAD_COLUMNS]
    if group_cols:
        col = group_cols[0]
        groups = list(df[col].unique())
        if group is None and len(groups) > 1:
            raise ValueError(f"the table is split by {col!r} into {groups}: pass group= one of them")
        group = groups[0] if group is None else group
        if group not in groups:
            raise ValueError(f"group {group!r} not in {col!r}: {groups}")
        df = df[df[col] == group]
    grid = df.pivot(index="layer", columns="expert", values=value)
    counts = df.pivot(index="layer", columns="expert", values="count" if value != "top1_share" else "top1_count")
    baseline = float(df[_USAGE_BASELINE[value]].iloc[0])
    tokens = int(df["tokens"].iloc[0])
    z = grid.to_numpy(dtype=float)
    ci = _ci_text(df, value, ["layer"], ["expert"])
    hover = [[f"layer {l} · expert {e}<br>{value} {z[i, j]:.3f} ({z[i, j] / baseline:.2f}× uniform {baseline:.3f})"
              f"<br>n = {int(counts.iloc[i, j])} of {tokens} tokens" + (ci[i][j] if ci is not None else "")
              for j, e in enumerate(grid.columns)] for i, l in enumerate(grid.index)]
    colorbar = dict(title=dict(text=f"{value}<br>white = uniform<br>({baseline:.3g})"))
    fig = go.Figure(_baseline_heatmap(z, baseline, x=list(grid.columns), y=list(grid.index), hovertext=hover,
                                      colorbar=colorbar))
    fig.update_xaxes(title="expert", tickmode="array", tickvals=list(grid.columns), showgrid=False)
    fig.update_yaxes(title="layer", tickmode="linear" if len(grid.index) <= 48 else "auto", showgrid=False,
                     autorange="reversed")
    what = {"share": "share of tokens routed (top-k)", "top1_share": "share of tokens as top-1",
            "weight_share": "mean routing weight"}[value]
    title = f"Expert usage: {what} per layer and expert ({tokens} tokens)"
    if group_cols:
        title += f" · {group_cols[0]} = {group}"
    return _finish(fig, title, height=max(360, 90 + 26 * len(grid.index)))


def _ci_text(df: pd.DataFrame, value: str, index: list[str], columns: list[str]) -> list[list[str]] | None:
    """Hover lines "95% CI [lo, hi] (bootstrap over n texts)" per cell of a pivot, when the table has the
    `{value}_lo` / `{value}_hi` columns of `analysis.routing.*_intervals`; None otherwise."""
    if f"{value}_lo" not in df.columns:
        return None
    lo = df.pivot(index=index, columns=columns, values=f"{value}_lo").to_numpy(float)
    hi = df.pivot(index=index, columns=columns, values=f"{value}_hi").to_numpy(float)
    level, unit = df.attrs.get("level", 0.95), df.attrs.get("bootstrap", "text")
    n = int(df["n_units"].iloc[0]) if "n_units" in df.columns else None
    over = f" (bootstrap over {n} {unit}s)" if n is not None else ""
    return [[f"<br>{level:.0%} CI [{a:.3f}, {b:.3f}]{over}" if np.isfinite(a) else
             f"<br>no interval: fewer than 2 {unit}s" for a, b in zip(ra, rb)] for ra, rb in zip(lo, hi)]


# --- routing map and routed text ---------------------------------------------------------------
def _routing_hover(trace, batch: int, positions: np.ndarray) -> list[list[str]]:
    """[L][n] hover text: token, position, top-k experts with weights, margin p_(k) - p_(k+1)."""
    from .analysis import router_confidence

    experts = trace.topk_experts[:, batch, positions].cpu().numpy()                     # [L, n, k]
    weights = (trace.topk_weights[:, batch, positions].float().cpu().numpy() if trace.topk_weights is not None
               else np.full(experts.shape, np.nan))
    L = experts.shape[0]
    margin = np.full((L, len(positions)), np.nan)
    if trace.router_logits is not None:
        conf = router_confidence(trace.select(batch))
        index = {int(p): i for i, p in enumerate(positions)}
        conf = conf[conf["position"].isin(index)]                        # a span: only its positions
        rows = conf["position"].map(index).to_numpy(int)
        margin[conf["layer"].to_numpy(), rows] = conf["margin"].to_numpy()
    tokens = trace.tokens[batch]
    out = []
    for l in range(L):
        row = []
        for i, p in enumerate(positions):
            chosen = " ".join(f"e{e}:{w:.2f}" for e, w in zip(experts[l, i], weights[l, i]) if e >= 0)
            m = "n/a (no router logits)" if np.isnan(margin[l, i]) else f"{margin[l, i]:.3f}"
            row.append(f"<b>{plotly_text(readable_token(tokens[p], 40))}</b> · position {p} · layer {l}"
                       f"<br>top-{experts.shape[-1]}: {chosen}<br>margin p(k)−p(k+1): {m}")
        out.append(row)
    return out


MAP_WINDOW = 64               # positions a routing map shows at first; the range slider pans over the rest
CELL_TEXT_MIN_PX = 12         # cell width (px) from which the map writes the expert number in each cell


def routing_map(trace, batch: int = 0, layers: Sequence[int] | None = None, span=None,
                window: int | None = MAP_WINDOW, cell_text: bool | None = None) -> go.Figure:
    """Token routing map: position x layer cells coloured by each token's top-1 expert.

    One cell per (layer, real position) of batch row `batch`; hover shows the token, its top-k experts
    with their applied weights and the router margin p_(k) - p_(k+1) (from `analysis.router_confidence`).
    A dotted line marks where generated tokens start.

    Long sequences: span crops to positions (a slice or (start, stop), e.g. `chat_span(trace)`: the user message
    and the reply of a chat); window: with more positions than that, the map opens on the last `window` of
    them with a range slider below to pan or widen the view (None: everything at once). cell_text: write the
    expert number in each cell (None: when the cells of the opening view are at least CELL_TEXT_MIN_PX wide).
    """
    _check_routing(trace)
    _check_batch(trace, batch)
    L = trace.topk_experts.shape[0]
    layers = list(range(L)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < L]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range [0, {L - 1}]")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an integer >= 1 (positions shown at first) or None, got {window!r}")
    if cell_text not in (None, True, False):
        raise ValueError(f"cell_text must be True, False or None (automatic), got {cell_text!r}")
    pos = span_positions(trace, batch, span)
    E = _n_experts(trace)
    top1 = trace.topk_experts[layers, batch][:, pos, 0].cpu().numpy().astype(float)      # [L_sel, n]
    hover = _routing_hover(trace, batch, pos)
    shown = len(pos) if window is None else min(window, len(pos))
    width = _width(160 + 24 * shown)
    if cell_text is None:                   # the plot area is the figure less ~130 px of margins and labels
        cell_text = ((width or FIT_WIDTH_GUESS) - 130) / shown >= CELL_TEXT_MIN_PX
    # text as plain lists of str (JSON everywhere: static figures, the FigureWidget's messages)
    text = dict(text=[[str(int(e)) for e in row] for row in top1], texttemplate="%{text}",
                textfont=dict(family=MONO)) if cell_text else {}        # font size: plotly fits it to the cell
    fig = go.Figure(go.Heatmap(
        z=top1, x=pos, y=layers, zmin=-0.5, zmax=E - 0.5, colorscale=_expert_colorscale(E),
        hovertext=[hover[l] for l in layers], hoverinfo="text", xgap=1, ygap=1, **text,
        # the colorbar's title text must be "" (not unset, not text): any title on a horizontal colorbar makes
        # plotly.js 3.8 draw the axis titles over their tick labels; the annotation below names the scale instead
        colorbar=dict(title=dict(text=""), tickmode="array", tickvals=list(range(E)), ticktext=[str(e) for e in range(E)],
                      orientation="h", x=1.0, xanchor="right", y=1.01, yanchor="bottom", thickness=12,
                      lenmode="pixels", len=min(26 * E, 640), outlinewidth=0)))
    fig.add_annotation(text="top-1 expert", xref="paper", yref="paper", x=1.0, xshift=-min(26 * E, 640) - 6, y=1.01,
                       yshift=10, xanchor="right", yanchor="bottom", showarrow=False, font=dict(size=12, color="#444"))
    tokens = [trace.tokens[batch][p] for p in pos]
    generated = 0 < trace.prompt_length <= pos.max()
    axis = _token_axis(list(pos), tokens, "position (grey: generated)" if generated else "position",
                       trace.prompt_length if generated else None, shown=shown)
    windowed = shown < len(pos)
    if windowed:
        axis.update(range=[float(pos[-shown]) - 0.5, float(pos[-1]) + 0.5],
                    rangeslider=dict(visible=True, thickness=0.07, bgcolor="#F3F5F8"))
        axis["title"] = dict(text=axis["title"]["text"] + f" · showing {shown} of {len(pos)}: drag the slider "
                                                          f"below to pan, its handles to zoom", standoff=axis["title"]["standoff"])
    fig.update_xaxes(**axis)
    fig.update_yaxes(title=dict(text="layer", standoff=AXIS_TITLE_STANDOFF), autorange="reversed", showgrid=False,
                     automargin=True, tickmode="array" if len(layers) <= 48 else "auto", tickvals=layers)
    if generated and trace.prompt_length > pos.min():
        fig.add_vline(x=trace.prompt_length - 0.5, line=dict(color="#222", dash="dot", width=2))
    # the row and span on a second, smaller line of the title
    sub = f"batch row {batch}{_span_note(trace, batch, pos)} · hover a cell for its top-k experts"
    _finish(fig, f'Token routing map: top-1 expert per layer and position<br><span style="font-size:12px;'
                 f'color:#555">{sub}</span>',
            height=max(340, 200 + 22 * len(layers)) + (70 if windowed else 0), width=width,
            margin=dict(l=70, r=30, t=120, b=60))
    fig.update_layout(title=dict(y=1, yref="container", yanchor="top", pad=dict(t=12)))   # the colorbar sits below
    return fig


def _routed_tokens(trace, layer: int, batch: int, span=None):
    """(positions, tokens, top-1 experts, hover texts) of the real tokens of a row (inside span) at a layer."""
    _check_routing(trace)
    _check_batch(trace, batch)
    L = trace.topk_experts.shape[0]
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise ValueError(f"layer must be in [0, {L - 1}], got {layer!r}")
    pos = span_positions(trace, batch, span)
    top1 = trace.topk_experts[layer, batch, pos, 0].cpu().numpy()
    hover = _routing_hover(trace, batch, pos)[layer]
    return pos, [trace.tokens[batch][p] for p in pos], top1, hover


def _display_text(token: str) -> str:
    """Token text as it reads in running text: tabs and carriage returns visible (⇥ ␍), each newline (raw or
    escaped by the tokenizer) shown as ↵ followed by the newline itself."""
    for escaped, raw in (("\\n", "\n"), ("\\r", "\r"), ("\\t", "\t")):
        token = token.replace(escaped, raw)
    return token.replace("\t", "⇥").replace("\r", "␍").replace("\n", "↵\n")


def routed_text_html(trace, layer: int, batch: int = 0, span=None) -> str:
    """The text of a row, each token on the colour of its top-1 expert at `layer` (HTML for ipywidgets.HTML
    or a report); hovering a token shows its top-k experts, weights and margin. span: only those positions."""
    pos, tokens, top1, hover = _routed_tokens(trace, layer, batch, span)
    spans = []
    for p, tok, e, h in zip(pos, tokens, top1, hover):
        color = expert_color(int(e))
        tip = html.unescape(h.replace("<br>", "\n").replace("<b>", "").replace("</b>", ""))
        cls = "tok gen" if p >= trace.prompt_length else "tok"
        spans.append(f'<span class="{cls}" data-position="{p}" data-expert="{int(e)}" title="{html.escape(tip)}" '
                     f'style="background:{color};color:{text_color(color)}">{html.escape(_display_text(tok)) or "∅"}'
                     f'</span>')
    E = _n_experts(trace)
    generated = "; dotted underline: generated" if pos.size and pos.max() >= trace.prompt_length else ""
    legend = "".join(f'<span class="tok" title="expert {e}" style="background:{expert_color(e)};'
                     f'color:{text_color(expert_color(e))}">{e}</span>' for e in range(E))
    return (f'<div class="dbrx-routed-text" style="font-family:{html.escape(MONO)};font-size:14px;line-height:1.9">'
            f'<style>.dbrx-routed-text .tok{{white-space:pre-wrap;padding:2px 1px;margin:0 1px;border-radius:3px}}'
            f'.dbrx-routed-text .gen{{text-decoration:underline dotted;text-underline-offset:4px}}</style>'
            f'<div style="font-family:sans-serif;font-size:12px;color:#555;margin-bottom:6px">top-1 expert at '
            f'layer {layer} (batch row {batch}{html.escape(_span_note(trace, batch, pos))}{generated}) · experts: '
            f'{legend}</div>' + "".join(spans) + "</div>")


def routed_text(trace, layer: int, batch: int = 0, width: int = 80) -> go.Figure:
    """The same coloured-text view as a figure: tokens wrapped at `width` characters, each a bar coloured by
    its top-1 expert at `layer` (one legend entry per expert, click to hide); hover as in the routing map."""
    pos, tokens, top1, hover = _routed_tokens(trace, layer, batch)
    line, col, rows = 0, 0, []                              # (line, start column, length, text, expert, hover)
    for tok, e, h in zip(tokens, top1, hover):
        text = _display_text(tok)
        breaks = text.count("\n")
        text = text.replace("\n", "")
        n = max(len(text), 1) + 1                           # one column of padding per token
        if col and col + n > width:
            line, col = line + 1, 0
        rows.append((line, col, n, text, int(e), h))
        col += n
        if breaks:
            line, col = line + breaks, 0
    fig = go.Figure()
    for e in sorted(set(int(x) for x in top1)):
        mine = [r for r in rows if r[4] == e]
        color = expert_color(e)
        fig.add_trace(go.Bar(
            orientation="h", y=[r[0] for r in mine], base=[r[1] for r in mine], x=[r[2] for r in mine],
            text=[r[3] for r in mine], textposition="inside", insidetextanchor="middle", textangle=0,
            textfont=dict(family=MONO, size=13, color=text_color(color)),
            marker=dict(color=color, line=dict(color="white", width=2)), name=f"expert {e}",
            hovertext=[r[5] for r in mine], hoverinfo="text", width=0.86))
    n_lines = line + 1
    fig.update_xaxes(visible=False, range=[0, width])
    fig.update_yaxes(visible=False, range=[n_lines - 0.5, -0.5])
    return _finish(fig, f"Tokens coloured by top-1 expert at layer {layer} (batch row {batch})",
                   barmode="overlay", uniformtext=dict(minsize=11, mode="show"), height=150 + 30 * n_lines,
                   width=60 + 10 * width, plot_bgcolor="white", margin=dict(l=20, r=20, t=100, b=20),
                   legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0, entrywidth=78))


# --- attention -----------------------------------------------------------------------------------
def attention_pattern(trace, layer: int, batch: int, max_tokens: int | None = None, span=None):
    """(pattern [H_sel, Q, K] of real queries/keys, heads, query positions, key positions); span: only the
    positions inside it (a slice or (start, stop), see `span_bounds`), as queries and as keys; with max_tokens,
    only the last max_tokens of those. Keys outside the crop are left out, so a row may sum to less than 1."""
    if layer not in trace.attention:
        raise ValueError(f"no attention recorded for layer {layer}; recorded layers: {sorted(trace.attention)} "
                         f"(record it with Record(attention=[{layer}]))")
    _check_batch(trace, batch)
    real = trace.attention_mask[batch].cpu().numpy()
    if not real.any():
        raise ValueError(f"batch row {batch} has no real tokens")
    keys = span_positions(trace, batch, span)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
        keys = keys[-max_tokens:]
    queries = (np.arange(trace.seq_len) if trace.attention_query_positions is None
               else np.asarray(trace.attention_query_positions))
    rows = np.flatnonzero(real[queries] & (queries >= keys[0]) & (queries <= keys[-1]))
    if not rows.size:
        raise ValueError(f"no recorded query position lies in {int(keys[0])}..{int(keys[-1])} (recorded query "
                         f"positions: {queries.tolist()})")
    pattern = trace.attention[layer][batch].float().cpu().numpy()[:, rows][:, :, keys]   # [H_sel, Q, K]
    heads = list(trace.attention_heads.get(layer, range(pattern.shape[0])))
    return pattern, heads, queries[rows], keys


def _shown(trace, batch: int, kpos: np.ndarray) -> str:
    n = int(trace.attention_mask[batch].sum())
    last = int(np.flatnonzero(trace.attention_mask[batch].cpu().numpy())[-1])
    if len(kpos) == n:
        return f"{n} tokens"
    if int(kpos[-1]) == last and len(kpos) == int((_real_positions(trace, batch) >= kpos[0]).sum()):
        return f"last {len(kpos)} of {n} tokens"
    return f"positions {int(kpos[0])}–{int(kpos[-1])} of {n} tokens"


def _position_labels(trace, batch: int, positions: np.ndarray) -> list[str]:
    """Unique category labels "token·position" (plotly merges equal categories; the suffix keeps repeated
    tokens apart), so hover can name tokens via %{x}/%{y} without a string per cell."""
    tok = trace.tokens[batch]
    return [f"{plotly_text(readable_token(tok[p]))}·{p}" for p in positions]


def _attention_trace(trace, batch: int, a: np.ndarray, qpos, kpos, head: int, **kwargs) -> go.Heatmap:
    """Heatmap of one head's pattern a [Q, K] on token·position categories; hover: head, query, key, weight."""
    return go.Heatmap(z=a, x=_position_labels(trace, batch, kpos), y=_position_labels(trace, batch, qpos),
                      hovertemplate=f"head {head}<br>query %{{y}}<br>key %{{x}}<br>attention %{{z:.3f}}<extra></extra>",
                      **kwargs)


def attention_heatmap(trace, layer: int, head: int, batch: int = 0, max_tokens: int | None = None,
                      span=None) -> go.Figure:
    """Attention pattern of one head: query x key, labelled "token·position", real tokens only (span: those
    inside it, e.g. `chat_span(trace)`; max_tokens: the last max_tokens of them). Values are the recorded
    weights (0 above the diagonal)."""
    pattern, heads, qpos, kpos = attention_pattern(trace, layer, batch, max_tokens, span)
    if head not in heads:
        raise ValueError(f"head {head} not recorded at layer {layer}; recorded heads: {heads}")
    fig = go.Figure(_attention_trace(trace, batch, pattern[heads.index(head)], qpos, kpos, head, zmin=0, zmax=1,
                                     colorscale=SEQUENTIAL, colorbar=dict(title=dict(text="attention<br>weight"))))
    ticks = dict(tickfont=dict(family=MONO, size=11), showgrid=False, type="category")
    fig.update_xaxes(title=dict(text="key (token·position)", standoff=AXIS_TITLE_STANDOFF), automargin=True,
                     tickangle=-60 if len(kpos) > 6 else 0, **ticks)
    fig.update_yaxes(title=dict(text="query (token·position)", standoff=AXIS_TITLE_STANDOFF), automargin=True,
                     autorange="reversed", **ticks)
    side = max(420, min(900, 220 + 24 * len(kpos)))
    return _finish(fig, f"Attention pattern: layer {layer}, head {head} (batch row {batch}, "
                        f"{_shown(trace, batch, kpos)})",
                   height=side, width=side + 120)


def attention_grid(trace, layer: int, batch: int = 0, cols: int | None = None,
                   max_tokens: int | None = None, span=None) -> go.Figure:
    """Every recorded head of a layer side by side (one shared colour scale 0..1); hover names the tokens.
    span / max_tokens: show only the positions inside span / the last max_tokens real tokens (a grid holds
    heads x tokens^2 cells)."""
    pattern, heads, qpos, kpos = attention_pattern(trace, layer, batch, max_tokens, span)
    H = len(heads)
    cols = cols or min(H, 4 if H <= 16 else 8)
    rows = math.ceil(H / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"head {h}" for h in heads],
                        horizontal_spacing=0.02, vertical_spacing=min(0.06, 0.3 / rows))
    for i, h in enumerate(heads):
        fig.add_trace(_attention_trace(trace, batch, pattern[i], qpos, kpos, h, coloraxis="coloraxis"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, type="category")
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, type="category", autorange="reversed")
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="key", row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="query", row=r, col=1)
    panel = 220 if cols <= 4 else 150
    return _finish(fig, f"Attention patterns of layer {layer}, all recorded heads (batch row {batch}, "
                        f"{_shown(trace, batch, kpos)})",
                   coloraxis=dict(colorscale=SEQUENTIAL, cmin=0, cmax=1,
                                  colorbar=dict(title=dict(text="attention<br>weight"))),
                   height=110 + rows * (panel + 30), width=min(1600, 140 + cols * (panel + 10)))


# --- co-activation, repetition, specialization, cross-layer flow ----------------------------------
def coactivation_heatmap(co, layer: int | None = None, value: str = "lift") -> go.Figure:
    """Which experts are chosen together at a layer: expert i (row) x expert j (column) of `coactivation`.

    value "lift" (P(j | i) / random baseline (k-1)/(E-1); midpoint 1) or "p_j_given_i" (midpoint: the
    baseline). The diagonal is blank. With the table of `analysis.routing.coactivation_intervals`, hover
    gives the bootstrap interval, and cells flagged low_count (count_i < min_count: lift saturates at
    1/baseline on few tokens) are blank (grey), with the reason in their hover text.
    """
    from .analysis import coactivation

    if value not in ("lift", "p_j_given_i"):
        raise ValueError(f"value must be 'lift' or 'p_j_given_i', got {value!r}")
    df = _table(co, coactivation, ["layer", "expert_i", "expert_j", "p_j_given_i", "baseline", "lift"],
                "coactivation_heatmap")
    df, layer = _one_layer(df, layer)
    E = int(max(df["expert_i"].max(), df["expert_j"].max())) + 1
    z, hover = np.full((E, E), np.nan), [[f"expert {i} with itself" for _ in range(E)] for i in range(E)]
    has_ci = {"lift_lo", "p_j_given_i_lo", "low_count"} <= set(df.columns)
    level, unit = df.attrs.get("level", 0.95), df.attrs.get("bootstrap", "text")
    for r in df.itertuples(index=False):
        low = has_ci and bool(r.low_count)
        z[r.expert_i, r.expert_j] = np.nan if low else getattr(r, value)
        text = (f"layer {layer}<br>P(expert {r.expert_j} | expert {r.expert_i}) = {r.p_j_given_i:.3f}"
                f"<br>random baseline {r.baseline:.3f} · lift {r.lift:.2f}<br>n = {r.count_both} of {r.count_i} tokens")
        if has_ci:
            lo, hi = getattr(r, f"{value}_lo"), getattr(r, f"{value}_hi")
            text += (f"<br>{level:.0%} CI [{lo:.3f}, {hi:.3f}] (bootstrap over {r.n_units} {unit}s)"
                     if np.isfinite(lo) else f"<br>no interval: fewer than 2 {unit}s")
            if low:
                text += (f"<br><b>blank: expert {r.expert_i} was chosen on fewer than "
                         f"{df.attrs.get('min_count', 'min_count')} tokens</b> (lift saturates at {r.lift_max:.2f})")
        hover[r.expert_i][r.expert_j] = text
    mid = 1.0 if value == "lift" else float(df["baseline"].iloc[0])
    fig = go.Figure(_baseline_heatmap(z, mid, x=list(range(E)), y=list(range(E)), hovertext=hover,
                                      colorbar=dict(title=dict(text=value.replace("_", " ")
                                                               + f"<br>white = random<br>({mid:.3g})"))))
    fig.update_xaxes(title="expert j (chosen too)", tickmode="linear", showgrid=False)
    fig.update_yaxes(title="expert i (given)", tickmode="linear", autorange="reversed", showgrid=False,
                     scaleanchor="x")
    title = f"Expert co-activation at layer {layer}: P(j in top-k | i in top-k)" + (" / random" if value == "lift" else "")
    extra = {}
    if has_ci:
        title += (f"<br><sup>grey: expert i chosen on fewer than {df.attrs.get('min_count', 'min_count')} tokens "
                  f"(too few to read) · hover: n and {level:.0%} bootstrap interval</sup>")
        extra = dict(plot_bgcolor="#C8C8C8", margin=dict(l=70, r=30, t=80, b=60))
    return _finish(fig, title, height=560, width=640, **extra)


_REPETITION_LABELS = {"same_top1": "same top-1 expert", "overlap": "top-k sets overlap",
                      "jaccard": "Jaccard of top-k sets", "shared": "shared experts (count)"}
_METRIC_COLORS = ["#2F3E55", "#6F86A8", "#A9B9CF", "#5E5E5E"]       # neutral: not expert colours


def repetition_bars(rep, metrics: Sequence[str] = ("same_top1", "overlap", "jaccard")) -> go.Figure:
    """Do consecutive tokens route alike? Bars per layer for each metric of `routing_repetition`, with a
    dashed line at each metric's random baseline. With the table of `analysis.routing.repetition_intervals`:
    whiskers (the bootstrap interval of each metric) and n (pairs, resampled units) in the hover."""
    from .analysis import routing_repetition

    bad = [m for m in metrics if m not in _REPETITION_LABELS]
    if bad or not metrics:
        raise ValueError(f"metrics must be among {list(_REPETITION_LABELS)}, got {list(metrics)}")
    df = _table(rep, routing_repetition, ["layer", "pairs", *metrics, *(f"baseline_{m}" for m in metrics)],
                "repetition_bars")
    fig = go.Figure()
    layers = df["layer"].to_numpy()
    has_ci = all({f"{m}_lo", f"{m}_hi"} <= set(df.columns) for m in metrics) and "n_units" in df.columns
    level, unit = df.attrs.get("level", 0.95), df.attrs.get("bootstrap", "text")
    for m, color in zip(metrics, _METRIC_COLORS):
        base = float(df[f"baseline_{m}"].iloc[0])
        y = df[m].to_numpy(float)
        error_y, notes = None, [""] * len(df)
        if has_ci:
            lo, hi = df[f"{m}_lo"].to_numpy(float), df[f"{m}_hi"].to_numpy(float)
            error_y = dict(type="data", symmetric=False, array=np.nan_to_num(np.maximum(hi - y, 0)),
                           arrayminus=np.nan_to_num(np.maximum(y - lo, 0)), color="#222", thickness=1, width=3)
            units = "pairs" if unit == "token" else f"{unit}s"
            notes = [f"<br>{level:.0%} CI [{a:.3f}, {b:.3f}] (bootstrap over {int(n):,} {units})" if np.isfinite(a)
                     else f"<br>no interval: fewer than 2 {units}" for a, b, n in zip(lo, hi, df["n_units"])]
        fig.add_trace(go.Bar(
            x=layers, y=y, name=_REPETITION_LABELS[m], marker_color=color, legendgroup=m, error_y=error_y,
            customdata=np.stack([df["pairs"], y / base, np.array(notes, dtype=object)], axis=-1),
            hovertemplate=(f"layer %{{x}}<br>{_REPETITION_LABELS[m]}: %{{y:.3f}}<br>random baseline {base:.3f} "
                           f"(%{{customdata[1]:.2f}}×)<br>n = %{{customdata[0]}} token pairs%{{customdata[2]}}"
                           f"<extra></extra>")))
        fig.add_trace(go.Scatter(
            x=[layers.min() - 0.45, layers.max() + 0.45], y=[base, base], mode="lines", legendgroup=m,
            line=dict(color=color, dash="dash", width=2.5), name=f"random: {base:.3f}",
            hovertemplate=f"random baseline of {_REPETITION_LABELS[m]}: {base:.3f}<extra></extra>"))
    fig.update_xaxes(title="layer", tickmode="linear" if len(layers) <= 48 else "auto")
    fig.update_yaxes(title="share of consecutive token pairs" if "shared" not in metrics else "value")
    title = "Consecutive-token routing repetition per layer vs random routing (dashed)"
    if has_ci:
        title += (f"<br><sup>whiskers: {level:.0%} bootstrap interval over "
                  f"{'token pairs' if unit == 'token' else unit + 's'} · n = {int(df['pairs'].iloc[0]):,} "
                  f"token pairs per layer</sup>")
    return _finish(fig, title, barmode="group", height=420 + (20 if has_ci else 0),
                   legend=dict(orientation="h", y=-0.2),
                   margin=dict(l=70, r=30, t=90 if has_ci else 60, b=60))


def specialization_bars(spec, layer: int | None = None, value: str = "lift",
                        domains: Sequence | None = None) -> go.Figure:
    """Domain specialization at a layer: per domain, a bar per expert (in its colour) of `domain_specialization`.

    value "lift" (share of the domain's tokens / share over all labelled tokens; 1 = average use) or
    "lift_uniform" (share / (k/E); 1 = uniform router) or "share" (line at the uniform k/E).
    With the table of `analysis.routing.specialization_intervals`: error bars (bootstrap interval of lift or
    share), low_count bars hatched and pale (fewer than min_count tokens), and saturated bars (lift at its
    ceiling tokens_all / tokens_domain: only this domain uses the expert) outlined, with a note saying so.
    """
    if value not in ("lift", "lift_uniform", "share"):
        raise ValueError(f"value must be 'lift', 'lift_uniform' or 'share', got {value!r}")
    required = ["layer", "expert", "share", "baseline_share", "lift", "lift_uniform", "tokens", "count"]
    if not isinstance(spec, pd.DataFrame) or not set(required) <= set(spec.columns):
        raise ValueError(f"specialization_bars needs the table of analysis.domain_specialization (columns "
                         f"{required} and the domain column); labels are not in a Trace")
    df, layer = _one_layer(spec, layer)
    extra = {"share_all", "n_units", "share_lo", "share_hi", "lift_lo", "lift_hi", "lift_max", "log_odds",
             "log_odds_lo", "log_odds_hi", "saturated", "low_count", "lift_uniform_lo", "lift_uniform_hi"}
    by = next((c for c in df.columns if c not in required and c not in extra), None)
    has_ci = f"{value}_lo" in df.columns
    flagged = {"saturated", "low_count", "lift_max"} <= set(df.columns)
    if by is None:
        raise ValueError("the table has no domain column: build it with domain_specialization(source, by=...)")
    all_domains = list(dict.fromkeys(df[by]))
    domains = all_domains if domains is None else list(domains)
    missing = [d for d in domains if d not in all_domains]
    if missing:
        raise ValueError(f"domains {missing} not in the table's {by!r} values {all_domains}")
    fig = make_subplots(rows=len(domains), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=[f"{by} = {d}" for d in domains])
    for r, d in enumerate(domains, start=1):
        part = df[df[by] == d].sort_values("expert")
        experts = part["expert"].to_numpy()
        y = part[value].to_numpy(float)
        notes = [""] * len(part)
        error_y = None
        if has_ci:
            lo, hi = part[f"{value}_lo"].to_numpy(float), part[f"{value}_hi"].to_numpy(float)
            error_y = dict(type="data", symmetric=False, array=np.nan_to_num(np.maximum(hi - y, 0)),
                           arrayminus=np.nan_to_num(np.maximum(y - lo, 0)), color="#444", thickness=1, width=3)
            level = spec.attrs.get("level", 0.95)
            notes = [f"<br>{level:.0%} CI [{a:.2f}, {b:.2f}] (bootstrap over {n} {spec.attrs.get('bootstrap', 'text')}s)"
                     if np.isfinite(a) else "<br>no interval: fewer than 2 texts"
                     for a, b, n in zip(lo, hi, part["n_units"])]
        low = part["low_count"].to_numpy(bool) if flagged else np.zeros(len(part), bool)
        sat = part["saturated"].to_numpy(bool) if flagged else np.zeros(len(part), bool)
        if flagged:
            mc = spec.attrs.get("min_count", "min_count")
            notes = [n + (f"<br><b>fewer than {mc} tokens</b>: too few to read" if lw else "")
                     + (f"<br><b>saturated</b>: only this {plotly_text(by)} uses the expert; lift is at its "
                        f"ceiling {m:.2f} whatever the count" if st and value == "lift" else "")
                     for n, lw, st, m in zip(notes, low, sat, part["lift_max"])]
        fig.add_trace(go.Bar(
            x=experts, y=y, marker_color=[expert_color(int(e)) for e in experts],
            marker_opacity=np.where(low, 0.35, 1.0),
            marker_pattern_shape=np.where(low, "/", ""),
            marker_line=dict(color=np.where(sat & (value == "lift"), "#CA0020", "#333").tolist(),
                             width=np.where(sat & (value == "lift"), 2.0, 0.5).tolist()),
            name=str(d), showlegend=False, error_y=error_y,
            customdata=np.stack([part["share"], part["share_all"], part["baseline_share"], part["count"],
                                 part["tokens"], np.array(notes, dtype=object)], axis=-1),
            hovertemplate=(f"{by} {plotly_text(str(d))} · layer {layer} · expert %{{x}}<br>{value} %{{y:.2f}}"
                           "<br>share of its tokens %{customdata[0]:.3f} (all domains %{customdata[1]:.3f}, "
                           "uniform %{customdata[2]:.3f})<br>n = %{customdata[3]} of %{customdata[4]} tokens"
                           "%{customdata[5]}<extra></extra>")), row=r, col=1)
        ref = float(part["baseline_share"].iloc[0]) if value == "share" else 1.0
        fig.add_hline(y=ref, line=dict(color="#444", dash="dash", width=1), row=r, col=1)
    fig.update_xaxes(tickmode="linear", showgrid=False)
    fig.update_xaxes(title="expert", row=len(domains), col=1)
    ylabel = {"lift": "lift vs all domains", "lift_uniform": "lift vs uniform", "share": "share of tokens"}[value]
    fig.update_yaxes(title=ylabel)
    title = (f"Domain specialization at layer {layer}: {ylabel} (dashed: "
             f"{'uniform k/E' if value == 'share' else 'no specialization'})")
    if flagged:
        title += (f"<br><sup>hatched: fewer than {spec.attrs.get('min_count', 'min_count')} tokens"
                  + (" · red outline: saturated (only this domain uses the expert, so lift = all tokens / this "
                     "domain's tokens whatever the count)" if value == "lift" else "")
                  + (f" · whiskers: {spec.attrs.get('level', 0.95):.0%} bootstrap interval" if has_ci else "")
                  + "</sup>")
    return _finish(fig, title, height=120 + 170 * len(domains) + (30 if flagged else 0),
                   margin=dict(l=70, r=30, t=90 if flagged else 60, b=60))


def routing_sankey(flows, layers: Sequence[int] | None = None, min_count: int = 1,
                   min_share: float = 0.0, label_share: float = 0.0) -> go.Figure:
    """Cross-layer routing as a Sankey: a column per layer with one node per expert (in its colour, ordered
    by expert id from the top, at fixed positions), links = tokens whose top-1 expert goes from one to the
    other (`layer_transitions`, rank "top1", or computed for a source over consecutive `layers`).

    Links below min_count tokens or below min_share of their source node's tokens are dropped (hover a node
    for its full count); nodes smaller than label_share of their column go unlabelled, so labels never
    overlap (the dashboard uses min_share 0.05, label_share 0.03). Nodes are "L{layer} e{expert}"; an expert
    with no link drawn has no node. Fixed positions keep the picture stable and comparable across layers.
    """
    from .analysis import layer_transitions

    if not 0 <= min_share < 1:
        raise ValueError(f"min_share must be in [0, 1), got {min_share!r}")
    if not 0 <= label_share < 1:
        raise ValueError(f"label_share must be in [0, 1), got {label_share!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    required = ["layer_a", "expert_a", "layer_b", "expert_b", "count", "share", "expected"]
    if isinstance(flows, pd.DataFrame) and set(required) <= set(flows.columns):
        df = flows
        if layers is not None:
            df = df[df["layer_a"].isin(layers) & df["layer_b"].isin(layers)]
    else:
        pairs = None if layers is None else list(zip(list(layers)[:-1], list(layers)[1:]))
        df = _table(flows, layer_transitions, required, "routing_sankey", layer_pairs=pairs)
    if df.empty:
        raise ValueError(f"no transitions between the layers {layers}")
    node_layers = sorted(set(df["layer_a"]) | set(df["layer_b"]))
    # every token's total per node, before any link is dropped (what hover reports)
    out_all = df.groupby(["layer_a", "expert_a"])["count"].sum()
    in_all = df.groupby(["layer_b", "expert_b"])["count"].sum()
    links = df[(df["count"] >= min_count) & (df["count"] > 0) & (df["share"] >= min_share)]
    if links.empty:
        raise ValueError(f"no link has >= {min_count} tokens and >= {min_share:.0%} of its source's tokens: "
                         f"lower min_count or min_share")
    outflow = links.groupby(["layer_a", "expert_a"])["count"].sum()
    inflow = links.groupby(["layer_b", "expert_b"])["count"].sum()
    nodes = sorted({(int(l), int(e)) for l, e in outflow.index} | {(int(l), int(e)) for l, e in inflow.index})
    size = {n: max(int(outflow.get(n, 0)), int(inflow.get(n, 0))) for n in nodes}
    index = {n: i for i, n in enumerate(nodes)}
    columns = {l: [n for n in nodes if n[0] == l] for l in node_layers}
    most = max(len(c) for c in columns.values())
    gap = min(0.02, 0.3 / max(most - 1, 1))              # fraction of the height between two nodes
    xs, ys, labels, hover = [], [], [], []
    col_x = {l: 0.001 + 0.998 * i / max(len(node_layers) - 1, 1) for i, l in enumerate(node_layers)}
    for l, col in columns.items():
        total = max(sum(size[n] for n in col), 1)
        free = 1 - gap * (len(col) - 1)
        below = 0
        for i, n in enumerate(col):
            xs.append(col_x[l])
            ys.append(min(0.999, max(0.001, gap * i + free * (below + size[n] / 2) / total)))
            below += size[n]
            labels.append(f"L{l} e{n[1]}" if size[n] >= label_share * total else "")
            tokens = int(out_all.get(n, in_all.get(n, 0)))
            hover.append(f"layer {l} · expert {n[1]}: top-1 of {tokens} tokens")
    ordered = sorted(nodes, key=index.get)
    fig = go.Figure(go.Sankey(
        arrangement="fixed",
        node=dict(label=labels, x=xs, y=ys, pad=4, thickness=16, color=[expert_color(e) for _, e in ordered],
                  line=dict(color="#333", width=0.3), customdata=hover,
                  hovertemplate="%{customdata}<extra></extra>"),
        link=dict(source=[index[(int(a), int(i))] for a, i in zip(links["layer_a"], links["expert_a"])],
                  target=[index[(int(b), int(j))] for b, j in zip(links["layer_b"], links["expert_b"])],
                  value=links["count"].tolist(), color=[_rgba(expert_color(int(e)), 0.4) for e in links["expert_a"]],
                  customdata=np.stack([links["layer_a"], links["expert_a"], links["layer_b"], links["expert_b"],
                                       links["share"], links["expected"]], axis=-1),
                  hovertemplate=("layer %{customdata[0]} e%{customdata[1]} → layer %{customdata[2]} "
                                 "e%{customdata[3]}: %{value} tokens<br>%{customdata[4]:.1%} of the source's "
                                 "tokens (independent layers: %{customdata[5]:.1f})<extra></extra>"))))
    for l in node_layers:
        fig.add_annotation(x=col_x[l], y=1.0, xref="paper", yref="paper", yanchor="bottom", showarrow=False,
                           text=f"layer {l}", font=dict(size=12, color="#555"))
    dropped = len(df[df["count"] > 0]) - len(links)
    note = "link width = tokens; experts top to bottom by id"
    if dropped:
        note += f"; hidden: {dropped} link(s) under {min_share:.0%} of their source's tokens or {min_count} token(s)"
    fig.add_annotation(x=0, y=-0.06, xref="paper", yref="paper", yanchor="top", xanchor="left", showarrow=False,
                       text=note, font=dict(size=11, color="#777"))
    return _finish(fig, f"Cross-layer routing of top-1 experts (layers {node_layers[0]}–{node_layers[-1]})",
                   height=max(460, 22 * most + 160), width=min(1600, max(900, 220 * len(node_layers))),
                   margin=dict(l=30, r=30, t=90, b=60))


# --- interventions -------------------------------------------------------------------------------
def ablation_impact(impact: pd.DataFrame) -> go.Figure:
    """Ablation impact matrix: layer x expert heatmap of the loss change when the expert alone is ablated,
    the output of `analysis.ablation_sweep` (index layer, columns expert, nats per token; attrs mode,
    baseline_loss). Red: the loss rises without the expert; the colour scale is symmetric around 0."""
    if not isinstance(impact, pd.DataFrame) or impact.empty or not all(
            pd.api.types.is_number(v) for v in [*impact.index, *impact.columns]):
        raise ValueError("ablation_impact needs analysis.ablation_sweep's layer x expert DataFrame "
                         "(index: layers, columns: experts, values: loss change in nats per token)")
    z = impact.to_numpy(dtype=float)
    base, mode = impact.attrs.get("baseline_loss"), impact.attrs.get("mode", "ablation")
    rel = (lambda d: f" ({d / base:+.1%} of the baseline {base:.3f})") if base else (lambda d: "")
    hover = [[f"{mode}: layer {l} · expert {e}<br>Δ loss {z[i, j]:+.4f} nats/token{rel(z[i, j])}"
              for j, e in enumerate(impact.columns)] for i, l in enumerate(impact.index)]
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=list(impact.columns), y=list(impact.index), zmid=0, zmin=-lim, zmax=lim,
                               colorscale=DIVERGING, hovertext=hover, hoverinfo="text", xgap=1, ygap=1,
                               colorbar=dict(title=dict(text="Δ loss<br>(nats/token)"))))
    fig.update_xaxes(title="expert", tickmode="array", tickvals=list(impact.columns), showgrid=False)
    fig.update_yaxes(title="layer", autorange="reversed", showgrid=False)
    n = impact.attrs.get("n_targets")
    return _finish(fig, f"Ablation impact ({mode}): change in loss when one expert is ablated (nats per token"
                        + (f", {n} predicted tokens)" if n else ")"), height=max(360, 90 + 26 * len(impact.index)))


_DIFF_OPS = {"equal": 0, "replace": 1, "only": 2, "gap": 3}        # cell colours of generation_diff
_DIFF_COLORS = [[0, "#EEEEEE"], [0.25, "#EEEEEE"], [0.25, "#F4A582"], [0.5, "#F4A582"], [0.5, "#D6604D"],
                [0.75, "#D6604D"], [0.75, "#FFFFFF"], [1, "#FFFFFF"]]
_CELL_CHAR_PX = 7.5           # width of one character of 12 px monospace, with a little room
_DIFF_PLOT_PX = 960 - 100     # plot area of a figure that fills a notebook (margins off)


def diff_cell_chars(n_columns: int, width: int | None) -> int:
    """How many characters fit in one cell of a generation_diff strip of n_columns (0: none, hover only):
    long tokens are cut to this (with …) so a label never runs into its neighbours."""
    plot = (width - 100) if width else _DIFF_PLOT_PX
    return max(0, min(8, int(plot / max(n_columns, 1) / _CELL_CHAR_PX) - 1))


def _diff_alignment(result, steps: pd.DataFrame) -> pd.DataFrame:
    """The result's aligned columns, or align_tokens over per_step's ids (tokens when there are no ids)."""
    have = getattr(result, "alignment", None)
    if isinstance(have, pd.DataFrame) and {"op", "baseline_step", "ablated_step"} <= set(have.columns) and len(have):
        return have
    from .analysis.compare import align_tokens           # analysis is upstream of figures

    def run(side: str) -> list:
        key = f"{side}_id" if f"{side}_id" in steps.columns else f"{side}_token"
        return [v for v in steps[key] if not pd.isna(v)]

    return align_tokens(run("baseline"), run("ablated"))


def generation_diff(result) -> go.Figure:
    """Baseline vs ablated generation as an aligned diff (free-running: each run's own tokens), above the
    per-step KL(baseline || ablated), teacher-forced on the baseline's tokens, the first divergence marked.

    The two token rows are aligned (analysis.compare.align_tokens: common prefix, then difflib), so a token
    inserted or dropped shifts nothing: grey cells agree, orange ones were replaced, red ones exist in one
    run only (the other row has a blank gap there). Tokens longer than a cell are cut with "…" (full text
    on hover). The KL of baseline step i is drawn at that token's column.
    result: `analysis.compare_generations(...)` (a GenerationComparison; its `per_step` has step,
    baseline_token, ablated_token, kl, top_token_changed; `first_divergence` is a step or None; its
    `alignment` is used when present).
    """
    steps = getattr(result, "per_step", None)
    need = ["step", "baseline_token", "ablated_token", "kl", "top_token_changed"]
    if not isinstance(steps, pd.DataFrame) or not set(need) <= set(steps.columns):
        raise ValueError(f"generation_diff needs compare_generations' result (per_step with columns {need})")
    align = _diff_alignment(result, steps)
    by_step = steps.set_index("step")
    cols = np.arange(len(align))
    width = _width(160 + 64 * len(cols))
    chars = diff_cell_chars(len(cols), width)
    rows: dict[str, dict[str, list]] = {}
    for side in ("baseline", "ablated"):
        z, text, full = [], [], []
        for op, s in zip(align["op"], align[f"{side}_step"]):
            if pd.isna(s):
                z.append(_DIFF_OPS["gap"]), text.append(""), full.append(None)
                continue
            tok = by_step.at[int(s), f"{side}_token"]
            tok = "" if pd.isna(tok) else str(tok)
            z.append(_DIFF_OPS["equal" if op == "equal" else "replace" if op == "replace" else "only"])
            text.append(readable_token(tok, chars) if chars else "")
            full.append(tok)
        rows[side] = {"z": z, "text": text, "full": full}
    kl = np.full(len(cols), np.nan)
    changed = np.zeros(len(cols), bool)
    for c, s in zip(cols, align["baseline_step"]):
        if not pd.isna(s) and int(s) in by_step.index:
            kl[c] = float(by_step.at[int(s), "kl"]) if not pd.isna(by_step.at[int(s), "kl"]) else np.nan
            changed[c] = bool(by_step.at[int(s), "top_token_changed"]) if not pd.isna(
                by_step.at[int(s), "top_token_changed"]) else False
    what = {"equal": "same token", "replace": "replaced", "delete": "only in the baseline",
            "insert": "only in the ablated run"}

    def side_text(side: str, c: int) -> str:
        s, tok = align[f"{side}_step"].iloc[c], rows[side]["full"][c]
        return f"{side} —" if tok is None else f"{side} step {int(s)} <b>{plotly_text(readable_token(tok, 40))}</b>"

    hover = [f"column {c} · {what.get(op, op)}<br>{side_text('baseline', c)}<br>{side_text('ablated', c)}"
             + (f"<br>KL {kl[c]:.4f} nats (teacher-forced)" if np.isfinite(kl[c]) else "")
             + ("<br>top token changed" if changed[c] else "") for c, op in zip(cols, align["op"])]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.3, 0.7], vertical_spacing=0.1,
                        subplot_titles=["generated tokens, aligned (free-running; grey: same, orange: replaced, "
                                        "red: only in one run, blank: gap)",
                                        "KL(baseline ‖ ablated), teacher-forced on the baseline's tokens"])
    fig.add_trace(go.Heatmap(z=[rows["baseline"]["z"], rows["ablated"]["z"]], x=cols, y=["baseline", "ablated"],
                             text=[rows["baseline"]["text"], rows["ablated"]["text"]], texttemplate="%{text}",
                             textfont=dict(family=MONO, size=12), zmin=0, zmax=3, showscale=False,
                             colorscale=_DIFF_COLORS, xgap=2, ygap=2,
                             hovertext=[hover, hover], hoverinfo="text"), row=1, col=1)
    fig.add_trace(go.Scatter(x=cols, y=kl, mode="lines+markers", name="KL", line=dict(color="#2F3E55"),
                             marker=dict(color=np.where(changed, "#CA0020", "#2F3E55"), size=8),
                             hovertext=hover, hoverinfo="text"), row=2, col=1)
    first = next((int(c) for c, op in zip(cols, align["op"]) if op != "equal"), None)
    if first is not None:
        fig.add_vline(x=first, line=dict(color="#CA0020", dash="dot", width=2), row=2, col=1,
                      annotation_text=f"first divergence (step {result.first_divergence})"
                      if result.first_divergence is not None else "first divergence",
                      annotation_position="top right", annotation_font_color="#CA0020")
    fig.update_yaxes(autorange="reversed", showgrid=False, row=1, col=1)
    fig.update_yaxes(title="KL (nats)", rangemode="tozero", exponentformat="e", row=2, col=1)
    fig.update_xaxes(title="aligned column (red markers: the top token changed)", row=2, col=1)
    fig.update_xaxes(showgrid=False, row=1, col=1)
    return _finish(fig, "Generation diff: baseline vs ablated", showlegend=False, height=460, width=width)


def routing_cascade(result) -> go.Figure:
    """How an intervention's routing change cascades: layer x position heatmap of `compare_generations`'
    `cascade` (share of each token's top-k experts that changed, teacher-forced on the baseline tokens);
    a dotted line where generated tokens start."""
    cascade = getattr(result, "cascade", None)
    need = ["layer", "position", "changed_fraction", "jaccard", "top1_changed"]
    if not isinstance(cascade, pd.DataFrame) or not set(need) <= set(cascade.columns) or cascade.empty:
        raise ValueError(f"routing_cascade needs compare_generations' result (cascade with columns {need})")
    grid = cascade.pivot(index="layer", columns="position", values="changed_fraction")
    jac = cascade.pivot(index="layer", columns="position", values="jaccard").to_numpy(float)
    top1 = cascade.pivot(index="layer", columns="position", values="top1_changed").to_numpy(bool)
    z = grid.to_numpy(float)
    generated = {int(p): str(t) for p, t in zip(result.per_step["position"], result.per_step["baseline_token"])
                 if not pd.isna(t)}
    prompt_length = len(result.prompt_ids)

    def where(p: int) -> str:
        return (f"generated <b>{plotly_text(readable_token(generated[p], 40))}</b>" if p in generated
                else "prompt" if p < prompt_length else "")

    hover = [[f"layer {l} · position {p} ({where(p)})<br>{z[i, j]:.0%} of the top-k changed · Jaccard "
              f"{jac[i, j]:.2f}" + ("<br>top-1 expert changed" if top1[i, j] else "")
              for j, p in enumerate(grid.columns)] for i, l in enumerate(grid.index)]
    fig = go.Figure(go.Heatmap(z=z, x=list(grid.columns), y=list(grid.index), zmin=0, zmax=1, colorscale="Reds",
                               xgap=1, ygap=1, hovertext=hover, hoverinfo="text",
                               colorbar=dict(title=dict(text="share of<br>top-k<br>changed"))))
    fig.add_vline(x=prompt_length - 0.5, line=dict(color="#222", dash="dot", width=2))
    fig.update_xaxes(title="position (right of the dotted line: generated)", showgrid=False)
    fig.update_yaxes(title="layer", autorange="reversed", showgrid=False)
    return _finish(fig, "Routing cascade: how much each token's top-k changed in the ablated run",
                   height=max(300, 120 + 26 * len(grid.index)), width=_width(160 + 16 * len(grid.columns)))


# --- expert cards and routing paths (issue 21) --------------------------------------------------------
_LABEL_COLORS = ["#2F3E55", "#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#999933",
                 "#882255", "#117733"]                  # path labels (not experts: a path has many experts)


def path_sankey(paths, n: int = 12) -> go.Figure:
    """The n most frequent routing paths as an alluvial figure: one column per layer, a node per expert set
    that one of these paths uses there ("{1,5,7,9}"), one band per path (width = tokens), coloured by the
    path's most common label when the table has labels. `paths`: `routing_paths` or `path_counts` output.
    Paths outside the n shown are left out; the title gives the share of tokens the n paths cover."""
    from .analysis.paths import format_path, path_counts

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(paths, pd.DataFrame) or "path" not in paths.columns:
        raise ValueError("path_sankey needs a paths table (analysis.routing_paths or analysis.path_counts)")
    counts = paths if "count" in paths.columns else path_counts(paths)
    cols = [c for c in counts.columns if c.startswith("set_L")]
    layers = [int(c.removeprefix("set_L")) for c in cols]
    if len(layers) < 2:
        raise ValueError("path_sankey needs paths over at least two layers")
    top = counts.head(n)
    tokens = counts.attrs.get("tokens", int(counts["count"].sum()))
    index: dict[tuple[int, int], int] = {}
    labels_, x_, y_ = [], [], []
    for li, c in enumerate(cols):
        masks = sorted(set(int(m) for m in top[c]), key=lambda m: -top.loc[top[c] == m, "count"].sum())
        for j, m in enumerate(masks):
            index[(li, m)] = len(labels_)
            labels_.append(format_path([m], [layers[li]]))
            x_.append(0.01 + 0.98 * li / (len(cols) - 1))
            y_.append(0.01 + 0.98 * (j + 0.5) / len(masks))
    has_label = "top_label" in top.columns
    names = sorted(set(top["top_label"].astype(str))) if has_label else []
    src, dst, val, col, hover = [], [], [], [], []
    for rank, (_, row) in enumerate(top.iterrows()):
        color = (_LABEL_COLORS[names.index(str(row["top_label"])) % len(_LABEL_COLORS)] if has_label
                 else _LABEL_COLORS[rank % len(_LABEL_COLORS)])
        text = (f"path #{rank + 1}: {int(row['count'])} tokens ({row['share']:.1%})"
                + (f", {row['purity']:.0%} {plotly_text(str(row['top_label']))}" if has_label else "")
                + (f", e.g. {plotly_text(readable_token(str(row['example']), 24))}" if "example" in top.columns else ""))
        for li in range(len(cols) - 1):
            src.append(index[(li, int(row[cols[li]]))])
            dst.append(index[(li + 1, int(row[cols[li + 1]]))])
            val.append(int(row["count"]))
            col.append(_rgba(color, 0.55))
            hover.append(text)
    fig = go.Figure(go.Sankey(
        arrangement="fixed",
        node=dict(label=labels_, x=x_, y=y_, pad=8, thickness=12, color="#C9D1DC", line=dict(color="#333", width=0.3),
                  hovertemplate="%{label}: %{value} tokens of the paths shown<extra></extra>"),
        link=dict(source=src, target=dst, value=val, color=col, customdata=hover,
                  hovertemplate="%{customdata}<extra></extra>")))
    covered = int(top["count"].sum())
    legend = (" · colour: " + ", ".join(f'<span style="color:{_LABEL_COLORS[i % len(_LABEL_COLORS)]}">'
                                         f'{plotly_text(s)}</span>' for i, s in enumerate(names))) if has_label else ""
    kind = "top-1 expert paths" if counts.attrs.get("top_k") == 1 else "routing paths"
    return _finish(fig, f"The {len(top)} most frequent {kind} ({covered} of {tokens} tokens, "
                        f"{covered / max(tokens, 1):.1%}){legend}",
                   height=max(360, 60 + 34 * max(top[c].nunique() for c in cols)),
                   width=min(1400, max(720, 260 * len(cols))))


def card_logits(card) -> go.Figure:
    """An expert card's promoted (right, red) and suppressed (left, blue) tokens: mean direct logit effect
    of its weighted output at its top contexts (`analysis.expert_cards` with a model)."""
    if getattr(card, "promoted", None) is None or getattr(card, "suppressed", None) is None:
        raise ValueError("this card has no logit effects: build the cards with a model (expert_cards(source, model))")
    df = pd.concat([card.suppressed.iloc[::-1], card.promoted.iloc[::-1]], ignore_index=True)
    labels_ = [readable_token(str(t), 20) for t in df["token"]]
    colors = [_REDS[3] if v > 0 else _BLUES[1] for v in df["logit"]]
    fig = go.Figure(go.Bar(x=df["logit"], y=[f"{s} " + "\u200b" * i for i, s in enumerate(labels_)], orientation="h",
                           marker_color=colors, customdata=df["token_id"],
                           hovertemplate="%{y} (id %{customdata}): %{x:+.3f} logits<extra></extra>"))
    fig.update_xaxes(title=f"mean direct effect on the logit (over {card.dla_positions} top positions)",
                     zeroline=True, zerolinecolor="#888")
    fig.update_yaxes(tickfont=dict(family=MONO, size=11))
    return _finish(fig, f"{card.name}: tokens it promotes and suppresses", height=120 + 18 * len(df), width=560,
                   margin=dict(l=110, r=20, t=50, b=50))


def expert_cache_figure(stats: pd.DataFrame) -> go.Figure:
    """An offloaded model's expert cache per layer (`model.expert_cache.stats()`): hit rate and prefetch
    recall (bars, left axis) and MB read from the file (line, right axis); hover gives the counts."""
    layers = stats.index.to_numpy()
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    looked = stats["hits"] + stats["prefetched_hits"] + stats["misses"] + stats.get("cpu_computed", 0)
    for name, col, color, count in (("hit rate", "hit_rate", "#0072B2", "hits"),
                                    ("prefetch recall", "prefetch_recall", "#E69F00", "prefetched_hits")):
        fig.add_trace(go.Bar(x=layers, y=stats[col].fillna(0), name=name, marker_color=color,
                             customdata=np.stack([stats[count], looked], axis=-1),
                             hovertemplate=f"layer %{{x}}<br>{name} %{{y:.2f}}<br>{count} %{{customdata[0]}} of "
                                           f"%{{customdata[1]}} experts looked up<extra></extra>"),
                      secondary_y=False)
    fig.add_trace(go.Scatter(x=layers, y=stats["bytes_read"] / 1e6, name="MB read", mode="lines+markers",
                             line=dict(color="#555"), hovertemplate="layer %{x}<br>%{y:.1f} MB read<extra></extra>"),
                  secondary_y=True)
    fig.update_layout(template=TEMPLATE, font=FONT, barmode="group", title="Expert cache per layer",
                      legend=dict(orientation="h", y=1.12), margin=dict(t=70, l=60, r=60, b=50))
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="fraction", range=[0, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="MB read from the checkpoint", secondary_y=True, rangemode="tozero")
    return fig
