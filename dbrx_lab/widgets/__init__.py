"""Notebook widgets (ipywidgets): state and callbacks over dbrx_lab's analysis and figures.

    from dbrx_lab.widgets import RoutingExplorer, AttentionExplorer, ExpertUsageDashboard, AblationLab, CardBrowser
    RoutingExplorer(model)                 # prompt -> routing map; click a token to follow its path
    AttentionExplorer(model)               # layer / head selectors, head grid, click a query token
    ExpertUsageDashboard(traces)           # usage, co-activation, repetition, specialization, flow
    AblationLab(model)                     # toggle experts, generate baseline vs ablated side by side
    CardBrowser(analysis.expert_cards(stats_folder, model))   # one card per expert: search, sort, partners

Each widget is a plain object; displaying it shows its `ui`. Long work runs in a background thread
(`background=True`, the default) so Stop stays clickable; `wait()` blocks until it is done, and
`background=False` runs everything in the caller (scripts, tests). Errors appear in the widget's error
area (and in `last_error`), never only in the kernel log.
"""
from .ablation import AblationLab
from .attention import AttentionExplorer
from .cards import CardBrowser
from .dashboard import ExpertUsageDashboard
from .routing import RoutingExplorer

__all__ = ["RoutingExplorer", "AttentionExplorer", "ExpertUsageDashboard", "AblationLab", "CardBrowser"]
