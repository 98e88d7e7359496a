"""Ablations measured on text: loss change per (layer, expert), "drop the top-r experts" and "vary k" curves."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..interventions import ExpertAblation, Intervention, TopK

__all__ = ["DropTopExperts", "LossEvaluator", "ablation_sweep", "drop_top_curve", "top_k_curve"]


class DropTopExperts(Intervention):
    """Per token, remove its r most probable experts before top-k (their router logits -> -inf), so it is
    routed to the next k (renormalised as usual). r = 0 changes nothing; r <= E - k."""

    def __init__(self, r: int, layer="all", positions=None) -> None:
        super().__init__(layer, positions)
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"r must be an integer >= 0, got {r!r}")
        self.r = r

    def attach(self, cfg) -> None:
        super().attach(cfg)
        if self.r > cfg.moe_num_experts - cfg.moe_top_k:
            raise ValueError(f"r={self.r} out of range: valid r are 0..{cfg.moe_num_experts - cfg.moe_top_k} "
                             f"(E - k experts must remain)")

    def edit_logits(self, logits, layer, ctx):
        if self.r == 0:
            return logits
        top = logits.topk(self.r, dim=-1).indices                                        # [N, r]
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
        drop &= self.row_mask(ctx, logits.shape[0], logits.device)[:, None]
        return logits.masked_fill(drop, float("-inf"))

    def _fields(self):
        return [("r", str(self.r)), *super()._fields()]


def encode_texts(model, texts) -> list[list[int]]:
    """Strings (encoded with the model's tokenizer), lists of token ids, or a LongTensor [B, T] -> id lists."""
    if isinstance(texts, torch.Tensor):
        texts = (texts[None] if texts.ndim == 1 else texts).tolist()
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError("texts must be a non-empty list of strings or of token-id lists")
    rows = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            if model.tokenizer is None:
                from ..tokenizer import load_tokenizer

                model.tokenizer = load_tokenizer()
            text = model.tokenizer.encode(text)
        rows.append([int(t) for t in text])
    return rows


class LossEvaluator:
    """Mean next-token cross-entropy (nats per predicted token) of a model on fixed texts; the baseline
    (no intervention) is computed once and kept, so sweeps compare against the same pass.

    texts: see `encode_texts`; each needs >= 2 tokens and at most max_seq_len. Texts are batched by length
    (left padding, padding never predicted nor predicting).
    """

    def __init__(self, model, texts, batch_size: int = 4) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model
        rows = encode_texts(model, texts)
        limit = model.config.max_seq_len
        for i, row in enumerate(rows):
            if not 2 <= len(row) <= limit:
                raise ValueError(f"text {i} has {len(row)} tokens: need 2..{limit} (max_seq_len)")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        self.batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for start in range(0, len(rows), batch_size):
            group = [rows[i] for i in order[start:start + batch_size]]
            T = max(len(r) for r in group)
            ids = torch.zeros(len(group), T, dtype=torch.long)
            mask = torch.zeros(len(group), T, dtype=torch.long)
            for b, r in enumerate(group):
                ids[b, T - len(r):] = torch.tensor(r)
                mask[b, T - len(r):] = 1
            self.batches.append((ids, None if bool(mask.all()) else mask))
        self.n_targets = sum(len(r) - 1 for r in rows)
        self._baseline: torch.Tensor | None = None

    @torch.no_grad()
    def token_losses(self, *interventions: Intervention) -> torch.Tensor:
        """Cross-entropy of every predicted token [n_targets] (float32), under the interventions."""
        out = []
        with self.model.intervene(*interventions):
            for ids, mask in self.batches:
                logits = self.model(ids, mask).logits[:, :-1]                              # [B, T-1, V]
                valid = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else \
                    (mask[:, :-1] & mask[:, 1:]).bool()
                target = ids[:, 1:].to(logits.device)[valid.to(logits.device)]
                out.append(F.cross_entropy(logits[valid.to(logits.device)].float(), target, reduction="none").cpu())
        return torch.cat(out)

    @property
    def baseline(self) -> torch.Tensor:
        """Per-token losses without interventions [n_targets] (computed on first use, then cached)."""
        if self._baseline is None:
            self._baseline = self.token_losses()
        return self._baseline

    @property
    def baseline_loss(self) -> float:
        return float(self.baseline.mean())

    def loss(self, *interventions: Intervention) -> float:
        return float(self.token_losses(*interventions).mean()) if interventions else self.baseline_loss

    def delta(self, *interventions: Intervention) -> float:
        """Loss under the interventions minus the baseline loss (nats per token; > 0: the model got worse)."""
        return self.loss(*interventions) - self.baseline_loss


def _evaluator(model, texts, batch_size: int) -> LossEvaluator:
    if isinstance(texts, LossEvaluator):
        if texts.model is not model:
            raise ValueError("the LossEvaluator was built for another model")
        return texts
    return LossEvaluator(model, texts, batch_size)


def ablation_sweep(model, texts, mode: str = "reroute", layers: Sequence[int] | None = None,
                   experts: Sequence[int] | None = None, batch_size: int = 4, progress: bool = True) -> pd.DataFrame:
    """Loss change from ablating each expert alone: a layer x expert matrix.

    Cell (l, e) = mean next-token cross-entropy on `texts` with ExpertAblation(l, [e], mode) minus the
    baseline's (nats per token; the baseline pass runs once). A random expert's expected cell is the row
    mean; 0 means the expert does not matter for these texts. mode: "reroute" | "zero" | "renormalize"
    (see ExpertAblation). texts: strings, token-id lists, or a LossEvaluator to reuse its cached baseline.
    attrs: baseline_loss, mode, n_targets.
    """
    cfg = model.config
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    experts = list(range(cfg.moe_num_experts)) if experts is None else list(experts)
    ExpertAblation(layers, experts, mode).attach(cfg)                                # validates the arguments
    ev = _evaluator(model, texts, batch_size)
    base = ev.baseline_loss
    table = pd.DataFrame(0.0, index=pd.Index(layers, name="layer"), columns=pd.Index(experts, name="expert"))
    with tqdm(total=len(layers) * len(experts), desc=f"ablation sweep ({mode})", disable=not progress) as bar:
        for layer in layers:
            for e in experts:
                table.loc[layer, e] = ev.loss(ExpertAblation(layer, [e], mode)) - base
                bar.update()
    table.attrs.update(baseline_loss=base, mode=mode, n_targets=ev.n_targets)
    return table


def _curve(ev: LossEvaluator, name: str, values: list[int], make, progress: bool) -> pd.DataFrame:
    base = ev.baseline_loss
    losses = [ev.loss(make(v)) for v in tqdm(values, desc=f"{name} curve", disable=not progress)]
    return pd.DataFrame({name: values, "loss": losses, "delta": [x - base for x in losses],
                         "baseline_loss": base})


def drop_top_curve(model, texts, r_values: Sequence[int] | None = None, layer="all", batch_size: int = 4,
                   progress: bool = True) -> pd.DataFrame:
    """Loss when every token loses its r most probable experts (DropTopExperts(r, layer)) and is routed to
    the next k. Columns: r, loss, delta (loss - baseline, nats per token), baseline_loss. r = 0 is the
    baseline; a model whose experts were interchangeable would stay flat. r_values default 0..E-k."""
    cfg = model.config
    r_values = list(range(cfg.moe_num_experts - cfg.moe_top_k + 1) if r_values is None else r_values)
    for r in r_values:
        DropTopExperts(r, layer).attach(cfg)
    return _curve(_evaluator(model, texts, batch_size), "r", r_values, lambda r: DropTopExperts(r, layer),
                  progress)


def top_k_curve(model, texts, k_values: Sequence[int] | None = None, layer="all", batch_size: int = 4,
                progress: bool = True) -> pd.DataFrame:
    """Loss when each token uses k experts (TopK(k, layer)) instead of the trained top_k. Columns: k, loss,
    delta (loss - baseline at the trained k, nats per token), baseline_loss. k_values default 1..E."""
    k_values = list(range(1, model.config.moe_num_experts + 1) if k_values is None else k_values)
    for k in k_values:
        TopK(k, layer).attach(model.config)
    return _curve(_evaluator(model, texts, batch_size), "k", k_values, lambda k: TopK(k, layer), progress)
