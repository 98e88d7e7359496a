"""Fast kernels, registered by name and chosen by the model (`DbrxLM.set_kernels`); the reference versions
live in `dbrx_lab.model`. Nothing here imports the model."""
from . import attention, experts, linear, unembed
from .registry import ATTENTION, EXPERTS, LINEAR, Registry

__all__ = ["ATTENTION", "EXPERTS", "LINEAR", "Registry", "attention", "experts", "linear", "unembed"]
