"""ExpertUsageDashboard: usage, co-activation, repetition, specialization and cross-layer flow of a corpus,
with counts (n), bootstrap intervals and a minimum-count guard where a statistic can mislead on few tokens."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import ipywidgets as W
import pandas as pd

from .. import analysis, figures
from ..analysis import routing as routing_stats
from ._base import FigurePane, LabWidget

__all__ = ["ExpertUsageDashboard"]

VIEWS = [("Usage", "usage"), ("Co-activation", "coactivation"), ("Repetition", "repetition"),
         ("Specialization", "specialization"), ("Flow", "flow")]
# the aggregate table route-stats writes for each view (the same analysis function's output)
_ROUTE_STATS_TABLES = {"usage": "load", "coactivation": "coactivation", "repetition": "repetition",
                       "specialization": "domain", "flow": "transitions"}
INTERVAL_TOKEN_LIMIT = 2_000_000    # intervals=None computes bootstrap intervals up to this many tokens
MIN_TEXTS_FOR_TEXT_BOOTSTRAP = 10   # fewer texts: resample tokens (a bootstrap over 2 texts says little)
FLOW_WINDOW = 8                     # layers drawn at once in the Flow view
SATURATION_NOTE = (
    "<b>Reading lift.</b> lift = share of the domain's tokens / share of all labelled tokens. It cannot exceed "
    "<i>lift_max</i> = all labelled tokens / the domain's tokens, and it reaches that ceiling whenever no other "
    "domain uses the expert, however many tokens it routes: such bars (red outline, column <i>saturated</i>) tie. "
    "<i>log_odds</i> (odds ratio vs the other domains, 0.5 added per cell) keeps growing with the evidence; the "
    "table below ranks by it. Hatched bars rest on fewer than <i>min tokens</i> tokens.")
COACTIVATION_NOTE = (
    "<b>Reading lift.</b> lift = P(j | i) / ((k-1)/(E-1)); it saturates at lift_max = (E-1)/(k-1) whenever j "
    "came with i every time, which on a handful of tokens says little: cells where i was chosen on fewer than "
    "<i>min tokens</i> tokens are grey. Hover for n and the bootstrap interval.")


class ExpertUsageDashboard(LabWidget):
    """Routing statistics of a set of traces or a route-stats output folder, one view at a time.

    source: a Trace, a list of Traces, a routing DataFrame or a route-stats folder; labels: one domain label
    per text (batch row) when the source is traces; by: the label column used for specialization.
    Tables are computed once per view (analysis functions) and kept in `tables`; for a route-stats folder
    the aggregate tables it wrote are read instead, as long as `by` is "label". The figure on show is
    `pane.figure`; `export_table()` is the current view's table (with intervals when computed).

    intervals: add n and bootstrap intervals (`analysis.routing.*_intervals`, kept in `stats`) to usage,
    co-activation, repetition and specialization: True, False, or None = when the source has at most
    INTERVAL_TOKEN_LIMIT tokens (one more pass over a route-stats folder's parts). Texts are resampled when
    there are at least MIN_TEXTS_FOR_TEXT_BOOTSTRAP, tokens otherwise. n_boot, seed: the bootstrap's;
    min_count: rows on fewer tokens are flagged low_count (grey / hatched; the "min tokens" box).
    """

    def __init__(self, source, labels: Sequence | None = None, by: str = "label", intervals: bool | None = None,
                 n_boot: int = 1000, seed: int = 0, min_count: int = routing_stats.DEFAULT_MIN_COUNT) -> None:
        super().__init__(background=False)
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_dir():
            raise FileNotFoundError(f"{str(source)!r} is not a folder; give traces or a route-stats output folder")
        if intervals not in (None, True, False):
            raise ValueError(f"intervals must be True, False or None (auto), got {intervals!r}")
        routing_stats._check_bootstrap(n_boot, 0.95, "text", seed, min_count)
        self.source, self.labels, self.by = source, labels, by
        self.folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
        self.tables: dict[str, object] = {}
        self.stats: dict[str, pd.DataFrame] = {}
        self.n_boot, self.seed = n_boot, seed
        load = self.table("usage")
        self.n_layers = int(load["layer"].nunique())
        self.n_experts = int(load["expert"].nunique())
        self.n_tokens = int(load["tokens"].iloc[0])
        self.n_texts = self._count_texts()
        self.intervals = self.n_tokens <= INTERVAL_TOKEN_LIMIT if intervals is None else intervals
        self.unit = ("text" if self.n_texts is not None and self.n_texts >= MIN_TEXTS_FOR_TEXT_BOOTSTRAP
                     else "token")

        self.view = W.ToggleButtons(options=VIEWS, value="usage", style=W.ToggleButtonsStyle(button_width="124px"))
        self.view.add_class("dbrx-dashboard-view")
        self.value = W.Dropdown(description="value", layout=W.Layout(width="300px"))
        self.layer = W.IntSlider(description="layer", min=0, max=self.n_layers - 1, continuous_update=False,
                                 layout=W.Layout(width="320px"))
        self.layer.add_class("dbrx-dashboard-layer")
        self.value.add_class("dbrx-dashboard-value")
        self.min_count = W.BoundedIntText(value=min_count, min=0, max=10**9, description="min tokens",
                                          layout=W.Layout(width="170px"),
                                          tooltip="rows on fewer tokens are flagged low_count (grey / hatched)")
        self.min_count.add_class("dbrx-dashboard-min-count")
        self.min_share = W.FloatSlider(value=0.05, min=0.0, max=0.5, step=0.01, description="min link share",
                                       continuous_update=False, readout_format=".0%",
                                       style={"description_width": "initial"}, layout=W.Layout(width="320px"))
        self.min_share.add_class("dbrx-dashboard-min-share")
        self.flow_start = W.IntSlider(description="from layer", min=0, max=max(self.n_layers - 2, 0),
                                      continuous_update=False, layout=W.Layout(width="320px"))
        self.flow_start.add_class("dbrx-dashboard-flow-start")
        self.note = W.HTML()
        self.note.add_class("dbrx-dashboard-note")
        self.rows = W.HTML()
        self.rows.add_class("dbrx-dashboard-rows")
        self.pane = FigurePane("dashboard")
        self._observe(self.view, lambda _: self._on_view(), "view")
        for control, name in ((self.value, "value"), (self.layer, "layer"), (self.min_count, "min tokens"),
                              (self.min_share, "min link share"), (self.flow_start, "from layer")):
            self._observe(control, lambda _: self.render(), name)

        what = (f"route-stats folder <code>{html.escape(str(source))}</code>" if isinstance(source, (str, os.PathLike))
                else f"{self._n_traces(source)} trace(s)")
        texts = f"{self.n_texts:,} texts · " if self.n_texts is not None else ""
        ci = (f"Hover: n and 95% bootstrap intervals ({n_boot} resamples of {self.unit}s, seed {seed})."
              if self.intervals else "Intervals off (pass intervals=True).")
        self.ui = self._frame(
            "Expert usage dashboard",
            f"{what} · {texts}{self.n_tokens:,} tokens · {self.n_layers} layers · {self.n_experts} experts. "
            f"Colours: white = what a uniform / random router would give. {ci}",
            self.view, W.HBox([self.value, self.layer, self.min_count, self.min_share, self.flow_start],
                              layout=W.Layout(flex_flow="row wrap")),
            self.note, self.pane.widget, self.rows)
        self._guard(self._on_view, "view")()

    @staticmethod
    def _n_traces(source) -> int:
        return len(source) if isinstance(source, (list, tuple)) else 1

    def _count_texts(self) -> int | None:
        """Texts in the source (cheap: batch sizes, a manifest, a column), or None when unknown."""
        src = self.source
        items = src if isinstance(src, (list, tuple)) else [src]
        if all(hasattr(t, "input_ids") for t in items):
            return int(sum(t.input_ids.shape[0] for t in items))
        if self.folder is not None:
            manifest = self.folder / "manifest.json"
            if manifest.is_file():
                import json
                return json.loads(manifest.read_text()).get("texts_done")
            return None
        if isinstance(src, pd.DataFrame):
            col = "text" if "text" in src.columns else "batch" if "batch" in src.columns else None
            return int(src[col].nunique()) if col else None
        return None

    def stats_table(self, view: str) -> pd.DataFrame | None:
        """The view's table with n and bootstrap intervals (`analysis.routing.*_intervals`, cached), or None
        for a view without one or with intervals off."""
        if not self.intervals or view not in ("usage", "coactivation", "repetition", "specialization"):
            return None
        if view not in self.stats:
            common = dict(n_boot=self.n_boot, seed=self.seed, unit=self.unit)
            if view == "usage":
                self.stats[view] = routing_stats.load_intervals(self.source, labels=self.labels, **common)
            elif view == "coactivation":
                self.stats[view] = routing_stats.coactivation_intervals(self.source, **common)
            elif view == "repetition":
                self.stats[view] = routing_stats.repetition_intervals(self.source, **common)
            else:
                self.stats[view] = routing_stats.specialization_intervals(self.source, by=self.by,
                                                                          labels=self.labels, **common)
        return self.stats[view]

    def _shown_table(self, view: str) -> pd.DataFrame:
        """The table the view draws: with intervals when on, low_count re-flagged at the min tokens box."""
        table = self.table(view)
        stats = self.stats_table(view)
        if stats is None:
            return table
        stats = stats.copy()
        if "low_count" in stats.columns:
            stats["low_count"] = stats["count_i" if view == "coactivation" else "count"] < self.min_count.value
            stats.attrs["min_count"] = int(self.min_count.value)
        return stats

    def _flow_layers(self) -> list[int] | None:
        """The layers the Flow view draws: all, or FLOW_WINDOW from the "from layer" slider."""
        layers = sorted(int(x) for x in self.table("flow")[["layer_a", "layer_b"]].stack().unique())
        if len(layers) <= FLOW_WINDOW:
            return None
        start = min(self.flow_start.value, len(layers) - 2)
        return layers[start:start + FLOW_WINDOW]

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
        self.min_count.layout.display = ("flex" if view in ("coactivation", "specialization") and self.intervals
                                         else "none")
        self.min_share.layout.display = "flex" if view == "flow" else "none"
        self.flow_start.layout.display = "flex" if view == "flow" and self.n_layers > FLOW_WINDOW else "none"
        self.render()

    def render(self) -> None:
        """Draw the current view with the current controls."""
        self.clear_error()
        view, value, layer = self.view.value, self.value.value, self.layer.value
        self.note.value = self.rows.value = ""
        try:
            table = self._shown_table(view)
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
            if "low_count" in table.columns:
                self.note.value = f'<div class="dbrx-card">{COACTIVATION_NOTE}</div>'
        elif view == "repetition":
            fig = figures.repetition_bars(table)
            if "n_pairs" in table.columns:
                self.note.value = f'<div class="dbrx-card">{self._repetition_note(table)}</div>'
        elif view == "specialization":
            fig = figures.specialization_bars(table, layer=layer, value=value)
            if "log_odds" in table.columns:
                self.note.value = f'<div class="dbrx-card">{SATURATION_NOTE}</div>'
                self.rows.value = self._top_rows(table, layer)
        else:
            fig = figures.routing_sankey(table, layers=self._flow_layers(), min_share=self.min_share.value,
                                         label_share=0.03)
        self.pane.show(fig)

    @staticmethod
    def _repetition_note(rep: pd.DataFrame) -> str:
        """What the repetition view's numbers rest on and what its whiskers are."""
        unit = rep.attrs.get("bootstrap", "text")
        units = "token pairs" if unit == "token" else "texts"
        return (f"<b>Reading repetition.</b> Each bar is the share of the {int(rep['n_pairs'].iloc[0]):,} "
                f"consecutive token pairs (t, t+1 of the same text) per layer; dashed: the same metric for two "
                f"independent random top-k choices. Whiskers: {rep.attrs.get('level', 0.95):.0%} bootstrap "
                f"interval ({rep.attrs.get('n_boot')} resamples of the {int(rep['n_units'].iloc[0]):,} {units}, "
                f"seed {rep.attrs.get('seed')}). Hover for n and the interval.")

    def _top_rows(self, spec: pd.DataFrame, layer: int, n: int = 8) -> str:
        """HTML table: the layer's n most specialised (domain, expert) rows by log_odds, with n and intervals."""
        rows = spec[(spec["layer"] == layer) & ~spec["low_count"]].sort_values("log_odds", ascending=False).head(n)
        cols = [self.by, "expert", "count", "tokens", "lift", "lift_lo", "lift_hi", "lift_max", "saturated",
                "log_odds", "log_odds_lo", "log_odds_hi"]
        body = rows[cols].to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0, classes="dbrx-path")
        return (f'<div class="dbrx-section">most specialised at layer {layer} (by log_odds, at least '
                f'{int(self.min_count.value)} tokens)</div>{body}')

    # --- export ----------------------------------------------------------------------------------------
    def export_table(self) -> pd.DataFrame:
        """The current view's table: the analysis table, with n and bootstrap intervals when computed."""
        return self._shown_table(self.view.value)

    def export_figure(self):
        return self.pane.figure

    def export_trace(self):
        """The source when it is one Trace (or a list of one); None for several traces or a folder."""
        src = self.source
        if isinstance(src, (list, tuple)) and len(src) == 1:
            src = src[0]
        return src if hasattr(src, "topk_experts") and hasattr(src, "save") else None

    def export_label(self) -> str:
        return self.view.value

    def __repr__(self) -> str:
        return f"ExpertUsageDashboard(view={self.view.value!r}, tokens={self.n_tokens}, layers={self.n_layers})"
