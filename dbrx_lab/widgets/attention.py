"""AttentionExplorer: attention patterns per layer and head; click a query token to read its attention row."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np

from .. import figures
from ..trace import Record
from ._base import SELECTED, ClickableFigure, PromptTraceWidget, clicked_position, token_html
from ._span import SpanControl

__all__ = ["AttentionExplorer"]

DEFAULT_PROMPT = "The cat sat on the mat. The dog sat on the log. The cat"


class AttentionExplorer(PromptTraceWidget):
    """Layer and head selectors, a grid of every head of the layer, the selected head's pattern, and the
    attention row of a query token (click a row of the pattern or a head in the grid, or pick the token).

    model: a DbrxLM (None: show `trace` only); trace: a Trace with attention recorded; layers: the layers to
    record when running (None: all); max_tokens: draw only the last max_tokens tokens (long prompts). The span
    control crops queries and keys to all tokens, a chat's user message + reply (the default for a chat) or a
    range. State: `trace`, `layer_index`, `head_index`, `query` (selected query column), `span.value`.
    """

    def __init__(self, model=None, prompt: str = DEFAULT_PROMPT, trace=None, batch: int = 0, layers=None,
                 max_tokens: int | None = None, chat: bool = False, background: bool = True) -> None:
        super().__init__(background)
        if model is None and trace is None:
            raise ValueError("AttentionExplorer needs a model (to run prompts) or a trace with attention")
        self.model, self.trace, self.batch = model, None, batch
        self.record_layers, self.max_tokens = layers, max_tokens
        self.query: int | None = None
        prompt_row = self._prompt_row(model, prompt, chat, rows=2)
        self.layer = W.Dropdown(description="layer", options=[], layout=W.Layout(width="160px"))
        self.head = W.Dropdown(description="head", options=[], layout=W.Layout(width="160px"))
        self.token = W.Dropdown(description="query", options=[], layout=W.Layout(width="280px"))
        for w, name in ((self.layer, "layer"), (self.head, "head"), (self.token, "query")):
            w.add_class(f"dbrx-{name}")
        self.span = SpanControl(self, self._render_layer)
        self.grid = ClickableFigure("attention-grid", self._on_grid_click)
        self.pattern = ClickableFigure("attention-head", self._on_pattern_click)
        self.row = W.HTML()
        self.row.add_class("dbrx-attention-row")

        self._observe(self.layer, lambda _: self._render_layer(), "layer")
        self._observe(self.head, lambda _: self._render_head(), "head")
        self._observe(self.token, self._on_token, "query")

        self.ui = self._frame(
            "Attention explorer",
            "All heads of a layer (click one), the selected head's pattern (click a query row) and what that "
            "query token attends to.",
            prompt_row,
            W.HBox([self.layer, self.head, self.token, self.span.widget], layout=W.Layout(flex_flow="row wrap")),
            self.grid.widget,
            W.HBox([self.pattern.widget,
                    W.VBox([W.HTML('<div class="dbrx-section">attention row of the query token</div>'), self.row],
                           layout=W.Layout(flex="1 1 240px", min_width="0", padding="0 0 0 12px"))],
                   layout=W.Layout(flex_flow="row wrap")))
        if trace is not None:
            self._guard(self.set_trace, "trace")(trace)
        else:
            self._guard(self._run_now, "run")()

    @property
    def layer_index(self) -> int | None:
        return self.layer.value

    @property
    def head_index(self) -> int | None:
        return self.head.value

    # --- actions -----------------------------------------------------------------------------------------
    running_message = "running the model with attention capture…"

    def record(self) -> Record:
        return Record(router=True, attention=True if self.record_layers is None else list(self.record_layers))

    def describe(self, trace) -> str:
        return f"{trace.seq_len} tokens · attention of layers {sorted(trace.attention)}"

    def set_trace(self, trace) -> None:
        """Show a trace with attention patterns."""
        if not trace.attention:
            raise ValueError("this trace has no attention patterns; record them with Record(attention=True) or "
                             "Record(attention=[layers])")
        if not 0 <= self.batch < trace.batch_size:
            raise ValueError(f"batch must be in [0, {trace.batch_size - 1}], got {self.batch}")
        self.trace = trace
        self.span.reset(trace, self.batch)
        layers = sorted(trace.attention)
        keep = self.layer.value if self.layer.value in layers else layers[0]
        with self._quietly():
            self.layer.options = [(f"layer {l}", l) for l in layers]
            self.layer.value = keep
        self._render_layer()

    def set_span(self, span) -> None:
        """Show only some positions (as queries and keys): None / "all", "chat" (the user message and the reply
        of a chat trace) or (start, stop) trace columns (stop exclusive)."""
        if self.trace is None:
            raise ValueError("no trace yet: run a prompt or pass trace=")
        self.span.set(span)
        self._render_layer()

    def _pattern(self, layer: int | None = None):
        """figures.attention_pattern of the shown row at `layer` (default: the current one), cropped as shown."""
        return figures.attention_pattern(self.trace, self.layer.value if layer is None else layer, self.batch,
                                         self.max_tokens, self.span.value)

    def select(self, head: int | None = None, query: int | None = None) -> None:
        """Select a head of the current layer and/or a query token column."""
        if head is not None:
            heads = [h for _, h in self.head.options]
            if head not in heads:
                raise ValueError(f"head {head} not recorded at layer {self.layer.value}; recorded heads: {heads}")
            if head != self.head.value:
                with self._quietly():
                    self.head.value = head
                self._render_head()
        if query is not None:
            queries = [q for _, q in self.token.options]
            if query not in queries:
                raise ValueError(f"query must be one of the shown query columns {queries[0]}..{queries[-1]}, "
                                 f"got {query}")
            self.query = query
            with self._quietly():
                self.token.value = query
            self._render_row()

    # --- callbacks ---------------------------------------------------------------------------------------
    def _on_grid_click(self, trace_index: int, point: dict) -> None:
        """A click on head trace_index's panel: select that head and the clicked query row."""
        def pick() -> None:
            heads = [h for _, h in self.head.options]
            if not 0 <= trace_index < len(heads):
                raise ValueError(f"clicked panel {trace_index} is not one of the {len(heads)} heads shown")
            self.select(heads[trace_index], clicked_position(point["y"]))
        self._guard(pick, "click")()

    def _on_pattern_click(self, trace_index: int, point: dict) -> None:
        """A click on the pattern: select the clicked query row (y is a "token·position" category label)."""
        self._guard(lambda: self.select(None, clicked_position(point["y"])), "click")()

    def _on_token(self, change) -> None:
        if change["new"] is not None:
            self.select(query=change["new"])

    # --- rendering ---------------------------------------------------------------------------------------
    def _render_layer(self) -> None:
        t, layer = self.trace, self.layer.value
        if t is None or layer is None:
            return
        self.grid.show(figures.attention_grid(t, layer, batch=self.batch, max_tokens=self.max_tokens,
                                              span=self.span.value), fit=True)
        pattern, heads, queries, _ = self._pattern()
        tokens = t.tokens[self.batch]
        keep_head = self.head.value if self.head.value in heads else heads[0]
        if self.query not in queries:
            self.query = int(queries[-1])
        with self._quietly():
            self.head.options = [(f"head {h}", h) for h in heads]
            self.head.value = keep_head
            self.token.options = [(f"{q}: {figures.readable_token(tokens[q], 20)}", int(q)) for q in queries]
            self.token.value = self.query
        self._render_head()

    def _render_head(self) -> None:
        t = self.trace
        if t is None or self.head.value is None:
            return
        self.pattern.show(figures.attention_heatmap(t, self.layer.value, self.head.value, batch=self.batch,
                                                    max_tokens=self.max_tokens, span=self.span.value))
        self._render_row()

    def _render_row(self) -> None:
        if self.trace is None or self.query is None or self.head.value is None:
            return
        q = self.query
        _, _, queries, keys = self._pattern()
        # the pattern's axes are categories: shapes are placed by category index, not by position
        row, last_key = list(queries).index(q), int(np.searchsorted(keys, q, side="right")) - 1
        self.pattern.mark(dict(type="rect", x0=-0.5, x1=last_key + 0.5, y0=row - 0.5, y1=row + 0.5,
                               line=dict(color=SELECTED, width=3)))
        self.row.value = self.row_html(self.layer.value, self.head.value, q)

    def row_html(self, layer: int, head: int, query: int) -> str:
        """The tokens up to the query, each shaded by the attention weight the query gives it."""
        pattern, heads, queries, keys = self._pattern(layer)
        a = pattern[heads.index(head), list(queries).index(query)]                 # [K]
        tokens = self.trace.tokens[self.batch]
        peak = float(a.max()) if a.size and a.max() > 0 else 1.0
        spans = []
        for k, w in zip(keys, a):
            if k > query:
                break
            alpha = 0.08 + 0.92 * float(w) / peak
            color = "#fff" if alpha > 0.55 else "#1E2530"
            outline = "outline:2px solid #CA0020;" if k == query else ""
            spans.append(f'<span title="key {k} {html.escape(tokens[k])!s}: {float(w):.3f}" '
                         f'style="background:rgba(33,102,172,{alpha:.3f});color:{color};{outline}">'
                         f'{token_html(tokens[k])}</span>')
        top = np.argsort(-a)[:3]
        best = ", ".join(f"<b>{token_html(tokens[keys[i]])}</b> ({float(a[i]):.2f})" for i in top if a[i] > 0)
        return (f'<div style="font-size:12px;color:#555;margin-bottom:6px">layer {layer} · head {head} · query '
                f'{query} <b>{token_html(tokens[query])}</b> attends most to {best}</div>'
                f'<div class="dbrx-attn-row" style="line-height:2">{"".join(spans)}</div>')

    # --- export ------------------------------------------------------------------------------------------
    def export_table(self):
        """The selected head's pattern as shown (current layer, head and span): one row per (query_pos, key_pos)
        with the attention weight; keys after the query (weight 0 under the causal mask) are left out."""
        import pandas as pd

        if self.trace is None or self.head.value is None:
            raise ValueError("nothing to export yet: run a prompt or pass trace=")
        pattern, heads, queries, keys = self._pattern()
        a = pattern[heads.index(self.head.value)]                                    # [Q, K]
        q, k = np.meshgrid(queries, keys, indexing="ij")
        causal = k <= q
        tokens = self.trace.tokens[self.batch]
        return pd.DataFrame({"layer": self.layer.value, "head": self.head.value, "query_pos": q[causal],
                             "query_token": [tokens[i] for i in q[causal]], "key_pos": k[causal],
                             "key_token": [tokens[i] for i in k[causal]], "weight": a[causal]})

    def export_figure(self):
        """The selected head's pattern on show (None before a trace is shown)."""
        return self.pattern.figure

    def __repr__(self) -> str:
        return (f"AttentionExplorer(trace={self.trace!r}, layer={self.layer.value}, head={self.head.value}, "
                f"query={self.query})")
