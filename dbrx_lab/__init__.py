"""dbrx-lab: a Jupyter workbench for interpretability research on DBRX."""
from .config import PRESETS, DbrxConfig
from .lm import DbrxLM
from .model import DbrxOutput
from .trace import Record, Trace
from .checkpoint import save_pretrained
from .loading import load_model
from .tokenizer import DbrxTokenizer, load_tokenizer
from .interventions import (ExpertAblation, ExpertForce, ExpertScale, HeadAblation, Intervention, RoutingPatch,
                            TopK)
from .steering import RouterSteer
from . import analysis
from .route_stats import route_stats

from .version import __version__


def __getattr__(name: str):
    """`dbrx_lab.figures` and `dbrx_lab.widgets` import lazily (plotly and ipywidgets are heavy)."""
    if name in ("figures", "widgets"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dbrx_lab' has no attribute {name!r}")

__all__ = ["Record", "Trace", "load_model", "save_pretrained", "load_tokenizer", "DbrxTokenizer",
           "ExpertAblation", "ExpertForce", "ExpertScale", "HeadAblation", "Intervention", "RoutingPatch", "TopK",
           "RouterSteer",
           "analysis", "route_stats", "DbrxConfig", "DbrxLM", "DbrxOutput", "PRESETS", "__version__"]
