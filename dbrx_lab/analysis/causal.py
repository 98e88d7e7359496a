"""Expert activation patching: restore single (layer, expert) units, or greedy coalitions of them, from a
clean run into a corrupted one, and attribution patching (gradient x delta) as the fast approximation.

A unit (l, e)'s *contribution* at a position is its weighted output w_e * GLU_e(x) when the router chose e
there, else 0. Restoring a unit at positions P sets, in the corrupted run, the MoE output of layer l at P to
    ffn_out - (e's contribution in this run) + (e's contribution in the clean run)
(added when this run did not route to e, its own removed when it did); every layer after l, routing
included, is recomputed. The metric is read at one position (default the last):
    wrong given: logit(answer) - logit(wrong)     (logit difference, the usual IOI-style metric)
    wrong None:  log p(answer)                    (log-prob of the clean answer)
recovery = (metric_patched - metric_corrupted) / (metric_clean - metric_corrupted): 0 = no effect,
1 = the clean behaviour fully restored.

Costs, with U candidate units: `expert_patching` 2 + U forwards (batched `batch_size` rows per call);
`expert_coalition` 2 + sum over steps of the remaining candidates; `attribution_patching` 2 forwards
plus one forward and backward (reference kernels, autograd). Forwards stop at `hook_final` (lm_head's
input): the metric needs one position, so the [B, T, vocab] logits are never formed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .ablation import encode_texts
from .attribution import _weight

__all__ = ["final_hidden", "reference_kernels", "expert_patching", "expert_coalition", "attribution_patching",
           "patching_agreement", "PatchSetup"]


# ------------------------------------------------------------------------------------------------
# shared helpers (also used by the audit, counterfactual routing and steering evaluation)
class _Stop(Exception):
    """Raised by the hook at hook_final to end a forward once lm_head's input is known."""


def final_hidden(model, input_ids: torch.Tensor, attention_mask=None, hooks: Sequence = (), cache=None,
                 start: int = 0) -> torch.Tensor:
    """lm_head's input [B, T, d] (`hook_final`) for one forward, without computing the logits.

    One forward; `hooks` are attached for it (removed after, even on error). The forward is the model's
    own (every hook and intervention of the calling context applies); it stops at hook_final.
    """
    got: dict[str, torch.Tensor] = {}

    def stop(x: torch.Tensor, hook) -> None:
        got["x"] = x
        raise _Stop

    try:
        with model.hooks([*hooks, ("hook_final", stop)]):
            model(input_ids, attention_mask, cache=cache, start=start)
    except _Stop:
        pass
    return got["x"]


@contextlib.contextmanager
def reference_kernels(model) -> Iterator[None]:
    """Run the plain reference experts and attention kernels in the block (for autograd); restored after.
    Note: kernels are a model setting, so other threads calling the model meanwhile use them too."""
    saved = [(b.ffn.experts.impl, b.norm_attn_norm.attn.impl) for b in model.transformer.blocks]
    try:
        model.set_kernels(experts="reference", attention="reference")
        yield
    finally:
        for b, (e, a) in zip(model.transformer.blocks, saved):
            b.ffn.experts.impl, b.norm_attn_norm.attn.impl = e, a


def token_id(model, token, name: str) -> int:
    """A token id from an int or a string that encodes to exactly one token."""
    V = model.config.vocab_size
    if isinstance(token, str):
        ids = encode_texts(model, [token])[0]
        if len(ids) != 1:
            raise ValueError(f"{name} {token!r} is {len(ids)} tokens ({ids}); give a single token or its id")
        token = ids[0]
    if isinstance(token, (np.integer, torch.Tensor)):
        token = int(token)
    if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < V:
        raise ValueError(f"{name} must be a token id in [0, {V - 1}] or a one-token string, got {token!r}")
    return token


def one_text(model, text, name: str) -> torch.Tensor:
    """A string or token ids (list, [T] or [1, T] tensor) -> LongTensor [1, T], checked by the model."""
    if isinstance(text, torch.Tensor) and text.ndim == 2:
        if text.shape[0] != 1:
            raise ValueError(f"{name} must be one text ([1, T]), got shape {tuple(text.shape)}")
        text = text[0]
    rows = encode_texts(model, [text] if isinstance(text, str) or isinstance(text, torch.Tensor) else [list(text)])
    return model.validate_input_ids(torch.tensor(rows[0])[None]).cpu()


def _layers_experts(cfg, layers, experts) -> tuple[list[int], list[int]]:
    L, E = cfg.n_layers, cfg.moe_num_experts
    layers = list(range(L)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    experts = list(range(E)) if experts is None else [experts] if isinstance(experts, int) else list(experts)
    for name, values, n in (("layers", layers, L), ("experts", experts, E)):
        if not values:
            raise ValueError(f"{name} must not be empty")
        bad = [v for v in values if not isinstance(v, (int, np.integer)) or not 0 <= v < n]
        if bad:
            raise ValueError(f"{name} {bad} out of range: this model has {name} 0..{n - 1}")
    return [int(v) for v in layers], [int(v) for v in experts]


# ------------------------------------------------------------------------------------------------
@dataclass
class PatchSetup:
    """A clean and a corrupted prompt, the positions to patch, the metric, and both runs' contributions.

    contrib_clean / contrib_corrupt: layer -> [P, E, d] float32, each expert's weighted contribution at
    the patched positions (zero where not routed); routed_*: layer -> [P, E] bool.
    """

    model: object
    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    positions: list[int]            # corrupted-run columns patched
    clean_positions: list[int]      # aligned clean-run columns
    metric_position: int            # column (of the corrupted run; the clean run's last/aligned one)
    clean_metric_position: int
    answer: int
    wrong: int | None
    contrib_clean: dict[int, torch.Tensor]
    contrib_corrupt: dict[int, torch.Tensor]
    routed_clean: dict[int, torch.Tensor]
    routed_corrupt: dict[int, torch.Tensor]
    clean_metric: float = float("nan")
    corrupt_metric: float = float("nan")

    @property
    def metric_name(self) -> str:
        return "logit_diff" if self.wrong is not None else "logprob"

    def recovery(self, metric: np.ndarray) -> np.ndarray:
        gap = self.clean_metric - self.corrupt_metric
        if abs(gap) < 1e-9:
            return np.full_like(np.asarray(metric, dtype=float), np.nan)
        return (np.asarray(metric, dtype=float) - self.corrupt_metric) / gap

    # --- metric ------------------------------------------------------------------------------------
    def metric(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, d] (lm_head's input at the metric position) -> metric [B] float32."""
        W = _weight(self.model.lm_head).to(hidden.device)
        h = hidden.float()
        if self.wrong is not None:
            return h @ (W[self.answer].float() - W[self.wrong].float())
        logits = h @ W.float().T                                                       # [B, V]
        return logits[:, self.answer] - logits.logsumexp(-1)

    # --- runs --------------------------------------------------------------------------------------
    def capture(self, ids: torch.Tensor, positions: list[int]):
        """One forward: (metric hidden [1, T, d], contributions and routed masks at `positions` per layer)."""
        model, L, E = self.model, self.model.config.n_layers, self.model.config.moe_num_experts
        kept: dict[str, torch.Tensor] = {}

        def keep(name):
            def fn(x, hook):
                kept[name] = x[0, positions].detach().float().cpu()
            return fn

        names = [f"blocks.{i}.ffn.{h}" for i in range(L) for h in ("hook_topk_experts", "hook_topk_weights",
                                                                        "hook_expert_out")]
        hidden = final_hidden(model, ids, hooks=[(n, keep(n)) for n in names])
        contrib, routed = {}, {}
        for i in range(L):
            ex = kept[f"blocks.{i}.ffn.hook_topk_experts"].long()                        # [P, k]
            w = kept[f"blocks.{i}.ffn.hook_topk_weights"]                                 # [P, k]
            outs = kept[f"blocks.{i}.ffn.hook_expert_out"]                                # [P, k, d]
            valid = ex >= 0
            c = torch.zeros(len(positions), E, outs.shape[-1])
            c.scatter_add_(1, ex.clamp(min=0)[..., None].expand_as(outs), outs * (w * valid)[..., None])
            contrib[i] = c
            routed[i] = torch.zeros(len(positions), E, dtype=torch.bool).scatter_(1, ex.clamp(min=0), valid)
        return hidden, contrib, routed

    def patched_metric(self, units: list[list[tuple[int, int]]], extra_hooks: Sequence = ()) -> np.ndarray:
        """One forward of the corrupted prompt per unit set (batched): metric [len(units)]."""
        model, E = self.model, self.model.config.moe_num_experts
        U = len(units)
        masks: dict[int, torch.Tensor] = {}
        for r, unit_set in enumerate(units):
            for layer, e in unit_set:
                masks.setdefault(layer, torch.zeros(U, E))[r, e] = 1.0
        T = self.corrupt_ids.shape[1]
        pos = torch.tensor(self.positions)
        hooks = list(extra_hooks)
        for layer, m in masks.items():
            hooks += self._layer_hooks(layer, m, pos, T)
        ids = self.corrupt_ids.expand(U, T)
        hidden = final_hidden(model, ids, hooks=hooks)[:, self.metric_position]
        return self.metric(hidden).detach().cpu().numpy().astype(np.float64)

    def _layer_hooks(self, layer: int, mask: torch.Tensor, pos: torch.Tensor, T: int):
        """Hooks restoring the units of `mask` [U, E] at layer `layer` (see the module doc)."""
        state: dict[str, torch.Tensor] = {}
        clean = self.contrib_clean[layer]                                                  # [P, E, d]

        def grab(name):
            def fn(x, hook):
                state[name] = x
            return fn

        def restore(x, hook):
            dev = x.device
            m = mask.to(dev)                                                              # [U, E]
            ex, w, outs = state["experts"], state["weights"].float(), state["outs"].float()
            ex_p, w_p, outs_p = ex[:, pos], w[:, pos], outs[:, pos]                       # [U, P, k(, d)]
            sel = m.gather(1, ex_p.clamp(min=0).flatten(1)).view_as(w_p) * (ex_p >= 0)   # [U, P, k]
            current = (outs_p * (w_p * sel)[..., None]).sum(2)                            # [U, P, d]
            added = torch.einsum("ue,ped->upd", m, clean.to(dev))
            new = x.clone()
            new[:, pos] = (x[:, pos].float() - current + added).to(x.dtype)
            return new

        name = f"blocks.{layer}.ffn."
        return [(name + "hook_topk_experts", grab("experts")), (name + "hook_topk_weights", grab("weights")),
                (name + "hook_expert_out", grab("outs")), (f"blocks.{layer}.hook_ffn_out", restore)]


def _columns(T: int, positions, name: str) -> list[int]:
    if positions is None:
        return list(range(T))
    cols = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
    if not cols:
        raise ValueError(f"{name} must not be empty")
    bad = [c for c in cols if not isinstance(c, (int, np.integer)) or not -T <= c < T]
    if bad:
        raise ValueError(f"{name} {bad} out of range: valid columns are {-T}..{T - 1}")
    out = [int(c) % T for c in cols]
    if len(set(out)) != len(out):
        raise ValueError(f"{name} has duplicates: {out}")
    return out


@torch.no_grad()
def patch_setup(model, clean, corrupted, answer, wrong=None, positions=None, clean_positions=None,
                metric_position: int = -1) -> PatchSetup:
    """Check the inputs, run the clean and corrupted prompts once each (2 forwards), keep their contributions.

    clean / corrupted: strings or token ids of one text each. Same length: positions (default every
    column) index both. Different lengths: give `positions` (corrupted columns) and `clean_positions`
    (the aligned clean columns, same count); the metric is read at `metric_position` of the corrupted
    run and at the clean run's last column (or its aligned column when metric_position is patched).
    answer / wrong: token ids or one-token strings (wrong None: metric = log p(answer)).
    """
    clean_ids, corrupt_ids = one_text(model, clean, "clean"), one_text(model, corrupted, "corrupted")
    Tc, Tx = clean_ids.shape[1], corrupt_ids.shape[1]
    answer = token_id(model, answer, "answer")
    wrong = None if wrong is None else token_id(model, wrong, "wrong")
    if wrong == answer:
        raise ValueError(f"answer and wrong are the same token ({answer}): the logit difference would be 0")
    cols = _columns(Tx, positions, "positions")
    if clean_positions is None:
        if Tc != Tx:
            raise ValueError(f"clean has {Tc} tokens and corrupted {Tx}: give positions (corrupted columns) and "
                             f"clean_positions (aligned clean columns) of the same length")
        ccols = list(cols)
    else:
        ccols = _columns(Tc, clean_positions, "clean_positions")
        if len(ccols) != len(cols):
            raise ValueError(f"positions has {len(cols)} columns and clean_positions {len(ccols)}: align them 1:1")
    mpos = _columns(Tx, metric_position, "metric_position")[0]
    cmpos = ccols[cols.index(mpos)] if mpos in cols and clean_positions is not None else \
        (mpos if Tc == Tx else Tc - 1)
    setup = PatchSetup(model, clean_ids, corrupt_ids, cols, ccols, mpos, cmpos, answer, wrong, {}, {}, {}, {})
    h_clean, setup.contrib_clean, setup.routed_clean = setup.capture(clean_ids, ccols)
    h_corr, setup.contrib_corrupt, setup.routed_corrupt = setup.capture(corrupt_ids, cols)
    setup.clean_metric = float(setup.metric(h_clean[:, cmpos])[0])
    setup.corrupt_metric = float(setup.metric(h_corr[:, mpos])[0])
    return setup


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _check_batch(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


@torch.no_grad()
def expert_patching(model, clean, corrupted, answer, wrong=None, layers=None, experts=None, positions=None,
                    clean_positions=None, metric_position: int = -1, batch_size: int = 32,
                    progress: bool = True) -> pd.DataFrame:
    """Restore each (layer, expert) unit alone from the clean run into the corrupted run (module doc).

    Columns: layer, expert, routed_clean / routed_corrupt (the router chose it at a patched position in that
    run), metric (patched corrupted run), effect (metric - corrupted metric), recovery (0 none, 1 full).
    attrs: clean_metric, corrupted_metric, metric ("logit_diff" | "logprob"), positions, forwards,
    interrupted. Cost: 2 + len(layers) * len(experts) forwards of the corrupted prompt, `batch_size` per
    call. Interrupting (KeyboardInterrupt) returns the units finished so far.
    """
    _check_batch(batch_size)
    layers, experts = _layers_experts(model.config, layers, experts)
    setup = patch_setup(model, clean, corrupted, answer, wrong, positions, clean_positions, metric_position)
    units = [(l, e) for l in layers for e in experts]
    metrics: list[float] = []
    interrupted = False
    with tqdm(total=len(units), desc="expert patching", disable=not progress) as bar:
        try:
            for chunk in _batches(units, batch_size):
                metrics.extend(setup.patched_metric([[u] for u in chunk]).tolist())
                bar.update(len(chunk))
        except KeyboardInterrupt:
            interrupted = True
    done = units[:len(metrics)]
    df = pd.DataFrame({
        "layer": [l for l, _ in done], "expert": [e for _, e in done],
        "routed_clean": [bool(setup.routed_clean[l][:, e].any()) for l, e in done],
        "routed_corrupt": [bool(setup.routed_corrupt[l][:, e].any()) for l, e in done],
        "metric": metrics})
    df["effect"] = df["metric"] - setup.corrupt_metric
    df["recovery"] = setup.recovery(df["metric"].to_numpy())
    df.attrs.update(clean_metric=setup.clean_metric, corrupted_metric=setup.corrupt_metric,
                    metric=setup.metric_name, positions=setup.positions, forwards=2 + len(done),
                    interrupted=interrupted)
    return df


@torch.no_grad()
def expert_coalition(model, clean, corrupted, answer, wrong=None, max_size: int = 8, candidates=None,
                     positions=None, clean_positions=None, metric_position: int = -1, stop_at: float | None = 0.95,
                     batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Greedy coalition search: grow the set of (layer, expert) units that, restored together, recover the
    clean metric most; each step adds the unit whose addition gives the highest recovery.

    candidates: a list of (layer, expert) pairs, or an `expert_patching` table (its units are tried in
    full), or None (every unit). Stops after `max_size` units, or once recovery >= stop_at (None: never).
    Rows (the curve of recovery vs coalition size): size (0 = corrupted run), layer, expert (the unit
    added), metric, recovery, coalition (the units so far, "L{l}E{e}"). attrs as expert_patching.
    Cost: 2 + sum over steps of the remaining candidates forwards (<= 2 + max_size * candidates).
    Interrupting returns the finished steps.
    """
    _check_batch(batch_size)
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
        raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
    if stop_at is not None and (not isinstance(stop_at, (int, float)) or isinstance(stop_at, bool)
                                or not np.isfinite(stop_at)):
        raise ValueError(f"stop_at must be None or a finite number (a recovery, e.g. 0.95), got {stop_at!r}")
    cfg = model.config
    if candidates is None:
        cand = [(l, e) for l in range(cfg.n_layers) for e in range(cfg.moe_num_experts)]
    elif isinstance(candidates, pd.DataFrame):
        cand = list(zip(candidates["layer"].astype(int), candidates["expert"].astype(int)))
    else:
        cand = [(int(l), int(e)) for l, e in candidates]
    if not cand:
        raise ValueError("candidates must not be empty")
    for l, e in cand:
        _layers_experts(cfg, [l], [e])
    cand = list(dict.fromkeys(cand))
    setup = patch_setup(model, clean, corrupted, answer, wrong, positions, clean_positions, metric_position)
    rows = [dict(size=0, layer=-1, expert=-1, metric=setup.corrupt_metric, recovery=0.0, coalition="")]
    chosen: list[tuple[int, int]] = []
    forwards, interrupted = 2, False
    steps = min(max_size, len(cand))
    with tqdm(total=sum(len(cand) - s for s in range(steps)), desc="coalition search",
              disable=not progress) as bar:
        try:
            for size in range(1, steps + 1):
                remaining = [u for u in cand if u not in chosen]
                metric = []
                for chunk in _batches(remaining, batch_size):
                    metric.extend(setup.patched_metric([chosen + [u] for u in chunk]).tolist())
                    bar.update(len(chunk))
                forwards += len(remaining)
                rec = setup.recovery(np.array(metric))
                best = int(np.nanargmax(rec)) if not np.all(np.isnan(rec)) else int(np.argmax(metric))
                chosen.append(remaining[best])
                rows.append(dict(size=size, layer=remaining[best][0], expert=remaining[best][1],
                                 metric=metric[best], recovery=float(rec[best]),
                                 coalition=" ".join(f"L{l}E{e}" for l, e in chosen)))
                if stop_at is not None and rec[best] >= stop_at:
                    break
        except KeyboardInterrupt:
            interrupted = True
    df = pd.DataFrame(rows)
    df.attrs.update(clean_metric=setup.clean_metric, corrupted_metric=setup.corrupt_metric,
                    metric=setup.metric_name, positions=setup.positions, forwards=forwards,
                    interrupted=interrupted, candidates=len(cand))
    return df


def attribution_patching(model, clean, corrupted, answer, wrong=None, layers=None, experts=None, positions=None,
                         clean_positions=None, metric_position: int = -1) -> pd.DataFrame:
    """Attribution patching: the first-order estimate of each unit's patching effect,
    effect(l, e) ~ sum over patched positions of grad_{ffn_out_l} metric . (clean contribution - corrupted
    contribution), the gradient taken in the corrupted run (through routing too: renormalised weights are
    differentiable, the top-k choice is not).

    Columns: layer, expert, attribution (estimated effect, metric units), recovery (attribution / (clean -
    corrupted metric)). Cost: 2 forwards + 1 forward and backward with the reference kernels (autograd);
    runs with gradients even when called under torch.inference_mode (the model's weights get no .grad).
    """
    layers, experts = _layers_experts(model.config, layers, experts)
    with reference_kernels(model):             # no scratch buffers: safe in and out of inference mode
        setup = patch_setup(model, clean, corrupted, answer, wrong, positions, clean_positions, metric_position)
    L = model.config.n_layers
    with torch.inference_mode(False), torch.enable_grad(), reference_kernels(model):
        leaves: dict[int, torch.Tensor] = {}

        def leaf(layer):
            def fn(x, hook):
                z = torch.zeros(x.shape, dtype=x.dtype, device=x.device, requires_grad=True)
                leaves[layer] = z
                return x + z
            return fn

        ids = setup.corrupt_ids.clone()
        hidden = final_hidden(model, ids, hooks=[(f"blocks.{i}.hook_ffn_out", leaf(i)) for i in range(L)])
        metric = setup.metric(hidden[:, setup.metric_position])[0]
        grads = torch.autograd.grad(metric, [leaves[i] for i in range(L)])
    rows = []
    for layer in layers:
        g = grads[layer][0, setup.positions].detach().float().cpu()                     # [P, d]
        delta = setup.contrib_clean[layer] - setup.contrib_corrupt[layer]               # [P, E, d]
        attr = torch.einsum("pd,ped->e", g, delta)
        rows += [dict(layer=layer, expert=e, attribution=float(attr[e])) for e in experts]
    df = pd.DataFrame(rows)
    gap = setup.clean_metric - setup.corrupt_metric
    df["recovery"] = df["attribution"] / gap if abs(gap) > 1e-9 else np.nan
    df.attrs.update(clean_metric=setup.clean_metric, corrupted_metric=setup.corrupt_metric,
                    metric=setup.metric_name, positions=setup.positions, forwards=3, backwards=1)
    return df


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        if j > i:
            ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def patching_agreement(exact: pd.DataFrame, approx: pd.DataFrame, top: int = 5) -> pd.Series:
    """How well attribution patching predicts exact patching over the same units.

    exact: `expert_patching` (uses `effect`); approx: `attribution_patching` (uses `attribution`).
    -> pearson, spearman (rank correlation of the effects), sign_agreement (share of units whose effect
    signs agree, among units with a nonzero exact effect), top_overlap (share of the `top` units by |effect|
    that both agree on), units.
    """
    m = exact.merge(approx[["layer", "expert", "attribution"]], on=["layer", "expert"])
    if len(m) < 2:
        raise ValueError("the two tables share fewer than 2 (layer, expert) units")
    x, y = m["effect"].to_numpy(float), m["attribution"].to_numpy(float)
    nz = np.abs(x) > 1e-12
    top = min(top, len(m))
    tx = set(np.argsort(-np.abs(x))[:top])
    ty = set(np.argsort(-np.abs(y))[:top])
    return pd.Series({"pearson": _corr(x, y), "spearman": _corr(_rank(x), _rank(y)),
                      "sign_agreement": float((np.sign(x[nz]) == np.sign(y[nz])).mean()) if nz.any() else np.nan,
                      "top_overlap": len(tx & ty) / top, "units": len(m)})
