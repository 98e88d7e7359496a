"""Logit lens: the next-token distribution the residual stream holds after each layer (nostalgebraist 2020)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["LogitLens", "logit_lens"]

EMBED = -1          # the layer number of the embeddings (hook_embed) in every lens table


@dataclass
class LogitLens:
    """table: one row per (layer, position) of the batch row read: batch, layer (-1 = embeddings), position
    (absolute column), token_id, token (the input token there), target_id, target (the next input token),
    prob, log_prob and rank (1 = top; ties share the best rank) of the target under that layer's lens,
    top_id, top_token, top_prob (the layer's top-1 guess). A position with no next token (the last column)
    has target_id -1, target None, prob and log_prob NaN, rank -1. The columns include
    dbrx_lab.figures_effects.LENS_COLUMNS, so `figures_effects.logit_lens_heatmap(lens.table)` draws it.
    top: one row per (layer, position, rank) for ranks 1..top_n: batch, layer, position, rank, token_id, token,
    prob, log_prob, is_target (the token is the next input token).
    logits: [layers read, positions read, vocab] float32 lens logits when asked for (keep_logits=True), in the
    order of `layers` and `positions`; else None."""

    table: pd.DataFrame
    top: pd.DataFrame
    layers: list[int]
    positions: list[int]
    logits: torch.Tensor | None = None

    def top_tokens(self, position: int | None = None) -> pd.DataFrame:
        """The top-n guesses of every layer at one position (default: the last one read), with attrs position,
        token and target (when there is one) for `figures_effects.lens_top_tokens`."""
        if position is None:
            position = self.positions[-1]
        if position not in self.positions:
            raise ValueError(f"position {position!r} was not read; positions read: {self.positions}")
        top = self.top[self.top["position"] == position].reset_index(drop=True)
        row = self.table[self.table["position"] == position].iloc[0]
        top.attrs.update(position=int(position), token=row["token"])
        if row["target_id"] >= 0:
            top.attrs["target"] = row["target"]
        return top


def _layers(layers, n_layers: int) -> list[int]:
    """None -> embeddings and every block; an int, "embed" or a list of them -> those (-1 = embeddings)."""
    valid = f"valid layers are -1 (the embeddings, also 'embed') to {n_layers - 1}"
    if layers is None:
        return list(range(EMBED, n_layers))
    items = [layers] if isinstance(layers, (int, str, np.integer)) else list(layers)
    if not items:
        raise ValueError(f"layers is empty; {valid}")
    out = []
    for layer in items:
        if layer == "embed":
            layer = EMBED
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not EMBED <= layer < n_layers:
            raise ValueError(f"layer {layer!r} out of range: {valid}")
        if int(layer) not in out:
            out.append(int(layer))
    return sorted(out)


def _positions(real: torch.Tensor, positions, batch: int) -> list[int]:
    """Columns of one batch row to read: None -> every real (non-padding) column; an int or list of ints ->
    those columns (negative counts from the end), each of which must be a real token."""
    T = real.shape[0]
    if positions is None:
        return [int(t) for t in torch.nonzero(real)[:, 0]]
    items = [positions] if isinstance(positions, (int, np.integer)) else list(positions)
    if not items:
        raise ValueError(f"positions is empty; valid columns are {-T} to {T - 1}")
    out = []
    for t in items:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not -T <= t < T:
            raise ValueError(f"position {t!r} out of range: valid columns are {-T} to {T - 1}")
        t = int(t) % T
        if not real[t]:
            first = int(torch.nonzero(real)[0, 0])
            raise ValueError(f"position {t} of batch row {batch} is padding; its real tokens are columns "
                             f"{first} to {T - 1}")
        if t not in out:
            out.append(t)
    return sorted(out)


@torch.no_grad()
def logit_lens(model, ids_or_text, positions=None, layers=None, top_n: int = 5, batch: int = 0,
               attention_mask=None, keep_logits: bool = False) -> LogitLens:
    """Read the residual stream after each layer with the model's own final norm and unembedding:
    lens_l = lm_head(norm_f(resid_l)), resid_l = `hook_embed` for layer -1 and `blocks.{l}.hook_resid_post`
    for block l. The last block's lens is the model's output (the same modules on the same tensor: equal to
    the logits bit for bit). Earlier layers were never trained to be read this way, so their distributions
    are only a rough view of what the stream encodes (a tuned lens fits a map per layer instead).

    One forward over the whole input; the residuals are captured with read-only hooks attached for that call
    only (removed on exit, also on error), so the model's outputs are unchanged. Works under
    torch.inference_mode and on dispatched or offloaded models (norm_f and lm_head are called as modules).

    ids_or_text: token ids [B, T] or [T], a string, or a list of strings (tokenized with model.tokenizer and
        left-padded). attention_mask [B, T] (1 real, 0 padding, left padding) for padded ids.
    batch: the batch row to read (the forward runs the whole batch, as given).
    positions: None -> every real token of that row; an int or list of ints -> those columns (negative counts
        from the end); padding columns are refused. Position t's target is the input token at t + 1.
    layers: None -> -1 (embeddings) and every block; an int, "embed" or a list of them.
    top_n: how many top guesses per (layer, position) go into `top`.
    keep_logits: also return the lens logits [layers, positions, vocab] in float32.
    """
    from ..generation import prepare_prompt                   # late: generation imports the model stack

    ids, mask = prepare_prompt(model, ids_or_text, attention_mask)
    ids = ids.cpu()
    B, T = ids.shape
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 0 <= batch < B:
        raise ValueError(f"batch {batch!r} out of range: the input has {B} row(s), valid rows are 0 to {B - 1}")
    batch = int(batch)
    V = model.config.vocab_size
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or not 1 <= top_n <= V:
        raise ValueError(f"top_n must be an int from 1 to the vocabulary size {V}, got {top_n!r}")
    real = torch.ones(T, dtype=torch.bool) if mask is None else mask[batch].cpu().bool()
    cols = _positions(real, positions, batch)
    read = _layers(layers, model.config.n_layers)
    names = {layer: "hook_embed" if layer == EMBED else f"blocks.{layer}.hook_resid_post" for layer in read}

    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def fn(x: torch.Tensor, hook) -> None:                  # read-only: returns None, stores a copy
            kept[layer] = x[batch:batch + 1].detach().clone()   # [1, T, d]
        return fn

    with model.hooks([(names[layer], keep(layer)) for layer in read]):
        model(ids, mask)
    missing = [names[layer] for layer in read if layer not in kept]
    if missing:
        raise RuntimeError(f"the forward never reached hook points {missing}")

    index = torch.tensor(cols)
    has_next = index + 1 < T
    target = torch.where(has_next, ids[batch, (index + 1).clamp(max=T - 1)], torch.tensor(-1))   # [P]
    gather = target.clamp(min=0)[:, None]
    k = int(top_n)
    rows_lens, rows_top, all_logits = [], [], []
    for layer in read:
        x = kept.pop(layer)
        with model._lock if model.dispatched() else nullcontext():     # accelerate swaps weights per call
            logits = model.lm_head(model.transformer.norm_f(x))[0]      # [T, V] the way the model computes them
        logits = logits[index.to(logits.device)].float().cpu()          # [P, V]
        if keep_logits:
            all_logits.append(logits)
        logp = logits.log_softmax(-1)
        lp_target = logp.gather(-1, gather)[:, 0]                       # [P]
        rank = (logp > lp_target[:, None]).sum(-1) + 1
        top_lp, top_id = logp.topk(k, dim=-1)                           # [P, k] descending
        lp_target = torch.where(has_next, lp_target, torch.tensor(float("nan")))
        rows_lens.append(dict(layer=layer, lp=lp_target, rank=torch.where(has_next, rank, -1),
                              top_id=top_id[:, 0], top_lp=top_lp[:, 0]))
        rows_top.append(dict(layer=layer, top_id=top_id, top_lp=top_lp))

    strings = _strings(model, ids[batch].tolist())
    P, n = len(cols), len(read)
    layer_col = np.repeat(np.array(read), P)
    position = np.tile(np.array(cols), n)
    target_np = np.tile(target.numpy(), n)
    lp = torch.cat([r["lp"] for r in rows_lens]).numpy().astype(np.float64)
    top1_id = torch.cat([r["top_id"] for r in rows_lens]).numpy()
    table = pd.DataFrame({
        "batch": batch, "layer": layer_col, "position": position,
        "token_id": ids[batch, position].numpy(), "token": [strings[t] for t in position],
        "target_id": target_np,
        "target": pd.Series([strings[t + 1] if t + 1 < T else None for t in position], dtype=object),
        "prob": np.exp(lp), "log_prob": lp,
        "rank": torch.cat([r["rank"] for r in rows_lens]).numpy().astype(np.int64),
        "top_id": top1_id, "top_token": _strings(model, top1_id.tolist()),
        "top_prob": np.exp(torch.cat([r["top_lp"] for r in rows_lens]).numpy().astype(np.float64)),
    })
    top_ids = torch.cat([r["top_id"] for r in rows_top]).reshape(-1).numpy()            # [n * P * k]
    top_lp = torch.cat([r["top_lp"] for r in rows_top]).reshape(-1).numpy().astype(np.float64)
    top = pd.DataFrame({
        "batch": batch, "layer": np.repeat(layer_col, k), "position": np.repeat(position, k),
        "rank": np.tile(np.arange(1, k + 1), n * P), "token_id": top_ids, "token": _strings(model, top_ids.tolist()),
        "prob": np.exp(top_lp), "log_prob": top_lp, "is_target": top_ids == np.repeat(target_np, k),
    })
    return LogitLens(table, top, read, cols, torch.stack(all_logits) if keep_logits else None)


def _strings(model, ids: list[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    return list(tok.token_strings(ids)) if tok is not None else [str(i) for i in ids]
