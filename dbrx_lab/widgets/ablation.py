"""AblationLab: toggle experts off, generate with and without them side by side, see where and how much
the generations diverge (an aligned diff, free-running and teacher-forced numbers, each labelled) and how
the change cascades through the routing; the expert grid shows each expert's usage on this text and, after
a sweep, the loss change from ablating it alone."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import ipywidgets as W
import numpy as np
import pandas as pd
import torch

from .. import analysis, figures
from ..analysis.ablation import LossEvaluator
from ..analysis.compare import _token_ops, align_tokens
from ..interventions import ExpertAblation
from ..trace import Record, run_with_trace
from ._base import FigurePane, LabWidget, prompt_input

__all__ = ["AblationLab"]

DEFAULT_PROMPT = "class Cache:\n    def __init__(self"
MODES = [("reroute", "reroute"), ("zero", "zero"), ("renormalize", "renormalize")]
_MODE_HELP = {"reroute": "the router never picks them; tokens go to the next-best experts",
              "zero": "routing unchanged; their outputs are dropped, other weights kept",
              "renormalize": "routing unchanged; their outputs are dropped, surviving weights rescaled to sum 1"}


HEAT_LEVELS = 10             # colour steps of a grid cell (usage share or |Δ loss|, relative to the grid's max)
GRID_VIEWS = [("usage", "usage"), ("ablation effect", "effect")]


def _heat_css() -> str:
    """Cell backgrounds: dbrx-use-N (blue: share of routed slots), dbrx-up-N / dbrx-down-N (red: ablating
    it alone raises the loss, blue: lowers it); N = 0..9 of the grid's largest value."""
    rules = []
    for n in range(HEAT_LEVELS):
        a = 0.08 + 0.82 * n / (HEAT_LEVELS - 1)
        ink = "white" if n >= 6 else "#1E2530"
        for cls, rgb in (("use", "33,102,172"), ("up", "178,24,43"), ("down", "33,102,172")):
            rules.append(f".dbrx-lab .dbrx-grid .dbrx-{cls}-{n} {{ background: rgba({rgb},{a:.2f}); color: {ink}; }}")
    return "".join(rules)


def _grid_css(n_experts: int) -> str:
    rules = "".join(f".dbrx-lab .dbrx-grid .dbrx-e{e} {{ box-shadow: inset 0 -3px 0 {figures.expert_color(e)}; }}"
                    for e in range(n_experts))
    return f"<style>{rules}{_heat_css()}</style>"


# the text panes' aligned diff: a replaced token is orange, a token only one run has is red and underlined,
# a gap (the other run has tokens here) is a caret drawn by CSS, so it adds no text to copy
TEXT_CSS = """<style>
.dbrx-lab .dbrx-text .diff[data-op="only"] { background: #F9C0AA; text-decoration: underline dotted #CA0020; }
.dbrx-lab .dbrx-text .gap::before { content: "‸"; color: #CA0020; font-weight: 700; }
.dbrx-lab .dbrx-text .gap.first { outline: 2px solid #CA0020; border-radius: 3px; }
.dbrx-lab .dbrx-grid-note { font-size: 12px; color: #555; }
</style>"""


def _delta_label(d: float) -> str:
    """A Δ loss in at most 4-5 characters for a 30 px cell: +.04, -.31, +1.2, +12."""
    if not np.isfinite(d):
        return "·"
    if abs(d) >= 9.95:
        return f"{d:+.0f}"
    if abs(d) >= 0.995:
        return f"{d:+.1f}"
    text = f"{d:+.2f}".replace("0.", ".")
    return "0" if text in ("+.00", "-.00") else text


class AblationLab(LabWidget):
    """Expert ablation during generation, baseline and ablated side by side.

    A layer x expert toggle grid (a header row toggles an expert in every layer), the ablation mode,
    sampling settings and seed, Generate and Stop. Both generations stream token by token, aligned
    (`analysis.compare.align_tokens`: replaced tokens orange, tokens only one run has red, a caret where the
    other run has more); then the summary (free-running numbers, and the ones teacher-forced on the
    baseline's tokens, each labelled), the aligned generation diff with the per-step KL and the routing
    cascade (`analysis.compare_generations`) are drawn.

    The grid's cells carry numbers (switch with "cells show"): usage, each expert's share of the layer's
    routed slots (top-k choices) on the lab's text (the prompt, plus the baseline continuation after a
    Generate), in %, after suggest / Generate / sweep; ablation effect, after `sweep()`: the mean next-token
    loss change (nats per token) on that text when the expert alone is ablated in the current mode (the
    cells of `analysis.ablation_sweep`), red when the loss rises. The sweep runs in the background worker
    with progress and Stop, painting cells as they come.

    model: a DbrxLM with a tokenizer; experts: the initial selection {layer: [experts]}, or "suggest" (the
    default: the `n_suggest` (layer, expert) cells whose ablation moves the next-token distribution most,
    so the demo shows a divergence; see `suggest`), or None (nothing selected).
    The ablation applies only to the lab's own generation: it is attached inside the background thread
    that generates, so other cells and widgets can use the same model meanwhile, see no ablation and don't
    wait for the lab (on an accelerate-dispatched model, calls take turns forward by forward: the model's
    lock). On a large model pass experts=None (or a selection): a suggestion costs up to 33 forward passes
    of the prompt.
    State: `selection` {layer: [experts]}, `interventions()`, `result` (the last GenerationComparison),
    `usage` [L, E] shares (or None), `sweep_table` (layer x expert Δ loss, or None); `export_table()` /
    `export_figure()` give what is shown.
    """

    def __init__(self, model, prompt: str = DEFAULT_PROMPT, experts: Mapping[int, Sequence[int]] | str | None =
                 "suggest", mode: str = "reroute", max_new_tokens: int = 40, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 chat: bool = False, n_suggest: int = 2, background: bool = True) -> None:
        super().__init__(background)
        if model is None:
            raise ValueError("AblationLab needs a model")
        if mode not in _MODE_HELP:
            raise ValueError(f"mode must be one of {list(_MODE_HELP)}, got {mode!r}")
        self.model = model
        cfg = model.config
        self.n_layers, self.n_experts = cfg.n_layers, cfg.moe_num_experts
        self.n_suggest = n_suggest
        self.result = None
        self._pieces: dict[str, list[str]] = {"baseline": [], "ablated": []}     # decoded tokens per branch
        self._ids: dict[str, list[int]] = {"baseline": [], "ablated": []}        # their ids (for the alignment)
        self._prompt_text = ""
        self.usage: np.ndarray | None = None          # [L, E] share of routed slots on `usage_tokens` tokens
        self.usage_tokens = 0
        self.sweep_table: pd.DataFrame | None = None  # layer x expert Δ loss (nats/token), NaN: not measured
        self._heat: dict[tuple[int, int], str] = {}   # the heat class each cell has now
        self._stale = False                           # the prompt changed since the numbers were measured

        # prompt and settings
        self.prompt = W.Textarea(value=prompt, rows=3, placeholder="prompt",
                                 layout=W.Layout(flex="1 1 auto", width="auto"))
        self.prompt.add_class("dbrx-prompt")
        self.chat = W.Checkbox(value=chat, description="chat (user message, ChatML template)", indent=False)
        self.mode = W.ToggleButtons(options=MODES, value=mode, style=W.ToggleButtonsStyle(button_width="112px"),
                                    tooltips=[_MODE_HELP[m] for _, m in MODES])
        self.mode_help = W.HTML(f'<span class="dbrx-status">{_MODE_HELP[mode]}</span>')
        self.max_new_tokens = W.IntSlider(value=max_new_tokens, min=1, max=min(256, cfg.max_seq_len - 1),
                                          description="new tokens", continuous_update=False)
        self.do_sample = W.Checkbox(value=do_sample, description="sample (else greedy)", indent=False)
        self.temperature = W.FloatSlider(value=temperature, min=0.05, max=2.0, step=0.05, description="temperature",
                                         continuous_update=False)
        self.top_k = W.BoundedIntText(value=top_k or 0, min=0, max=cfg.vocab_size, description="top-k",
                                      layout=W.Layout(width="170px"))
        self.top_p = W.FloatSlider(value=top_p or 1.0, min=0.05, max=1.0, step=0.05, description="top-p",
                                   continuous_update=False)
        self.seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="170px"))
        for w, name in ((self.chat, "chat"), (self.mode, "mode"), (self.max_new_tokens, "new-tokens"),
                        (self.do_sample, "sample"), (self.temperature, "temperature"), (self.top_k, "top-k"),
                        (self.top_p, "top-p"), (self.seed, "seed")):
            w.add_class(f"dbrx-{name}")                 # stable handles for the browser test
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play",
                                        layout=W.Layout(width="120px"))
        self.generate_button.add_class("dbrx-generate")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True,
                                    layout=W.Layout(width="90px"))
        self.stop_button.add_class("dbrx-stop")

        # the toggle grid
        self.cells: dict[tuple[int, int], W.ToggleButton] = {}
        self.columns: dict[int, W.ToggleButton] = {}
        self.suggest_button = W.Button(description="suggest", icon="magic", tooltip=(
            "select the experts whose ablation changes the next token most"),
            layout=W.Layout(width="96px"))
        self.clear_button = W.Button(description="clear", icon="eraser", layout=W.Layout(width="80px"))
        self.clear_button.add_class("dbrx-clear")
        self.suggest_button.add_class("dbrx-suggest")
        self.sweep_button = W.Button(description="sweep", icon="th", tooltip=(
            "ablate each expert alone (current mode) and paint its loss change on this text into the grid"),
            layout=W.Layout(width="90px"))
        self.sweep_button.add_class("dbrx-sweep")
        self.grid_view = W.ToggleButtons(options=GRID_VIEWS, value="usage", description="cells show",
                                         style=W.ToggleButtonsStyle(button_width="120px"),
                                         tooltips=["share of the layer's routed slots on this text (%)",
                                                   "loss change from ablating the expert alone (after a sweep)"])
        self.grid_view.add_class("dbrx-grid-view")
        self.grid_note = W.HTML()
        self.grid_note.add_class("dbrx-grid-note")
        self.selection_label = W.HTML()
        self.selection_label.add_class("dbrx-selection")
        grid = self._build_grid()

        # results
        self.baseline_text = W.HTML()
        self.baseline_text.add_class("dbrx-baseline-text")
        self.ablated_text = W.HTML()
        self.ablated_text.add_class("dbrx-ablated-text")
        self.ablated_title = W.HTML()
        self.summary = W.HTML()
        self.summary.add_class("dbrx-summary")
        self.diff_pane = FigurePane("generation-diff")
        self.cascade_pane = FigurePane("cascade")

        self.generate_button.on_click(self._guard(lambda _: self.generate(), "generate"))
        self.stop_button.on_click(self._guard(lambda _: self.stop(), "stop"))
        self.suggest_button.on_click(self._guard(lambda _: self.suggest(), "suggest"))
        self.clear_button.on_click(self._guard(lambda _: self.clear(), "clear"))
        self.sweep_button.on_click(self._guard(lambda _: self.sweep(), "sweep"))
        self._observe(self.mode, lambda _: self._on_settings(), "mode")
        self._observe(self.do_sample, lambda _: self._on_settings(), "sampling")
        self._observe(self.grid_view, lambda _: self._paint_grid(), "cells show")
        self._observe(self.prompt, lambda _: self._on_prompt(), "prompt")
        self._observe(self.chat, lambda _: self._on_prompt(), "chat")

        settings = W.VBox([
            W.HBox([self.mode, self.mode_help], layout=W.Layout(align_items="center")),
            W.HBox([self.max_new_tokens, self.seed, self.do_sample], layout=W.Layout(align_items="center",
                                                                                    flex_flow="row wrap")),
            W.HBox([self.temperature, self.top_k, self.top_p], layout=W.Layout(flex_flow="row wrap")),
        ])
        texts = W.HBox([
            W.VBox([W.HTML('<div class="dbrx-section">baseline</div>'), self.baseline_text],
                   layout=W.Layout(width="50%", padding="0 8px 0 0")),
            W.VBox([self.ablated_title, self.ablated_text], layout=W.Layout(width="50%", padding="0 0 0 8px")),
        ])
        self.ui = self._frame(
            "Ablation lab",
            "Toggle experts off (a cell: one layer; a header: every layer), choose how, and Generate: the same "
            "prompt and seed run with and without them.",
            W.HTML(TEXT_CSS), W.HBox([self.prompt]), self.chat,
            W.HTML('<div class="dbrx-section">experts to ablate</div>'), grid,
            W.HTML('<div class="dbrx-section">mode and sampling</div>'), settings,
            W.HBox([self.generate_button, self.stop_button], layout=W.Layout(margin="6px 0")),
            texts, self.summary, self.diff_pane.widget, self.cascade_pane.widget)
        self._on_settings()
        if isinstance(experts, str):
            if experts != "suggest":
                raise ValueError(f"experts must be {{layer: [experts]}}, 'suggest' or None, got {experts!r}")
            self._guard(self.suggest, "suggest")()
        elif experts:
            self.set_selection(experts)
        self._paint_grid()
        self._render_texts()

    # --- the grid ------------------------------------------------------------------------------------------
    def _build_grid(self) -> W.VBox:
        E = self.n_experts
        cell = W.Layout(width="30px", height="24px")
        label = lambda text: W.HTML(f'<span class="dbrx-rowlabel">{text}</span>',  # noqa: E731
                                    layout=W.Layout(width="74px"))
        header = [label("<b>every layer</b>")]
        for e in range(E):
            b = W.ToggleButton(description=str(e), tooltip=f"expert {e} in every layer", layout=cell)
            b.add_class("dbrx-col")
            b.add_class(f"dbrx-e{e}")
            b.add_class(f"dbrx-col-E{e}")
            self._observe(b, lambda change, e=e: self._on_column(e, change["new"]), "expert column")
            self.columns[e] = b
            header.append(b)
        rows = [W.HBox(header, layout=W.Layout(margin="0 0 6px 0"))]
        for l in range(self.n_layers):
            row = [label(f"layer {l}")]
            for e in range(E):
                b = W.ToggleButton(description=str(e), tooltip=f"layer {l}, expert {e}", layout=cell)
                b.add_class("dbrx-cell")
                b.add_class(f"dbrx-e{e}")
                b.add_class(f"dbrx-cell-L{l}-E{e}")
                self._observe(b, lambda _: self._on_cell(), "expert cell")
                self.cells[(l, e)] = b
                row.append(b)
            rows.append(W.HBox(row))
        tools = W.HBox([self.suggest_button, self.clear_button, self.sweep_button, self.selection_label],
                       layout=W.Layout(align_items="center", margin="4px 0 0 0", flex_flow="row wrap"))
        view = W.HBox([self.grid_view, self.grid_note], layout=W.Layout(align_items="center", flex_flow="row wrap"))
        box = W.VBox([W.HTML(_grid_css(E)), view, *rows, tools])
        box.add_class("dbrx-grid")
        return box

    @property
    def selection(self) -> dict[int, list[int]]:
        """{layer: sorted experts} of the toggled cells."""
        out: dict[int, list[int]] = {}
        for (l, e), b in self.cells.items():
            if b.value:
                out.setdefault(l, []).append(e)
        return {l: sorted(es) for l, es in sorted(out.items())}

    def set_selection(self, selection: Mapping[int, Sequence[int]]) -> None:
        """Toggle exactly these cells on: {layer: [experts]} (layer "all" for every layer)."""
        wanted = set()
        for layer, experts in dict(selection).items():
            layers = range(self.n_layers) if layer == "all" else [layer]
            for l in layers:
                if not isinstance(l, (int, np.integer)) or not 0 <= l < self.n_layers:
                    raise ValueError(f"layer must be in [0, {self.n_layers - 1}] or 'all', got {l!r}")
                for e in experts:
                    if not isinstance(e, (int, np.integer)) or not 0 <= e < self.n_experts:
                        raise ValueError(f"expert must be in [0, {self.n_experts - 1}], got {e!r}")
                    wanted.add((int(l), int(e)))
        with self._quietly():
            for key, b in self.cells.items():
                b.value = key in wanted
        self._on_cell()

    def clear(self) -> None:
        self.set_selection({})

    def toggle(self, layer: int | str, expert: int) -> None:
        """Flip one cell (layer "all": the expert's header toggle)."""
        if layer == "all":
            self.columns[expert].value = not self.columns[expert].value
        else:
            self.cells[(layer, expert)].value = not self.cells[(layer, expert)].value

    @torch.no_grad()
    def suggest(self, max_candidates: int = 32) -> dict[int, list[int]]:
        """Select the n_suggest (layer, expert) cells whose single ablation (current mode) moves the prompt's
        next-token distribution most: candidates are the experts the last prompt token is routed to (the
        max_candidates heaviest), each scored by KL(baseline || ablated) in nats."""
        self.clear_error()
        if not self.prompt.value.strip():
            raise ValueError("the prompt is empty: type a prompt first")
        ids = torch.tensor([self._prompt_ids()])
        mode = self.mode.value
        self.set_status("tracing the prompt…", (0, 1))
        out, trace = run_with_trace(self.model, ids, record=Record(router=True), last_only=True)
        base = out.logits[0, -1].float().log_softmax(-1)
        self._set_usage(trace.topk_experts[:, 0])
        experts, weights = trace.topk_experts[:, 0, -1], trace.topk_weights[:, 0, -1]      # [L, k]
        cells = sorted(((float(w), l, int(e)) for l in range(experts.shape[0])
                        for e, w in zip(experts[l].tolist(), weights[l].tolist()) if e >= 0), reverse=True)
        scores = []
        for i, (_, l, e) in enumerate(cells[:max_candidates]):
            self.set_status(f"trying layer {l} expert {e}…", (i, min(len(cells), max_candidates)))
            with self.model.intervene(ExpertAblation(l, [e], mode=mode)):
                abl = self.model(ids, last_only=True).logits[0, -1].float().log_softmax(-1)
            scores.append((float((base.exp() * (base - abl)).sum()), l, e))
        best = sorted(scores, reverse=True)[:self.n_suggest]
        chosen: dict[int, list[int]] = {}
        for _, l, e in best:
            chosen.setdefault(l, []).append(e)
        self.set_selection(chosen)
        self.set_status("suggested (" + mode + "): " + ", ".join(
            f"layer {l} expert {e} (KL {kl:.2g} nats on the next token)" for kl, l, e in best))
        return chosen

    # --- what the cells show ----------------------------------------------------------------------------
    def _set_usage(self, experts) -> None:
        """usage from top-k experts [L, S, k] of the lab's text (-1 slots ignored), then repaint."""
        experts = np.asarray(experts)
        counts = np.stack([(experts == e).sum(axis=(1, 2)) for e in range(self.n_experts)], axis=1)   # [L, E]
        slots = np.maximum((experts >= 0).sum(axis=(1, 2)), 1)[:, None]
        self.usage, self.usage_tokens, self._stale = counts / slots, int(experts.shape[1]), False
        self._paint_grid()

    def _cell_look(self, l: int, e: int, view: str, top: float) -> tuple[str, str, str]:
        """(label, heat class, tooltip) of cell (l, e) in view "usage" | "effect"; top: the grid's max."""
        tip = [f"layer {l}, expert {e}"]
        share = None if self.usage is None else float(self.usage[l, e])
        delta = None if self.sweep_table is None else float(self.sweep_table.loc[l, e])
        if share is not None:
            tip.append(f"{share:.1%} of the layer's routed slots on this text ({self.usage_tokens} tokens)")
        if delta is not None:
            tip.append("ablated alone: not measured" if not np.isfinite(delta) else
                       f"ablated alone ({self.sweep_table.attrs.get('mode')}): Δ loss {delta:+.4f} nats/token")
        tip.append("click: ablate it in this layer")
        if view == "effect" and delta is not None:
            if not np.isfinite(delta):                                   # not measured (yet): no colour
                return "·", "", " · ".join(tip)
            level = 0 if top <= 0 else round((HEAT_LEVELS - 1) * min(1, abs(delta) / top))
            return _delta_label(delta), f"dbrx-{'up' if delta >= 0 else 'down'}-{level}", " · ".join(tip)
        if view == "usage" and share is not None:
            level = 0 if top <= 0 else round((HEAT_LEVELS - 1) * min(1, share / top))
            return f"{100 * share:.0f}", f"dbrx-use-{level}", " · ".join(tip)
        return str(e), "", " · ".join(tip)

    def _paint_grid(self, cells=None) -> None:
        """Write each cell's number, colour and tooltip for the chosen view (cells: only these)."""
        view = self.grid_view.value
        if view == "effect" and self.sweep_table is not None:
            values = np.abs(self.sweep_table.to_numpy(float))
            top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        else:
            top = float(self.usage.max()) if self.usage is not None else 0.0
        for key in (self.cells if cells is None else cells):
            b = self.cells[key]
            label, heat, tip = self._cell_look(*key, view, top)
            if self._heat.get(key) != heat:
                if self._heat.get(key):
                    b.remove_class(self._heat[key])
                if heat:
                    b.add_class(heat)
                self._heat[key] = heat
            if b.description != label:
                b.description = label
            if b.tooltip != tip:
                b.tooltip = tip
        self._grid_note()

    def _grid_note(self) -> None:
        view = self.grid_view.value
        stale = " <i>(measured before the prompt changed)</i>" if self._stale else ""
        if view == "effect" and self.sweep_table is not None:
            a = self.sweep_table.attrs
            done = int(np.isfinite(self.sweep_table.to_numpy(float)).sum())
            text = (f"Δ loss (nats/token) on {a.get('text_tokens')} tokens when each expert alone is ablated "
                    f"({a.get('mode')}; baseline loss {a.get('baseline_loss', float('nan')):.3f}); red: the "
                    f"loss rises" + ("" if done == self.sweep_table.size else
                                     f"; {done} of {self.sweep_table.size} cells measured"))
        elif view == "effect":
            text = "no sweep yet: press <b>sweep</b> to measure each expert's ablation effect on this text"
        elif self.usage is not None:
            text = (f"% of each layer's routed slots (its top-k choices) on {self.usage_tokens} tokens "
                    f"(the prompt{' + baseline continuation' if self._usage_has_generation() else ''})")
        else:
            text = "numbers appear after suggest, Generate or sweep: each expert's share of the routed slots"
        self.grid_note.value = f'<span class="dbrx-grid-note">{text}{stale}</span>'

    def _usage_has_generation(self) -> bool:
        return self.result is not None and self.usage_tokens > len(self.result.prompt_ids)

    def _on_prompt(self) -> None:
        """The prompt (or chat) changed: the numbers describe the earlier text until re-measured."""
        if (self.usage is not None or self.sweep_table is not None) and not self._stale:
            self._stale = True
            self._grid_note()

    def interventions(self) -> list[ExpertAblation]:
        """One ExpertAblation per layer with toggled experts, in the chosen mode."""
        return [ExpertAblation(l, es, mode=self.mode.value) for l, es in self.selection.items()]

    def _on_column(self, e: int, on: bool) -> None:
        with self._quietly():
            for l in range(self.n_layers):
                self.cells[(l, e)].value = on
        self._on_cell()

    def _on_cell(self) -> None:
        with self._quietly():
            for e, b in self.columns.items():
                b.value = all(self.cells[(l, e)].value for l in range(self.n_layers))
        sel = self.selection
        n = sum(len(v) for v in sel.values())
        self.selection_label.value = (
            '<span class="dbrx-status">nothing selected</span>' if not n else
            f'<span class="dbrx-status">{n} cell{"s" * (n > 1)}: '
            + "; ".join(f"layer {l}: {', '.join(map(str, es))}" for l, es in sel.items()) + "</span>")
        self.ablated_title.value = (f'<div class="dbrx-section">ablated · {html.escape(self.mode.value)} · '
                                    f'{n} expert cell{"s" * (n != 1)}</div>')

    def _on_settings(self) -> None:
        self.mode_help.value = f'<span class="dbrx-status">{_MODE_HELP[self.mode.value]}</span>'
        sampling = self.do_sample.value
        for w in (self.temperature, self.top_k, self.top_p):
            w.disabled = not sampling
        self._on_cell()

    # --- generation ----------------------------------------------------------------------------------------
    def _prompt_ids(self) -> list[int]:
        tok = self.model.tokenizer
        if tok is None:
            raise ValueError("the model has no tokenizer: load it with dbrx_lab.load_model(...)")
        if self.chat.value:
            return list(tok.apply_chat_template(prompt_input(self.prompt.value, True), add_generation_prompt=True,
                                                tokenize=True))
        return list(tok.encode(self.prompt.value))

    def settings(self) -> dict:
        """The sampling keyword arguments of compare_generations from the controls."""
        sample = self.do_sample.value
        return dict(max_new_tokens=int(self.max_new_tokens.value), seed=int(self.seed.value), do_sample=sample,
                    temperature=float(self.temperature.value) if sample else 1.0,
                    top_k=(int(self.top_k.value) or None) if sample else None,
                    top_p=(float(self.top_p.value) if self.top_p.value < 1.0 else None) if sample else None)

    def generate(self) -> None:
        """Start baseline + ablated generation (in the background when background=True)."""
        self.clear_error()
        if self.busy:
            raise RuntimeError("a generation is running: press Stop first")
        if not self.prompt.value.strip():
            raise ValueError("the prompt is empty: type a prompt")
        ivs = self.interventions()
        if not ivs:
            raise ValueError("no expert selected: toggle at least one cell (or an expert's header) to ablate")
        for iv in ivs:
            iv.attach(self.model.config)                            # ValueError naming the range, before starting
        ids, kwargs = self._prompt_ids(), self.settings()
        self.result = None
        self._pieces = {"baseline": [], "ablated": []}
        self._ids = {"baseline": [], "ablated": []}
        self._prompt_text = self.model.tokenizer.decode(ids)
        self.summary.value = ""
        self.diff_pane.show(None)
        self.cascade_pane.show(None)
        self._render_texts(running=True)
        self._set_running(True)
        self._start(lambda: self._generate_now(ids, ivs, kwargs), "generate",
                    on_exit=lambda: self._set_running(False))

    def _set_running(self, running: bool) -> None:
        self.generate_button.disabled = running
        self.stop_button.disabled = not running
        self.suggest_button.disabled = running
        self.sweep_button.disabled = running

    def _generate_now(self, ids: list[int], ivs: list[ExpertAblation], kwargs: dict) -> None:
        n = kwargs["max_new_tokens"]
        self.set_status("generating…", (0, 2 * n))
        done = [0]

        def on_step(step) -> None:
            self._pieces[step.branch].append(self.model.tokenizer.decode([step.token_id]))
            self._ids[step.branch].append(int(step.token_id))
            done[0] += 1
            if step.branch == "ablated" or done[0] % 2 == 0:
                self._render_texts(running=True)
            self.set_status(f"generating… token {step.index + 1} of {n}", (done[0], 2 * n))

        # compare_generations enters model.intervene(*ivs) here, in the worker thread (background=True): the
        # ablation is attached in this thread's context only, never in the caller's
        result = analysis.compare_generations(self.model, ids, ivs, on_step=on_step, stop=self._stop.is_set,
                                              **kwargs)
        self.result = result
        self._render_texts()
        if result.routing is not None:
            self._set_usage(result.routing)
        self.set_status("drawing…", (1, 1))
        self.summary.value = self.summary_html(result, stopped=self._stop.is_set())
        self.diff_pane.show(figures.generation_diff(result))
        self.cascade_pane.show(figures.routing_cascade(result))
        self.set_status(f"done: {len(result.baseline_ids)} baseline and {len(result.ablated_ids)} ablated tokens"
                        + (" (stopped)" if self._stop.is_set() else ""))

    def run_sync(self) -> "AblationLab":
        """generate() and wait for it (scripts and tests)."""
        self.generate()
        return self.wait()

    # --- the sweep -------------------------------------------------------------------------------------
    def _text_ids(self) -> list[int]:
        """The lab's text: the prompt, plus the last baseline continuation when it was generated from it."""
        ids = self._prompt_ids()
        if self.result is not None and self.result.prompt_ids.tolist() == ids:
            ids = ids + self.result.baseline_ids.tolist()
        return ids

    def sweep(self, layers: Sequence[int] | None = None, experts: Sequence[int] | None = None) -> None:
        """Ablate each (layer, expert) alone in the current mode and paint the loss change on the lab's text
        into the grid (in the background when background=True; Stop ends it, leaving the rest unmeasured).
        layers / experts: only these cells (default all; on a large model a sweep costs one forward of the
        text per cell the text routes to)."""
        self.clear_error()
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        experts = list(range(self.n_experts)) if experts is None else list(experts)
        for name, values, n in (("layer", layers, self.n_layers), ("expert", experts, self.n_experts)):
            if not values:
                raise ValueError(f"no {name} to sweep: pass some in [0, {n - 1}] (or None for all)")
            for v in values:
                if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not 0 <= v < n:
                    raise ValueError(f"{name} must be in [0, {n - 1}], got {v!r}")
        if self.busy:
            raise RuntimeError("the lab is running: press Stop first")
        if not self.prompt.value.strip():
            raise ValueError("the prompt is empty: type a prompt")
        ids = self._text_ids()
        if len(ids) < 2:
            raise ValueError(f"the text has {len(ids)} token: a loss needs at least 2 (a longer prompt, or Generate)")
        mode = self.mode.value
        self._set_running(True)
        cells = [(int(l), int(e)) for l in layers for e in experts]
        self._start(lambda: self._sweep_now(ids, mode, cells), "sweep", on_exit=lambda: self._set_running(False))

    def run_sweep_sync(self, layers: Sequence[int] | None = None,
                       experts: Sequence[int] | None = None) -> "AblationLab":
        """sweep(layers, experts) and wait for it (scripts and tests)."""
        self.sweep(layers, experts)
        return self.wait()

    @torch.no_grad()
    def _sweep_now(self, ids: list[int], mode: str, cells: list[tuple[int, int]]) -> None:
        L, E = self.n_layers, self.n_experts
        self.set_status("sweep: tracing the text…", (0, len(cells) + 1))
        _, trace = run_with_trace(self.model, torch.tensor([ids]), record=Record(router=True), last_only=True)
        self._set_usage(trace.topk_experts[:, 0])
        ev = LossEvaluator(self.model, [ids])
        table = pd.DataFrame(np.nan, index=pd.Index(range(L), name="layer"), columns=pd.Index(range(E), name="expert"))
        table.attrs.update(baseline_loss=ev.baseline_loss, mode=mode, n_targets=ev.n_targets, text_tokens=len(ids))
        self.sweep_table = table
        with self._quietly():
            self.grid_view.value = "effect"
        self._paint_grid()
        # an expert the text never routes to changes nothing when it is dropped (zero / renormalize), or when
        # it is removed before top-k and the chosen weights are renormalised anyway (reroute, p-norm on)
        skip_unused = mode != "reroute" or bool(self.model.config.moe_normalize_expert_weights)
        for i, (l, e) in enumerate(cells):
            if self._stop.is_set():
                break
            self.set_status(f"sweep ({mode}): layer {l}, expert {e}…", (i + 1, len(cells) + 1))
            if skip_unused and self.usage[l, e] == 0:
                table.loc[l, e] = 0.0
            else:
                table.loc[l, e] = ev.loss(ExpertAblation(l, [e], mode=mode)) - ev.baseline_loss
            # this cell now; every cell (colours are relative to the grid's largest value) once a row is done
            self._paint_grid(None if i % E == E - 1 else [(l, e)])
        stopped = self._stop.is_set()
        table.attrs["complete"] = not stopped
        self._paint_grid()
        best = sorted(((float(table.loc[l, e]), l, e) for l in range(L) for e in range(E)
                       if np.isfinite(table.loc[l, e])), reverse=True)[:3]
        top = ", ".join(f"layer {l} expert {e} ({d:+.3g})" for d, l, e in best) or "none"
        self.set_status(f"sweep ({mode}) {'stopped' if stopped else 'done'}: {int(table.notna().sum().sum())} cells; "
                        f"largest Δ loss (nats/token): {top}")

    # --- rendering -----------------------------------------------------------------------------------------
    def _render_texts(self, running: bool = False) -> None:
        """Both panes from the tokens so far, aligned (while streaming, only the steps both runs have are
        aligned; the newest baseline token waits as "same" for its ablated partner)."""
        ids = self._ids
        n = min(len(ids["baseline"]), len(ids["ablated"])) if running else None
        ops = _token_ops(ids["baseline"][:n], ids["ablated"][:n])
        first = next((c for c, (op, _, _) in enumerate(ops) if op != "equal"), None)
        for side, pane in (("baseline", self.baseline_text), ("ablated", self.ablated_text)):
            cols = [(op, i if side == "baseline" else j) for op, i, j in ops]
            pane.value = self._text_html(self._prompt_text, self._pieces[side], cols, first, running)

    @staticmethod
    def _text_html(prompt: str, mine: list[str], columns: list[tuple[str, int | None]], first: int | None,
                   running: bool) -> str:
        """One pane: the prompt in grey, then this run's tokens by aligned column (op, my step or None for a
        gap), steps past the aligned ones as "same"; the first divergent column marked "first"."""
        if len(prompt) > 400:
            prompt = "…" + prompt[-400:]
        spans, gap, gap_first = [], 0, False

        def flush() -> None:
            nonlocal gap, gap_first
            if gap:
                title = f"the other run has {gap} token{'s' * (gap > 1)} here"
                spans.append(f'<span class="gap{" first" if gap_first else ""}" title="{title}"></span>')
            gap, gap_first = 0, False

        seen = set()
        for c, (op, step) in enumerate(columns):
            if step is None:
                gap += 1
                gap_first |= c == first
                continue
            flush()
            seen.add(step)
            cls = "same" if op == "equal" else "diff"
            if c == first:
                cls += " first"
            kind = "" if op == "equal" else f' data-op="{"replace" if op == "replace" else "only"}"'
            spans.append(f'<span{kind} class="gen {cls}" data-step="{step}">{html.escape(mine[step])}</span>')
        flush()
        spans += [f'<span class="gen same" data-step="{i}">{html.escape(p)}</span>' for i, p in enumerate(mine)
                  if i not in seen]
        cursor = '<span class="cursor">▌</span>' if running else ""
        placeholder = ('<span class="prompt">press Generate</span>' if not prompt and not mine else "")
        return (f'<div class="dbrx-text dbrx-card"><span class="prompt">{html.escape(prompt)}</span>'
                f'{"".join(spans)}{cursor}{placeholder}</div>')

    @staticmethod
    def summary_html(result, stopped: bool = False) -> str:
        """Two labelled paragraphs: free-running (each run continues its own text: first divergence, token
        agreement, the aligned diff, each text's log-probability under both models) and teacher-forced on
        the baseline's tokens (KL, top-token changes, routing change), which after a divergence measure the
        two models on the baseline's context, not how far the texts drifted."""
        steps, first = result.per_step, result.first_divergence
        m = result.metrics()
        if first is None:
            free = ["<b>The generations are identical.</b> These experts do not change this continuation; try "
                    "more experts, another layer, or mode <i>zero</i>."]
        else:
            row = steps.iloc[first]
            b, a = ("∅ (ended)" if pd.isna(row[c]) else figures.readable_token(row[c], 24)
                    for c in ("baseline_token", "ablated_token"))
            free = [f"<b>First divergence at step {first}</b>: baseline <code>{html.escape(b)}</code> vs "
                    f"ablated <code>{html.escape(a)}</code>."]
        n = len(steps)
        if n:
            same = int(steps["same"].astype(bool).sum())
            free.append(f"Per-step token agreement: {same} of {n} steps ({m['token_agreement']:.0%}).")
        align = result.alignment if len(result.alignment) else align_tokens(result.baseline_ids.tolist(),
                                                                           result.ablated_ids.tolist())
        if len(align):
            ops = align["op"].value_counts()
            free.append(f"Aligned diff: {m['aligned_agreement']:.0%} of the tokens match "
                        f"({int(ops.get('replace', 0))} replaced, {int(ops.get('delete', 0))} only in the baseline, "
                        f"{int(ops.get('insert', 0))} only in the ablated run).")
        if np.isfinite(m["logp_ablated_text_under_baseline"]) or np.isfinite(m["logp_baseline_text_under_ablated"]):
            def f(x: float) -> str:
                return "n/a" if not np.isfinite(x) else f"{x:.3g}"
            free.append(f"Log-probability per token of each other's text: the baseline model gives the ablated "
                        f"text {f(m['logp_ablated_text_under_baseline'])} nats (its own "
                        f"{f(m['logp_baseline_text_under_baseline'])}); the ablated model gives the baseline text "
                        f"{f(m['logp_baseline_text_under_ablated'])} (its own "
                        f"{f(m['logp_ablated_text_under_ablated'])}).")
        forced = []
        kl = steps["kl"].astype(float) if n else pd.Series([], dtype=float)
        if kl.notna().any():
            forced.append(f"KL(baseline ‖ ablated) of the next-token distributions: mean {kl.mean():.3g} nats, "
                          f"max {kl.max():.3g} at step {int(steps['step'][kl.idxmax()])}; the top token changed at "
                          f"{m['top_token_changed']} of {int(kl.notna().sum())} steps.")
        generated = result.cascade[result.cascade["is_generated"]] if len(result.cascade) else result.cascade
        if len(generated):
            forced.append(f"Routing of the generated tokens changed for {generated['changed_fraction'].mean():.0%} "
                          f"of the chosen experts.")
        if stopped:
            free.append("<i>Stopped early.</i>")
        parts = [f'<div class="dbrx-free"><b>Free-running</b> (each run continues its own text): '
                 f'{" ".join(free)}</div>']
        if forced:
            parts.append(f'<div class="dbrx-forced" style="margin-top:4px"><b>Teacher-forced on the baseline\'s '
                         f'tokens</b> (both models read the baseline text): {" ".join(forced)}</div>')
        return f'<div class="dbrx-card" style="font-size:13px">{"".join(parts)}</div>'

    # --- export ----------------------------------------------------------------------------------------
    def _sweep_shown(self) -> bool:
        return self.grid_view.value == "effect" and self.sweep_table is not None

    def export_label(self) -> str:
        """What an export file is named after: the sweep or the comparison (LabWidget._export_name)."""
        return f"sweep-{self.sweep_table.attrs.get('mode')}" if self._sweep_shown() else "comparison"

    def export_table(self) -> pd.DataFrame | None:
        """What the lab shows, as a table: the sweep (when the grid shows the ablation effect: layer, expert,
        share, delta_loss) or the last comparison, one row per aligned column (op, both runs' steps, tokens
        and ids, kl, log-probs; see GenerationComparison.alignment); None before either exists."""
        if self._sweep_shown():
            t = self.sweep_table
            cells = [(l, e) for l in t.index for e in t.columns]
            out = pd.DataFrame({"layer": [l for l, _ in cells], "expert": [e for _, e in cells],
                                "share": [np.nan if self.usage is None else float(self.usage[l, e]) for l, e in cells],
                                "delta_loss": [float(t.loc[l, e]) for l, e in cells]})
            out.attrs.update(t.attrs)
            return out
        if self.result is None:
            return None
        res = self.result
        out = (res.alignment if len(res.alignment) else
               align_tokens(res.baseline_ids.tolist(), res.ablated_ids.tolist())).copy()
        out.attrs.update(mode=self.mode.value, selection=self.selection, first_divergence=res.first_divergence,
                         **{k: v for k, v in res.metrics().items() if k != "first_divergence"})
        return out

    def export_figure(self):
        """The figure of what the lab shows: the sweep's layer x expert heatmap (figures.ablation_impact) when
        the grid shows the ablation effect, else the generation diff of the last result; None before either."""
        if self._sweep_shown():
            return figures.ablation_impact(self.sweep_table)
        if self.result is None:
            return None
        return self.diff_pane.figure if self.diff_pane.figure is not None else figures.generation_diff(self.result)

    def __repr__(self) -> str:
        return f"AblationLab(selection={self.selection}, mode={self.mode.value!r}, busy={self.busy})"

