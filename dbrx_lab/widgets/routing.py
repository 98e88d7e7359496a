"""RoutingExplorer: where does each token go, layer by layer?"""
from __future__ import annotations

import ipywidgets as W

from .. import analysis, figures
from ..trace import Record
from ._base import SELECTED, ClickableFigure, PromptTraceWidget, clicked_position, expert_chip, token_html
from ._span import SpanControl

__all__ = ["RoutingExplorer"]

DEFAULT_PROMPT = "def add(a, b):\n    return a + b\n\nThe cat sat on the mat."


class RoutingExplorer(PromptTraceWidget):
    """Prompt box and Run (or an existing trace), a layer slider, a top-1 / top-k toggle, a span control; click a
    cell of the routing map (or pick a token) to see that token's path through the layers with weights and
    margins. Long sequences: the map opens on a window with a range slider; the span control crops the map, the
    text and the token list to all tokens, a chat's user message + reply (the default for a chat) or a range.

    model: a DbrxLM (None: show `trace` only); trace: a Trace with routing (shown instead of running);
    batch: the trace row to show. State: `trace`, `position` (selected token column), `layer`, `view`,
    `span.value` (None or (start, stop)).
    """

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, trace=None, batch: int = 0, chat: bool = False,
                 background: bool = True) -> None:
        super().__init__(background)
        if model is None and trace is None:
            raise ValueError("RoutingExplorer needs a model (to run prompts) or a trace (to show)")
        self.model, self.trace, self.batch = model, None, batch
        self.position: int | None = None
        self._confidence = None
        prompt_row = self._prompt_row(model, prompt, chat, rows=3, placeholder="text to route")
        self.layer = W.IntSlider(value=0, min=0, max=0, description="layer", continuous_update=False,
                                 layout=W.Layout(width="320px"))
        self.view = W.ToggleButtons(options=[("top-1", "top1"), ("top-k", "topk")], value="topk",
                                    tooltips=["only the highest-weighted expert", "all chosen experts"],
                                    style=W.ToggleButtonsStyle(button_width="64px"))
        self.token = W.Dropdown(description="token", options=[], layout=W.Layout(width="280px"))
        self.token.add_class("dbrx-token")
        self.span = SpanControl(self, self._on_span)
        self.map = ClickableFigure("routing-map", self._on_map_click)
        self.text = W.HTML()
        self.text.add_class("dbrx-routed-text")
        self.path = W.HTML()
        self.path.add_class("dbrx-token-path")

        self._observe(self.layer, lambda _: self._render_layer(), "layer")
        self._observe(self.view, lambda _: self._render_path(), "view")
        self._observe(self.token, self._on_token, "token")

        self.layer.add_class("dbrx-layer")
        self.view.add_class("dbrx-view")
        controls = W.HBox([self.layer, self.view, self.token, self.span.widget],
                          layout=W.Layout(align_items="center", flex_flow="row wrap"))
        lower = W.HBox([W.VBox([W.HTML('<div class="dbrx-section">text at this layer (top-1 expert)</div>'),
                                self.text], layout=W.Layout(width="50%", padding="0 12px 0 0")),
                        W.VBox([W.HTML('<div class="dbrx-section">path of the selected token</div>'), self.path],
                               layout=W.Layout(width="50%"))])
        self.ui = self._frame(
            "Routing explorer",
            "Each cell: the top-1 expert of a token at a layer (hover for the top-k and the router margin). "
            "Click a cell to follow that token through the layers.",
            prompt_row, controls, self.map.widget, lower)
        if trace is not None:
            self._guard(self.set_trace, "trace")(trace)
        else:
            self._guard(self._run_now, "run")()

    # --- actions -----------------------------------------------------------------------------------------
    def record(self) -> Record:
        return Record(router=True)

    def describe(self, trace) -> str:
        return f"{trace.seq_len} tokens · {trace.n_layers} layers · {trace.n_experts} experts, top-{trace.top_k}"

    def set_trace(self, trace) -> None:
        """Show a trace (with routing); selects its last token."""
        if trace.topk_experts is None:
            raise ValueError("this trace has no routing; record it with Record(router=True)")
        if not 0 <= self.batch < trace.batch_size:
            raise ValueError(f"batch must be in [0, {trace.batch_size - 1}], got {self.batch}")
        self.trace = trace
        self._confidence = (analysis.router_confidence(trace.select(self.batch))
                            if trace.router_logits is not None else None)
        self.position = None
        self.span.reset(trace, self.batch)
        with self._quietly():
            self.layer.max = trace.n_layers - 1
            self.layer.value = min(self.layer.value, trace.n_layers - 1)
        self._show_span()

    def set_span(self, span) -> None:
        """Show only some positions: None / "all", "chat" (the user message and the reply of a chat trace) or
        (start, stop) trace columns (stop exclusive)."""
        if self.trace is None:
            raise ValueError("no trace yet: run a prompt or pass trace=")
        self.span.set(span)
        self._show_span()

    def _on_span(self) -> None:
        self._show_span()

    def _show_span(self) -> None:
        """Redraw the map and the token list for the current span; keeps the selected token if it is inside."""
        t = self.trace
        positions = figures.span_positions(t, self.batch, self.span.value)
        tokens = t.tokens[self.batch]
        with self._quietly():
            self.token.options = [(f"{p}: {figures.readable_token(tokens[p], 20)}", int(p)) for p in positions]
        self.map.show(figures.routing_map(t, batch=self.batch, span=self.span.value))
        keep = self.position if self.position in positions else int(positions[-1])
        self.select(keep, self.layer.value)

    def select(self, position: int, layer: int | None = None) -> None:
        """Select a token (trace column) and optionally a layer."""
        real = [p for _, p in self.token.options]
        if position not in real:
            raise ValueError(f"position must be a real token column of row {self.batch} in the span shown: "
                             f"{real[0]}..{real[-1]}, got {position}")
        if layer is not None:
            if not 0 <= layer < self.trace.n_layers:
                raise ValueError(f"layer must be in [0, {self.trace.n_layers - 1}], got {layer}")
        with self._quietly():
            if layer is not None:
                self.layer.value = layer
            self.token.value = position
        self.position = position
        self._render_layer()

    # --- callbacks ---------------------------------------------------------------------------------------
    def _on_map_click(self, trace_index: int, point: dict) -> None:
        self._guard(lambda: self.select(clicked_position(point["x"]), clicked_position(point["y"])), "click")()

    def _on_token(self, change) -> None:
        if change["new"] is not None:
            self.select(change["new"])

    # --- rendering ---------------------------------------------------------------------------------------
    def _render_layer(self) -> None:
        if self.trace is None:
            return
        self.text.value = figures.routed_text_html(self.trace, self.layer.value, batch=self.batch, span=self.span.value)
        if self.position is not None:
            p, l = self.position, self.layer.value
            self.map.mark(dict(type="rect", x0=p - 0.5, x1=p + 0.5, y0=-0.5, y1=self.trace.n_layers - 0.5,
                               line=dict(color=SELECTED, width=2)),
                          dict(type="rect", x0=p - 0.5, x1=p + 0.5, y0=l - 0.5, y1=l + 0.5,
                               line=dict(color=SELECTED, width=4)))
        self._render_path()

    def _render_path(self) -> None:
        if self.trace is None or self.position is None:
            return
        self.path.value = self.path_html(self.position, top1_only=self.view.value == "top1")

    def path_html(self, position: int, top1_only: bool = False) -> str:
        """The token's route: per layer its experts as a bar (width = applied weight), the router margin
        p_(k) - p_(k+1) and the runner-up expert (the one a small push would bring in)."""
        t, b = self.trace, self.batch
        experts = t.topk_experts[:, b, position].numpy()                           # [L, k]
        weights = t.topk_weights[:, b, position].float().numpy() if t.topk_weights is not None else None
        conf = None
        if self._confidence is not None:
            conf = self._confidence[self._confidence["position"] == position].set_index("layer")
        rows = []
        for l in range(experts.shape[0]):
            spans, rest = [], 1.0
            for r, e in enumerate(experts[l]):
                if e < 0 or (top1_only and r > 0):
                    continue
                w = float(weights[l, r]) if weights is not None else 1.0 / experts.shape[1]
                rest -= w
                color = figures.expert_color(int(e))
                label = f"e{e} {w:.2f}" if w >= 0.18 else f"e{e}"
                spans.append(f'<span title="expert {e}: weight {w:.3f}" style="flex:{w:.4f};background:{color};'
                             f'color:{figures.text_color(color)}">{label}</span>')
            if top1_only and rest > 1e-3:
                spans.append(f'<span title="the other experts" style="flex:{rest:.4f};background:#EEF0F3;'
                             f'color:#888">others</span>')
            margin = runner = "—"
            if conf is not None and l in conf.index:
                c = conf.loc[l]
                margin = f"{c['margin']:.3f}"
                runner = expert_chip(int(c["runner_up"]))
            current = ' style="font-weight:600;background:#F3F5F8"' if l == self.layer.value else ""
            rows.append(f'<tr{current}><td>L{l}</td><td><div class="dbrx-bar">{"".join(spans)}</div></td>'
                        f'<td>{margin}</td><td>{runner}</td></tr>')
        token = t.tokens[b][position]
        head = (f'<div style="margin-bottom:4px"><b>{token_html(token, 40)}</b> · position {position}'
                f'{" · generated" if position >= t.prompt_length else ""}</div>')
        return (head + '<table class="dbrx-path"><tr><th>layer</th><th>'
                + ("top-1 expert (width = weight)" if top1_only else f"top-{experts.shape[1]} experts (width = weight)")
                + '</th><th title="p(k) - p(k+1): how close the runner-up came">margin</th><th>runner-up</th></tr>'
                + "".join(rows) + "</table>")

    # --- export ------------------------------------------------------------------------------------------
    def export_table(self):
        """The routing on show: one row per (position, layer, rank) of the shown row inside the span, with the
        token, expert, applied weight, router probability and logit (`Trace.to_frame` columns)."""
        if self.trace is None:
            raise ValueError("nothing to export yet: run a prompt or pass trace=")
        positions = figures.span_positions(self.trace, self.batch, self.span.value)
        df = self.trace.to_frame()
        df = df[(df["batch"] == self.batch) & df["position"].isin(positions)]
        return df.reset_index(drop=True)

    def export_figure(self):
        """The routing map on show (None before a trace is shown)."""
        return self.map.figure

    def __repr__(self) -> str:
        return f"RoutingExplorer(trace={self.trace!r}, layer={self.layer.value}, position={self.position})"

