"""CardBrowser: browse expert cards (analysis.expert_cards): search by token, sort by any column, jump to partners."""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import pandas as pd

from .. import figures
from ..analysis.cards import SUMMARY_COLUMNS, ExpertCards
from ..card_site import CARD_CSS, card_html
from ._base import FigurePane, LabWidget

__all__ = ["CardBrowser"]

ROWS = 14                      # cards listed at once


class CardBrowser(LabWidget):
    """A list of cards (filtered by a token search, sorted by any summary column) and the selected card:
    its contexts, logit effects, partners (buttons that open the partner's card), ablation and specialization.

    cards: the result of `analysis.expert_cards`. State: `selected` ((layer, expert)), `rows` (the summary
    rows listed, in order); `select(layer, expert)`, `search.value`, `sort.value`, `descending.value` drive it.
    """

    def __init__(self, cards: ExpertCards, sort: str = "count", descending: bool = True) -> None:
        super().__init__(background=False)
        if not isinstance(cards, ExpertCards) or not len(cards):
            raise ValueError("CardBrowser needs the cards of analysis.expert_cards (at least one card)")
        if sort not in SUMMARY_COLUMNS:
            raise ValueError(f"sort must be one of the summary columns {list(SUMMARY_COLUMNS)}, got {sort!r}")
        self.cards = cards
        self.selected: tuple[int, int] | None = None
        self.rows = cards.summary
        self.search = W.Text(placeholder="search by token, e.g. def", description="token",
                             continuous_update=False, layout=W.Layout(width="260px"))
        self.search.add_class("dbrx-card-search")
        self.sort = W.Dropdown(options=list(SUMMARY_COLUMNS), value=sort, description="sort by",
                               layout=W.Layout(width="250px"))
        self.sort.add_class("dbrx-card-sort")
        self.descending = W.ToggleButton(value=descending, description="descending", icon="sort-amount-desc",
                                         layout=W.Layout(width="120px"))
        self.descending.add_class("dbrx-card-order")
        self.listing = W.Select(options=[], rows=ROWS, layout=W.Layout(width="100%"))
        self.listing.add_class("dbrx-card-list")
        self.count = W.HTML()
        self.card = W.HTML()
        self.card.add_class("dbrx-card-view")
        self.partners = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.partners.add_class("dbrx-card-partners")
        self.pane = FigurePane("card-logits")

        self._observe(self.search, lambda _: self.refresh(), "search")
        self._observe(self.sort, lambda _: self.refresh(), "sort")
        self._observe(self.descending, lambda _: self.refresh(), "order")
        self._observe(self.listing, self._on_pick, "list")

        m = cards.meta
        self.ui = self._frame(
            "Expert cards",
            f"{len(cards)} cards · {m.get('tokens', 0):,} tokens · {m.get('n_experts')} experts, top-{m.get('top_k')}"
            f" · model: {html.escape(str(m.get('model')))}. Pick a card; partner buttons open the partner's card.",
            W.HBox([self.search, self.sort, self.descending], layout=W.Layout(align_items="center")),
            self.count, self.listing,
            W.HTML(f"<style>{CARD_CSS}</style>"), self.card,
            W.HBox([W.HTML('<div class="dbrx-section">open a partner&nbsp;</div>'), self.partners],
                   layout=W.Layout(align_items="center")),
            self.pane.widget)
        self._guard(self.refresh, "cards")()

    # --- actions -------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Apply the search and sort to the list; keeps the selected card when it is still listed."""
        rows = self.cards.search(self.search.value)
        key = self.sort.value
        rows = rows.sort_values([key, "layer", "expert"], ascending=[not self.descending.value, True, True],
                                na_position="last", kind="stable")
        self.rows = rows
        self.descending.icon = "sort-amount-desc" if self.descending.value else "sort-amount-asc"
        self.count.value = (f'<span class="dbrx-status">{len(rows)} of {len(self.cards)} cards'
                            + (f' mention <b>{html.escape(self.search.value)}</b>' if self.search.value.strip() else "")
                            + f" · sorted by {html.escape(key)}</span>")
        options = [(self._row_text(r, key), (int(r["layer"]), int(r["expert"]))) for _, r in rows.iterrows()]
        with self._quietly():
            self.listing.options = options
            self.listing.value = self.selected if self.selected in [v for _, v in options] else None
        if self.selected is None and options:
            self.select(*options[0][1])

    @staticmethod
    def _row_text(r: pd.Series, key: str) -> str:
        def fmt(v) -> str:
            if v is None or (isinstance(v, float) and np.isnan(v)):
                return "–"
            if isinstance(v, (float, np.floating)):
                return f"{v:.3g}"
            return figures.readable_token(str(v), 14) if isinstance(v, str) else str(v)
        extra = "" if key in ("card", "layer", "expert", "count", "top_token") else f" · {key} {fmt(r[key])}"
        return (f"{r['card']:<8} {int(r['count']):>6} routed · top token {fmt(r['top_token'])} · "
                f"class {fmt(r['top_class'])}{extra}")

    def select(self, layer: int, expert: int) -> None:
        """Show the card of (layer, expert) (and select it in the list when listed)."""
        card = self.cards[layer, expert]
        self.selected = (int(layer), int(expert))
        with self._quietly():
            if self.selected in [v for _, v in self.listing.options]:
                self.listing.value = self.selected
        self.card.value = card_html(card)
        buttons = []
        for _, p in card.partners.iterrows():
            b = W.Button(description=f"L{layer} e{int(p['expert'])} · lift {p['lift']:.2f}",
                         tooltip=f"{int(p['count_both'])} tokens chose both", layout=W.Layout(width="auto"))
            b.add_class("dbrx-card-partner")
            b.add_class(f"dbrx-partner-of-L{layer}-e{expert}")        # which card's partner (for the browser test)
            if (layer, int(p["expert"])) not in self.cards.cards:
                b.disabled, b.tooltip = True, "no card was built for this expert"
            b.on_click(self._guard(lambda _, e=int(p["expert"]): self.select(layer, e), "partner"))
            buttons.append(b)
        self.partners.children = buttons
        self.pane.show(figures.card_logits(card) if card.promoted is not None else None)

    # --- export ----------------------------------------------------------------------------------------
    def export_table(self) -> pd.DataFrame:
        """The cards as listed (search and sort applied): one summary row per card."""
        return self.rows.reset_index(drop=True)

    def export_figure(self):
        """The selected card's logit-effect figure (None when the card has none)."""
        return self.pane.figure

    def export_label(self) -> str:
        return "cards" if self.selected is None else f"L{self.selected[0]}-e{self.selected[1]}"

    def _on_pick(self, change) -> None:
        if change["new"] is not None:
            self.select(*change["new"])

    def __repr__(self) -> str:
        return f"CardBrowser(cards={len(self.cards)}, selected={self.selected}, listed={len(self.rows)})"
