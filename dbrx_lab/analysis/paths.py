"""Routing paths: the sequence of expert sets a token goes through, layer by layer, as a unit of analysis.

"Paths, not experts" (arXiv 2604.17837) found the path more monosemantic than any single expert. This module
turns a routing source (see `dbrx_lab.analysis.routing`) into one path per token, counts distinct paths,
clusters them by Jaccard distance and compares how well paths and single experts separate token labels.

A path is the tuple of per-layer expert sets; each set is stored as a bitmask (bit e = expert e chosen), so a
path of L layers is L integers. As a set of (layer, expert) pairs, two paths' Jaccard similarity is
|A & B| / |A | B|; with k experts at every layer |A| = |B| = L k, so Jaccard is a monotone function of the
overlap |A & B| and nearest-medoid search needs only dot products of 0/1 vectors.

Labels: `labels="class"` (token classes computed offline from the token text: identifier, keyword, number,
punctuation, whitespace, word), `"label"` (the dataset's label field that route-stats stores), any other
per-token column, an array with one label per token, or a function token string -> label.
"""
from __future__ import annotations

import keyword
import string
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from .routing import Routing, iter_routing

__all__ = ["TOKEN_CLASSES", "token_class", "token_classes", "routing_paths", "path_counts", "cluster_paths",
           "PathClusters", "purity", "path_purity", "format_path"]

TOKEN_CLASSES = ("identifier", "keyword", "number", "punctuation", "whitespace", "word")
_KEYWORDS = frozenset(keyword.kwlist)
EXACT_MEDOID = 2048       # clusters up to this many distinct paths get the exact Jaccard medoid (quadratic)
_ESCAPES = {"\\n": "\n", "\\r": "\r", "\\t": "\t"}     # tokenizer.token_strings writes these escaped


# ------------------------------------------------------------------------------------------------
# token classes
def token_class(token: str | None) -> str:
    """One of TOKEN_CLASSES for a token's text, without any tagger: whitespace (only spaces/newlines/tabs),
    number (digits, possibly with . or _), keyword (a Python keyword), identifier (a name with _ , a digit
    or an inner capital: snake_case, camelCase, x1), word (letters only), punctuation (no letter or digit).
    Leading/trailing spaces and punctuation around a core are ignored (" foo(" is a word, ".append" a word,
    "_x" an identifier); a core mixing letters with other symbols is an identifier."""
    if token is None or (isinstance(token, float) and np.isnan(token)):
        return "whitespace"
    text = str(token)
    for escaped, char in _ESCAPES.items():
        text = text.replace(escaped, char)
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    core = stripped.strip(string.punctuation.replace("_", "") + "\u2018\u2019\u201c\u201d")
    if not core:
        return "punctuation" if not any(c.isalnum() for c in stripped) else "word"
    if core.replace(".", "").replace("_", "").isdigit():
        return "number"
    if core in _KEYWORDS:
        return "keyword"
    if core.isalpha():
        inner_capital = any(c.isupper() for c in core[1:]) and any(c.islower() for c in core)
        return "identifier" if inner_capital else "word"
    if core.isidentifier():
        return "identifier"
    if not any(unicodedata.category(c)[0] in "LN" for c in core):
        return "punctuation"
    return "identifier"


def token_classes(tokens: Sequence) -> np.ndarray:
    """token_class of every token (object array)."""
    cache: dict = {}
    return np.array([cache.setdefault(t, token_class(t)) if isinstance(t, str) else token_class(t)
                     for t in tokens], dtype=object)


# ------------------------------------------------------------------------------------------------
# paths
def format_path(masks: Sequence[int], layers: Sequence[int] | None = None, compact: bool = False) -> str:
    """A path as text: "L0 {1,5,7,9} → L1 {0,2,3,4} ..." (compact: "1.5.7.9|0.2.3.4|...")."""
    layers = range(len(masks)) if layers is None else layers
    sets = [[e for e in range(64) if int(m) >> e & 1] for m in masks]
    if compact:
        return "|".join(".".join(map(str, s)) for s in sets)
    return " → ".join(f"L{l} {{{','.join(map(str, s))}}}" for l, s in zip(layers, sets))


def _masks(experts: np.ndarray) -> np.ndarray:
    """experts [L, N, k] (-1 = none) -> [L, N] int64 bitmasks."""
    bits = np.where(experts >= 0, np.left_shift(np.int64(1), np.maximum(experts, 0)), 0)
    return np.bitwise_or.reduce(bits, axis=-1)


def _labels_for(r: Routing, labels, offset: int) -> np.ndarray | None:
    """Per-token labels of one chunk (None: no labels asked)."""
    if labels is None:
        return None
    n = r.n_tokens
    if isinstance(labels, str):
        if labels == "class":
            return token_classes(r.column("token"))
        values = r.column(labels)
        return np.asarray(values, dtype=object)
    if callable(labels):
        tokens = r.column("token")
        cache: dict = {}
        return np.array([cache.setdefault(t, labels(t)) for t in tokens], dtype=object)
    values = np.asarray(labels, dtype=object)
    if offset + n > len(values):
        raise ValueError(f"labels has {len(values)} entries, fewer than the source's tokens (one label per "
                         f"real token, in text then position order)")
    return values[offset:offset + n]


def _path_strings(masks: np.ndarray, n_experts: int) -> np.ndarray:
    """[L, N] bitmasks -> N compact path strings, built once per distinct path."""
    uniq, inv = np.unique(masks.T, axis=0, return_inverse=True)
    sets: dict[int, str] = {}
    text = ["|".join(sets.setdefault(m, ".".join(str(e) for e in range(n_experts) if m >> e & 1)) for m in row)
            for row in uniq.tolist()]
    return np.asarray(text, dtype=object)[inv.reshape(-1)]


def routing_paths(source, labels="class", layers: Sequence[int] | None = None, rank: str = "topk") -> pd.DataFrame:
    """One row per real token: its path through `layers` (default all recorded layers).

    rank "topk": each layer's set of chosen experts; "top1": the highest-weighted expert only (a set of one).
    Columns: text, position, token_id, token (when the source has them), label (see the module doc; None
    leaves it out), path (compact text "1.5.7.9|0.2.3.4|..."), one bitmask column per layer named
    `set_L{layer}` (bit e: expert e in the path's set there) and the top-1 expert per layer, `top1_L{layer}`.
    attrs: layers, n_experts, top_k (1 with rank "top1"), labels (what they are, in words).
    """
    if rank not in ("topk", "top1"):
        raise ValueError(f"rank must be 'topk' or 'top1', got {rank!r}")
    frames, offset, meta = [], 0, None
    for r in iter_routing(source):
        all_layers = [int(x) for x in r.layers]
        chosen = all_layers if layers is None else [int(x) for x in layers]
        missing = [x for x in chosen if x not in all_layers]
        if missing or not chosen:
            raise ValueError(f"layers {missing or chosen} not in the routing's layers {all_layers}")
        if r.n_experts > 63:
            raise ValueError(f"paths store expert sets as 63-bit masks; this model has {r.n_experts} experts")
        idx = [all_layers.index(x) for x in chosen]
        experts = r.experts[idx] if rank == "topk" else r.experts[idx][..., :1]
        masks = _masks(experts)                                                          # [L, N]
        data = {c: r.columns[c] for c in ("text", "position", "token_id", "token") if c in r.columns}
        lab = _labels_for(r, labels, offset)
        if lab is not None:
            data["label"] = lab
        data["path"] = _path_strings(masks, r.n_experts)
        for li, layer in enumerate(chosen):
            data[f"set_L{layer}"] = masks[li]
        for li, layer in enumerate(chosen):
            data[f"top1_L{layer}"] = r.experts[idx[li], :, 0]
        frames.append(pd.DataFrame(data))
        offset += r.n_tokens
        meta = dict(layers=chosen, n_experts=r.n_experts, top_k=experts.shape[-1], labels=_describe(labels))
    if not frames:
        raise ValueError("no tokens: the source has no routing chunks")
    if not isinstance(labels, (str, type(None))) and not callable(labels) and len(labels) != offset:
        raise ValueError(f"labels has {len(labels)} entries for {offset} tokens (one per real token)")
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update(meta)
    return df


def _describe(labels) -> str | None:
    """What the labels are, in words (kept in the tables' attrs for titles)."""
    if labels is None:
        return None
    if isinstance(labels, str):
        return "token classes" if labels == "class" else f"the {labels!r} column"
    return "a function of the token" if callable(labels) else "the given labels"


def _set_columns(paths: pd.DataFrame) -> list[str]:
    cols = [c for c in paths.columns if c.startswith("set_L")]
    if not cols or "path" not in paths.columns:
        raise ValueError("not a paths table: expected the columns path and set_L<layer> (routing_paths)")
    return cols


def path_counts(paths: pd.DataFrame, min_count: int = 1) -> pd.DataFrame:
    """Distinct paths, most frequent first: path, count, share (of all tokens), and with labels:
    top_label, top_label_count, purity (= top_label_count / count), plus the path's bitmask columns and an
    example token. Paths seen fewer than min_count times are dropped (shares still count them)."""
    cols = _set_columns(paths)
    g = paths.groupby("path", sort=False)
    out = g[cols].first()
    out["count"] = g.size()
    out["share"] = out["count"] / len(paths)
    if "token" in paths.columns:
        out["example"] = g["token"].agg(lambda s: s.value_counts().index[0])
    if "label" in paths.columns:
        counts = paths.groupby(["path", "label"], sort=False).size().rename("n").reset_index()
        counts = counts.sort_values(["path", "n", "label"], ascending=[True, False, True])
        top = counts.drop_duplicates("path").set_index("path")
        out["top_label"] = top["label"]
        out["top_label_count"] = top["n"]
        out["purity"] = out["top_label_count"] / out["count"]
    out = out[out["count"] >= min_count].sort_values(["count", "path"], ascending=[False, True])
    out = out.reset_index()
    out.attrs.update(paths.attrs, tokens=len(paths))
    return out


# ------------------------------------------------------------------------------------------------
# clustering
def _bits(masks: np.ndarray, n_experts: int) -> np.ndarray:
    """[U, L] bitmasks -> [U, L * E] float32 0/1 vectors."""
    e = np.arange(n_experts)
    return ((masks[:, :, None] >> e) & 1).reshape(len(masks), -1).astype(np.float32)


def _jaccard_to(x: np.ndarray, sizes: np.ndarray, c: np.ndarray, csizes: np.ndarray) -> np.ndarray:
    """Jaccard similarity [U, K] between 0/1 rows x [U, D] and c [K, D]."""
    inter = x @ c.T
    return inter / np.maximum(sizes[:, None] + csizes[None, :] - inter, 1)


@dataclass
class PathClusters:
    """k-medoids clusters of paths under Jaccard distance.

    assignment: cluster of every token (the paths table's rows) [N]; medoids: the medoid path of each
    cluster (count, share, the medoid's compact path text, mean Jaccard similarity of members to it);
    distinct: the distinct paths with their cluster."""

    assignment: np.ndarray
    medoids: pd.DataFrame
    distinct: pd.DataFrame


def cluster_paths(paths: pd.DataFrame, n_clusters: int | None = None, seed: int = 0,
                  max_iter: int = 30) -> PathClusters:
    """Cluster tokens by the Jaccard distance of their paths (as sets of (layer, expert) pairs): k-medoids
    over the distinct paths, weighted by how many tokens take each, with a k-means++ start (seeded, so the
    result is reproducible). n_clusters: default E (the number of groups a single layer's top-1 expert
    makes), so path clusters and single experts are compared at the same number of groups; at most the
    number of distinct paths."""
    cols = _set_columns(paths)
    E = int(paths.attrs.get("n_experts") or int(np.log2(max(int(paths[cols].to_numpy().max()), 1))) + 1)
    codes, uniq = pd.factorize(paths["path"], sort=True)
    first = pd.Series(np.arange(len(paths))).groupby(codes).first().to_numpy()
    masks = paths[cols].to_numpy(np.int64)[first]                                      # [U, L]
    weight = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    U = len(uniq)
    K = E if n_clusters is None else n_clusters
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    K = min(int(K), U)
    x = _bits(masks, E)
    sizes = x.sum(1)
    rng = np.random.default_rng(seed)
    centers = [int(np.argmax(weight))]                                                # the most frequent path
    best = _jaccard_to(x, sizes, x[centers], sizes[centers])[:, 0]
    while len(centers) < K:                                                           # k-means++ on 1 - Jaccard
        d = (1 - best) ** 2 * weight
        if d.sum() <= 0:
            break
        nxt = int(rng.choice(U, p=d / d.sum()))
        centers.append(nxt)
        best = np.maximum(best, _jaccard_to(x, sizes, x[[nxt]], sizes[[nxt]])[:, 0])
    centers = np.array(centers)
    for _ in range(max_iter):
        sim = _jaccard_to(x, sizes, x[centers], sizes[centers])                       # [U, K]
        assign = sim.argmax(1)
        new = centers.copy()
        for c in range(len(centers)):
            members = np.flatnonzero(assign == c)
            if len(members) == 0:
                continue
            # medoid: the member with the largest token-weighted total similarity to the cluster (above
            # EXACT_MEDOID members, the largest total overlap |A & B|, of which Jaccard is an increasing function)
            if len(members) <= EXACT_MEDOID:
                inner = _jaccard_to(x[members], sizes[members], x[members], sizes[members]) @ weight[members]
            else:
                inner = x[members] @ (x[members].T @ weight[members])
            new[c] = members[int(np.argmax(inner))]
        if np.array_equal(new, centers):
            break
        centers = new
    sim = _jaccard_to(x, sizes, x[centers], sizes[centers])
    assign = sim.argmax(1)
    member_sim = sim[np.arange(U), assign]
    n = len(paths)
    rows = []
    for c in range(len(centers)):
        m = assign == c
        w = weight[m].sum()
        rows.append({"cluster": c, "count": int(w), "share": w / n, "distinct_paths": int(m.sum()),
                     "medoid": uniq[centers[c]],
                     "mean_jaccard": float((member_sim[m] * weight[m]).sum() / max(w, 1))})
    medoids = pd.DataFrame(rows)
    distinct = pd.DataFrame({"path": uniq, "count": weight.astype(np.int64), "cluster": assign,
                             "jaccard_to_medoid": member_sim.astype(np.float64)})
    return PathClusters(assign[codes], medoids, distinct)


# ------------------------------------------------------------------------------------------------
# purity
def purity(groups: np.ndarray, labels: np.ndarray) -> float:
    """Purity of a partition against labels: sum over groups of its most common label's count / tokens
    (1 = every group holds one label; a single group scores the majority label's share)."""
    groups, labels = np.asarray(groups), np.asarray(labels, dtype=object)
    if len(groups) != len(labels) or not len(groups):
        raise ValueError(f"groups ({len(groups)}) and labels ({len(labels)}) need the same non-zero length")
    df = pd.DataFrame({"g": groups, "y": labels})
    return float(df.groupby(["g", "y"], sort=False).size().groupby(level=0).max().sum() / len(df))


def _shuffled_purity(groups: np.ndarray, labels: np.ndarray, rng: np.random.Generator, n: int) -> float:
    return float(np.mean([purity(groups, rng.permutation(labels)) for _ in range(n)]))


def path_purity(paths: pd.DataFrame, n_clusters: int | None = None, seed: int = 0,
                shuffles: int = 5) -> pd.DataFrame:
    """How well paths separate the token labels, next to single experts.

    One row per grouping of the tokens: "expert L{l}" (the top-1 expert at layer l: E groups), "path clusters"
    (`cluster_paths` with n_clusters groups, default E: the same number of groups), and "distinct paths"
    (every distinct path a group; many small groups, so high purity comes cheap: compare with its baseline).
    Columns: grouping, groups (non-empty groups), tokens, purity, baseline (mean purity of the same groups
    with the labels shuffled, `shuffles` times: what group sizes alone give), gain = purity - baseline,
    majority (the most common label's share: the purity of one group). `paths`: routing_paths(..., labels=...).
    """
    if "label" not in paths.columns:
        raise ValueError("the paths table has no labels: make it with routing_paths(source, labels=...)")
    cols = _set_columns(paths)
    y = paths["label"].to_numpy(dtype=object)
    rng = np.random.default_rng(seed)
    rows = []

    def add(name: str, groups: np.ndarray) -> None:
        p = purity(groups, y)
        base = _shuffled_purity(groups, y, rng, shuffles)
        rows.append({"grouping": name, "groups": int(len(pd.unique(groups))), "tokens": len(y), "purity": p,
                     "baseline": base, "gain": p - base})

    for c in cols:
        layer = c.removeprefix("set_L")
        top1 = f"top1_L{layer}"
        add(f"expert L{layer}", paths[top1 if top1 in paths.columns else c].to_numpy())
    clusters = cluster_paths(paths, n_clusters, seed)
    add("path clusters", clusters.assignment)
    add("distinct paths", pd.factorize(paths["path"])[0])
    out = pd.DataFrame(rows)
    out["majority"] = pd.Series(y).value_counts(normalize=True).iloc[0]
    out.attrs["labels"] = paths.attrs.get("labels") or "labels"
    return out
