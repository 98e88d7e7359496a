"""AblationLab: toggle experts off, generate with and without them side by side, see where and how much
the generations diverge and how the change cascades through the routing."""
from __future__ import annotations

import html
from typing import Mapping, Sequence

import ipywidgets as W
import numpy as np
import pandas as pd
import torch

from .. import analysis, figures
from ..interventions import ExpertAblation
from ..trace import Record, run_with_trace
from ._base import FigurePane, LabWidget, prompt_input

__all__ = ["AblationLab"]

DEFAULT_PROMPT = "class Cache:\n    def __init__(self"
MODES = [("reroute", "reroute"), ("zero", "zero"), ("renormalize", "renormalize")]
_MODE_HELP = {"reroute": "the router never picks them; tokens go to the next-best experts",
              "zero": "routing unchanged; their outputs are dropped, other weights kept",
              "renormalize": "routing unchanged; their outputs are dropped, surviving weights rescaled to sum 1"}


def _grid_css(n_experts: int) -> str:
    rules = "".join(f".dbrx-lab .dbrx-grid .dbrx-e{e} {{ box-shadow: inset 0 -3px 0 {figures.expert_color(e)}; }}"
                    for e in range(n_experts))
    return f"<style>{rules}</style>"


class AblationLab(LabWidget):
    """Expert ablation during generation, baseline and ablated side by side.

    A layer x expert toggle grid (a header row toggles an expert in every layer), the ablation mode,
    sampling settings and seed, Generate and Stop. Both generations stream token by token (the ablated one
    highlights where it differs); then the per-step KL, the first divergence and the routing cascade
    (`analysis.compare_generations`) are drawn.

    model: a DbrxLM with a tokenizer; experts: the initial selection {layer: [experts]}, or "suggest" (the
    default: the `n_suggest` (layer, expert) cells whose ablation moves the next-token distribution most,
    so the demo shows a divergence; see `suggest`), or None (nothing selected).
    The ablation applies only to the lab's own generation: it is attached inside the background thread
    that generates, so other cells and widgets can use the same model meanwhile, see no ablation and don't
    wait for the lab (on an accelerate-dispatched model, calls take turns forward by forward: the model's
    lock). On a large model pass experts=None (or a selection): a suggestion costs up to 33 forward passes
    of the prompt.
    State: `selection` {layer: [experts]}, `interventions()`, `result` (the last GenerationComparison).
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
        self._prompt_text = ""

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
        self._observe(self.mode, lambda _: self._on_settings(), "mode")
        self._observe(self.do_sample, lambda _: self._on_settings(), "sampling")

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
            W.HBox([self.prompt]), self.chat,
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
        tools = W.HBox([self.suggest_button, self.clear_button, self.selection_label],
                       layout=W.Layout(align_items="center", margin="4px 0 0 0"))
        box = W.VBox([W.HTML(_grid_css(E)), *rows, tools])
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

    def _generate_now(self, ids: list[int], ivs: list[ExpertAblation], kwargs: dict) -> None:
        n = kwargs["max_new_tokens"]
        self.set_status("generating…", (0, 2 * n))
        done = [0]

        def on_step(step) -> None:
            self._pieces[step.branch].append(self.model.tokenizer.decode([step.token_id]))
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

    # --- rendering -----------------------------------------------------------------------------------------
    def _render_texts(self, running: bool = False) -> None:
        base, abl = self._pieces["baseline"], self._pieces["ablated"]
        first = next((i for i in range(min(len(base), len(abl))) if base[i] != abl[i]), None)
        self.baseline_text.value = self._text_html(self._prompt_text, base, abl, first, running)
        self.ablated_text.value = self._text_html(self._prompt_text, abl, base, first, running)

    @staticmethod
    def _text_html(prompt: str, mine: list[str], other: list[str], first: int | None, running: bool) -> str:
        if len(prompt) > 400:
            prompt = "…" + prompt[-400:]
        spans = []
        for i, piece in enumerate(mine):
            cls = "same" if i >= len(other) or other[i] == piece else "diff"
            if i == first:
                cls += " first"
            spans.append(f'<span class="gen {cls}" data-step="{i}">{html.escape(piece)}</span>')
        cursor = '<span class="cursor">▌</span>' if running else ""
        placeholder = ('<span class="prompt">press Generate</span>' if not prompt and not mine else "")
        return (f'<div class="dbrx-text dbrx-card"><span class="prompt">{html.escape(prompt)}</span>'
                f'{"".join(spans)}{cursor}{placeholder}</div>')

    @staticmethod
    def summary_html(result, stopped: bool = False) -> str:
        """One paragraph: where the generations part, how far the distributions move, how much routing changed."""
        steps, first = result.per_step, result.first_divergence
        if first is None:
            parts = ["<b>The generations are identical.</b> These experts do not change this continuation; try "
                     "more experts, another layer, or mode <i>zero</i>."]
        else:
            row = steps.iloc[first]
            b, a = ("∅ (ended)" if pd.isna(row[c]) else figures.readable_token(row[c], 24)
                    for c in ("baseline_token", "ablated_token"))
            parts = [f"<b>First divergence at step {first}</b>: baseline <code>{html.escape(b)}</code> vs "
                     f"ablated <code>{html.escape(a)}</code>."]
        kl = steps["kl"].astype(float)
        if kl.notna().any():
            changed = int(steps["top_token_changed"].fillna(False).astype(bool).sum())
            parts.append(f"KL(baseline ‖ ablated) mean {kl.mean():.3g} nats, max {kl.max():.3g} at step "
                         f"{int(steps['step'][kl.idxmax()])}; the top token changed at {changed} of "
                         f"{int(kl.notna().sum())} steps.")
        generated = result.cascade[result.cascade["is_generated"]]
        if len(generated):
            parts.append(f"Routing of the generated tokens changed for {generated['changed_fraction'].mean():.0%} "
                         f"of the chosen experts (teacher-forced on the baseline tokens).")
        if stopped:
            parts.append("<i>Stopped early.</i>")
        return f'<div class="dbrx-card" style="font-size:13px">{" ".join(parts)}</div>'

    def __repr__(self) -> str:
        return f"AblationLab(selection={self.selection}, mode={self.mode.value!r}, busy={self.busy})"

