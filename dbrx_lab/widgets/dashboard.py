"""ExpertUsageDashboard: usage, co-activation, repetition, specialization and cross-layer flow of a corpus."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import ipywidgets as W
import pandas as pd

from .. import analysis, figures
from ._base import FigurePane, LabWidget

__all__ = ["ExpertUsageDashboard"]

VIEWS = [("Usage", "usage"), ("Co-activation", "coactivation"), ("Repetition", "repetition"),
         ("Specialization", "specialization"), ("Flow", "flow")]
# the aggregate table route-stats writes for each view (the same analysis function's output)
_ROUTE_STATS_TABLES = {"usage": "load", "coactivation": "coactivation", "repetition": "repetition",
                       "specialization": "domain", "flow": "transitions"}


class ExpertUsageDashboard(LabWidget):
    """Routing statistics of a set of traces or a route-stats output folder, one view at a time.

    source: a Trace, a list of Traces, a routing DataFrame or a route-stats folder; labels: one domain label
    per text (batch row) when the source is traces; by: the label column used for specialization.
    Tables are computed once per view (analysis functions) and kept in `tables`; for a route-stats folder
    the aggregate tables it wrote are read instead (no pass over the per-token parts), as long as `by` is
    "label". The figure on show is `pane.figure`.
    """

    def __init__(self, source, labels: Sequence | None = None, by: str = "label") -> None:
        super().__init__(background=False)
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_dir():
            raise FileNotFoundError(f"{str(source)!r} is not a folder; give traces or a route-stats output folder")
        self.source, self.labels, self.by = source, labels, by
        self.folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
        self.tables: dict[str, object] = {}
        load = self.table("usage")
        self.n_layers = int(load["layer"].nunique())
        self.n_experts = int(load["expert"].nunique())
        self.n_tokens = int(load["tokens"].iloc[0])

        self.view = W.ToggleButtons(options=VIEWS, value="usage", style=W.ToggleButtonsStyle(button_width="124px"))
        self.view.add_class("dbrx-dashboard-view")
        self.value = W.Dropdown(description="value", layout=W.Layout(width="300px"))
        self.layer = W.IntSlider(description="layer", min=0, max=self.n_layers - 1, continuous_update=False,
                                 layout=W.Layout(width="320px"))
        self.note = W.HTML()
        self.pane = FigurePane("dashboard")
        self._observe(self.view, lambda _: self._on_view(), "view")
        self._observe(self.value, lambda _: self.render(), "value")
        self._observe(self.layer, lambda _: self.render(), "layer")

        what = (f"route-stats folder <code>{html.escape(str(source))}</code>" if isinstance(source, (str, os.PathLike))
                else f"{self._n_traces(source)} trace(s)")
        self.ui = self._frame(
            "Expert usage dashboard",
            f"{what} · {self.n_tokens:,} tokens · {self.n_layers} layers · {self.n_experts} experts. "
            "Colours: white = what a uniform / random router would give.",
            self.view, W.HBox([self.value, self.layer]), self.note, self.pane.widget)
        self._guard(self._on_view, "view")()

    @staticmethod
    def _n_traces(source) -> int:
        return len(source) if isinstance(source, (list, tuple)) else 1

    # --- tables (computed on first use) --------------------------------------------------------------------
    def table(self, view: str):
        """The analysis table behind a view (cached)."""
        if view not in self.tables:
            stored = None if self.folder is None else self.folder / f"{_ROUTE_STATS_TABLES.get(view)}.parquet"
            if stored is not None and stored.is_file() and (view != "specialization" or self.by == "label"):
                self.tables[view] = pd.read_parquet(stored)
            elif view == "usage":
                self.tables[view] = analysis.expert_load(self.source, labels=self.labels)
            elif view == "coactivation":
                self.tables[view] = analysis.coactivation(self.source)
            elif view == "repetition":
                self.tables[view] = analysis.routing_repetition(self.source)
            elif view == "specialization":
                self.tables[view] = analysis.domain_specialization(self.source, by=self.by, labels=self.labels)
            elif view == "flow":
                self.tables[view] = analysis.layer_transitions(self.source)
            else:
                raise ValueError(f"view must be one of {[v for _, v in VIEWS]}, got {view!r}")
        return self.tables[view]

    # --- rendering -------------------------------------------------------------------------------------
    _VALUES = {"usage": [("share of tokens (top-k)", "share"), ("share as top-1", "top1_share"),
                         ("mean weight", "weight_share")],
               "coactivation": [("lift over random", "lift"), ("P(j | i)", "p_j_given_i")],
               "specialization": [("lift vs all domains", "lift"), ("lift vs uniform", "lift_uniform"),
                                  ("share of tokens", "share")]}

    def _on_view(self) -> None:
        view = self.view.value
        with self._quietly():
            options = self._VALUES.get(view, [])
            self.value.options = options
            if options:
                self.value.value = options[0][1]
        self.value.layout.display = "flex" if view in self._VALUES else "none"
        self.layer.layout.display = "flex" if view in ("coactivation", "specialization") else "none"
        self.render()

    def render(self) -> None:
        """Draw the current view with the current controls."""
        self.clear_error()
        view, value, layer = self.view.value, self.value.value, self.layer.value
        self.note.value = ""
        try:
            table = self.table(view)
        except (ValueError, KeyError) as err:
            if view != "specialization":
                raise
            self.pane.show(None)
            self.note.value = (f'<div class="dbrx-card">Specialization needs a domain label per text: pass '
                               f'<code>labels=</code> (one per trace row) or a route-stats folder written from '
                               f'JSONL with a "label" field. ({html.escape(str(err))})</div>')
            return
        if view == "usage":
            fig = figures.usage_heatmap(table, value=value)
        elif view == "coactivation":
            fig = figures.coactivation_heatmap(table, layer=layer, value=value)
        elif view == "repetition":
            fig = figures.repetition_bars(table)
        elif view == "specialization":
            fig = figures.specialization_bars(table, layer=layer, value=value)
        else:
            fig = figures.routing_sankey(table)
        self.pane.show(fig)

    def __repr__(self) -> str:
        return f"ExpertUsageDashboard(view={self.view.value!r}, tokens={self.n_tokens}, layers={self.n_layers})"
