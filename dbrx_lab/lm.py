"""The public DbrxLM: the model (dbrx_lab.model) with generation, traces, interventions and checkpoints,
each attached from its own module. model.py imports none of them; they build on it."""
from __future__ import annotations

from . import checkpoint, generation, interventions, trace
from .model import DbrxModel

__all__ = ["DbrxLM"]


class DbrxLM(DbrxModel):
    """DBRX causal LM with generation, traces and interventions. `DbrxLM(cfg)` is a plain constructor (works
    under `torch.device("meta")`); `dbrx_lab.load_model` loads checkpoints."""

    # generation.py
    generate = generation.generate
    generate_text = generation.generate_text
    stream = generation.stream
    # trace.py
    run_with_trace = trace.run_with_trace
    generate_with_trace = trace.generate_with_trace
    # interventions.py
    intervene = interventions.intervene
    active_interventions = interventions.active_interventions
    # checkpoint.py
    save_pretrained = checkpoint.save_pretrained

    @property
    def screen_greedy(self) -> bool | None:
        """Greedy decoding through lm_head's int8 screen: None = when it pays (large vocab), True, False."""
        return getattr(self.lm_head, "screen_greedy", None)

    @screen_greedy.setter
    def screen_greedy(self, value: bool | None) -> None:
        self.lm_head.screen_greedy = value
