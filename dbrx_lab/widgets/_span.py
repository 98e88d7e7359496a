"""SpanControl: which positions a view shows (all tokens, a chat's user message + reply, or a custom range), for
the explorers of long sequences: a chat's default system prompt is most of its tokens (issue #22 item 7)."""
from __future__ import annotations

from typing import Callable

import ipywidgets as W
import numpy as np

from .. import figures

__all__ = ["SpanControl"]

MODES = {"all": "all tokens", "chat": "user message + reply", "custom": "custom range"}


class SpanControl:
    """A "span" dropdown (all tokens / user message + reply / custom range) and, for a custom range, a range
    slider over the row's real positions. `value`: None (all) or (start, stop) trace columns, stop exclusive,
    as `figures.span_bounds` takes it. `on_change()` runs (guarded, through the owner) when the user changes it."""

    def __init__(self, owner, on_change: Callable[[], None]) -> None:
        self._owner = owner
        self._chat: tuple[int, int] | None = None
        self.mode = W.Dropdown(description="span", options=[(MODES["all"], "all"), (MODES["custom"], "custom")],
                               value="all", layout=W.Layout(width="250px"))
        self.mode.add_class("dbrx-span-mode")
        self.range = W.IntRangeSlider(value=(0, 0), min=0, max=0, description="positions", continuous_update=False,
                                      layout=W.Layout(width="420px", display="none"))
        self.range.add_class("dbrx-span-range")
        self.widget = W.HBox([self.mode, self.range], layout=W.Layout(align_items="center", flex_flow="row wrap"))
        owner._observe(self.mode, lambda _: self._mode_changed(on_change), "span")
        owner._observe(self.range, lambda _: on_change(), "span range")

    @property
    def chat(self) -> tuple[int, int] | None:
        """The (start, stop) of the shown trace's last user turn and reply (`figures.chat_span`), or None."""
        return self._chat

    @property
    def value(self) -> tuple[int, int] | None:
        if self.mode.value == "chat":
            return self._chat
        if self.mode.value == "custom":
            return int(self.range.value[0]), int(self.range.value[1]) + 1
        return None

    def reset(self, trace, batch: int) -> None:
        """Fit the control to a new trace: the slider spans the row's real positions; a chat opens on its user
        message and reply, anything else on all tokens."""
        real = np.flatnonzero(trace.attention_mask[batch].cpu().numpy())
        try:
            self._chat = figures.chat_span(trace, batch)
        except ValueError:
            self._chat = None
        options = [(MODES["all"], "all")] + ([(MODES["chat"], "chat")] if self._chat else []) + \
                  [(MODES["custom"], "custom")]
        lo, hi = int(real[0]), int(real[-1])
        with self._owner._quietly():
            with self.range.hold_trait_notifications():
                self.range.min, self.range.max = 0, max(hi, 1)
                self.range.value = (self._chat[0], hi) if self._chat else (lo, hi)
                self.range.min = lo
            self.mode.options = options
            self.mode.value = "chat" if self._chat else "all"
        self.range.layout.display = "none"

    def set(self, span) -> None:
        """Set the span without running on_change: None / "all", "chat", or (start, stop) (a custom range of
        real positions; stop exclusive)."""
        if span is None or span == "all":
            mode = "all"
        elif span == "chat":
            if self._chat is None:
                raise ValueError("this trace has no chat user turn: span 'chat' needs a chat prompt (tick 'as chat')")
            mode = "chat"
        else:
            start, stop = figures.span_bounds(span, self.range.max + 1)
            if start < self.range.min:
                raise ValueError(f"span {span!r} starts before the first real position {self.range.min}; "
                                 f"real positions are {self.range.min}..{self.range.max}")
            mode = "custom"
        with self._owner._quietly():
            if mode == "custom":
                self.range.value = (start, stop - 1)
            self.mode.value = mode
        self.range.layout.display = "flex" if mode == "custom" else "none"

    def describe(self) -> str:
        """'' for all tokens, else a short note of what is shown."""
        v = self.value
        return "" if v is None else f"{MODES[self.mode.value]}: positions {v[0]}–{v[1] - 1}"

    def _mode_changed(self, on_change: Callable[[], None]) -> None:
        self.range.layout.display = "flex" if self.mode.value == "custom" else "none"
        on_change()
