"""Kernel registries: how a module computes, chosen by name (HF's attention/experts interfaces are the pattern).

A registry maps names to functions with one signature per kind; "reference" is the plain implementation
in `dbrx_lab.model`, every other kernel is tested against it. "auto" asks the registry's chooser.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["Registry", "EXPERTS", "ATTENTION", "LINEAR"]


class Registry:
    def __init__(self, kind: str, signature: str) -> None:
        self.kind, self.signature = kind, signature
        self.impls: dict[str, Callable] = {}
        self.chooser: Callable[..., str] | None = None

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            self.impls[name] = fn
            return fn
        return add

    def names(self) -> list[str]:
        return ["auto", *self.impls]

    def check(self, name: str) -> str:
        if name != "auto" and name not in self.impls:
            raise ValueError(f"unknown {self.kind} kernel {name!r}; valid: {self.names()}")
        return name

    def choose(self, name: str, *args) -> tuple[str, Callable]:
        """(name, fn) for `name`; "auto" picks with the chooser given the call's arguments."""
        if name == "auto":
            name = self.chooser(*args) if self.chooser is not None else "reference"
        return name, self.impls[name]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.names()}; {self.signature})"


EXPERTS = Registry("experts", "fn(mlp, x [N, d], experts [N, k], weights [N, k], observe) -> "
                              "(out [N, d], unweighted outputs [N, k, d] | None, GLU hidden norms [N, k] | None)")
ATTENTION = Registry("attention", "fn(q [B, H, T, D], k [B, K, S, D], v [B, K, S, D], mask [B|1, 1, T, S] bool | None)"
                                  " -> z [B, H, T, D]; mask None: causal, the T queries are the last T keys")
LINEAR = Registry("linear", "fn(x [n, in], weight [out, in]) -> [n, out]")
