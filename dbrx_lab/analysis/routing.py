"""Routing statistics: traces (or route-stats tables) -> pandas DataFrames.

Every statistic counts real tokens only (padding is dropped) and is aggregated over layers, positions and
texts. Each one is an accumulator with `update(routing)` and `result()`, so the same code runs on one
trace in a notebook and, chunk by chunk in bounded memory, on a dataset (`dbrx_lab.route_stats`).

Shapes: L layers, N real tokens, E experts, k experts chosen per token.
A *source* is a `Trace`, a list of Traces, a `Routing`, a routing DataFrame (as written by route-stats, or
`Trace.to_frame()`), or a route-stats output folder (read one part file at a time).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

__all__ = ["Routing", "iter_routing", "routing_frame", "load_routing", "expert_load", "router_confidence",
           "confidence_summary", "fragile_tokens", "routing_repetition", "coactivation", "layer_transitions",
           "LoadCounts", "ConfidenceStats", "FragileTokens", "RepetitionCounts", "CoactivationCounts",
           "TransitionCounts", "Accumulator", "repetition_baselines", "set_overlap", "load_intervals",
           "coactivation_intervals", "specialization_intervals", "poisson_weights", "LoadIntervals",
           "CoactivationIntervals", "SpecializationIntervals", "DEFAULT_MIN_COUNT", "repetition_intervals",
           "RepetitionIntervals"]

# per-(token, layer) columns of the wide routing table besides expert_i / weight_i
CONFIDENCE_COLUMNS = ("entropy", "margin", "topk_mass", "runner_up")
_ROUTING_META = "meta.json"
_PARTS_DIR = "routing"


# ------------------------------------------------------------------------------------------------
@dataclass
class Routing:
    """The routing of N real tokens at L layers: one chunk of a dataset (whole texts only).

    experts [L, N, k] int64 in descending weight order, -1 where a layer chose fewer than k (a TopK
    intervention on some layers); weights [L, N, k] float32 (applied, 0 at -1);
    probs [L, N, E] float32 router softmax, or None; layers [L]: model layer of each row;
    columns: per-token arrays [N] in text then position order: always `text` (text index) and `position`
    (consecutive for consecutive tokens of a text), usually `token_id`, `token`, `next_id` (-1 at a text's
    end), and whatever else the source has (`label`, `predicted_id`, `line`, ...);
    confidence: precomputed [L, N] arrays named in CONFIDENCE_COLUMNS (used when probs is None).
    """

    experts: np.ndarray
    weights: np.ndarray
    n_experts: int
    layers: np.ndarray
    columns: dict[str, np.ndarray]
    probs: np.ndarray | None = None
    confidence: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise ValueError(f"no per-token column {name!r}; this routing has {sorted(self.columns)}")
        return self.columns[name]

    def confidence_arrays(self) -> dict[str, np.ndarray]:
        """entropy (nats), margin, topk_mass, runner_up: each [L, N] (see `router_confidence`)."""
        if self.probs is None:
            if all(c in self.confidence for c in CONFIDENCE_COLUMNS):
                return self.confidence
            raise ValueError("router probabilities are missing: record router logits (Record(router=True)) "
                             "or use a route-stats table, which stores entropy and margins")
        p = self.probs
        k, E = self.top_k, self.n_experts
        order = np.argsort(-p, axis=-1, kind="stable")                                   # [L, N, E]
        ranked = np.take_along_axis(p, order, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
        kth_next = ranked[..., k] if k < E else np.zeros_like(ranked[..., 0])
        return {"entropy": entropy.astype(np.float32),
                "margin": (ranked[..., k - 1] - kth_next).astype(np.float32),
                "topk_mass": ranked[..., :k].sum(-1).astype(np.float32),
                "runner_up": order[..., k] if k < E else np.full(p.shape[:2], -1)}

    def consecutive(self) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs (i, j) [P] of tokens j = i + 1 in the same text."""
        text, pos = self.column("text"), self.column("position")
        i = np.flatnonzero((text[1:] == text[:-1]) & (pos[1:] == pos[:-1] + 1))
        return i, i + 1

    # --- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_trace(cls, trace, text_offset: int = 0, labels: Sequence | None = None) -> "Routing":
        """Real tokens of a Trace. `position` is the trace column; `labels`: one per batch row."""
        if trace.topk_experts is None or trace.topk_weights is None:
            raise ValueError("this trace has no routing: record it with Record(router=True)")
        ids = trace.input_ids.cpu()
        B, T = ids.shape
        mask = trace.attention_mask
        mask = np.ones((B, T), dtype=bool) if mask is None else mask.cpu().numpy().astype(bool)
        experts = trace.topk_experts.cpu().numpy()[:, mask].astype(np.int64)             # [L, N, k]
        weights = trace.topk_weights.float().cpu().numpy()[:, mask]
        probs = None
        if trace.router_logits is not None:
            probs = trace.router_probs.float().cpu().numpy()[:, mask]
        rows, cols = np.nonzero(mask)
        ids_np = ids.numpy()
        nxt = np.full((B, T), -1, dtype=np.int64)
        nxt[:, :-1] = np.where(mask[:, 1:], ids_np[:, 1:], -1)
        columns: dict[str, np.ndarray] = {
            "text": rows + text_offset, "position": cols, "token_id": ids_np[mask], "next_id": nxt[mask]}
        if trace.tokens is not None:
            columns["token"] = np.array([trace.tokens[b][t] for b, t in zip(rows, cols)], dtype=object)
        generated = getattr(trace, "is_generated", None)
        if generated is not None:
            columns["is_generated"] = generated.cpu().numpy().astype(bool)[mask]
        if labels is not None:
            if len(labels) != B:
                raise ValueError(f"labels has {len(labels)} entries for a trace of {B} texts (one per batch row)")
            columns["label"] = np.asarray(labels, dtype=object)[rows]
        recorded = getattr(trace, "layers", None)
        layers = np.arange(experts.shape[0]) if recorded is None else np.asarray(list(recorded))
        E = trace.n_experts if trace.n_experts is not None else int(experts.max()) + 1
        return cls(experts, weights, int(E), layers, columns, probs)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, n_experts: int | None = None) -> "Routing":
        """A wide routing table (one row per token and layer, expert_0..expert_{k-1}, weight_0.., as written
        by route-stats) or a tidy `Trace.to_frame()` table (one row per token, layer and rank)."""
        if "rank" in df.columns:
            return cls._from_tidy(df, n_experts)
        k = sum(1 for c in df.columns if c.startswith("expert_"))
        if not k or "layer" not in df.columns:
            raise ValueError("not a routing table: expected columns layer, expert_0.., weight_0.. (route-stats) "
                             "or batch, position, layer, rank, expert, weight (Trace.to_frame())")
        text_col = "text" if "text" in df.columns else "batch"
        df = df.sort_values([text_col, "position", "layer"], kind="stable")
        layers = np.sort(df["layer"].unique()).astype(np.int64)
        L = len(layers)
        if len(df) % L:
            raise ValueError(f"routing table has {len(df)} rows for {L} layers: every token needs one row per layer")
        N = len(df) // L
        expert_cols, weight_cols = [f"expert_{i}" for i in range(k)], [f"weight_{i}" for i in range(k)]
        experts = df[expert_cols].to_numpy(np.int64).reshape(N, L, k).transpose(1, 0, 2)
        weights = df[weight_cols].to_numpy(np.float32).reshape(N, L, k).transpose(1, 0, 2)
        per_layer = set(expert_cols) | set(weight_cols) | set(CONFIDENCE_COLUMNS) | {"layer", "top1_weight"}
        first = df.iloc[::L]
        columns = {c: first[c].to_numpy() for c in df.columns if c not in per_layer}
        columns["text"] = columns.pop(text_col)
        confidence = {c: df[c].to_numpy().reshape(N, L).T for c in CONFIDENCE_COLUMNS if c in df.columns}
        return cls(experts, weights, _n_experts(df, n_experts, experts), layers, columns, None, confidence)

    @classmethod
    def _from_tidy(cls, df: pd.DataFrame, n_experts: int | None) -> "Routing":
        df = df.sort_values(["batch", "position", "layer", "rank"], kind="stable")
        layers, k = np.sort(df["layer"].unique()).astype(np.int64), int(df["rank"].nunique())
        L = len(layers)
        if len(df) % (L * k):
            raise ValueError(f"tidy routing table has {len(df)} rows, not a multiple of layers x k = {L * k}")
        N = len(df) // (L * k)
        experts = df["expert"].to_numpy(np.int64).reshape(N, L, k).transpose(1, 0, 2)
        weights = df["weight"].to_numpy(np.float32).reshape(N, L, k).transpose(1, 0, 2)
        first = df.iloc[::L * k]
        keep = [c for c in df.columns if c not in ("layer", "rank", "expert", "weight", "prob", "logit")]
        columns = {c: first[c].to_numpy() for c in keep}
        columns["text"] = columns.pop("batch")
        return cls(experts, weights, _n_experts(df, n_experts, experts), layers, columns)

    def to_frame(self) -> pd.DataFrame:
        """Wide table: one row per (token, layer): per-token columns, layer, expert_i, weight_i (rank i in
        descending weight), top1_weight and, when known, entropy, margin, topk_mass, runner_up."""
        L, N, k = self.experts.shape
        data: dict[str, Any] = {name: np.repeat(values, L) for name, values in self.columns.items()}
        data["layer"] = np.tile(self.layers, N).astype(np.int16)
        for i in range(k):
            data[f"expert_{i}"] = self.experts[:, :, i].T.reshape(-1).astype(np.int16)
        for i in range(k):
            data[f"weight_{i}"] = self.weights[:, :, i].T.reshape(-1).astype(np.float32)
        data["top1_weight"] = data["weight_0"]
        if self.probs is not None or self.confidence:
            for name, values in self.confidence_arrays().items():
                data[name] = values.T.reshape(-1)
        df = pd.DataFrame(data)
        df.attrs.update(n_experts=self.n_experts, top_k=k)
        return df


def _n_experts(df: pd.DataFrame, n_experts: int | None, experts: np.ndarray) -> int:
    """E from the argument, the table's attrs (route-stats sets it), or max expert + 1 as a last resort."""
    E = n_experts or df.attrs.get("n_experts")
    return int(E) if E else int(experts.max()) + 1


# ------------------------------------------------------------------------------------------------
def iter_routing(source, labels: Sequence | None = None, n_experts: int | None = None) -> Iterator[Routing]:
    """Routing chunks from a source (see the module doc); text indices are unique across chunks.

    labels: one label per text (batch row) over all the traces, in order (for `by="label"`).
    """
    if isinstance(source, Routing):
        yield source
    elif isinstance(source, pd.DataFrame):
        yield Routing.from_frame(source, n_experts)
    elif isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        meta = _read_meta(folder)
        for part in _part_files(folder):
            df = pd.read_parquet(part)
            df.attrs.update(meta)
            yield Routing.from_frame(df, n_experts)
    elif hasattr(source, "topk_experts"):
        yield Routing.from_trace(source, labels=labels)
    elif isinstance(source, (list, tuple)):
        offset = 0
        for item in source:
            if hasattr(item, "topk_experts"):
                B = item.input_ids.shape[0]
                part = None if labels is None else list(labels)[offset:offset + B]
                if labels is not None and len(part) != B:
                    raise ValueError(f"labels has {len(labels)} entries, fewer than the traces' texts")
                yield Routing.from_trace(item, text_offset=offset, labels=part)
                offset += B
            else:
                yield from iter_routing(item, n_experts=n_experts)
        if labels is not None and offset != len(labels):
            raise ValueError(f"labels has {len(labels)} entries for {offset} texts (one per batch row)")
    else:
        raise ValueError(f"cannot read routing from {type(source).__name__}: give a Trace, a list of Traces, a "
                         "routing DataFrame or a route-stats output folder")


def _read_meta(folder: Path) -> dict:
    path = folder / _ROUTING_META
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a route-stats output folder (no {_ROUTING_META})")
    return json.loads(path.read_text())


def _part_files(folder: Path) -> list[Path]:
    """Committed part files, from the route-stats progress manifest."""
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    return [folder / _PARTS_DIR / p["file"] for p in manifest.get("parts", [])]


def load_routing(folder: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole per-token routing table of a route-stats folder as one DataFrame (attrs: n_experts, top_k)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    parts = [pd.read_parquet(p, columns=columns) for p in _part_files(folder)]
    if not parts:
        raise ValueError(f"{folder} has no committed routing parts yet")
    df = pd.concat(parts, ignore_index=True)
    df.attrs.update(meta)
    return df


class Accumulator:
    """A statistic over chunks: `update(routing)` per chunk, then `result()` -> DataFrame."""

    def update(self, r: Routing) -> None:
        raise NotImplementedError

    def result(self) -> pd.DataFrame:
        raise NotImplementedError

    def collect(self, source, labels: Sequence | None = None) -> "Accumulator":
        """Update with every chunk of a source; returns self."""
        for routing in iter_routing(source, labels=labels):
            self.update(routing)
        return self


def _layer_bincount(experts: np.ndarray, E: int, weights: np.ndarray | None = None) -> np.ndarray:
    """experts [L, ...] (-1 = none) -> [L * E] counts (or weight sums) of layer * E + expert."""
    flat = experts + E * np.arange(experts.shape[0]).reshape((-1,) + (1,) * (experts.ndim - 1))
    valid = experts >= 0
    w = None if weights is None else weights[valid].astype(np.float64)
    return np.bincount(flat[valid], weights=w, minlength=experts.shape[0] * E)


def _groups(values: np.ndarray | None) -> Iterator[tuple[Any, np.ndarray]]:
    """(group value, token indices) for each distinct non-missing value; one group `None` without values."""
    if values is None:
        yield None, slice(None)
        return
    codes, uniques = pd.factorize(values, sort=True)
    for c, u in enumerate(uniques):
        yield u, np.flatnonzero(codes == c)


# ------------------------------------------------------------------------------------------------
# expert load
class LoadCounts(Accumulator):
    """Per (group, layer, expert): top-k assignments, top-1 assignments, applied weight; tokens per group."""

    def __init__(self, by: str | None = None) -> None:
        self.by = by
        self.counts: dict[Any, dict[str, np.ndarray]] = {}
        self.layers = self.E = self.k = None

    def update(self, r: Routing) -> None:
        L, N, k = r.experts.shape
        E = self.E = r.n_experts
        self.layers, self.k = r.layers, k
        for group, idx in _groups(None if self.by is None else r.column(self.by)):
            ex, w = r.experts[:, idx], r.weights[:, idx]
            c = self.counts.setdefault(group, {"tokens": 0, "count": np.zeros(L * E), "top1": np.zeros(L * E),
                                               "weight": np.zeros(L * E)})
            c["tokens"] += ex.shape[1]
            c["count"] += _layer_bincount(ex, E)
            c["top1"] += _layer_bincount(ex[..., 0], E)
            c["weight"] += _layer_bincount(ex, E, w)

    def result(self) -> pd.DataFrame:
        frames = []
        for group, c in sorted(self.counts.items(), key=lambda item: str(item[0])):
            L, E = len(self.layers), self.E
            n = max(c["tokens"], 1)
            df = pd.DataFrame({"layer": np.repeat(self.layers, E), "expert": np.tile(np.arange(E), L),
                               "tokens": c["tokens"], "count": c["count"].astype(np.int64),
                               "share": c["count"] / n, "top1_count": c["top1"].astype(np.int64),
                               "top1_share": c["top1"] / n, "weight_share": c["weight"] / n,
                               "baseline_share": self.k / E, "baseline_top1": 1 / E})
            if self.by is not None:
                df.insert(0, self.by, group)
            frames.append(df)
        if not frames:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        return pd.concat(frames, ignore_index=True)


def expert_load(source, by: str | None = None, labels: Sequence | None = None) -> pd.DataFrame:
    """Expert load per layer: how often each expert is chosen.

    Columns: [by], layer, expert, tokens (real tokens in the group), count (tokens that have the expert in
    their top-k), share = count / tokens (sums to k over experts; uniform baseline `baseline_share` = k/E),
    top1_count/top1_share (tokens whose highest-weighted expert it is; baseline `baseline_top1` = 1/E),
    weight_share = sum of its applied weights / tokens (sums to 1 with p=1 weights; baseline 1/E).
    by: a per-token column to split by ("label", "text", "token", ...); labels: one per text for traces.
    """
    return LoadCounts(by).collect(source, labels).result()


# ------------------------------------------------------------------------------------------------
# router confidence: entropy, concentration, margin
def router_confidence(source, labels: Sequence | None = None) -> pd.DataFrame:
    """Per (token, layer): how decided the router is.

    entropy: -sum_e p_e ln p_e of the router softmax, in nats (uniform router: ln E; one-hot: 0).
    topk_mass: sum of the k largest probabilities (uniform: k/E), the mass the chosen experts hold.
    top1_weight: the largest applied weight (uniform: 1/k with p=1 renormalisation).
    margin: p_(k) - p_(k+1), the probability gap between the k-th and (k+1)-th expert; a small margin means
        a small push to the router changes the chosen set (uniform: 0). runner_up: the (k+1)-th expert.
    Columns: the per-token columns (text, position, token_id, token, ...), layer, those five.
    """
    frames = []
    for r in iter_routing(source, labels=labels):
        conf = r.confidence_arrays()
        df = Routing(r.experts, r.weights, r.n_experts, r.layers, r.columns, None, conf).to_frame()
        frames.append(df.drop(columns=[c for c in df.columns if c.startswith(("expert_", "weight_"))]))
    return pd.concat(frames, ignore_index=True)


class ConfidenceStats(Accumulator):
    """Per layer: means, standard deviations and histogram quantiles of entropy, margin, topk_mass and
    top1_weight; the share of fragile tokens (margin < threshold)."""

    BINS = 1000
    METRICS = ("entropy", "margin", "topk_mass", "top1_weight")

    def __init__(self, fragile_threshold: float = 0.05) -> None:
        self.threshold = fragile_threshold
        self.stats: dict[str, dict[str, np.ndarray]] = {}
        self.n = self.fragile = None

    def update(self, r: Routing) -> None:
        conf = r.confidence_arrays()
        values = {"entropy": conf["entropy"], "margin": conf["margin"], "topk_mass": conf["topk_mass"],
                  "top1_weight": r.weights[..., 0]}
        L = r.experts.shape[0]
        if self.n is None:
            self.layers, self.E, self.k = r.layers, r.n_experts, r.top_k
            self.n, self.fragile = np.zeros(L), np.zeros(L)
            self.hi = {m: (math.log(self.E) if m == "entropy" else 1.0) for m in self.METRICS}
            self.stats = {m: {"sum": np.zeros(L), "sq": np.zeros(L), "hist": np.zeros((L, self.BINS))}
                          for m in self.METRICS}
        self.n += r.n_tokens
        self.fragile += (conf["margin"] < self.threshold).sum(1)
        for m, v in values.items():
            v = v.astype(np.float64)
            s = self.stats[m]
            s["sum"] += v.sum(1)
            s["sq"] += (v ** 2).sum(1)
            bins = np.clip((v / self.hi[m] * self.BINS).astype(np.int64), 0, self.BINS - 1)
            s["hist"] += np.stack([np.bincount(b, minlength=self.BINS) for b in bins])

    def _quantile(self, m: str, q: float) -> np.ndarray:
        cum = self.stats[m]["hist"].cumsum(1)
        idx = (cum < q * cum[:, -1:]).sum(1)
        return (idx + 0.5) / self.BINS * self.hi[m]

    def result(self) -> pd.DataFrame:
        if self.n is None:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        n = np.maximum(self.n, 1)
        data: dict[str, Any] = {"layer": self.layers, "tokens": self.n.astype(np.int64)}
        for m in self.METRICS:
            s = self.stats[m]
            mean = s["sum"] / n
            data[f"{m}_mean"] = mean
            data[f"{m}_std"] = np.sqrt(np.maximum(s["sq"] / n - mean ** 2, 0))
            for q in (0.1, 0.5, 0.9):
                data[f"{m}_p{int(q * 100)}"] = self._quantile(m, q)
        data["fragile_share"] = self.fragile / n
        data["fragile_threshold"] = self.threshold
        data["entropy_uniform"] = math.log(self.E)
        data["topk_mass_uniform"] = self.k / self.E
        data["top1_weight_uniform"] = 1 / self.k
        return pd.DataFrame(data)


def confidence_summary(source, fragile_threshold: float = 0.05) -> pd.DataFrame:
    """Per layer: mean, std and 10/50/90th percentiles (histogram of 1000 bins: +-0.05% of the range) of
    entropy, margin, topk_mass and top1_weight (definitions in `router_confidence`), the share of tokens
    with margin < fragile_threshold, and the uniform-router values entropy_uniform = ln E,
    topk_mass_uniform = k/E, top1_weight_uniform = 1/k (a uniform router has margin 0)."""
    return ConfidenceStats(fragile_threshold).collect(source).result()


class FragileTokens(Accumulator):
    """The n (token, layer) routings with the smallest margin, per layer."""

    def __init__(self, n: int = 20) -> None:
        self.n = n
        self.best: pd.DataFrame | None = None

    def update(self, r: Routing) -> None:
        conf = r.confidence_arrays()
        k = r.top_k
        frames = []
        for li, layer in enumerate(r.layers):
            idx = np.argsort(conf["margin"][li], kind="stable")[:self.n]
            df = pd.DataFrame({c: v[idx] for c, v in r.columns.items()})
            df["layer"] = layer
            df["margin"] = conf["margin"][li, idx]
            df["kth_expert"] = r.experts[li, idx, k - 1]
            df["runner_up"] = conf["runner_up"][li, idx]
            df["entropy"] = conf["entropy"][li, idx]
            frames.append(df)
        merged = pd.concat(frames if self.best is None else [self.best, *frames], ignore_index=True)
        merged = merged.sort_values(["layer", "margin"], kind="stable")
        self.best = merged.groupby("layer", sort=True).head(self.n).reset_index(drop=True)

    def result(self) -> pd.DataFrame:
        if self.best is None:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        return self.best


def fragile_tokens(source, n: int = 20, layer: int | None = None) -> pd.DataFrame:
    """Tokens whose routing is fragile: per layer, the n smallest margins p_(k) - p_(k+1) (see
    `router_confidence`), with kth_expert (chosen, k-th by weight) and runner_up (the (k+1)-th expert, which
    would take its place). A uniform router has margin 0 everywhere."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    df = FragileTokens(n).collect(source).result()
    return df if layer is None else df[df["layer"] == layer].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# consecutive-token repetition
def repetition_baselines(n_experts: int, k: int) -> dict[str, float]:
    """Values for two independent uniformly random top-k sets: same top-1 1/E, overlap 1 - C(E-k,k)/C(E,k),
    shared experts k^2/E, Jaccard (hypergeometric expectation of |A&B| / |A|B|)."""
    E = n_experts
    pj = [math.comb(k, j) * math.comb(E - k, k - j) / math.comb(E, k) for j in range(k + 1)]
    return {"same_top1": 1 / E, "overlap": 1 - math.comb(E - k, k) / math.comb(E, k), "shared": k * k / E,
            "jaccard": sum(p * j / (2 * k - j) for j, p in enumerate(pj))}


def set_overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expert sets a, b [..., k] (-1 = none) -> (|A & B|, |A | B|) [...]."""
    shared = ((a[..., :, None] == b[..., None, :]) & (a >= 0)[..., :, None]).sum((-1, -2))
    return shared, (a >= 0).sum(-1) + (b >= 0).sum(-1) - shared


class RepetitionCounts(Accumulator):
    """Per layer over consecutive token pairs: same top-1, overlapping sets, shared experts, Jaccard."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] | None = None

    def update(self, r: Routing) -> None:
        i, j = r.consecutive()
        a, b = r.experts[:, i], r.experts[:, j]                                          # [L, P, k]
        shared, union = set_overlap(a, b)                                                # [L, P]
        k = r.top_k
        sums = {"pairs": np.full(a.shape[0], len(i), dtype=np.float64),
                "same_top1": (a[..., 0] == b[..., 0]).sum(1), "overlap": (shared > 0).sum(1),
                "shared": shared.sum(1), "jaccard": (shared / union).sum(1)}
        if self.sums is None:
            self.layers, self.E, self.k = r.layers, r.n_experts, k
            self.sums = {name: np.zeros(a.shape[0]) for name in sums}
        for name, v in sums.items():
            self.sums[name] += v

    def result(self) -> pd.DataFrame:
        if self.sums is None:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        pairs = self.sums["pairs"]
        n = np.maximum(pairs, 1)
        base = repetition_baselines(self.E, self.k)
        data: dict[str, Any] = {"layer": self.layers, "pairs": pairs.astype(np.int64)}
        for name in ("same_top1", "overlap", "shared", "jaccard"):
            data[name] = np.where(pairs > 0, self.sums[name] / n, np.nan)
            data[f"baseline_{name}"] = base[name]
        return pd.DataFrame(data)


def routing_repetition(source) -> pd.DataFrame:
    """Do consecutive tokens (t, t+1 of the same text) route alike? Per layer over all pairs:
    same_top1 = P(same highest-weighted expert) (random baseline 1/E); overlap = P(top-k sets share an
    expert) (baseline 1 - C(E-k, k)/C(E, k)); shared = mean |A & B| (baseline k^2/E); jaccard = mean
    |A & B| / |A | B| (baseline: its expectation for two random k-sets). Baselines in baseline_* columns."""
    return RepetitionCounts().collect(source).result()


# ------------------------------------------------------------------------------------------------
# co-activation
def _one_hot(experts: np.ndarray, E: int) -> np.ndarray:
    """experts [..., k] (-1 = none) -> [..., E] float32 with 1 at each chosen expert."""
    out = np.zeros(experts.shape[:-1] + (E + 1,), dtype=np.float32)
    np.put_along_axis(out, np.where(experts >= 0, experts, E), 1.0, axis=-1)
    return out[..., :E]


class CoactivationCounts(Accumulator):
    """Per layer: C[i, j] = tokens with both i and j in their top-k (C[i, i] = tokens choosing i)."""

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def update(self, r: Routing) -> None:
        hot = _one_hot(r.experts, r.n_experts)                                           # [L, N, E]
        c = np.einsum("lni,lnj->lij", hot, hot).astype(np.int64)
        if self.counts is None:
            self.layers, self.E, self.k, self.counts = r.layers, r.n_experts, r.top_k, c
        else:
            self.counts += c

    def result(self) -> pd.DataFrame:
        if self.counts is None:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        L, E = self.counts.shape[:2]
        li, i, j = np.meshgrid(np.arange(L), np.arange(E), np.arange(E), indexing="ij")
        off = i != j
        both = self.counts[off]
        alone = np.diagonal(self.counts, axis1=1, axis2=2)[li[off], i[off]]
        base = (self.k - 1) / (E - 1) if E > 1 else np.nan
        p = np.where(alone > 0, both / np.maximum(alone, 1), np.nan)
        return pd.DataFrame({"layer": self.layers[li[off]], "expert_i": i[off], "expert_j": j[off],
                             "count_both": both, "count_i": alone, "p_j_given_i": p,
                             "baseline": base, "lift": p / base})


def coactivation(source) -> pd.DataFrame:
    """Which experts are chosen together. Per layer and ordered pair i != j: p_j_given_i =
    N(i and j both in the top-k) / N(i in the top-k); random baseline (k-1)/(E-1) (the other k-1 slots
    uniform over the other E-1 experts); lift = p_j_given_i / baseline."""
    return CoactivationCounts().collect(source).result()


# ------------------------------------------------------------------------------------------------
# cross-layer transitions
class TransitionCounts(Accumulator):
    """counts[(a, b)] [E, E]: tokens with expert i at layer a and expert j at layer b."""

    def __init__(self, layer_pairs: Sequence[tuple[int, int]] | None = None, rank: str = "top1") -> None:
        if rank not in ("top1", "topk"):
            raise ValueError(f"rank must be 'top1' or 'topk', got {rank!r}")
        self.pairs, self.rank = layer_pairs, rank
        self.counts: dict[tuple[int, int], np.ndarray] = {}

    def update(self, r: Routing) -> None:
        layers = [int(x) for x in r.layers]
        pairs = self.pairs if self.pairs is not None else list(zip(layers[:-1], layers[1:]))
        E = self.E = r.n_experts
        for a, b in pairs:
            if a not in layers or b not in layers:
                raise ValueError(f"layer pair ({a}, {b}) not in the routing's layers {layers}")
            ea, eb = r.experts[layers.index(a)], r.experts[layers.index(b)]
            if self.rank == "top1":
                c = np.bincount(ea[:, 0] * E + eb[:, 0], minlength=E * E).reshape(E, E)
            else:
                c = (_one_hot(ea, E).T @ _one_hot(eb, E)).astype(np.int64)
            self.counts[(a, b)] = self.counts.get((a, b), 0) + c

    def result(self) -> pd.DataFrame:
        frames = []
        for (a, b), c in self.counts.items():
            E = c.shape[0]
            i, j = np.meshgrid(np.arange(E), np.arange(E), indexing="ij")
            out_a, in_b, total = c.sum(1), c.sum(0), max(c.sum(), 1)
            frames.append(pd.DataFrame({
                "layer_a": a, "expert_a": i.ravel(), "layer_b": b, "expert_b": j.ravel(), "count": c.ravel(),
                "share": (c / np.maximum(out_a, 1)[:, None]).ravel(),
                "expected": (out_a[:, None] * in_b[None, :] / total).ravel()}))
        if not frames:
            raise ValueError("no layer pairs: the routing needs at least two layers")
        return pd.concat(frames, ignore_index=True)


def layer_transitions(source, layer_pairs: Sequence[tuple[int, int]] | None = None,
                      rank: str = "top1") -> pd.DataFrame:
    """Where tokens go from layer a to layer b (for a Sankey view).

    Per layer pair (default: consecutive layers) and expert pair: count of tokens with expert_a at layer_a
    and expert_b at layer_b (rank "top1": each token's highest-weighted expert, one count per token;
    "topk": every pair of its two top-k sets, k^2 counts per token); share = count / tokens leaving
    expert_a; expected = count under independence of the two layers (row total x column total / total).
    """
    return TransitionCounts(layer_pairs, rank).collect(source).result()


def routing_frame(source, labels: Sequence | None = None) -> pd.DataFrame:
    """The wide per-(token, layer) routing table of a source (the format route-stats writes)."""
    return pd.concat([r.to_frame() for r in iter_routing(source, labels=labels)], ignore_index=True)


# ------------------------------------------------------------------------------------------------
# counts and bootstrap intervals
#
# Intervals come from a Poisson bootstrap over units (texts by default, or tokens): replicate b gives unit u
# the weight w_bu ~ Poisson(1) (the streaming form of resampling units with replacement), and each statistic
# is recomputed from the weighted sums. The weights are a hash of (seed, unit, b), so a unit gets the same
# weights whichever chunk it arrives in: the intervals of a route-stats folder and of the same traces match,
# and memory stays [n_boot, statistics], whatever the number of texts.
DEFAULT_MIN_COUNT = 10          # rows whose statistic rests on fewer tokens are flagged `low_count`
BOOTSTRAP_UNITS = ("text", "token")
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(i) for i in range(24)])
_BLOCK = 1 << 22                # elements of one dense [units, features] block


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a counter-based hash."""
    x = np.asarray(x, dtype=np.uint64).copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def poisson_weights(keys: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, U] float32 bootstrap weights ~ Poisson(1) for units named by int keys [U]; deterministic in
    (seed, key, replicate), independent of how the units are chunked."""
    base = _mix64(np.asarray(keys).astype(np.int64).view(np.uint64) ^ _mix64(np.uint64(seed) + np.uint64(1)))
    step = np.uint64(0x9E3779B97F4A7C15) * np.arange(1, n_boot + 1, dtype=np.uint64)
    h = _mix64(base[None, :] + step[:, None])
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float32)


def _check_bootstrap(n_boot: int, level: float, unit: str, seed: int, min_count: int | None = None) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or not 10 <= n_boot <= 100_000:
        raise ValueError(f"n_boot must be an integer in [10, 100000], got {n_boot!r}")
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")
    if unit not in BOOTSTRAP_UNITS:
        raise ValueError(f"unit must be one of {BOOTSTRAP_UNITS} (what the bootstrap resamples), got {unit!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if min_count is not None and (isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer))
                                  or min_count < 0):
        raise ValueError(f"min_count must be an integer >= 0 (tokens), got {min_count!r}")


class _Replicates:
    """Bootstrap replicate sums of per-token features: sums[b, f] = sum over units u of w_bu * x_uf."""

    def __init__(self, n_boot: int, seed: int, unit: str) -> None:
        self.n_boot, self.seed, self.unit = n_boot, seed, unit

    def unit_keys(self, r: Routing, idx) -> np.ndarray:
        """The unit of each token of r[idx]: its text, or (text, position) hashed."""
        text = np.asarray(r.column("text"))[idx].astype(np.int64)
        if self.unit == "text":
            return text
        pos = np.asarray(r.column("position"))[idx].astype(np.int64).view(np.uint64)
        return (_mix64(text.view(np.uint64)) ^ pos).view(np.int64)

    def sums(self, keys: np.ndarray, token: np.ndarray, feature: np.ndarray, n_features: int,
             value: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Entries (token index, feature index, value or 1) of tokens with unit keys [n] ->
        ([n_boot, n_features] weighted sums, number of units)."""
        uniq, code = np.unique(keys, return_inverse=True)
        U = len(uniq)
        out = np.zeros((self.n_boot, n_features))
        entry_unit = code[token]
        order = np.argsort(entry_unit, kind="stable")
        entry_unit, feature = entry_unit[order], feature[order]
        value = None if value is None else np.asarray(value, dtype=np.float64)[order]
        per_block = max(1, _BLOCK // max(n_features, self.n_boot))
        for a in range(0, U, per_block):
            b = min(U, a + per_block)
            lo, hi = np.searchsorted(entry_unit, [a, b])
            dense = np.bincount((entry_unit[lo:hi] - a) * n_features + feature[lo:hi],
                                weights=None if value is None else value[lo:hi],
                                minlength=(b - a) * n_features).reshape(b - a, n_features)
            out += poisson_weights(uniq[a:b], self.n_boot, self.seed).astype(np.float64) @ dense
        return out, U


def _interval(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of replicate values (NaN replicates ignored; all-NaN -> NaN)."""
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    finite = np.isfinite(reps).any(0)
    lo, hi = np.full(reps.shape[1:], np.nan), np.full(reps.shape[1:], np.nan)
    if finite.any():
        vals = np.nanpercentile(reps[:, finite], q, axis=0)
        lo[finite], hi[finite] = vals[0], vals[1]
    return lo, hi


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


class LoadIntervals(Accumulator):
    """`LoadCounts` plus bootstrap replicates of each group's count, top-1 count, weight and tokens."""

    def __init__(self, by: str | None = None, n_boot: int = 1000, level: float = 0.95, unit: str = "text",
                 seed: int = 0) -> None:
        _check_bootstrap(n_boot, level, unit, seed)
        self.by, self.level = by, level
        self.point = LoadCounts(by)
        self.boot = _Replicates(n_boot, seed, unit)
        self.reps: dict[Any, np.ndarray] = {}
        self.units: dict[Any, int] = {}

    def update(self, r: Routing) -> None:
        self.point.update(r)
        L, _, k = r.experts.shape
        E = r.n_experts
        LE = L * E
        for group, idx in _groups(None if self.by is None else r.column(self.by)):
            ex, w = r.experts[:, idx], r.weights[:, idx]                                 # [L, n, k]
            n = ex.shape[1]
            li, ti, ri = np.nonzero(ex >= 0)
            cell = li * E + ex[li, ti, ri]
            top = ri == 0
            token = np.concatenate([ti, ti[top], ti, np.arange(n)])
            feature = np.concatenate([cell, LE + cell[top], 2 * LE + cell, np.full(n, 3 * LE)])
            value = np.concatenate([np.ones(len(ti) + int(top.sum())), w[li, ti, ri], np.ones(n)])
            sums, units = self.boot.sums(self.boot.unit_keys(r, idx), token, feature, 3 * LE + 1, value)
            self.reps[group] = self.reps.get(group, 0) + sums
            self.units[group] = self.units.get(group, 0) + units    # chunks hold whole texts

    def result(self) -> pd.DataFrame:
        df = self.point.result()
        LE = len(self.point.layers) * self.point.E
        extra = []
        for group, _ in sorted(self.point.counts.items(), key=lambda item: str(item[0])):
            reps = self.reps[group]
            tokens = reps[:, 3 * LE:3 * LE + 1]
            cols = {"n_units": np.full(LE, self.units[group])}
            for name, a in (("share", 0), ("top1_share", LE), ("weight_share", 2 * LE)):
                lo, hi = _interval(_ratio(reps[:, a:a + LE], tokens), self.level)
                if self.units[group] < 2:
                    lo[:], hi[:] = np.nan, np.nan
                cols[f"{name}_lo"], cols[f"{name}_hi"] = lo, hi
            extra.append(pd.DataFrame(cols))
        out = pd.concat([df, pd.concat(extra, ignore_index=True)], axis=1)
        out.attrs.update(bootstrap=self.boot.unit, n_boot=self.boot.n_boot, level=self.level, seed=self.boot.seed)
        return out


def load_intervals(source, by: str | None = None, labels: Sequence | None = None, n_boot: int = 1000,
                   level: float = 0.95, unit: str = "text", seed: int = 0) -> pd.DataFrame:
    """`expert_load` with uncertainty: the same rows and columns plus n_units (texts, or tokens, resampled)
    and `level` bootstrap percentile intervals share_lo/_hi, top1_share_lo/_hi, weight_share_lo/_hi.

    unit "text" resamples whole texts (tokens of a text are not independent; the default) or "token";
    with fewer than 2 units the intervals are NaN. Poisson bootstrap, deterministic in `seed`
    (see `poisson_weights`); attrs record bootstrap, n_boot, level and seed.
    """
    return LoadIntervals(by, n_boot, level, unit, seed).collect(source, labels).result()


class CoactivationIntervals(Accumulator):
    """`CoactivationCounts` plus bootstrap replicates of the [L, E, E] co-occurrence counts."""

    def __init__(self, n_boot: int = 1000, level: float = 0.95, unit: str = "text", seed: int = 0,
                 min_count: int = DEFAULT_MIN_COUNT) -> None:
        _check_bootstrap(n_boot, level, unit, seed, min_count)
        self.level, self.min_count = level, min_count
        self.point = CoactivationCounts()
        self.boot = _Replicates(n_boot, seed, unit)
        self.reps, self.units = 0, 0

    def update(self, r: Routing) -> None:
        self.point.update(r)
        L, n, k = r.experts.shape
        E = r.n_experts
        ex = r.experts
        a, b = np.broadcast_arrays(ex[..., :, None], ex[..., None, :])                 # [L, n, k, k]
        li, ti, _, _ = np.nonzero(np.ones(a.shape, dtype=bool))
        valid = ((a >= 0) & (b >= 0)).ravel()
        feature = ((li * E + a.ravel()) * E + b.ravel())[valid]
        sums, units = self.boot.sums(self.boot.unit_keys(r, slice(None)), ti[valid], feature, L * E * E)
        self.reps, self.units = self.reps + sums, self.units + units

    def result(self) -> pd.DataFrame:
        df = self.point.result()
        L, E = self.point.counts.shape[:2]
        reps = self.reps.reshape(-1, L, E, E)
        li, i, j = np.meshgrid(np.arange(L), np.arange(E), np.arange(E), indexing="ij")
        off = i != j
        both, alone = reps[:, off], reps[:, li[off], i[off], i[off]]
        p_lo, p_hi = _interval(_ratio(both, alone), self.level)
        if self.units < 2:
            p_lo[:], p_hi[:] = np.nan, np.nan
        base = df["baseline"].to_numpy()
        df["n_units"] = self.units
        df["p_j_given_i_lo"], df["p_j_given_i_hi"] = p_lo, p_hi
        df["lift_lo"], df["lift_hi"] = p_lo / base, p_hi / base
        df["lift_max"] = 1 / base
        df["low_count"] = df["count_i"] < self.min_count
        df.attrs.update(bootstrap=self.boot.unit, n_boot=self.boot.n_boot, level=self.level,
                        seed=self.boot.seed, min_count=self.min_count)
        return df


def coactivation_intervals(source, n_boot: int = 1000, level: float = 0.95, unit: str = "text", seed: int = 0,
                           min_count: int = DEFAULT_MIN_COUNT) -> pd.DataFrame:
    """`coactivation` with counts guarded and uncertainty: plus n_units, bootstrap intervals p_j_given_i_lo/_hi
    and lift_lo/_hi (as in `load_intervals`), lift_max = 1/baseline (the lift when j is chosen with i every
    time: small count_i saturates there) and low_count = count_i < min_count (too few tokens to read)."""
    return CoactivationIntervals(n_boot, level, unit, seed, min_count).collect(source).result()


def specialization_from_load(load: pd.DataFrame, by: str) -> pd.DataFrame:
    """Add share_all (the expert's share over all groups' tokens), lift = share / share_all and
    lift_uniform = share / (k/E) to a grouped `expert_load` table."""
    totals = load.groupby(["layer", "expert"], sort=False)[["count", "tokens"]].sum()
    share_all = (totals["count"] / totals["tokens"]).rename("share_all")
    out = load.join(share_all, on=["layer", "expert"])
    out["lift"] = out["share"] / out["share_all"]
    out["lift_uniform"] = out["share"] / out["baseline_share"]
    cols = [by, "layer", "expert", "tokens", "count", "share", "baseline_share", "lift_uniform", "share_all", "lift"]
    return out[cols]


class SpecializationIntervals(Accumulator):
    """Per group: bootstrap replicates of (count [L*E], tokens) for `specialization_intervals`."""

    def __init__(self, by: str = "label", n_boot: int = 1000, level: float = 0.95, unit: str = "text",
                 seed: int = 0, min_count: int = DEFAULT_MIN_COUNT) -> None:
        _check_bootstrap(n_boot, level, unit, seed, min_count)
        self.by, self.level, self.min_count = by, level, min_count
        self.load = LoadIntervals(by, n_boot, level, unit, seed)

    def update(self, r: Routing) -> None:
        self.load.update(r)

    def result(self) -> pd.DataFrame:
        load = self.load.result()
        spec = specialization_from_load(load, self.by)
        groups = [g for g, _ in sorted(self.load.point.counts.items(), key=lambda item: str(item[0]))]
        LE = len(self.load.point.layers) * self.load.point.E
        count = np.stack([self.load.reps[g][:, :LE] for g in groups], 1)                # [B, G, LE]
        tokens = np.stack([self.load.reps[g][:, 3 * LE] for g in groups], 1)[..., None]  # [B, G, 1]
        share = _ratio(count, tokens)
        share_all = _ratio(count.sum(1, keepdims=True), tokens.sum(1, keepdims=True))
        rest_c, rest_n = count.sum(1, keepdims=True) - count, tokens.sum(1, keepdims=True) - tokens
        lift_lo, lift_hi = _interval(_ratio(share, share_all).reshape(share.shape[0], -1), self.level)
        odds = _log_odds(count, tokens, rest_c, rest_n).reshape(share.shape[0], -1)
        odds_lo, odds_hi = _interval(odds, self.level)
        n_units = load["n_units"].to_numpy()
        for a in (lift_lo, lift_hi, odds_lo, odds_hi):
            a[n_units < 2] = np.nan
        c, n = spec["count"].to_numpy(float), spec["tokens"].to_numpy(float)
        all_c = spec.groupby(["layer", "expert"])["count"].transform("sum").to_numpy(float)
        all_n = spec.groupby(["layer", "expert"])["tokens"].transform("sum").to_numpy(float)
        base = spec["baseline_share"]
        out = spec.assign(n_units=n_units, share_lo=load["share_lo"], share_hi=load["share_hi"],
                          lift_uniform_lo=load["share_lo"] / base, lift_uniform_hi=load["share_hi"] / base,
                          lift_lo=lift_lo, lift_hi=lift_hi, lift_max=all_n / n,
                          log_odds=_log_odds(c, n, all_c - c, all_n - n), log_odds_lo=odds_lo, log_odds_hi=odds_hi)
        out["saturated"] = np.isclose(out["lift"], out["lift_max"]) & (out["count"] > 0)
        out["low_count"] = out["count"] < self.min_count
        out.attrs.update(load.attrs, min_count=self.min_count)
        return out


def _log_odds(c, n, rest_c, rest_n):
    """ln of the odds ratio of choosing the expert in the group vs the other groups, with 0.5 added to every
    cell (Haldane-Anscombe): finite when one side never or always chooses it, and it grows with the count."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.log((c + 0.5) / (n - c + 0.5)) - np.log((rest_c + 0.5) / (rest_n - rest_c + 0.5)))


def specialization_intervals(source, by: str = "label", labels: Sequence | None = None, n_boot: int = 1000,
                             level: float = 0.95, unit: str = "text", seed: int = 0,
                             min_count: int = DEFAULT_MIN_COUNT) -> pd.DataFrame:
    """`domain_specialization` with counts guarded and uncertainty. Plus: n_units; bootstrap intervals
    share_lo/_hi, lift_uniform_lo/_hi, lift_lo/_hi, log_odds_lo/_hi (as in `load_intervals`);
    low_count = count < min_count.

    Saturation: lift = share / share_all cannot exceed lift_max = all labelled tokens / the group's tokens,
    reached whenever no other group uses the expert, however many tokens it routes, so several experts tie
    there (`saturated`). log_odds (ln odds ratio vs the other groups, 0.5 added to each cell) keeps growing
    with the evidence: rank by it, or by lift_lo, to break such ties.
    """
    return SpecializationIntervals(by, n_boot, level, unit, seed, min_count).collect(source, labels).result()


REPETITION_METRICS = ("same_top1", "overlap", "shared", "jaccard")


class RepetitionIntervals(Accumulator):
    """`RepetitionCounts` plus bootstrap replicates of each layer's pair sums (a pair's unit: its first token's)."""

    def __init__(self, n_boot: int = 1000, level: float = 0.95, unit: str = "text", seed: int = 0) -> None:
        _check_bootstrap(n_boot, level, unit, seed)
        self.level = level
        self.point = RepetitionCounts()
        self.boot = _Replicates(n_boot, seed, unit)
        self.reps, self.units = 0, 0

    def update(self, r: Routing) -> None:
        self.point.update(r)
        i, j = r.consecutive()
        a, b = r.experts[:, i], r.experts[:, j]                                          # [L, P, k]
        L, P = a.shape[:2]
        shared, union = set_overlap(a, b)                                                # [L, P]
        per_pair = np.stack([a[..., 0] == b[..., 0], shared > 0, shared,
                             _ratio(shared, union)]).astype(np.float64)                 # [4, L, P]
        per_pair = np.nan_to_num(per_pair)        # jaccard of two empty sets (no expert chosen at either): 0
        feature = np.arange(4 * L).repeat(P)                                             # metric * L + layer
        token = np.tile(np.arange(P), 4 * L)
        value = per_pair.reshape(-1)
        keep = value != 0
        token = np.concatenate([token[keep], np.arange(P)])
        feature = np.concatenate([feature[keep], np.full(P, 4 * L)])                     # pairs in the last column
        value = np.concatenate([value[keep], np.ones(P)])
        sums, units = self.boot.sums(self.boot.unit_keys(r, i), token, feature, 4 * L + 1, value)
        self.reps, self.units = self.reps + sums, self.units + units                     # chunks hold whole texts

    def result(self) -> pd.DataFrame:
        df = self.point.result()
        L = len(df)
        reps = np.broadcast_to(np.asarray(self.reps, dtype=np.float64), (self.boot.n_boot, 4 * L + 1))
        df["n_pairs"] = df["pairs"]
        df["n_units"] = self.units
        for m, name in enumerate(REPETITION_METRICS):
            lo, hi = _interval(_ratio(reps[:, m * L:(m + 1) * L], reps[:, 4 * L:]), self.level)
            if self.units < 2:
                lo[:], hi[:] = np.nan, np.nan
            df[f"{name}_lo"], df[f"{name}_hi"] = lo, hi
        df.attrs.update(bootstrap=self.boot.unit, n_boot=self.boot.n_boot, level=self.level, seed=self.boot.seed)
        return df


def repetition_intervals(source, n_boot: int = 1000, level: float = 0.95, unit: str = "text",
                         seed: int = 0) -> pd.DataFrame:
    """`routing_repetition` with n and uncertainty: the same rows and columns (point estimates and baselines
    unchanged) plus n_pairs (consecutive token pairs behind each layer's numbers), n_units (texts, or pairs,
    resampled) and `level` bootstrap percentile intervals same_top1_lo/_hi, overlap_lo/_hi, shared_lo/_hi,
    jaccard_lo/_hi.

    unit "text" resamples whole texts (the default: a text's pairs are not independent) or "token" (each pair,
    named by its first token, is a unit: use it for fewer than ~10 texts, where a bootstrap over texts says
    little); with fewer than 2 units the intervals are NaN. Poisson bootstrap, deterministic in `seed` and
    independent of chunking (see `poisson_weights`), so a route-stats folder and the same traces agree;
    attrs record bootstrap, n_boot, level and seed.
    """
    return RepetitionIntervals(n_boot, level, unit, seed).collect(source).result()
