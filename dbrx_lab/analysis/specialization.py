"""Specialization: do experts serve domains or vocabulary? Sources as in `dbrx_lab.analysis.routing`."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .routing import Accumulator, LoadCounts, Routing, specialization_from_load

__all__ = ["domain_specialization", "vocab_specialization", "top_tokens_per_expert", "VocabCounts",
           "specialization_from_load"]

# by -> (per-token id column, per-token string column or None)
TOKEN_KEYS = {"input": ("token_id", "token"), "next": ("next_id", None), "predicted": ("predicted_id", "predicted")}


def domain_specialization(source, by: str = "label", labels: Sequence | None = None) -> pd.DataFrame:
    """Share of a labelled domain's tokens that route to each expert.

    Per (domain, layer, expert): share = tokens of the domain with the expert in their top-k / tokens of the
    domain; random baseline k/E (baseline_share), lift_uniform = share / (k/E); share_all = the same share
    over every labelled token, lift = share / share_all (> 1: the domain uses the expert more than average).
    by: the per-token label column (route-stats writes `label` from the JSONL "label"/"domain" field);
    labels: one label per text for traces.
    """
    return specialization_from_load(LoadCounts(by).collect(source, labels).result(), by)


class VocabCounts(Accumulator):
    """Per (token id, layer, expert): occurrences routed to the expert; per token id: occurrences.

    by: "input" (the token itself), "next" (the next token of the text) or "predicted" (the model's top-1
    prediction at that position, column predicted_id, which route-stats writes).
    rank: "topk" (counted when the expert is in the top-k set) or "top1" (highest-weighted expert only).
    """

    def __init__(self, by: str = "input", rank: str = "topk") -> None:
        if by not in TOKEN_KEYS:
            raise ValueError(f"by must be one of {sorted(TOKEN_KEYS)}, got {by!r}")
        if rank not in ("topk", "top1"):
            raise ValueError(f"rank must be 'topk' or 'top1', got {rank!r}")
        self.by, self.rank = by, rank
        self.index: dict[int, int] = {}
        self.strings: dict[int, str] = {}
        self.occ = np.zeros(0, dtype=np.int64)
        self.counts: np.ndarray | None = None                                          # [rows, L, E] int32

    def update(self, r: Routing) -> None:
        id_col, _ = TOKEN_KEYS[self.by]
        keys = np.asarray(r.column(id_col), dtype=np.int64)
        for a, b in (("token_id", "token"), ("predicted_id", "predicted")):
            if a in r.columns and b in r.columns:
                seen = pd.Series(r.columns[b], index=r.columns[a])
                self.strings.update(seen[~seen.index.duplicated()].to_dict())
        valid = np.flatnonzero(keys >= 0)
        uniq, inv = np.unique(keys[valid], return_inverse=True)
        rows = np.array([self.index.setdefault(int(u), len(self.index)) for u in uniq], dtype=np.int64)
        L, E = r.experts.shape[0], r.n_experts
        if self.counts is None:
            self.layers, self.E, self.k = r.layers, E, r.top_k
            self.counts = np.zeros((0, L, E), dtype=np.int32)
        if len(self.index) > len(self.occ):
            grow = max(len(self.index), 2 * len(self.occ)) - len(self.occ)
            self.occ = np.concatenate([self.occ, np.zeros(grow, dtype=np.int64)])
            self.counts = np.concatenate([self.counts, np.zeros((grow, L, E), dtype=np.int32)])
        token_rows = rows[inv]                                                          # [n]
        self.occ += np.bincount(token_rows, minlength=len(self.occ))
        ex = r.experts[:, valid] if self.rank == "topk" else r.experts[:, valid, :1]   # [L, n, k']
        flat = (token_rows[None, :, None] * L + np.arange(L)[:, None, None]) * E + ex
        np.add.at(self.counts.reshape(-1), flat[ex >= 0], 1)

    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids [R], occurrences [R], counts [R, L, E]) of the tokens seen."""
        if self.counts is None:
            raise ValueError("no tokens: the source has no real (non-padding) tokens")
        ids = np.empty(len(self.index), dtype=np.int64)
        ids[list(self.index.values())] = list(self.index.keys())
        R = len(ids)
        return ids, self.occ[:R], self.counts[:R]

    def result(self) -> pd.DataFrame:
        return self.specialization()

    def baseline(self) -> float:
        return (self.k if self.rank == "topk" else 1) / self.E

    def specialization(self, min_count: int = 10) -> pd.DataFrame:
        ids, occ, counts = self._table()
        keep = np.flatnonzero(occ >= min_count)
        ids, occ, counts = ids[keep], occ[keep], counts[keep]                         # [R], [R], [R, L, E]
        R, L, _ = counts.shape
        top = counts.argmax(-1)                                                         # [R, L]
        top_count = np.take_along_axis(counts, top[..., None], -1)[..., 0]
        df = pd.DataFrame({"layer": np.tile(self.layers, R), "token_id": np.repeat(ids, L),
                           "token": [self.strings.get(int(i)) for i in np.repeat(ids, L)],
                           "occurrences": np.repeat(occ, L), "top_expert": top.ravel(),
                           "top_count": top_count.ravel(), "top_share": (top_count / occ[:, None]).ravel(),
                           "baseline": self.baseline()})
        df["lift"] = df["top_share"] / df["baseline"]
        return df.sort_values(["layer", "occurrences", "token_id"], ascending=[True, False, True],
                              ignore_index=True)

    def top_tokens(self, n: int = 10, min_count: int = 5, sort: str = "share") -> pd.DataFrame:
        if sort not in ("share", "count"):
            raise ValueError(f"sort must be 'share' or 'count', got {sort!r}")
        ids, occ, counts = self._table()
        per_expert = counts.sum(0)                                                      # [L, E]
        keep = np.flatnonzero(occ >= min_count)
        R, L, E = counts[keep].shape
        r, li, e = np.meshgrid(keep, np.arange(L), np.arange(E), indexing="ij")
        c = counts[keep].ravel()
        df = pd.DataFrame({"layer": self.layers[li.ravel()], "expert": e.ravel(), "token_id": ids[r.ravel()],
                           "count": c, "occurrences": occ[r.ravel()], "share_of_token": c / occ[r.ravel()],
                           "share_of_expert": c / np.maximum(per_expert[li.ravel(), e.ravel()], 1)})
        df = df[df["count"] > 0]
        order = ["share_of_token", "count"] if sort == "share" else ["count", "share_of_token"]
        df = df.sort_values(["layer", "expert", *order, "token_id"], ascending=[True, True, False, False, True])
        df = df.groupby(["layer", "expert"], sort=False).head(n).reset_index(drop=True)
        df.insert(2, "rank", df.groupby(["layer", "expert"]).cumcount())
        df.insert(4, "token", [self.strings.get(int(i)) for i in df["token_id"]])
        df["baseline"] = self.baseline()
        return df


def vocab_specialization(source, by: str = "input", min_count: int = 10, rank: str = "topk") -> pd.DataFrame:
    """How consistently a token id goes to one expert.

    For each token id seen at least min_count times and each layer: top_expert = the expert its occurrences
    route to most often, top_share = the share of its occurrences routed there. rank "topk": routed = in the
    top-k set (random baseline k/E); "top1": the highest-weighted expert (baseline 1/E); lift = top_share /
    baseline. by: "input" (the token at the position), "next" (the following token of the text) or
    "predicted" (the model's top-1 prediction there; needs predicted_id, as route-stats writes).
    Columns: layer, token_id, token, occurrences, top_expert, top_count, top_share, baseline, lift.
    """
    return VocabCounts(by, rank).collect(source).specialization(min_count)


def top_tokens_per_expert(source, n: int = 10, min_count: int = 5, by: str = "input", rank: str = "topk",
                          sort: str = "share") -> pd.DataFrame:
    """The tokens each expert serves: per (layer, expert), the n tokens (seen >= min_count times) with the
    highest share_of_token = count routed to the expert / occurrences (sort "share"; random baseline k/E,
    or 1/E for rank "top1"), or the highest count (sort "count"); share_of_expert = count / all tokens the
    expert got. Columns: layer, expert, rank (0 = first), token_id, token, count, occurrences,
    share_of_token, share_of_expert, baseline. by/rank as in `vocab_specialization`."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return VocabCounts(by, rank).collect(source).top_tokens(n, min_count, sort)
