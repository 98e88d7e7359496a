"""dbrx-lab: a Jupyter workbench for interpretability research on DBRX."""
from .config import PRESETS, DbrxConfig
from .model import DbrxLM, DbrxOutput

__version__ = "0.1.0"

__all__ = ["DbrxConfig", "DbrxLM", "DbrxOutput", "PRESETS", "__version__"]
