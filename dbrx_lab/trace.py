"""Record what a forward pass or a generation does (routing, attention, expert norms, activations) as a Trace.

A `Record` says what to keep; `run_with_trace` / `generate_with_trace` attach recorder hooks with
`model.hooks(...)` (always removed) that copy each kept tensor to CPU, in the Record's dtype, the moment
it is produced; the result is a `Trace` of CPU tensors shaped [layer, batch, position, ...].

Shapes: L layers, B batch, T positions (absolute columns of the padded sequence), E experts,
k experts per token, H heads, Q recorded query positions, d d_model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .generation import prepare_prompt, stream
from .hooks import scoped
from .model import attention_pattern
from .tokenizer import VOCAB_SIZE, load_tokenizer
from .version import __version__

if TYPE_CHECKING:
    import pandas as pd

    from .config import DbrxConfig
    from .lm import DbrxLM
    from .model import DbrxOutput

__all__ = ["Record", "Trace", "AttentionBudgetError", "run_with_trace", "generate_with_trace", "FORMAT_VERSION"]

FORMAT_NAME = "dbrx_lab.trace"
FORMAT_VERSION = 2               # 2: the checksum covers the JSON header too; version 1 files still load
READABLE_VERSIONS = ("1", "2")

_KEY_DIM_FILL = {"hook_scores": float("-inf"), "hook_pattern": 0.0}                 # last dim: keys


class AttentionBudgetError(ValueError, MemoryError):
    """The attention patterns a Record asks for would exceed its `max_attention_bytes`."""


def _format_bytes(n: float) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.2f} MiB"


def _int_list(name: str, value, allow_true: bool = False):
    """None / True / an int / a sequence of ints -> None / True / tuple of ints (no duplicates)."""
    if value is None or (allow_true and value is True):
        return value
    if value is False and allow_true:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple, range)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        expected = "True, an int or a list of ints" if allow_true else "None, an int or a list of ints"
        raise ValueError(f"Record.{name} must be {expected}, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"Record.{name} has duplicates: {list(value)}")
    return tuple(value)


def _check_range(label: str, values: Sequence[int], n: int) -> None:
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise ValueError(f"{label} {bad} out of range [0, {n - 1}]")


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """What a trace keeps.

    router: router logits [L,B,T,E], top-k experts and applied weights [L,B,T,k] for every layer (float32).
    attention: True (the layers in `layers`, default all) or a list of layers; patterns [B, H_sel, Q_sel, T].
    experts: L2 norms of each chosen expert's unweighted output and of its GLU hidden, [L,B,T,k], all layers.
    layers: the layers `attention=True` and `residuals=True` mean (None = all).
    heads: attention heads to keep (None = all); query_positions: query rows to keep (None = all T).
    residuals: True (the layers in `layers`) or a list of layers: blocks.{i}.hook_resid_pre/mid/post [B,T,d].
    hooks: extra hook names or globs to keep in `trace.activations`, reshaped to [B, T, ...].
    dtype: dtype of attention, expert norms and activations (router data is always float32 / long).
    max_attention_bytes: refuse an attention capture estimated above this many bytes.
    cache: an offloaded model's per-token expert cache outcome, `trace.cache` [L,B,T,k] (dbrx_lab.offload:
        1 hit, 2 prefetched, 0 miss, 3 computed on the CPU, -1 not fetched).
    """

    router: bool = True
    attention: bool | Sequence[int] = False
    experts: bool = False
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    query_positions: Sequence[int] | None = None
    residuals: bool | Sequence[int] = False
    hooks: Sequence[str] = ()
    dtype: torch.dtype = torch.float32
    max_attention_bytes: int = 2 * 1024 ** 3
    cache: bool = False

    def __post_init__(self) -> None:
        for name in ("router", "experts", "cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Record.{name} must be True or False, got {getattr(self, name)!r}")
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen dataclass)
        set_("attention", _int_list("attention", self.attention, allow_true=True))
        set_("residuals", _int_list("residuals", self.residuals, allow_true=True))
        for name in ("layers", "heads", "query_positions"):
            set_(name, _int_list(name, getattr(self, name)))
        hooks = (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks)
        if not all(isinstance(h, str) for h in hooks):
            raise ValueError(f"Record.hooks must be hook names or globs (strings), got {self.hooks!r}")
        set_("hooks", hooks)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"Record.dtype must be a floating torch dtype (e.g. torch.float32, torch.bfloat16), "
                             f"got {self.dtype!r}")
        if not isinstance(self.max_attention_bytes, (int, float)) or self.max_attention_bytes <= 0:
            raise ValueError(f"Record.max_attention_bytes must be > 0, got {self.max_attention_bytes!r}")

    # --- resolving against a model ---------------------------------------------------------------
    def attention_layers(self, config: "DbrxConfig") -> list[int]:
        """The layers whose attention patterns are kept."""
        if self.attention is None:
            return []
        layers = self.attention if self.attention is not True else (self.layers or range(config.n_layers))
        layers = list(layers)
        _check_range(f"Record.{'attention' if self.attention is not True else 'layers'}: layers", layers,
                     config.n_layers)
        return layers

    def residual_layers(self, config: "DbrxConfig") -> list[int]:
        if self.residuals is None:
            return []
        layers = list(self.residuals if self.residuals is not True else (self.layers or range(config.n_layers)))
        _check_range(f"Record.{'residuals' if self.residuals is not True else 'layers'}: layers", layers,
                     config.n_layers)
        return layers

    def validate(self, config: "DbrxConfig", seq_len: int | None = None) -> None:
        """Check layers, heads and query positions against a model config and sequence length."""
        if self.layers is not None:
            _check_range("Record.layers: layers", self.layers, config.n_layers)
        self.attention_layers(config)
        self.residual_layers(config)
        if self.heads is not None:
            _check_range("Record.heads: heads", self.heads, config.n_heads)
        if self.query_positions is not None and seq_len is not None:
            _check_range("Record.query_positions: positions", self.query_positions, seq_len)

    def estimate_attention_bytes(self, config: "DbrxConfig", batch: int, seq_len: int, pattern_hooks: int = 0) -> int:
        """Bytes of attention patterns this Record would hold: layers x batch x heads x queries x seq_len x itemsize,
        plus, for each scores/pattern hook in `hooks` (`pattern_hooks` of them), batch x all heads x seq_len^2
        in the Record's dtype and the float32 [B, H, T, S] scores the model builds for such a hook."""
        n_layers = len(self.attention_layers(config))
        heads = config.n_heads if self.heads is None else len(self.heads)
        queries = seq_len if self.query_positions is None else len(self.query_positions)
        hooked = pattern_hooks * batch * config.n_heads * seq_len * seq_len * self.dtype.itemsize
        scores = batch * config.n_heads * seq_len * seq_len * 4 if pattern_hooks else 0
        return n_layers * batch * heads * queries * seq_len * self.dtype.itemsize + hooked + scores

    def check_budget(self, config: "DbrxConfig", batch: int, seq_len: int, pattern_hooks: int = 0) -> int:
        """The estimate, or AttentionBudgetError with the estimate and how to narrow the capture."""
        need = self.estimate_attention_bytes(config, batch, seq_len, pattern_hooks)
        if need > self.max_attention_bytes:
            if pattern_hooks:
                raise AttentionBudgetError(
                    f"recording would hold ~{_format_bytes(need)} of attention, including {pattern_hooks} scores/"
                    f"pattern hook(s) in Record.hooks (each batch {batch} x {config.n_heads} heads x {seq_len}^2), "
                    f"over max_attention_bytes={_format_bytes(self.max_attention_bytes)}. Record patterns with "
                    f"attention=[...], heads=[...], query_positions=[...] instead, or raise max_attention_bytes.")
            n_layers = len(self.attention_layers(config))
            heads = config.n_heads if self.heads is None else len(self.heads)
            queries = seq_len if self.query_positions is None else len(self.query_positions)
            raise AttentionBudgetError(
                f"recording attention would hold ~{_format_bytes(need)} ({n_layers} layers x batch {batch} x "
                f"{heads} heads x {queries} query positions x {seq_len} keys x {self.dtype.itemsize} bytes), over "
                f"max_attention_bytes={_format_bytes(self.max_attention_bytes)}. Narrow it: fewer layers "
                f"(attention=[...]), fewer heads (heads=[...]), fewer query positions (query_positions=[...]), "
                f"a smaller dtype (dtype=torch.bfloat16), a shorter/smaller batch, or raise max_attention_bytes.")
        return need

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d


# ------------------------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class Trace:
    """What a model did on a batch: CPU tensors shaped [layer, batch, position, ...] (see design.md)."""

    input_ids: torch.Tensor                       # [B, T] long
    attention_mask: torch.Tensor                  # [B, T] bool, True = real token
    tokens: list[list[str]]                       # per row, readable string per token
    router_logits: torch.Tensor | None = None     # [L, B, T, E] float32 raw logits
    topk_experts: torch.Tensor | None = None      # [L, B, T, k] long, descending weight, as applied
    topk_weights: torch.Tensor | None = None      # [L, B, T, k] float32 applied weights
    attention: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> [B, H_sel, Q_sel, T]
    attention_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> head indices kept
    attention_query_positions: list[int] | None = None                  # None = all T
    expert_output_norm: torch.Tensor | None = None    # [L, B, T, k]
    expert_hidden_norm: torch.Tensor | None = None    # [L, B, T, k]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)   # hook name -> [B, T, ...]
    prompt_length: int = 0                        # T for a forward; prompt columns for a generation
    metadata: dict = field(default_factory=dict)

    @property
    def cache(self) -> torch.Tensor | None:
        """[L, B, T, k] int8 expert cache outcome per routed expert (Record(cache=True) on an offloaded model):
        1 hit, 2 brought by a prefetch, 0 miss (read on demand), 3 computed on the CPU, -1 not fetched."""
        names = [f"blocks.{i}.ffn.experts.mlp.hook_cache" for i in range(self.n_layers)]
        if not names or any(n not in self.activations for n in names):
            return None
        return torch.stack([self.activations[n] for n in names]).to(torch.int8)

    # --- shape properties ------------------------------------------------------------------------
    def _routing(self) -> torch.Tensor | None:
        return next((t for t in (self.topk_experts, self.router_logits, self.expert_output_norm)
                     if t is not None), None)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_layers(self) -> int:
        t = self._routing()
        return t.shape[0] if t is not None else self.metadata.get("config", {}).get("n_layers", 0)

    @property
    def n_experts(self) -> int | None:
        if self.router_logits is not None:
            return self.router_logits.shape[-1]
        return self.metadata.get("config", {}).get("moe_num_experts", self.metadata.get("n_experts"))

    @property
    def top_k(self) -> int | None:
        if self.topk_experts is not None:
            return self.topk_experts.shape[-1]
        return self.metadata.get("config", {}).get("moe_top_k")

    @property
    def router_probs(self) -> torch.Tensor | None:
        """[L, B, T, E] float32 softmax of the raw router logits."""
        return None if self.router_logits is None else torch.softmax(self.router_logits.float(), dim=-1)

    @property
    def is_generated(self) -> torch.Tensor:
        """[B, T] bool: the column was generated (at or after prompt_length)."""
        return (torch.arange(self.seq_len) >= self.prompt_length).expand(self.batch_size, -1)

    def __repr__(self) -> str:
        parts = [f"batch={self.batch_size}", f"seq_len={self.seq_len}", f"prompt_length={self.prompt_length}"]
        for name in ("router_logits", "topk_experts", "topk_weights", "expert_output_norm", "expert_hidden_norm"):
            t = getattr(self, name)
            if t is not None:
                parts.append(f"{name}={list(t.shape)}")
        if self.attention:
            parts.append("attention={" + ", ".join(f"{k}: {list(v.shape)}" for k, v in self.attention.items()) + "}")
        if self.activations:
            parts.append(f"activations={list(self.activations)}")
        return "Trace(" + ", ".join(parts) + ")"

    # --- construction from crafted tensors -------------------------------------------------------
    @classmethod
    def from_routing(cls, topk_experts: torch.Tensor, topk_weights: torch.Tensor | None = None,
                     router_logits: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                     tokens: list[list[str]] | None = None, attention_mask: torch.Tensor | None = None,
                     n_experts: int | None = None) -> "Trace":
        """A Trace from hand-made routing (tests, synthetic data).

        topk_experts [L, B, T, k] integer; topk_weights [L, B, T, k] (default: the router softmax over the
        chosen experts renormalised to sum 1 when router_logits [L, B, T, E] is given, else 1/k);
        input_ids [B, T] (default zeros); tokens (default str(id)); attention_mask [B, T] (default all real);
        n_experts (default E of router_logits, else max expert + 1).
        """
        experts = torch.as_tensor(topk_experts)
        if experts.ndim != 4 or experts.dtype.is_floating_point or experts.dtype == torch.bool:
            raise ValueError(f"topk_experts must be an integer tensor [L, B, T, k], got "
                             f"{tuple(experts.shape)} {experts.dtype}")
        experts = experts.long().cpu()
        L, B, T, k = experts.shape
        logits = None
        if router_logits is not None:
            logits = torch.as_tensor(router_logits).float().cpu()
            if logits.shape[:3] != (L, B, T):
                raise ValueError(f"router_logits must be [L, B, T, E] = [{L}, {B}, {T}, E], got {tuple(logits.shape)}")
            n_experts = logits.shape[-1] if n_experts is None else n_experts
            if n_experts != logits.shape[-1]:
                raise ValueError(f"n_experts={n_experts} but router_logits has {logits.shape[-1]} experts")
        if n_experts is None:
            n_experts = int(experts.max()) + 1 if experts.numel() else k
        if experts.numel() and not (0 <= int(experts.min()) and int(experts.max()) < n_experts):
            raise ValueError(f"topk_experts has ids outside [0, {n_experts - 1}]")
        if topk_weights is None:
            if logits is not None:
                w = torch.softmax(logits, -1).gather(-1, experts)
                weights = w / w.sum(-1, keepdim=True)
            else:
                weights = torch.full((L, B, T, k), 1.0 / k)
        else:
            weights = torch.as_tensor(topk_weights).float().cpu()
            if weights.shape != experts.shape:
                raise ValueError(f"topk_weights must match topk_experts {tuple(experts.shape)}, got "
                                 f"{tuple(weights.shape)}")
        ids = torch.zeros(B, T, dtype=torch.long) if input_ids is None else torch.as_tensor(input_ids).long().cpu()
        mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else \
            torch.as_tensor(attention_mask).bool().cpu()
        for name, t in (("input_ids", ids), ("attention_mask", mask)):
            if t.shape != (B, T):
                raise ValueError(f"{name} must be [B, T] = [{B}, {T}], got {tuple(t.shape)}")
        if tokens is None:
            tokens = [[str(i) for i in row] for row in ids.tolist()]
        if len(tokens) != B or any(len(row) != T for row in tokens):
            raise ValueError(f"tokens must be {B} lists of {T} strings")
        return cls(input_ids=ids, attention_mask=mask, tokens=[list(r) for r in tokens], router_logits=logits,
                   topk_experts=experts, topk_weights=weights, prompt_length=T,
                   metadata={"source": "from_routing", "n_experts": n_experts, **_version_stamp()})

    # --- tables ----------------------------------------------------------------------------------
    def to_frame(self, layers: Sequence[int] | None = None, include_padding: bool = False) -> "pd.DataFrame":
        """One row per (batch, position, layer, rank) of the routing, ordered that way.

        Columns: batch, position, layer, rank, token_id, token, expert, weight, prob, logit,
        is_padding (only with include_padding), is_generated. prob/logit are NaN without router logits.
        """
        import numpy as np
        import pandas as pd

        if self.topk_experts is None:
            raise ValueError("this trace has no routing; record it with Record(router=True)")
        L, B, T, k = self.topk_experts.shape
        layer_idx = list(range(L)) if layers is None else list(_int_list("layers", layers))
        _check_range("layers", layer_idx, L)
        experts = self.topk_experts[layer_idx].permute(1, 2, 0, 3)                  # [B, T, L_sel, k]
        weights = (self.topk_weights[layer_idx].permute(1, 2, 0, 3).float() if self.topk_weights is not None
                   else torch.full(experts.shape, float("nan")))
        if self.router_logits is not None:
            logits = self.router_logits[layer_idx].permute(1, 2, 0, 3).float()       # [B, T, L_sel, E]
            safe = experts.clamp(min=0)
            logit = logits.gather(-1, safe)
            prob = torch.softmax(logits, -1).gather(-1, safe)
        else:
            logit = prob = torch.full(experts.shape, float("nan"))
        shape = experts.shape
        grid = [g.reshape(-1).numpy() for g in torch.meshgrid(
            *(torch.arange(n) for n in shape), indexing="ij")]                       # batch, pos, layer-idx, rank
        keep = experts.reshape(-1) >= 0                                              # -1 pads a smaller top-k
        real = self.attention_mask[:, :, None, None].expand(shape).reshape(-1)
        if not include_padding:
            keep &= real
        keep = keep.numpy()
        b, t = grid[0][keep], grid[1][keep]
        token_table = np.empty((B, T), dtype=object)
        token_table[:] = [list(r) for r in self.tokens]
        df = pd.DataFrame({
            "batch": b,
            "position": t,
            "layer": np.asarray(layer_idx, dtype=np.int64)[grid[2][keep]],
            "rank": grid[3][keep],
            "token_id": self.input_ids.numpy()[b, t],
            "token": token_table[b, t],
            "expert": experts.reshape(-1).numpy()[keep],
            "weight": weights.reshape(-1).numpy()[keep],
            "prob": prob.reshape(-1).numpy()[keep],
            "logit": logit.reshape(-1).numpy()[keep],
        })
        if include_padding:
            df["is_padding"] = ~real.numpy()[keep]
        df["is_generated"] = t >= self.prompt_length
        return df

    # --- sub-traces and comparison ---------------------------------------------------------------
    def select(self, batch: int | Sequence[int] | slice) -> "Trace":
        """The sub-trace of some batch rows (an int keeps the batch dimension, size 1)."""
        rows = list(range(self.batch_size))
        if isinstance(batch, slice):
            idx = rows[batch]
        else:
            idx = list(_int_list("batch", batch))
            bad = [i for i in idx if not -self.batch_size <= i < self.batch_size]
            if bad:
                raise ValueError(f"batch rows {bad} out of range [0, {self.batch_size - 1}]")
            idx = [rows[i] for i in idx]
        ix = torch.tensor(idx, dtype=torch.long)
        pick = lambda t, dim: None if t is None else t.index_select(dim, ix)  # noqa: E731
        return dataclasses.replace(
            self, input_ids=pick(self.input_ids, 0), attention_mask=pick(self.attention_mask, 0),
            tokens=[list(self.tokens[i]) for i in idx], router_logits=pick(self.router_logits, 1),
            topk_experts=pick(self.topk_experts, 1), topk_weights=pick(self.topk_weights, 1),
            attention={l: pick(a, 0) for l, a in self.attention.items()},
            attention_heads={l: list(h) for l, h in self.attention_heads.items()},
            expert_output_norm=pick(self.expert_output_norm, 1), expert_hidden_norm=pick(self.expert_hidden_norm, 1),
            activations={n: pick(a, 0) for n, a in self.activations.items()}, metadata=dict(self.metadata))

    def differences(self, other: "Trace", rtol: float = 1e-5, atol: float = 1e-5) -> list[str]:
        """What differs from `other` (empty if all tensors match within tolerance; metadata ignored)."""
        out: list[str] = []
        if self.tokens != other.tokens:
            out.append("tokens")
        if self.prompt_length != other.prompt_length:
            out.append(f"prompt_length {self.prompt_length} != {other.prompt_length}")
        if self.attention_heads != other.attention_heads:
            out.append("attention_heads")
        if self.attention_query_positions != other.attention_query_positions:
            out.append("attention_query_positions")
        mine, theirs = self._tensors(), other._tensors()
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a is None or b is None:
                out.append(f"{name}: only in {'self' if b is None else 'other'}")
            elif a.shape != b.shape:
                out.append(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            elif not a.is_floating_point():
                if not torch.equal(a, b):
                    out.append(f"{name}: {int((a != b).sum())} entries differ")
            elif not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True):
                diff = (a.float() - b.float()).abs().nan_to_num(posinf=float("inf"))
                out.append(f"{name}: max abs difference {float(diff.max()):.3g}")
        return out

    def allclose(self, other: "Trace", rtol: float = 1e-5, atol: float = 1e-5) -> bool:
        return not self.differences(other, rtol=rtol, atol=atol)

    # --- save / load -----------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        t = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        for name in ("router_logits", "topk_experts", "topk_weights", "expert_output_norm", "expert_hidden_norm"):
            if getattr(self, name) is not None:
                t[name] = getattr(self, name)
        t.update({f"attention.{layer}": a for layer, a in self.attention.items()})
        t.update({f"activations.{name}": a for name, a in self.activations.items()})
        return t

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (tensors + a JSON header with the format version and a checksum of both).

        The file is written next to `path` under a temporary name (`checkpoint.temp_path`; those of a killed
        save are swept by the next one), flushed and renamed into place, so `path` is either the complete
        new trace or untouched. Tensors are written from their own memory (no second copy of the trace); the
        file gets the permissions the umask allows. An existing file that is not a trace is never replaced.
        """
        from . import checkpoint

        path = Path(path)
        if path.is_dir():
            raise ValueError(f"cannot save the trace to {path}: it is a folder; give a file name")
        if path.exists() and not _is_trace_file(path):
            raise ValueError(f"cannot save the trace to {path}: that file exists and is not a dbrx_lab trace; "
                             f"choose another name (nothing was overwritten)")
        tensors = {name: t.detach() for name, t in self._tensors().items()}
        bad = [n for n, t in tensors.items() if t.device.type != "cpu" and t.device.type != "meta"]
        tensors.update({n: tensors[n].cpu() for n in bad})                   # traces hold CPU tensors already
        info = json.dumps({"tokens": self.tokens, "prompt_length": self.prompt_length,
                           "attention_heads": {str(k): v for k, v in self.attention_heads.items()},
                           "attention_query_positions": self.attention_query_positions,
                           "metadata": self.metadata}, default=repr)
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "trace": info,
                  "sha256": _checksum(tensors, info)}
        checkpoint.sweep_temps(path)
        tmp = checkpoint.temp_path(path)
        try:
            checkpoint._write_file(tmp, lambda f: checkpoint.write_safetensors(f, tensors, header))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        checkpoint._fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read a file written by `save`; ValueError for another format version, a damaged file, or a header
        whose fields do not fit the tensors (naming the field)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trace file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT_NAME:
                    raise ValueError(f"{path} is not a dbrx_lab trace file (no '{FORMAT_NAME}' header)")
                version = header.get("format_version")
                if version not in READABLE_VERSIONS:
                    raise ValueError(f"{path} is a trace of format version {version}; this dbrx_lab reads version "
                                     f"{FORMAT_VERSION} (re-record it, or load it with a matching dbrx_lab)")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
            raise ValueError(f"{path} is damaged or truncated and cannot be read as a trace: {err}") from None
        raw = header.get("trace")
        signed = _checksum(tensors) if version == "1" else _checksum(tensors, raw if isinstance(raw, str) else "")
        if signed != header.get("sha256"):
            what = "tensor data" if version == "1" else "tensor data or JSON header"
            raise ValueError(f"{path} is damaged: its {what} does not match the checksum in its header")
        try:
            info = json.loads(raw)
        except (TypeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path} is damaged: unreadable trace header ({err})") from None
        _check_loaded(path, info, tensors)
        return cls(
            input_ids=tensors.pop("input_ids"), attention_mask=tensors.pop("attention_mask"), tokens=info["tokens"],
            router_logits=tensors.pop("router_logits", None), topk_experts=tensors.pop("topk_experts", None),
            topk_weights=tensors.pop("topk_weights", None),
            expert_output_norm=tensors.pop("expert_output_norm", None),
            expert_hidden_norm=tensors.pop("expert_hidden_norm", None),
            attention={int(n.split(".", 1)[1]): t for n, t in tensors.items() if n.startswith("attention.")},
            attention_heads={int(k): v for k, v in info["attention_heads"].items()},
            attention_query_positions=info["attention_query_positions"],
            activations={n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("activations.")},
            prompt_length=info["prompt_length"], metadata=info["metadata"])


def _is_trace_file(path: Path) -> bool:
    """Whether `path` is a safetensors file whose header says it is a dbrx_lab trace (read: its header only)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 2 ** 20:
                return False
            head = json.loads(f.read(n))
        return isinstance(head, dict) and isinstance(head.get("__metadata__"), dict) and \
            head["__metadata__"].get("format") == FORMAT_NAME
    except (OSError, ValueError, RecursionError):
        return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_loaded(path: Path, info, tensors: dict[str, torch.Tensor]) -> None:
    """Check a loaded trace's JSON fields against its tensors; ValueError naming the first field that does not fit."""
    def bad(field_name: str, problem: str) -> ValueError:
        return ValueError(f"{path} is damaged: field {field_name} {problem}")

    if not isinstance(info, dict):
        raise bad("trace", f"must be a JSON object, got {type(info).__name__}")
    for key in ("tokens", "prompt_length", "attention_heads", "attention_query_positions", "metadata"):
        if key not in info:
            raise bad(key, "is missing")
    for key in ("input_ids", "attention_mask"):
        if key not in tensors:
            raise bad(key, "is missing (no such tensor)")
    ids = tensors["input_ids"]
    if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise bad("input_ids", f"must be an integer tensor [B, T], got {ids.dtype} {tuple(ids.shape)}")
    B, T = ids.shape
    if tuple(tensors["attention_mask"].shape) != (B, T):
        raise bad("attention_mask", f"must be [B, T] = [{B}, {T}], got {tuple(tensors['attention_mask'].shape)}")
    tokens = info["tokens"]
    if not isinstance(tokens, list) or len(tokens) != B or any(
            not isinstance(row, list) or len(row) != T or not all(isinstance(t, str) for t in row) for row in tokens):
        raise bad("tokens", f"must be {B} lists of {T} strings (one per token of input_ids)")
    if not _is_int(info["prompt_length"]) or not 0 <= info["prompt_length"] <= T:
        raise bad("prompt_length", f"must be an integer in [0, {T}], got {info['prompt_length']!r}")
    if not isinstance(info["metadata"], dict):
        raise bad("metadata", f"must be a JSON object, got {type(info['metadata']).__name__}")
    L = k = None
    for name in ("router_logits", "topk_experts", "topk_weights", "expert_output_norm", "expert_hidden_norm"):
        t = tensors.get(name)
        if t is None:
            continue
        if t.ndim != 4 or tuple(t.shape[1:3]) != (B, T) or (L is not None and t.shape[0] != L):
            raise bad(name, f"must be [L, {B}, {T}, ...], got {tuple(t.shape)}")
        L = t.shape[0]
        if name != "router_logits":
            if k is not None and t.shape[3] != k:
                raise bad(name, f"has k={t.shape[3]}, other routing fields k={k}")
            k = t.shape[3]
        if (name == "topk_experts") == t.dtype.is_floating_point:
            raise bad(name, f"has dtype {t.dtype}")
    config = info["metadata"].get("config") if isinstance(info["metadata"].get("config"), dict) else {}
    n_heads = config.get("n_heads") if _is_int(config.get("n_heads")) else None
    queries = info["attention_query_positions"]
    if queries is not None and (not isinstance(queries, list) or len(set(map(repr, queries))) != len(queries) or
                                not all(_is_int(q) and 0 <= q < T for q in queries)):
        raise bad("attention_query_positions", f"must be null or distinct integers in [0, {T - 1}], got {queries!r}")
    heads = info["attention_heads"]
    if not isinstance(heads, dict):
        raise bad("attention_heads", f"must be an object {{layer: [heads]}}, got {type(heads).__name__}")
    layers = {n.split(".", 1)[1] for n in tensors if n.startswith("attention.")}
    if set(heads) != layers:
        raise bad("attention_heads", f"names layers {sorted(heads)}, the file has attention for {sorted(layers)}")
    for layer, hs in heads.items():
        limit = f" < n_heads={n_heads}" if n_heads else ""
        if not layer.isdigit() or not isinstance(hs, list) or len(set(map(repr, hs))) != len(hs) or \
                not all(_is_int(h) and h >= 0 and (n_heads is None or h < n_heads) for h in hs):
            raise bad(f"attention_heads[{layer}]", f"must be distinct head indices >= 0{limit}, got {hs!r}")
        a = tensors[f"attention.{layer}"]
        want = (B, len(hs), T if queries is None else len(queries), T)
        if tuple(a.shape) != want:
            raise bad(f"attention_heads[{layer}]", f"and attention_query_positions give the shape {list(want)}; "
                      f"the tensor attention.{layer} is {list(a.shape)}")
    for name, t in tensors.items():
        if name.startswith("activations.") and (t.ndim < 2 or tuple(t.shape[:2]) != (B, T)):
            raise bad(name, f"must be [{B}, {T}, ...], got {tuple(t.shape)}")
    known = {"input_ids", "attention_mask", "router_logits", "topk_experts", "topk_weights", "expert_output_norm",
             "expert_hidden_norm"}
    unknown = [n for n in tensors if n not in known and not n.startswith(("attention.", "activations."))]
    if unknown:
        raise bad(unknown[0], "is not a trace tensor")


def _checksum(tensors: dict[str, torch.Tensor], info: str | None = None) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and, from format version 2, the JSON header."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    if info is not None:
        h.update(b"trace:" + info.encode("utf-8"))
    return h.hexdigest()


def _version_stamp() -> dict[str, str]:
    return {"dbrx_lab_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------
class Recorder:
    """Hook functions and attention captures that copy what a Record asks for into CPU buffers with
    `total_len` position columns.

    Every hook point is laid out [B, t, ...] (scores and pattern [B, H, t, S]) and covers the columns of the
    current call (`ctx.columns`), so decode steps fill one column each. Tensors on an accelerator are copied
    into pinned host memory without waiting (non_blocking); the copies are waited for once, when the buffers
    are read (`trace_fields`, `stacked`). Attention patterns are computed by captures beside the model's own
    attention, for the recorded heads and query rows only, in chunks that keep the temporaries within the
    Record's `max_attention_bytes`.
    """

    def __init__(self, model: "DbrxLM", record: Record, batch: int, total_len: int) -> None:
        cfg = model.config
        record.validate(cfg, total_len)
        self.model, self.record, self.B, self.total = model, record, batch, total_len
        self.L = cfg.n_layers
        self.dtype = record.dtype
        self.per_layer: dict[str, list[torch.Tensor | None]] = {}   # field -> per layer [B, total, ...]
        self.pending: dict[str, list[list]] = {}                    # field -> per layer [(column, [B, t, ...])]
        self.activations: dict[str, torch.Tensor] = {}              # hook name -> [B, total, ...]
        self.pending_activations: dict[str, list] = {}              # hook name -> [(columns, [B, t, ...])]
        self.attn_layers = record.attention_layers(cfg)
        self.heads = list(range(cfg.n_heads)) if record.heads is None else list(record.heads)
        self.queries = record.query_positions
        self.query_row = None if self.queries is None else {p: i for i, p in enumerate(self.queries)}
        n_q = total_len if self.queries is None else len(self.queries)
        self.attn_shape = (batch, len(self.heads), n_q, total_len)
        self.attention: dict[int, torch.Tensor] = {}
        self.pending_attention: dict[int, list] = {l: [] for l in self.attn_layers}   # [(rows, [B, h, r, S])]
        self.activation_names: list[str] = []
        for layer in record.residual_layers(cfg):
            self.activation_names += [f"blocks.{layer}.hook_resid_{w}" for w in ("pre", "mid", "post")]
        for selector in record.hooks:
            self.activation_names += model.resolve_hook_names(selector)
        if record.cache:
            if getattr(model, "expert_runtime", None) is None:
                raise ValueError("Record(cache=True) needs a model whose experts are offloaded "
                                 "(load_model(..., experts='offload', expert_cache=...))")
            self.activation_names += [f"blocks.{i}.ffn.experts.mlp.hook_cache" for i in range(cfg.n_layers)]
        self.activation_names = list(dict.fromkeys(self.activation_names))
        pattern_hooks = sum(n.rsplit(".", 1)[-1] in _KEY_DIM_FILL for n in self.activation_names)
        record.check_budget(cfg, batch, total_len, pattern_hooks=pattern_hooks)
        self.calls: list = []                                       # the ForwardContext of each recorded call
        self.device_copies = False
        self.active = True

    @contextlib.contextmanager
    def paused(self):
        """Ignore forwards run meanwhile (e.g. by a callback) so they cannot write into the buffers."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    @contextlib.contextmanager
    def attached(self):
        """Attach the recorder's hooks and captures to the model in this thread (context) for the block."""
        captures = [(self.model.transformer.blocks[l].norm_attn_norm.attn, self._capture) for l in self.attn_layers]
        with self.model.hooks(self.hooks()), scoped("captures", captures):
            yield self

    # --- hook functions --------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Callable]]:
        """(name, fn) pairs for model.hooks(); each fn is a no-op while paused."""
        hooks: list[tuple[str, Callable]] = [("hook_final", self._on_final)]
        for i in range(self.L):
            f = f"blocks.{i}.ffn."
            if self.record.router:
                hooks += [(f + "hook_router_logits", self._layer_writer("router_logits", torch.float32)),
                          (f + "hook_topk_experts", self._layer_writer("topk_experts", torch.long)),
                          (f + "hook_topk_weights", self._layer_writer("topk_weights", torch.float32))]
            if self.record.experts:
                hooks += [(f + "hook_expert_out", self._layer_writer("expert_output_norm", self.dtype, norm=True)),
                          (f + "hook_expert_hidden_norm", self._layer_writer("expert_hidden_norm", self.dtype))]
        hooks += [(name, self._on_activation) for name in self.activation_names]
        return [(name, self._when_active(fn)) for name, fn in hooks]

    def _when_active(self, fn: Callable) -> Callable:
        def hook(x: torch.Tensor, point) -> None:
            if self.active:
                fn(x, point)

        hook.__name__ = getattr(fn, "__name__", "record")
        return hook

    def _host(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A CPU copy of x in dtype; from an accelerator into pinned memory, without waiting for it."""
        x = x.detach()
        if x.device.type == "cpu":
            return x.to(dtype, copy=True)                              # hooks after this one may edit x
        out = torch.empty(x.shape, dtype=dtype, pin_memory=torch.cuda.is_available())
        out.copy_(x.to(dtype), non_blocking=True)
        self.device_copies = True
        return out

    def _wait(self) -> None:
        if self.device_copies and torch.cuda.is_available():
            torch.cuda.synchronize()
            self.device_copies = False

    @staticmethod
    def _columns(ctx, t: int) -> range:
        """The columns of a tensor with t positions in the current call: the last t of ctx.columns."""
        return ctx.columns[len(ctx.columns) - t:]

    def _on_final(self, x: torch.Tensor, hook) -> None:
        self.calls.append(hook.ctx)                 # its kernels are read at the end (lm_head runs after this)

    def _layer_writer(self, field_name: str, dtype: torch.dtype, norm: bool = False) -> Callable:
        """A hook that copies its tensor [B, t, ...] now and writes it into the layer's buffer at the next
        `_flush` (so the decode steps' columns go in with one copy per layer, not one per step)."""
        self.per_layer.setdefault(field_name, [None] * self.L)
        pending = self.pending.setdefault(field_name, [[] for _ in range(self.L)])

        def write(x: torch.Tensor, hook) -> None:                  # x [B, t, k(, d)] or [B, t, E]
            if norm:
                x = torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
            x = self._host(x, dtype if x.is_floating_point() else x.dtype)
            pending[hook.layer].append((self._columns(hook.ctx, x.shape[1]).start, x))

        write.__name__ = f"record_{field_name}"
        return write

    def _flush(self, field_name: str) -> None:
        """Write a field's pending tensors into its per-layer buffers [B, total, ...]; runs of adjacent
        columns are concatenated first."""
        self._wait()
        store = self.per_layer[field_name]
        for layer, pending in enumerate(self.pending[field_name]):
            if not pending:
                continue
            if store[layer] is None:
                store[layer] = torch.zeros(self.B, self.total, *pending[0][1].shape[2:], dtype=pending[0][1].dtype)
            pending.sort(key=lambda item: item[0])
            run: list[torch.Tensor] = []
            for i, (col, x) in enumerate(pending):
                run.append(x)
                if i + 1 == len(pending) or pending[i + 1][0] != col + x.shape[1]:
                    stop = col + x.shape[1]
                    block = run[0] if len(run) == 1 else torch.cat(run, dim=1)
                    store[layer][:, stop - block.shape[1]:stop] = block
                    run = []
            pending.clear()

    def _capture(self, attn, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Attention capture (called by Attention beside its kernel): q [B, H, t, D], k [B, K, S, D] -> the
        recorded heads' pattern at the recorded query rows of this call, in chunks of rows."""
        if not self.active:
            return
        ctx = attn.hook_z.ctx
        cols = self._columns(ctx, q.shape[2])
        if self.query_row is None:
            local, dest = list(range(len(cols))), list(cols)
        else:
            hits = [(i, self.query_row[c]) for i, c in enumerate(cols) if c in self.query_row]
            if not hits:
                return
            local, dest = (list(x) for x in zip(*hits))
        S = k.shape[2]
        per_row = self.B * len(self.heads) * S * 4 * 3                 # float32 scores, softmax, a copy
        step = max(1, int(self.record.max_attention_bytes // per_row))
        layer = attn.hook_z.layer
        for i in range(0, len(local), step):
            p = attention_pattern(q, k, mask, self.heads, local[i:i + step])          # [B, h, r, S] float32
            self.pending_attention[layer].append((dest[i:i + step], self._host(p, self.dtype)))

    def _on_activation(self, x: torch.Tensor, hook) -> None:
        kind = hook.name.rsplit(".", 1)[-1]
        if kind in _KEY_DIM_FILL:
            x = x.transpose(1, 2)                                                   # [B, t, heads, S]
        x = self._host(x, self.dtype if x.is_floating_point() else x.dtype)
        self.pending_activations.setdefault(hook.name, []).append((self._columns(hook.ctx, x.shape[1]), x))

    def _flush_all(self) -> None:
        self._wait()
        for name in self.per_layer:
            self._flush(name)
        for layer, pending in self.pending_attention.items():
            if layer not in self.attention:
                self.attention[layer] = torch.zeros(self.attn_shape, dtype=self.dtype)
            buf = self.attention[layer]
            for rows, p in pending:
                buf[:, :, rows, :p.shape[-1]] = p
            pending.clear()
        for name, pending in self.pending_activations.items():
            kind = name.rsplit(".", 1)[-1]
            for cols, x in pending:
                buf = self.activations.get(name)
                if buf is None:
                    rest = list(x.shape[2:])
                    if kind in _KEY_DIM_FILL:
                        rest[-1] = self.total
                    buf = torch.full((self.B, self.total, *rest), _KEY_DIM_FILL.get(kind, 0), dtype=x.dtype)
                    self.activations[name] = buf
                buf[:, cols.start:cols.stop, ..., :x.shape[-1]] = x
            pending.clear()

    # --- result ----------------------------------------------------------------------------------
    def stacked(self, name: str, columns: slice | int) -> torch.Tensor:
        """A per-layer field at some columns, layers stacked: [L, B, T_sel, ...] (or [L, B, ...] for an int).

        A layer with a smaller top-k (a TopK intervention) is padded with expert -1 and weight/norm 0.
        """
        self._flush(name)
        store = self.per_layer[name]
        missing = [i for i, t in enumerate(store) if t is None]
        if missing:
            raise RuntimeError(f"no {name} was recorded for layers {missing}")
        parts = [t[:, columns] for t in store]
        if name != "router_logits":
            k = max(p.shape[-1] for p in parts)
            fill = -1 if name == "topk_experts" else 0
            parts = [torch.nn.functional.pad(p, (0, k - p.shape[-1]), value=fill) for p in parts]
        return torch.stack(parts)

    def kernel_names(self) -> dict[str, list[str]]:
        """{kind: per layer the kernel(s) that ran, joined by '+'} ("unembed": one entry)."""
        kernels: dict[str, dict] = {}                               # kind -> {layer: {names}}
        for ctx in self.calls:
            for (kind, layer), name in ctx.kernels.items():
                kernels.setdefault(kind, {}).setdefault(layer, set()).add(name)
        out: dict[str, list[str]] = {}
        for kind, per in kernels.items():
            layers = sorted(per, key=lambda l: -1 if l is None else l)
            out[kind] = ["+".join(sorted(per[l])) for l in layers]
        return out

    def trace_fields(self, length: int) -> dict[str, Any]:
        """Trace fields for the first `length` columns (layers stacked; a smaller top-k padded with -1 / 0)."""
        self._flush_all()
        out: dict[str, Any] = {name: self.stacked(name, slice(0, length)) for name in self.per_layer}
        keep_q = None if self.queries is None else [i for i, p in enumerate(self.queries) if p < length]
        out["attention"] = {}
        for l in self.attn_layers:
            a = self.attention.get(l)
            if a is None:
                a = torch.zeros(self.attn_shape, dtype=self.dtype)
            out["attention"][l] = a[:, :, :length, :length] if keep_q is None else a[:, :, keep_q, :length]
        out["attention_heads"] = {l: list(self.heads) for l in self.attn_layers}
        out["attention_query_positions"] = None if keep_q is None else [self.queries[i] for i in keep_q]
        out["activations"] = {}
        for name, a in self.activations.items():
            a = a[:, :length]
            if name.rsplit(".", 1)[-1] in _KEY_DIM_FILL:
                a = a[..., :length]
            out["activations"][name] = a
        return out


def _token_strings(model: "DbrxLM", ids: torch.Tensor) -> list[list[str]]:
    """Per row, a readable string per token: the model's tokenizer, DBRX's for the real vocab, else str(id)."""
    tok = model.tokenizer
    if tok is None and model.config.vocab_size == VOCAB_SIZE:
        tok = load_tokenizer()
    if tok is None:
        return [[str(i) for i in row] for row in ids.tolist()]
    return [tok.token_strings(row) for row in ids.tolist()]


def _metadata(model: "DbrxLM", record: Record, kind: str, **extra) -> dict[str, Any]:
    return {"kind": kind, "model": getattr(model, "name_or_path", None) or type(model).__name__,
            "config": model.config.to_dict(), "record": record.to_dict(),
            "interventions": [repr(e) for e in model.active_interventions()], **extra, **_version_stamp()}


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_with_trace(model: "DbrxLM", input_ids, attention_mask=None, record: Record | None = None,
                   **forward_kwargs) -> tuple["DbrxOutput", Trace]:
    """One forward pass (no grad) -> (DbrxOutput, Trace with T = the input's columns).

    input_ids: ids [B, T], a string, a list of strings (left padded) or chat messages.
    """
    record = Record() if record is None else record
    ids, mask = prepare_prompt(model, input_ids, attention_mask)
    B, T = ids.shape
    recorder = Recorder(model, record, B, T)
    with recorder.attached():
        out = model(ids, mask, **forward_kwargs)
    ids = ids.cpu()
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.cpu().bool()
    trace = Trace(input_ids=ids, attention_mask=mask, tokens=_token_strings(model, ids), prompt_length=T,
                  metadata=_metadata(model, record, "forward", kernels=recorder.kernel_names()), **recorder.trace_fields(T))
    return out, trace


@torch.no_grad()
def generate_with_trace(model: "DbrxLM", prompt, max_new_tokens: int = 50, record: Record | None = None,
                        on_step: Callable[[Any, dict], Any] | None = None,
                        **generate_kwargs) -> tuple[torch.Tensor, Trace]:
    """Generate (see generation.stream) while recording -> (ids [B, T + n], Trace over all T + n columns).

    The trace has the shapes of one forward pass over the final ids: the prompt's columns come from the
    prefill, each generated token's column from the cached step that processes it, attention rows of
    each step go into row `position` of the full causal pattern (zeros above the diagonal). After the
    last token is sampled it is run through the model once more (cached) so its routing is recorded too.
    Tokens after a row produced an eos id are marked as padding in `trace.attention_mask`.
    Generation computes `hook_final` only for the last prompt token, so a recorded `hook_final` holds
    zeros at the prompt's earlier columns (record blocks.{L-1}.hook_resid_post for those).

    on_step(step, routing) is called once per generated token, as soon as the model has processed it
    (i.e. when the next token is sampled; the last one after the extra pass): `step` is the
    generation.Step that produced the token, and routing = {"position": step.position,
    "topk_experts": [L, B, k] long, "topk_weights": [L, B, k] float32, "router_logits": [L, B, E] float32}
    for that token (routing keys only with record.router). Forwards run inside on_step are not recorded.
    """
    record = Record() if record is None else record
    ids, mask = prepare_prompt(model, prompt, generate_kwargs.get("attention_mask"))
    generate_kwargs["attention_mask"] = mask
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if max_new_tokens == 0:
        list(stream(model, ids, 0, **generate_kwargs))                          # validates the settings
        return ids, run_with_trace(model, ids, mask, record=record)[1]
    B, T = ids.shape
    recorder = Recorder(model, record, B, T + max_new_tokens)

    def routing_at(pos: int) -> dict[str, Any]:
        names = [n for n in ("topk_experts", "topk_weights", "router_logits") if n in recorder.per_layer]
        return {"position": pos, **{n: recorder.stacked(n, pos) for n in names}}      # [L, B, ...]

    steps = []                                  # stream yields >= 1 step; process_last runs the last token
    with recorder.attached():
        for step in stream(model, ids, max_new_tokens, process_last=True, **generate_kwargs):
            if steps and on_step is not None:
                with recorder.paused():
                    on_step(steps[-1], routing_at(steps[-1].position))
            steps.append(step)
        last, n = steps[-1], len(steps)
    if on_step is not None:
        on_step(last, routing_at(last.position))

    out_ids = torch.cat([ids.cpu(), torch.stack([s.tokens.cpu() for s in steps], dim=1)], dim=1)  # [B, T + n]
    prompt_mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.cpu().bool()
    finished_before = [torch.zeros(B, dtype=torch.bool)] + [s.finished.cpu() for s in steps[:-1]]
    trace_mask = torch.cat([prompt_mask, ~torch.stack(finished_before, dim=1)], dim=1)
    settings = {k: v for k, v in generate_kwargs.items() if k not in ("attention_mask", "stop")}
    trace = Trace(input_ids=out_ids, attention_mask=trace_mask, tokens=_token_strings(model, out_ids),
                  prompt_length=T, metadata=_metadata(model, record, "generate", kernels=recorder.kernel_names(), generation={
                      "max_new_tokens": max_new_tokens, "generated": n, **settings}),
                  **recorder.trace_fields(T + n))
    return out_ids, trace
