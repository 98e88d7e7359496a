"""Figures for the causal expert analyses (issue 20): pure functions from their tables to plotly Figures.

    patching_heatmap(analysis.expert_patching(...))          recovery per (layer, expert)
    coalition_curve(analysis.expert_coalition(...))          recovery vs coalition size
    attribution_scatter(exact, analysis.attribution_patching(...))
    audit_figure(analysis.expert_audit(...))                 correlations with CIs beside a metric-vs-effect scatter
    regret_figure(analysis.counterfactual_routing(...))      router regret and optimality per layer
    set_losses(result, position, layer)                      the loss of every expert set at one token
    contrastive_heatmap(analysis.contrastive_experts(...))   risk difference per (layer, expert)
    steering_figure(analysis.steering_effect(...))           baseline vs steered score per prompt

Same look as dbrx_lab.figures (shared template, expert colours, diverging scale centred on 0).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis.audit import OBSERVATIONAL
from .figures import DIVERGING, _finish, expert_color, readable_token

__all__ = ["patching_heatmap", "coalition_curve", "attribution_scatter", "audit_figure", "regret_figure",
           "set_losses", "contrastive_heatmap", "steering_figure"]


def _need(df, columns, name: str, source: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame) or not set(columns) <= set(df.columns) or df.empty:
        raise ValueError(f"{name} needs the non-empty table of {source} (columns {list(columns)})")
    return df


def _layer_expert_heatmap(df: pd.DataFrame, value: str, hover, colorbar: str, marks=None) -> go.Figure:
    grid = df.pivot_table(index="layer", columns="expert", values=value, aggfunc="first")
    z = grid.to_numpy(float)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() and np.nanmax(np.abs(z)) > 0 else 1.0
    text = [[hover(l, e) for e in grid.columns] for l in grid.index]
    fig = go.Figure(go.Heatmap(z=z, x=list(grid.columns), y=list(grid.index), zmid=0, zmin=-lim, zmax=lim,
                               colorscale=DIVERGING, hovertext=text, hoverinfo="text", xgap=1, ygap=1,
                               colorbar=dict(title=dict(text=colorbar))))
    if marks is not None and len(marks):
        fig.add_trace(go.Scatter(x=marks["expert"], y=marks["layer"], mode="markers", hoverinfo="skip",
                                 marker=dict(symbol="circle-open", size=12, color="#222", line_width=2),
                                 showlegend=False))
    fig.update_xaxes(title="expert", tickmode="array", tickvals=list(grid.columns), showgrid=False)
    fig.update_yaxes(title="layer", autorange="reversed", showgrid=False, tickmode="array",
                     tickvals=list(grid.index))
    return fig


# --- 1. patching ---------------------------------------------------------------------------------
def patching_heatmap(df: pd.DataFrame, value: str = "recovery") -> go.Figure:
    """Layer x expert heatmap of `expert_patching`: the recovery (or effect) when one unit is restored; open
    circles mark units that only the clean run routed to at a patched position (restoring them adds them)."""
    _need(df, ["layer", "expert", value, "routed_clean", "routed_corrupt"], "patching_heatmap",
          "analysis.expert_patching")
    idx = df.set_index(["layer", "expert"])

    def hover(l, e):
        if (l, e) not in idx.index:
            return ""
        r = idx.loc[(l, e)]
        return (f"layer {l} · expert {e}<br>recovery {r.recovery:+.3f}<br>effect {r.effect:+.4f}"
                f"<br>routed: clean {'yes' if r.routed_clean else 'no'}, corrupted {'yes' if r.routed_corrupt else 'no'}")

    fig = _layer_expert_heatmap(df, value, hover, value, marks=df[df["routed_clean"] & ~df["routed_corrupt"]])
    a = df.attrs
    title = (f"Expert patching: {value} when one expert is restored from the clean run "
             f"({a.get('metric', 'metric')}: clean {a.get('clean_metric', np.nan):.3f}, "
             f"corrupted {a.get('corrupted_metric', np.nan):.3f})")
    return _finish(fig, title, height=max(360, 90 + 28 * df["layer"].nunique()))


def coalition_curve(df: pd.DataFrame) -> go.Figure:
    """Recovery vs coalition size from `expert_coalition`, each point labelled with the unit it added."""
    _need(df, ["size", "layer", "expert", "recovery", "coalition"], "coalition_curve", "analysis.expert_coalition")
    labels = ["corrupted" if s == 0 else f"+L{l}E{e}" for s, l, e in zip(df["size"], df["layer"], df["expert"])]
    fig = go.Figure(go.Scatter(x=df["size"], y=df["recovery"], mode="lines+markers+text", text=labels,
                               textposition="top center", line=dict(color="#0072B2", width=2),
                               marker=dict(size=9, color=["#999"] + [expert_color(int(e)) for e in df["expert"][1:]]),
                               hovertext=[f"size {s}: {c or '(none)'}<br>recovery {r:+.3f}"
                                          for s, c, r in zip(df["size"], df["coalition"], df["recovery"])],
                               hoverinfo="text"))
    fig.add_hline(y=1.0, line_dash="dash", line_color="#999", annotation_text="clean")
    fig.update_xaxes(title="coalition size (units restored)", dtick=1)
    fig.update_yaxes(title="recovery", zeroline=True)
    return _finish(fig, f"Greedy expert coalition ({df.attrs.get('forwards', '?')} forwards)", height=420)


def attribution_scatter(exact: pd.DataFrame, approx: pd.DataFrame) -> go.Figure:
    """Exact patching effect vs attribution patching's estimate, one point per unit (y = x dashed)."""
    _need(exact, ["layer", "expert", "effect"], "attribution_scatter", "analysis.expert_patching")
    _need(approx, ["layer", "expert", "attribution"], "attribution_scatter", "analysis.attribution_patching")
    m = exact.merge(approx[["layer", "expert", "attribution"]], on=["layer", "expert"])
    lim = float(np.nanmax(np.abs(m[["effect", "attribution"]].to_numpy()))) or 1.0
    fig = go.Figure(go.Scatter(x=m["effect"], y=m["attribution"], mode="markers",
                               marker=dict(size=9, color=[expert_color(int(e)) for e in m["expert"]],
                                           line=dict(width=0.5, color="#333")),
                               hovertext=[f"layer {l} · expert {e}<br>exact {x:+.4f}<br>attribution {y:+.4f}"
                                          for l, e, x, y in zip(m["layer"], m["expert"], m["effect"], m["attribution"])],
                               hoverinfo="text"))
    fig.add_shape(type="line", x0=-lim, y0=-lim, x1=lim, y1=lim, line=dict(dash="dash", color="#999"))
    fig.update_xaxes(title="exact patching effect (metric units)")
    fig.update_yaxes(title="attribution patching estimate")
    return _finish(fig, "Attribution patching vs exact patching", height=460, width=560)


# --- 2. audit ------------------------------------------------------------------------------------
def audit_figure(audit, mode: str = "zero", metric: str = "load", layer=None) -> go.Figure:
    """Observational vs causal, side by side: left, Spearman's rho of each metric with the ablation effect
    per layer (bootstrap CI; filled = significant after BH); right, `metric` vs the effect per expert."""
    corr = _need(audit.correlations, ["layer", "metric", "mode", "rho", "rho_lo", "rho_hi", "significant"],
                 "audit_figure", "analysis.expert_audit")
    c = corr[corr["mode"] == mode]
    if c.empty:
        raise ValueError(f"no correlations for mode {mode!r}; modes audited: {sorted(corr['mode'].unique())}")
    ex = audit.experts if layer is None else audit.experts[audit.experts["layer"] == layer]
    if metric not in OBSERVATIONAL or metric not in ex:
        raise ValueError(f"metric must be one of {list(OBSERVATIONAL)}, got {metric!r}")
    fig = make_subplots(1, 2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
                        subplot_titles=(f"rank correlation with the {mode} ablation effect",
                                        f"{metric} vs effect ({'all layers' if layer is None else f'layer {layer}'})"))
    scopes = [str(s) for s in c["layer"].unique()]
    metrics = list(dict.fromkeys(c["metric"]))
    step = 0.7 / max(1, len(scopes))
    for j, scope in enumerate(scopes):
        g = c[c["layer"].astype(str) == scope]
        y = [metrics.index(m) + (j - (len(scopes) - 1) / 2) * step for m in g["metric"]]   # a row per layer
        fig.add_trace(go.Scatter(
            x=g["rho"], y=y, mode="markers", name="all layers" if scope == "all" else f"layer {scope}",
            error_x=dict(type="data", symmetric=False, array=g["rho_hi"] - g["rho"], arrayminus=g["rho"] - g["rho_lo"]),
            marker=dict(size=9, symbol=["circle" if s else "circle-open" for s in g["significant"]]),
            hovertext=[f"layer {scope} · {m}<br>rho {r:+.3f} [{lo:+.3f}, {hi:+.3f}]<br>p_adj {p:.3g}"
                       for m, r, lo, hi, p in zip(g["metric"], g["rho"], g["rho_lo"], g["rho_hi"], g["p_adjusted"])],
            hoverinfo="text"), 1, 1)
    fig.add_vline(x=0, line_color="#999", line_dash="dot", row=1, col=1)
    eff = f"effect_{mode}"
    fig.add_trace(go.Scatter(x=ex[metric], y=ex[eff], mode="markers", showlegend=False,
                             marker=dict(size=9, color=[expert_color(int(e)) for e in ex["expert"]],
                                         line=dict(width=0.5, color="#333")),
                             error_y=dict(type="data", symmetric=False, array=ex[f"{eff}_hi"] - ex[eff],
                                          arrayminus=ex[eff] - ex[f"{eff}_lo"], thickness=1, color="#aaa"),
                             hovertext=[f"layer {l} · expert {e}<br>{metric} {x:.4f}<br>Δ loss {y:+.4f}"
                                        for l, e, x, y in zip(ex["layer"], ex["expert"], ex[metric], ex[eff])],
                             hoverinfo="text"), 1, 2)
    fig.update_xaxes(title="Spearman rho (95% CI; filled: significant after BH)", range=[-1.05, 1.05], row=1, col=1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(metrics))), ticktext=metrics, row=1, col=1)
    fig.update_xaxes(title=metric, row=1, col=2)
    fig.update_yaxes(title=f"Δ loss when ablated ({mode}, nats/token)", row=1, col=2)
    return _finish(fig, f"Observational vs causal audit ({audit.sampling.get('text', '')})", height=480,
                   legend=dict(orientation="h", y=-0.2), title_font_size=13)


# --- 3. counterfactual routing -------------------------------------------------------------------
def regret_figure(result) -> go.Figure:
    """Per layer: the router's regret over tokens (box, nats) and the share of tokens where its set is the
    best of all C(E, k) (bars); layers ordered from most to least optimal."""
    t = _need(result.table, ["layer", "regret", "rank"], "regret_figure", "analysis.counterfactual_routing")
    by = result.by_layer()
    fig = make_subplots(1, 2, subplot_titles=("router regret per token (nats)", "share of tokens routed optimally"))
    for layer in by["layer"]:
        g = t[t["layer"] == layer]
        fig.add_trace(go.Box(y=g["regret"], name=f"L{layer}", boxpoints="all", jitter=0.4, pointpos=0,
                             marker=dict(size=4), line_color="#0072B2", showlegend=False,
                             hovertext=[f"pos {p} {tok!r} -> {tg!r}<br>regret {r:.4f}, rank {k}"
                                        for p, tok, tg, r, k in zip(g["position"], g["token"], g["target"],
                                                                    g["regret"], g["rank"])],
                             hoverinfo="text"), 1, 1)
    fig.add_trace(go.Bar(x=[f"L{l}" for l in by["layer"]], y=by["optimal_share"], marker_color="#009E73",
                         showlegend=False, text=[f"{s:.0%}" for s in by["optimal_share"]], textposition="outside",
                         hovertext=[f"layer {l}: optimal at {s:.0%} of tokens<br>mean rank {r:.1f}"
                                    f"<br>mean gain vs a random set {g:+.3f} nats"
                                    for l, s, r, g in zip(by["layer"], by["optimal_share"], by["mean_rank"],
                                                          by["mean_gain_vs_random"])],
                         hoverinfo="text"), 1, 2)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    n = int(t["n_sets"].iloc[0]) if "n_sets" in t else "all"
    return _finish(fig, f"Counterfactual routing ({result.variant}): the router's set vs all {n} expert sets, "
                        f"{t['position'].nunique()} tokens", height=440)


def set_losses(result, position: int, layer: int) -> go.Figure:
    """Histogram of the next-token loss of every expert set at one (position, layer), with the router's set,
    the best set and the mean (a random set's expected loss) marked."""
    if position not in result.positions or layer not in result.layers:
        raise ValueError(f"(position, layer) = ({position}, {layer}) was not scored; positions "
                         f"{result.positions[:10]}{'...' if len(result.positions) > 10 else ''}, layers {result.layers}")
    losses = result.losses[result.positions.index(position), result.layers.index(layer)]
    row = result.table[(result.table["position"] == position) & (result.table["layer"] == layer)].iloc[0]
    fig = go.Figure(go.Histogram(x=losses, nbinsx=60, marker_color="#92C5DE", name="expert sets"))
    for x, name, color, where in ((row.router_loss, f"router {row.router_set}", "#D55E00", "top right"),
                                  (row.best_loss, f"best {row.best_set}", "#009E73", "bottom right"),
                                  (row.mean_loss, "mean", "#555", "top right")):
        fig.add_vline(x=x, line_color=color, line_width=2, annotation_text=name, annotation_position=where,
                      annotation_font_color=color)
    fig.update_xaxes(title="next-token loss (nats)")
    fig.update_yaxes(title="expert sets")
    token, target = readable_token(str(row.token)), readable_token(str(row.target))
    return _finish(fig, f"All {len(losses)} expert sets at position {position} ({token} → {target}), "
                        f"layer {layer}: router ranks {int(row['rank'])}", height=400)


# --- 4. contrastive experts and steering ---------------------------------------------------------
def contrastive_heatmap(df: pd.DataFrame) -> go.Figure:
    """Layer x expert risk difference (rate in A - rate in B) from `contrastive_experts`; open circles mark
    experts significant after Benjamini-Hochberg."""
    _need(df, ["layer", "expert", "risk_diff", "rate_a", "rate_b", "p_adjusted", "significant"],
          "contrastive_heatmap", "analysis.contrastive_experts")
    idx = df.set_index(["layer", "expert"])

    def hover(l, e):
        r = idx.loc[(l, e)]
        return (f"layer {l} · expert {e}<br>RD {r.risk_diff:+.3f} [{r.rd_lo:+.3f}, {r.rd_hi:+.3f}]"
                f"<br>A {r.rate_a:.3f} · B {r.rate_b:.3f}<br>p_adj {r.p_adjusted:.3g}")

    fig = _layer_expert_heatmap(df, "risk_diff", hover, "risk diff.", marks=df[df["significant"]])
    return _finish(fig, "Contrastive experts: activation rate in A minus in B (circles: significant, BH)",
                   height=max(360, 90 + 28 * df["layer"].nunique()))


def steering_figure(result) -> go.Figure:
    """Baseline vs steered score per prompt (paired points joined by a line), mean delta and CI in the title."""
    t = _need(result.table, ["prompt", "baseline", "steered"], "steering_figure", "analysis.steering_effect")
    fig = go.Figure()
    for _, r in t.iterrows():
        fig.add_trace(go.Scatter(x=["baseline", "steered"], y=[r.baseline, r.steered], mode="lines+markers",
                                 line=dict(color="#bbb"), marker=dict(size=8, color=["#0072B2", "#D55E00"]),
                                 showlegend=False, hovertext=f"prompt {int(r.prompt)}: {r.baseline:.3f} -> {r.steered:.3f}",
                                 hoverinfo="text"))
    s = result.summary
    fig.update_yaxes(title="log p(label)" if s.score == "label_logprob" else "classifier score")
    return _finish(fig, f"Steering: mean change {s.mean_delta:+.3f} [{s.delta_lo:+.3f}, {s.delta_hi:+.3f}], "
                        f"p = {s.p_value:.3g} ({int(s.prompts)} prompts)", height=420, width=560)
