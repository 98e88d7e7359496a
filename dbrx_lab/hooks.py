"""Named hook points (an identity module with a name, as in TransformerLens) and the hook context manager."""
from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Callable, Iterable, Iterator, Union

import torch
from torch import nn

__all__ = ["HookPoint", "ForwardContext", "HookFn", "HookedMixin"]

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]


class ForwardContext:
    """What a hook may need to know about the current forward call (shared by all hook points of a model).

    positions: LongTensor [B, T], absolute column of each token in the (padded) sequence.
    attention_mask: [B, S] (1 = real token) over the whole sequence so far, or None (no padding).
    is_prefill: True for a forward over a prompt (or a plain forward), False for a cached decode step.
    """

    __slots__ = ("positions", "attention_mask", "is_prefill")

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.is_prefill = True


class HookPoint(nn.Module):
    """Identity on a tensor, with a name (`blocks.3.ffn.hook_router_logits`) where hooks can read or replace it.

    A hook is `fn(tensor, hook) -> tensor | None`; returning a tensor replaces the value. With no hook
    attached, calling the point returns its input at the cost of one attribute check.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.layer: int | None = None
        self.ctx: ForwardContext = ForwardContext()
        self.fns: list[HookFn] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module.__call__ on purpose
        if not self.fns:
            return x
        for fn in list(self.fns):
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    raise ValueError(f"hook {getattr(fn, '__name__', fn)!r} at {self.name} must return None or a "
                                     f"tensor of shape {tuple(x.shape)}, got "
                                     f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
                x = out
        return x

    forward = __call__

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


HookSelector = Union[str, Callable[[str], bool]]


class HookedMixin:
    """Adds `hook_points`, `hook_names()` and `hooks(...)` to a module tree that contains HookPoints."""

    hook_points: dict[str, HookPoint]

    def hook_names(self, pattern: str | None = None) -> list[str]:
        """All hook point names, in forward order; `pattern` is an fnmatch glob (`blocks.*.ffn.*`)."""
        names = list(self.hook_points)
        return [n for n in names if pattern is None or fnmatch.fnmatchcase(n, pattern)]

    def resolve_hook_names(self, selector: HookSelector) -> list[str]:
        """Names matching an exact name, a glob, or a predicate `fn(name) -> bool`; ValueError if none match."""
        if callable(selector):
            names = [n for n in self.hook_points if selector(n)]
        elif selector in self.hook_points:
            names = [selector]
        else:
            names = self.hook_names(selector) if any(c in selector for c in "*?[") else []
        if not names:
            raise ValueError(self._unknown_hook_message(selector))
        return names

    def _unknown_hook_message(self, selector: HookSelector) -> str:
        if callable(selector):
            return "hook predicate matched no hook point; see model.hook_names()"
        m = re.match(r"blocks\.(\d+)\.", selector)
        n_layers = getattr(self.config, "n_layers", None)
        if m and n_layers is not None and int(m.group(1)) >= n_layers:
            return f"no hook point {selector!r}: layer {m.group(1)} out of range [0, {n_layers - 1}]"
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in self.hook_points})
        return f"no hook point {selector!r}; valid names are blocks.{{i}}.<x> or top-level ones: {suffixes}"

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[HookSelector, HookFn]]) -> Iterator["HookedMixin"]:
        """Attach `(name | glob | predicate, fn)` hooks for the duration of the block; always removed on exit."""
        attached: list[tuple[HookPoint, HookFn]] = []
        try:
            for selector, fn in fwd_hooks:
                if not callable(fn):
                    raise TypeError(f"hook for {selector!r} is not callable: {fn!r}")
                for name in self.resolve_hook_names(selector):
                    point = self.hook_points[name]
                    point.fns.append(fn)
                    attached.append((point, fn))
            yield self
        finally:
            for point, fn in reversed(attached):
                for i in range(len(point.fns) - 1, -1, -1):
                    if point.fns[i] is fn:
                        del point.fns[i]
                        break

    def reset_hooks(self) -> None:
        """Detach every hook (a safety net; `hooks()` already cleans up after itself)."""
        for point in self.hook_points.values():
            point.fns.clear()
