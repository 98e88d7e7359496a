"""Named hook points (an identity module with a name, as in TransformerLens), the per-call forward context,
and the context-local scope that holds hooks, interventions and captures.

Everything a `with` block attaches (`model.hooks`, `model.intervene`, a trace's recorder) lives in a
`Scope` held by a `contextvars.ContextVar`: it applies to calls made by the thread (context) that entered
the block and to no other. A Scope is immutable; attaching or detaching sets a new one.
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import re
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import nn

__all__ = ["HookPoint", "ForwardContext", "HookFn", "HookedMixin", "Scope", "current_scope", "scoped",
           "current_call", "edited", "suspended", "version"]

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]


# ------------------------------------------------------------------------------------------------
class Scope:
    """What the current thread (context) has attached: hook fns per HookPoint, interventions per module,
    attention captures per Attention module. Immutable: `with_items` returns a new Scope."""

    __slots__ = ("fns", "edits", "captures")
    KINDS = ("fns", "edits", "captures")

    def __init__(self, fns=None, edits=None, captures=None) -> None:
        self.fns: dict[Any, tuple] = fns or {}
        self.edits: dict[Any, tuple] = edits or {}
        self.captures: dict[Any, tuple] = captures or {}

    def with_items(self, kind: str, items: Iterable[tuple[Any, Any]], add: bool) -> "Scope":
        """A copy with each (owner, item) appended to (or its last identical entry removed from) `kind`."""
        table = dict(getattr(self, kind))
        for owner, item in items:
            entries = list(table.get(owner, ()))
            if add:
                entries.append(item)
            else:
                for i in range(len(entries) - 1, -1, -1):
                    if entries[i] is item:
                        del entries[i]
                        break
            if entries:
                table[owner] = tuple(entries)
            else:
                table.pop(owner, None)
        parts = {k: getattr(self, k) for k in self.KINDS}
        parts[kind] = table
        return Scope(**parts)

    def empty(self) -> bool:
        return not (self.fns or self.edits or self.captures)


_EMPTY = Scope()
_SCOPE: contextvars.ContextVar[Scope] = contextvars.ContextVar("dbrx_lab_scope", default=_EMPTY)


def current_scope() -> Scope:
    return _SCOPE.get()


@contextlib.contextmanager
def scoped(kind: str, items: list[tuple[Any, Any]]) -> Iterator[None]:
    """Attach (owner, item) pairs of `kind` for the block, in this context only; detached on exit, even on
    error (exactly these entries: other blocks' entries, entered or left meanwhile, stay)."""
    _SCOPE.set(_SCOPE.get().with_items(kind, items, add=True))
    try:
        yield
    finally:
        _SCOPE.set(_SCOPE.get().with_items(kind, reversed(items), add=False))


@contextlib.contextmanager
def suspended(kind: str, owners: Iterable[Any]) -> Iterator[None]:
    """Detach every `kind` entry of `owners` in this context for the block; they come back on exit."""
    owners = set(owners)
    table = getattr(_SCOPE.get(), kind)
    saved = [(owner, item) for owner, items in table.items() if owner in owners for item in items]
    _SCOPE.set(_SCOPE.get().with_items(kind, reversed(saved), add=False))
    try:
        yield
    finally:
        _SCOPE.set(_SCOPE.get().with_items(kind, saved, add=True))


# ------------------------------------------------------------------------------------------------
class ForwardContext:
    """What a hook or an intervention may need to know about the current forward call (one per call).

    positions: LongTensor [B, T], absolute column of each token of the tensors being computed now.
    columns: the same as a Python range (host side: no device sync to read it).
    attention_mask: [B, S] bool (True = real token) over the whole sequence so far, or None (no padding).
    is_prefill: True for a forward over a prompt (or a plain forward), False for a cached decode step.
    side: True in a side pass (values computed only for observers; nothing reaches the output).
    kernels: {(kind, layer): kernel name} that ran in this call.
    greedy: the caller only needs each row's argmax of the last logits (generation's greedy decoding).
    """

    __slots__ = ("positions", "columns", "attention_mask", "is_prefill", "side", "kernels", "greedy")

    def __init__(self, positions: torch.Tensor | None = None, columns: range = range(0),
                 attention_mask: torch.Tensor | None = None, is_prefill: bool = True, greedy: bool = False) -> None:
        self.positions = positions
        self.columns = columns
        self.attention_mask = attention_mask
        self.is_prefill = is_prefill
        self.side = False
        self.kernels: dict[tuple[str, int | None], str] = {}
        self.greedy = greedy

    def narrow(self, start: int, stop: int) -> None:
        """Keep the tokens [start, stop) of the current ones (indices relative to them)."""
        self.columns = self.columns[start:stop]
        if self.positions is not None:
            self.positions = self.positions[:, start:stop]

    @contextlib.contextmanager
    def side_pass(self, start: int, stop: int) -> Iterator["ForwardContext"]:
        saved = self.positions, self.columns, self.side
        self.narrow(start, stop)
        self.side = True
        try:
            yield self
        finally:
            self.positions, self.columns, self.side = saved


_CALL: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("dbrx_lab_call", default=None)


def current_call() -> ForwardContext:
    """The ForwardContext of the model call running in this context (a fresh, empty one outside a call)."""
    ctx = _CALL.get()
    return ForwardContext() if ctx is None else ctx


@contextlib.contextmanager
def call_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CALL.set(ctx)
    try:
        yield ctx
    finally:
        _CALL.reset(token)


def version(t: torch.Tensor) -> int:
    """t's version counter (moves on in-place writes); -1 for inference tensors, which have none."""
    return -1 if t.is_inference() else t._version


def edited(before: torch.Tensor, version: int, after: torch.Tensor) -> bool:
    """Whether a hook changed a tensor: returned another one, or wrote into it (its version counter moved;
    under torch.inference_mode only a returned tensor counts)."""
    return after is not before or (version >= 0 and before._version != version)


# ------------------------------------------------------------------------------------------------
class HookPoint(nn.Module):
    """Identity on a tensor, with a name (`blocks.3.ffn.hook_router_logits`) where hooks can read or replace it.

    A hook is `fn(tensor, hook) -> tensor | None`; returning a tensor (same shape, dtype and device)
    replaces the value. With no hook attached in the calling context, calling the point returns its input
    at the cost of one dictionary lookup. `layout` names the dimensions (see `DbrxLM.hook_names`).
    """

    def __init__(self, layout: tuple[str, ...] = ("batch", "pos", "d_model")) -> None:
        super().__init__()
        self.name: str = ""
        self.layer: int | None = None
        self.layout = layout

    @property
    def fns(self) -> tuple[HookFn, ...]:
        """The hook fns attached to this point in the calling context."""
        return _SCOPE.get().fns.get(self, ())

    @property
    def ctx(self) -> ForwardContext:
        return current_call()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module.__call__ on purpose
        fns = _SCOPE.get().fns.get(self)
        if not fns:
            return x
        for fn in fns:
            out = fn(x, self)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype \
                        or out.device != x.device:
                    got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
                           else type(out).__name__)
                    raise ValueError(f"hook {getattr(fn, '__name__', fn)!r} at {self.name} must return None or a "
                                     f"tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}; got {got}")
                x = out
        return x

    forward = __call__

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


HookSelector = Union[str, Callable[[str], bool]]

# Public hook names derive from module paths by these replacements, applied in order (one alias rule):
# transformer.blocks.3.norm_attn_norm.attn.hook_q -> blocks.3.attn.hook_q; transformer.hook_embed -> hook_embed
HOOK_ALIASES = (("transformer.", ""), ("norm_attn_norm.attn.", "attn."), ("norm_attn_norm.", ""))


def hook_alias(module_path: str) -> str:
    for old, new in HOOK_ALIASES:
        module_path = module_path.replace(old, new)
    return module_path


class HookedMixin:
    """Adds `hook_points`, `hook_names()` and `hooks(...)` to a module tree that contains HookPoints."""

    hook_points: dict[str, HookPoint]

    def _name_hook_points(self) -> dict[str, HookPoint]:
        """Every HookPoint in the module tree, named by `hook_alias` of its path, in registration (forward) order."""
        points: dict[str, HookPoint] = {}
        for path, module in self.named_modules():
            if isinstance(module, HookPoint):
                name = hook_alias(path)
                m = re.match(r"blocks\.(\d+)\.", name)
                module.name, module.layer = name, int(m.group(1)) if m else None
                points[name] = module
        return points

    def hook_names(self, pattern: str | None = None, shapes: bool = False) -> list[str] | dict[str, str]:
        """All hook point names, in forward order; `pattern` is an fnmatch glob (`blocks.*.ffn.*`).
        shapes=True: {name: layout} with this model's sizes, e.g. '[batch, pos, head=8, d_head=64]'."""
        names = [n for n in self.hook_points if pattern is None or fnmatch.fnmatchcase(n, pattern)]
        if not shapes:
            return names
        sizes = self._dim_sizes()
        return {n: "[" + ", ".join(f"{d}={sizes[d]}" if d in sizes else d for d in self.hook_points[n].layout) + "]"
                for n in names}

    def _dim_sizes(self) -> dict[str, int]:
        return {}

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
        """Attach `(name | glob | predicate, fn)` hooks for the block, in this thread (context) only; always
        removed on exit."""
        items: list[tuple[HookPoint, HookFn]] = []
        for selector, fn in fwd_hooks:
            if not callable(fn):
                raise TypeError(f"hook for {selector!r} is not callable: {fn!r}")
            items += [(self.hook_points[name], fn) for name in self.resolve_hook_names(selector)]
        with scoped("fns", items):
            yield self

    def reset_hooks(self) -> None:
        """Detach every hook of this model in the calling context (`hooks()` already cleans up after itself)."""
        scope = _SCOPE.get()
        mine = set(self.hook_points.values())
        _SCOPE.set(Scope({p: f for p, f in scope.fns.items() if p not in mine}, scope.edits, scope.captures))
