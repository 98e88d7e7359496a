"""Expert cards: one Neuronpedia-style summary per (layer, expert), built from routing data (and the model).

A card holds, each with the counts it rests on:
  - the top activating contexts: the tokens routed to the expert with the largest applied weight, with a
    window of text around each and the expert's weight on every token of the window (0 = not chosen);
  - the tokens it promotes and suppresses: direct logit attribution through the unembedding of its weighted
    output at those top positions (the LayerNorm scale frozen, as `logit_attribution`), averaged;
  - its co-activated partners (same layer, `coactivation`: P(j | i) and lift over random);
  - its ablation effect on the contexts: each context's text up to the top token is run with and without
    `ExpertAblation(layer, [expert], mode)` and the next-token cross-entropy and KL(baseline || ablated) at
    the top token are compared;
  - its specialization: lift per token class (see `paths.token_class`), per dataset label, and per token.

    cards = analysis.expert_cards("runs/demo-routing", model)        # a route-stats folder (or any source)
    cards.summary.sort_values("class_lift")                          # one row per card
    cards[2, 5].contexts                                             # the card of layer 2, expert 5
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .paths import token_classes
from .routing import CoactivationCounts, LoadCounts, Routing, iter_routing
from .specialization import VocabCounts, specialization_from_load

__all__ = ["ExpertCard", "ExpertCards", "expert_cards", "SUMMARY_COLUMNS"]

# the summary table's columns, in order (the widget sorts by any of them)
SUMMARY_COLUMNS = ("card", "layer", "expert", "count", "share", "lift_uniform", "top1_count", "mean_weight",
                   "max_weight", "top_token", "top_token_count", "top_token_share", "top_class", "class_lift",
                   "class_count", "top_label", "label_lift", "top_partner", "partner_lift", "promoted",
                   "suppressed", "ablation_delta", "ablation_kl", "ablation_n", "audit_effect")


@dataclass
class ExpertCard:
    """Everything shown for one expert. Tables are DataFrames; `None` where the input lacks what a part needs
    (no model: no logit effects or ablation; no label column: no label lift).

    stats: tokens (real tokens in the data), count (tokens routed to it: it is in their top-k), share,
    baseline_share (k/E), lift_uniform, top1_count, mean_weight (mean applied weight when routed), max_weight.
    contexts: rank, text, position, line, label, weight, token, tokens (list of strings of the window),
    weights (the expert's weight on each window token at this layer), center (index of the top token in it).
    promoted / suppressed: token_id, token, logit (mean direct effect in logit units over `dla_positions`).
    partners: expert, count_both, p_given_this, lift. tokens: token_id, token, count, occurrences,
    share_of_token, lift. classes / labels: class|label, tokens, count, share, lift (vs all tokens).
    ablation: mode, contexts (with a next token), delta_loss (nats, > 0: the model got worse), kl (nats),
    per-context deltas. audit: the dataset-wide ablation effect from `expert_audit` (issue 20's causal audit)
    when one was passed: per mode, effect / lo / hi (nats per token, bootstrap CI) and tokens.
    """

    layer: int
    expert: int
    stats: dict[str, Any]
    contexts: pd.DataFrame
    partners: pd.DataFrame
    tokens: pd.DataFrame
    classes: pd.DataFrame
    labels: pd.DataFrame | None = None
    promoted: pd.DataFrame | None = None
    suppressed: pd.DataFrame | None = None
    dla_positions: int = 0
    ablation: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer} e{self.expert}"

    def to_dict(self) -> dict:
        """Plain lists and dicts (json.dumps-able; the contexts' token-id prefixes left out), to share or store."""
        def table(df):
            return None if df is None else json.loads(df.drop(columns=["prefix_ids"], errors="ignore")
                                                      .to_json(orient="records"))
        return {"layer": self.layer, "expert": self.expert, "name": self.name, "stats": self.stats,
                "contexts": table(self.contexts), "partners": table(self.partners), "tokens": table(self.tokens),
                "classes": table(self.classes), "labels": table(self.labels), "promoted": table(self.promoted),
                "suppressed": table(self.suppressed), "dla_positions": self.dla_positions,
                "ablation": self.ablation, "audit": self.audit}


@dataclass
class ExpertCards:
    """All cards of a run: `summary` (one row per card, SUMMARY_COLUMNS), `cards[(layer, expert)]`, and
    `meta` (n_layers, n_experts, top_k, tokens, texts, source, model, settings, seconds per stage)."""

    summary: pd.DataFrame
    cards: dict[tuple[int, int], ExpertCard]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: tuple[int, int]) -> ExpertCard:
        layer, expert = key
        if (layer, expert) not in self.cards:
            layers = sorted({l for l, _ in self.cards})
            experts = sorted({e for _, e in self.cards})
            raise ValueError(f"no card for layer {layer}, expert {expert}: layers {layers[0]}..{layers[-1]}, "
                             f"experts {experts[0]}..{experts[-1]}")
        return self.cards[(layer, expert)]

    def __len__(self) -> int:
        return len(self.cards)

    def __iter__(self):
        return iter(self.cards.values())

    def search(self, token: str) -> pd.DataFrame:
        """Summary rows of the cards where `token` (case-insensitive substring of the token text, spaces
        kept) is among the top tokens, the top-context tokens or the promoted/suppressed tokens."""
        needle = token.lower()
        if not needle.strip():
            return self.summary
        keep = []
        for (l, e), card in self.cards.items():
            texts = list(card.tokens["token"].astype(str)) + list(card.contexts["token"].astype(str))
            for df in (card.promoted, card.suppressed):
                if df is not None:
                    texts += list(df["token"].astype(str))
            if any(needle in t.lower() for t in texts):
                keep.append((l, e))
        idx = pd.MultiIndex.from_frame(self.summary[["layer", "expert"]])
        return self.summary[idx.isin(keep)]


# ------------------------------------------------------------------------------------------------
class _TopContexts:
    """Per (layer, expert): the n token positions with the largest applied weight over all chunks."""

    def __init__(self, layers: list[int], experts: list[int], n: int, before: int, after: int) -> None:
        self.layers, self.experts, self.n, self.before, self.after = layers, experts, n, before, after
        self.best: dict[tuple[int, int], list[dict]] = {(l, e): [] for l in layers for e in experts}

    def update(self, r: Routing) -> None:
        L, N, k = r.experts.shape
        E = r.n_experts
        dense = np.zeros((L, N, E + 1), dtype=np.float32)                              # weight per expert
        np.put_along_axis(dense, np.where(r.experts >= 0, r.experts, E), r.weights, axis=-1)
        text, pos = r.column("text"), r.column("position")
        start = np.r_[0, np.flatnonzero(text[1:] != text[:-1]) + 1]                    # first row of each text
        first_row = np.repeat(start, np.diff(np.r_[start, N]))
        last_row = np.repeat(np.r_[start[1:], N], np.diff(np.r_[start, N])) - 1
        tokens = r.columns.get("token")
        ids = r.columns.get("token_id")
        row_of = {int(l): i for i, l in enumerate(r.layers)}
        for l in self.layers:
            li = row_of[l]
            for e in self.experts:
                w = dense[li, :, e]
                cand = np.flatnonzero(w > 0)
                if not len(cand):
                    continue
                if len(cand) > self.n:
                    cand = cand[np.argsort(-w[cand], kind="stable")[:self.n]]
                found = self.best[(l, e)]
                for i in cand:
                    a, b = max(first_row[i], i - self.before), min(last_row[i], i + self.after)
                    found.append({
                        "weight": float(w[i]), "text": int(text[i]), "position": int(pos[i]),
                        "line": _scalar(r.columns.get("line"), i), "label": _scalar(r.columns.get("label"), i),
                        "token": None if tokens is None else str(tokens[i]),
                        "tokens": [str(t) for t in tokens[a:b + 1]] if tokens is not None else
                                  [str(t) for t in ids[a:b + 1]],
                        "weights": [round(float(x), 4) for x in w[a:b + 1]], "center": int(i - a),
                        "prefix_ids": (np.asarray(ids[first_row[i]:i + 1], dtype=np.int32) if ids is not None
                                       else None),
                        "next_id": int(ids[i + 1]) if ids is not None and i < last_row[i] else -1})
                found.sort(key=lambda c: (-c["weight"], c["text"], c["position"]))
                del found[self.n:]

    def result(self, layer: int, expert: int) -> pd.DataFrame:
        rows = self.best[(layer, expert)]
        df = pd.DataFrame(rows, columns=["weight", "text", "position", "line", "label", "token", "tokens",
                                         "weights", "center", "prefix_ids", "next_id"])
        df.insert(0, "rank", np.arange(len(df)))
        return df


def _scalar(values, i: int):
    if values is None:
        return None
    v = values[i]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _top_table(df: pd.DataFrame, key: str, value: str = "lift", min_count: int = 1) -> tuple:
    """(key, value, count) of the row with the largest value among rows with count >= min_count."""
    df = df[df["count"] >= min_count]
    if df.empty:
        return None, np.nan, 0
    row = df.sort_values([value, "count"], ascending=False).iloc[0]
    return row[key], float(row[value]), int(row["count"])


# ------------------------------------------------------------------------------------------------
def expert_cards(source, model=None, layers: Sequence[int] | None = None, experts: Sequence[int] | None = None,
                 n_contexts: int = 8, window: tuple[int, int] = (12, 4), n_logits: int = 10, n_partners: int = 5,
                 n_tokens: int = 10, min_token_count: int = 2, ablation: str | None = "reroute",
                 batch_size: int = 8, audit=None, progress: bool = False) -> ExpertCards:
    """Cards for every (layer, expert) of `source` (a route-stats folder, traces, a routing table: see
    `dbrx_lab.analysis.routing`), one pass over its routing, plus two forward passes per card when a `model`
    is given (the DbrxLM that made the routing: logit effects and ablation; None leaves them out).

    layers / experts: the cards to make (default all); n_contexts: top contexts per card; window: tokens
    shown (before, after) each top token; n_logits: promoted and suppressed tokens listed; n_partners: partners
    listed; n_tokens / min_token_count: top tokens listed, among tokens seen at least that often (ranked by
    the share of their occurrences routed to the expert, smoothed towards k/E: see `_top_tokens`);
    ablation: ExpertAblation mode ("reroute", "zero", "renormalize") or None to skip it; batch_size:
    contexts per forward pass. audit: a `CausalAudit` (`expert_audit(model, texts)`, e.g. on the same
    route-stats folder) whose dataset-wide ablation effects are added to the cards it covers.
    """
    for name, value, low in (("n_contexts", n_contexts, 1), ("n_logits", n_logits, 1), ("n_partners", n_partners, 0),
                             ("n_tokens", n_tokens, 1), ("min_token_count", min_token_count, 1),
                             ("batch_size", batch_size, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and 0 <= w <= 256 for w in window)):
        raise ValueError(f"window must be (before, after) with each in [0, 256] tokens, got {window!r}")
    if ablation not in (None, "reroute", "zero", "renormalize"):
        raise ValueError(f"ablation must be 'reroute', 'zero', 'renormalize' or None, got {ablation!r}")
    if isinstance(model, str):
        from ..loading import load_model

        model = load_model(model)
    t0 = time.perf_counter()
    chunks = iter_routing(source)
    first = next(chunks, None)
    if first is None:
        raise ValueError("the source has no routing")
    all_layers = [int(x) for x in first.layers]
    E, k = first.n_experts, first.top_k
    layers = all_layers if layers is None else [int(x) for x in layers]
    experts = list(range(E)) if experts is None else [int(x) for x in experts]
    bad = [x for x in layers if x not in all_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the routing has layers {all_layers}")
    bad = [x for x in experts if not 0 <= x < E]
    if bad or not experts:
        raise ValueError(f"experts {bad or experts} out of range: valid experts are 0..{E - 1}")
    if model is not None and (model.config.moe_num_experts != E or model.config.n_layers < max(all_layers) + 1):
        raise ValueError(f"the model ({model.config.n_layers} layers, {model.config.moe_num_experts} experts) did "
                         f"not make this routing ({max(all_layers) + 1}+ layers, {E} experts)")

    load, by_class, by_label = LoadCounts(), LoadCounts("token_class"), LoadCounts("label")
    co, vocab = CoactivationCounts(), VocabCounts("input")
    top = _TopContexts(layers, experts, n_contexts, *window)
    max_weight = np.zeros((len(all_layers), E))
    labelled, texts, has_tokens = False, set(), True
    chunk = first
    while chunk is not None:
        if "token" not in chunk.columns:
            has_tokens = False
            chunk.columns["token"] = np.array([str(t) for t in chunk.column("token_id")], dtype=object)
        chunk.columns["token_class"] = token_classes(chunk.columns["token"])
        for acc in (load, by_class, co, vocab, top):
            acc.update(chunk)
        if "label" in chunk.columns and pd.notna(chunk.columns["label"]).any():
            labelled = True
            by_label.update(chunk)
        dense = np.zeros((chunk.experts.shape[0], chunk.n_tokens, E + 1), dtype=np.float32)
        np.put_along_axis(dense, np.where(chunk.experts >= 0, chunk.experts, E), chunk.weights, axis=-1)
        max_weight = np.maximum(max_weight, dense[..., :E].max(1))
        texts.update(np.unique(chunk.column("text")).tolist())
        chunk = next(chunks, None)
    t_pass = time.perf_counter() - t0

    load_df = load.result().set_index(["layer", "expert"])
    class_df = specialization_from_load(by_class.result(), "token_class")
    label_df = specialization_from_load(by_label.result(), "label") if labelled else None
    co_df = co.result()
    tok_df = _top_tokens(vocab, n_tokens, min_token_count)
    n_total = int(load_df["tokens"].iloc[0])

    cards: dict[tuple[int, int], ExpertCard] = {}
    for l in layers:
        for e in experts:
            row = load_df.loc[(l, e)]
            count = int(row["count"])
            stats = {"tokens": n_total, "count": count, "share": float(row["share"]),
                     "baseline_share": k / E, "lift_uniform": float(row["share"]) / (k / E),
                     "top1_count": int(row["top1_count"]),
                     "mean_weight": float(row["weight_share"] * n_total / count) if count else 0.0,
                     "max_weight": float(max_weight[all_layers.index(l), e])}
            partners = co_df[(co_df["layer"] == l) & (co_df["expert_i"] == e) & (co_df["count_both"] > 0)]
            partners = partners.sort_values(["lift", "count_both"], ascending=False).head(n_partners)
            partners = pd.DataFrame({"expert": partners["expert_j"].to_numpy(),
                                     "count_both": partners["count_both"].to_numpy(),
                                     "p_given_this": partners["p_j_given_i"].to_numpy(),
                                     "lift": partners["lift"].to_numpy()})
            toks = tok_df.get((l, e), tok_df["empty"])
            cards[(l, e)] = ExpertCard(
                l, e, stats, top.result(l, e), partners, toks,
                _group_table(class_df, "token_class", "class", l, e),
                None if label_df is None else _group_table(label_df, "label", "label", l, e))

    t1 = time.perf_counter()
    if model is not None:
        _model_parts(model, cards, n_logits, ablation, batch_size, progress)
    t_model = time.perf_counter() - t1
    if audit is not None:
        _add_audit(cards, audit)
    meta = {"n_layers": len(all_layers), "layers": all_layers, "n_experts": E, "top_k": k, "tokens": n_total,
            "texts": len(texts), "labelled": labelled, "token_strings": has_tokens,
            "source": str(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else
            type(source).__name__,
            "model": None if model is None else (getattr(model, "name_or_path", None) or type(model).__name__),
            "settings": {"n_contexts": n_contexts, "window": list(window), "n_logits": n_logits,
                         "ablation": ablation if model is not None else None},
            "seconds": {"routing_pass": round(t_pass, 3), "model": round(t_model, 3)}}
    return ExpertCards(_summary(cards), cards, meta)


MIN_GROUP_COUNT = 5         # a card's top class / label needs this many of its tokens (else the best with any)
PRIOR_OCCURRENCES = 4       # pseudo-occurrences at the random share k/E when ranking a card's top tokens


def _top_tokens(vocab: VocabCounts, n: int, min_count: int) -> dict:
    """Per (layer, expert): the n tokens (seen >= min_count times) with the largest share of their occurrences
    routed to the expert, the share smoothed towards k/E by PRIOR_OCCURRENCES pseudo-occurrences, so a
    token routed here 20 times out of 20 ranks above one seen twice. Values: DataFrames with token_id,
    token, count, occurrences, share_of_token (unsmoothed) and lift (share / (k/E)); "empty": none."""
    cols = ["token_id", "token", "count", "occurrences", "share_of_token", "lift"]
    out: dict = {"empty": pd.DataFrame(columns=cols)}
    ids, occ, counts = vocab._table()                                                # [R], [R], [R, L, E]
    keep = np.flatnonzero(occ >= min_count)
    if not len(keep):
        return out
    ids, occ, counts = ids[keep], occ[keep], counts[keep]
    base = vocab.baseline()
    score = (counts + PRIOR_OCCURRENCES * base) / (occ[:, None, None] + PRIOR_OCCURRENCES)
    score = np.where(counts > 0, score, -1.0)
    m = min(n, len(ids))
    top = np.argpartition(-score, m - 1, axis=0)[:m] if m < len(ids) else np.broadcast_to(
        np.arange(len(ids))[:, None, None], score.shape)                                # [m, L, E]
    for li, layer in enumerate(vocab.layers):
        for e in range(counts.shape[2]):
            rows = top[:, li, e]
            rows = rows[np.argsort(-score[rows, li, e], kind="stable")]
            rows = rows[counts[rows, li, e] > 0]
            c, o = counts[rows, li, e], occ[rows]
            out[(int(layer), e)] = pd.DataFrame({
                "token_id": ids[rows], "token": [vocab.strings.get(int(i)) for i in ids[rows]], "count": c,
                "occurrences": o, "share_of_token": c / o, "lift": c / o / base}, columns=cols)
    return out


def _add_audit(cards: dict[tuple[int, int], ExpertCard], audit) -> None:
    """Attach `expert_audit`'s per-expert ablation effects (with their bootstrap CIs) to the cards it audited."""
    table = getattr(audit, "experts", None)
    if not isinstance(table, pd.DataFrame) or not {"layer", "expert"} <= set(table.columns):
        raise ValueError("audit must be the CausalAudit that analysis.expert_audit returns")
    modes = [c.removeprefix("effect_") for c in table.columns
             if c.startswith("effect_") and not c.endswith(("_lo", "_hi"))]
    for _, row in table.iterrows():
        card = cards.get((int(row["layer"]), int(row["expert"])))
        if card is None or not modes:
            continue
        card.audit = {"tokens": int(row["tokens"]) if "tokens" in row else None,
                      "effects": {m: {"effect": float(row[f"effect_{m}"]), "lo": float(row[f"effect_{m}_lo"]),
                                      "hi": float(row[f"effect_{m}_hi"])} for m in modes}}


def _group_table(df: pd.DataFrame, column: str, name: str, layer: int, expert: int) -> pd.DataFrame:
    """One card's rows of a specialization table: name, tokens (of the group), count, share, lift."""
    d = df[(df["layer"] == layer) & (df["expert"] == expert)]
    out = pd.DataFrame({name: d[column].to_numpy(), "tokens": d["tokens"].to_numpy(), "count": d["count"].to_numpy(),
                        "share": d["share"].to_numpy(), "lift": d["lift"].to_numpy()})
    return out.sort_values(["lift", "count"], ascending=False, ignore_index=True)


def _summary(cards: dict[tuple[int, int], ExpertCard]) -> pd.DataFrame:
    rows = []
    for (l, e), c in cards.items():
        s = c.stats
        top_token = c.tokens.iloc[0] if len(c.tokens) else None
        cls, cls_lift, cls_count = _top_table(c.classes, "class", min_count=MIN_GROUP_COUNT)
        if cls is None:
            cls, cls_lift, cls_count = _top_table(c.classes, "class")
        lab, lab_lift = ((None, np.nan) if c.labels is None
                         else _top_table(c.labels, "label", min_count=MIN_GROUP_COUNT)[:2])
        partner = c.partners.iloc[0] if len(c.partners) else None
        rows.append({
            "card": c.name, "layer": l, "expert": e, "count": s["count"], "share": s["share"],
            "lift_uniform": s["lift_uniform"], "top1_count": s["top1_count"], "mean_weight": s["mean_weight"],
            "max_weight": s["max_weight"],
            "top_token": None if top_token is None else top_token["token"],
            "top_token_count": 0 if top_token is None else int(top_token["count"]),
            "top_token_share": np.nan if top_token is None else float(top_token["share_of_token"]),
            "top_class": cls, "class_lift": cls_lift, "class_count": cls_count,
            "top_label": lab, "label_lift": lab_lift,
            "top_partner": None if partner is None else int(partner["expert"]),
            "partner_lift": np.nan if partner is None else float(partner["lift"]),
            "promoted": None if c.promoted is None or c.promoted.empty else c.promoted["token"].iloc[0],
            "suppressed": None if c.suppressed is None or c.suppressed.empty else c.suppressed["token"].iloc[0],
            "ablation_delta": np.nan if c.ablation is None else c.ablation["delta_loss"],
            "ablation_kl": np.nan if c.ablation is None else c.ablation["kl"],
            "ablation_n": 0 if c.ablation is None else c.ablation["contexts"],
            "audit_effect": np.nan if c.audit is None else next(iter(c.audit["effects"].values()))["effect"]})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


# ------------------------------------------------------------------------------------------------
# model-based parts: logit effects (DLA) and ablation on the contexts
def _distinct_rows(unembed: torch.Tensor) -> torch.Tensor:
    """Ids of the first of each group of identical unembedding rows (a model trained on a vocabulary
    shortlist, like the demo, copies one row to every rare id): one GEMV fingerprint per row."""
    probe = torch.randn(unembed.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fp = np.concatenate([(unembed[i:i + 4096].double().cpu() @ probe).numpy()        # float64, 4096 rows at a time
                         for i in range(0, unembed.shape[0], 4096)])
    _, first = np.unique(fp, return_index=True)
    return torch.from_numpy(np.sort(first))


def _batch(prefixes: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    T = max(len(p) for p in prefixes)
    ids = torch.zeros(len(prefixes), T, dtype=torch.long)
    mask = torch.zeros(len(prefixes), T, dtype=torch.long)
    for b, p in enumerate(prefixes):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.no_grad()
def _last_column(model, prefixes: list[list[int]], layer: int, interventions=()) -> dict[str, torch.Tensor]:
    """One forward over left-padded prefixes (logits at the last column only); -> logits [B, V] and, at the
    last column, the layer's chosen experts/weights/unweighted outputs and the final residual."""
    L = model.config.n_layers
    kept: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x, hook):            # the last call holds the last column (last_only's side pass comes first)
            kept[name] = x[:, -1].detach().float().cpu()
        return fn

    names = [f"blocks.{layer}.ffn.hook_topk_experts", f"blocks.{layer}.ffn.hook_topk_weights",
             f"blocks.{layer}.ffn.hook_expert_out", f"blocks.{L - 1}.hook_resid_post"]
    ids, mask = _batch(prefixes, model.device)
    with model.intervene(*interventions), model.hooks([(n, keep(n)) for n in names] if not interventions else []):
        logits = model(ids, mask, last_only=True).logits[:, -1].float().cpu()
    kept["logits"] = logits
    return kept


def _model_parts(model, cards: dict[tuple[int, int], ExpertCard], n_logits: int, ablation: str | None,
                 batch_size: int, progress: bool) -> None:
    from ..interventions import ExpertAblation
    from .attribution import _weight

    tok = model.tokenizer
    unembed = _weight(model.lm_head)                                                   # [V, d], on its device
    gain = _weight(model.transformer.norm_f).float().cpu()
    eps = model.transformer.norm_f.eps
    distinct = _distinct_rows(unembed)
    U = unembed[distinct.to(unembed.device)].float() * gain.to(unembed.device)         # [V', d]

    def strings(ids: list[int]) -> list[str]:
        return tok.token_strings(ids) if tok is not None else [str(i) for i in ids]

    for (l, e), card in tqdm(cards.items(), desc="cards: logit effects and ablation", disable=not progress):
        ctx = card.contexts
        if ctx.empty or ctx["prefix_ids"].iloc[0] is None:
            continue
        prefixes = list(ctx["prefix_ids"])
        next_ids = ctx["next_id"].to_numpy()
        effect_sum, n_effect, losses = None, 0, {"base": [], "ablated": [], "kl": [], "index": []}
        for part in _buckets([len(p) for p in prefixes], batch_size):
            batch = [prefixes[i] for i in part]
            base = _last_column(model, batch, l)
            slot = base[f"blocks.{l}.ffn.hook_topk_experts"].long() == e                # [B, k]
            hit = slot.any(-1)
            if hit.any():
                out = base[f"blocks.{l}.ffn.hook_expert_out"]                           # [B, k, d]
                w = base[f"blocks.{l}.ffn.hook_topk_weights"]
                c = (out * (w * slot)[..., None]).sum(1)[hit]                            # [b, d]
                x = base[f"blocks.{model.config.n_layers - 1}.hook_resid_post"][hit]
                s_ = (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
                part_sum = (((c - c.mean(-1, keepdim=True)) * s_).to(U.device) @ U.T).sum(0).cpu()   # [V']
                effect_sum = part_sum if effect_sum is None else effect_sum + part_sum
                n_effect += int(hit.sum())
            if ablation is not None:
                abl = _last_column(model, batch, l, [ExpertAblation(l, [e], ablation)])["logits"]
                lp, lq = base["logits"].log_softmax(-1), abl.log_softmax(-1)
                losses["kl"] += (lp.exp() * (lp - lq)).sum(-1).tolist()
                for b, i in enumerate(part):
                    if next_ids[i] >= 0:
                        losses["base"].append(-float(lp[b, next_ids[i]]))
                        losses["ablated"].append(-float(lq[b, next_ids[i]]))
                        losses["index"].append(int(i))
        if n_effect:
            mean = effect_sum / n_effect
            card.dla_positions = n_effect
            order = mean.argsort(descending=True)
            for attr, idx in (("promoted", order[:n_logits]), ("suppressed", order.flip(0)[:n_logits])):
                ids = distinct[idx].tolist()
                setattr(card, attr, pd.DataFrame({"token_id": ids, "token": strings(ids),
                                                  "logit": mean[idx].double().numpy()}))
        if ablation is not None:
            deltas = np.array(losses["ablated"]) - np.array(losses["base"])
            card.ablation = {"mode": ablation, "contexts": len(deltas), "runs": len(prefixes),
                             "delta_loss": float(deltas.mean()) if len(deltas) else float("nan"),
                             "base_loss": float(np.mean(losses["base"])) if len(deltas) else float("nan"),
                             "kl": float(np.mean(losses["kl"])),
                             "deltas": [round(float(d), 5) for d in deltas], "context_rank": losses["index"]}


def _buckets(lengths: list[int], batch_size: int, slack: float = 1.5) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted; a batch closes when left padding would make it
    more than `slack` times its real tokens plus 64, or at batch_size), so short prefixes do not pay for a
    long one's padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur and len(cur) < batch_size and (len(cur) + 1) * lengths[i] <= slack * (sum(lengths[j] for j in cur)
                                                                                    + lengths[i]) + 64:
            cur.append(i)
        else:
            batches.append([i])
    return batches
