"""Direct logit attribution per expert: which chosen experts push a target token's logit up or down."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["LogitAttribution", "logit_attribution"]


@dataclass
class LogitAttribution:
    """components: one row per (batch, position, component): component "embed" | "attn" | "expert", layer
    (-1 for embed), expert and rank (-1 unless an expert), weight (the expert's applied weight, else 1),
    contribution (logit units). totals: per (batch, position): the model's logit, attributed (sum of the
    contributions), error = logit - attributed, and the embed / attn / experts sums."""

    components: pd.DataFrame
    totals: pd.DataFrame

    def expert_matrix(self, batch: int = 0, position: int | None = None) -> pd.DataFrame:
        """layer x expert contributions at one position (default: the last attributed one); 0 = not chosen."""
        df = self.components
        df = df[(df["batch"] == batch) & (df["component"] == "expert")]
        if position is None:
            position = int(df["position"].max())
        df = df[df["position"] == position]
        if df.empty:
            raise ValueError(f"no attribution at batch {batch}, position {position}; attributed positions: "
                             f"{sorted(self.totals['position'].unique())}")
        return df.pivot_table(index="layer", columns="expert", values="contribution", fill_value=0.0)


def _positions(mask: torch.Tensor, positions) -> list[tuple[int, int]]:
    """(batch, column) pairs to attribute: None -> each row's last column, "all" -> every real token,
    int / list of ints -> those columns (negative counts from the end) in every row."""
    B, T = mask.shape
    if positions is None:
        return [(b, T - 1) for b in range(B)]
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions must be None, 'all', an int or a list of ints, got {positions!r}")
        return [(int(b), int(t)) for b, t in zip(*np.nonzero(mask.numpy()))]
    cols = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for t in cols:
        if not -T <= t < T:
            raise ValueError(f"position {t} out of range: valid columns are {-T}..{T - 1}")
        for b in range(B):
            if not mask[b, t % T]:
                raise ValueError(f"position {t} of batch row {b} is padding")
            out.append((b, t % T))
    return out


@torch.no_grad()
def logit_attribution(model, input_ids, target: int | str | None = None, positions=None,
                      attention_mask=None) -> LogitAttribution:
    """Each component's direct contribution to the logit of a target token.

    The final residual is x = embed + sum_l attn_out_l + sum_l sum_chosen w_e * expert_out_e, and the logit
    of token y is LN(x) . U_y with LN(x) = (x - mean(x)) * s * g, s = 1 / sqrt(var(x) + eps) (norm_f has no
    bias). Freezing s at this position's value makes the logit linear in the components: component c
    contributes ((c - mean(c)) * s * g) . U_y, and the contributions sum to the logit (up to float
    rounding; `totals.error`). With s frozen, the contributions show where the logit comes from, not what
    removing a component would do (that would change s too: use ablations for that).

    input_ids [B, T] (or [T]); attention_mask [B, T] (1 real, left padding).
    target: None -> the model's top prediction at each position; "next" -> the next input token;
        an int -> that token id everywhere.
    positions: None -> the last column; "all" -> every real token; an int or list of ints -> those columns.
    """
    ids = model.validate_input_ids(input_ids).cpu()
    B, T = ids.shape
    mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    pairs = _positions(mask, positions)
    if target == "next":
        pairs = [(b, t) for b, t in pairs if t + 1 < T]
        if not pairs:
            raise ValueError("target='next' needs a position with a following token")
    elif target is not None and not (isinstance(target, int) and 0 <= target < model.config.vocab_size):
        raise ValueError(f"target must be None, 'next' or a token id in [0, {model.config.vocab_size - 1}], "
                         f"got {target!r}")
    rows = torch.tensor([b * T + t for b, t in pairs])                                  # [S] flat token index
    L = model.config.n_layers
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(x: torch.Tensor, hook) -> None:
            flat = x.reshape(B * T, *x.shape[2:])                                       # [N, ...]
            kept[name] = flat[rows.to(flat.device)].detach().float().cpu()
        return fn

    names = ["hook_embed", f"blocks.{L - 1}.hook_resid_post"]
    for i in range(L):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.ffn.hook_expert_out",
                  f"blocks.{i}.ffn.hook_topk_experts", f"blocks.{i}.ffn.hook_topk_weights"]
    with model.hooks([(n, keep(n)) for n in names]):
        logits = model(ids, None if attention_mask is None else mask.long()).logits
    logits = logits.reshape(B * T, -1)[rows.to(logits.device)].float().cpu()           # [S, V]
    if target is None:
        targets = logits.argmax(-1)
    elif target == "next":
        targets = torch.tensor([int(ids[b, t + 1]) for b, t in pairs])
    else:
        targets = torch.full((len(pairs),), target)
    target_logit = logits.gather(-1, targets[:, None])[:, 0]                            # [S]

    x = kept[f"blocks.{L - 1}.hook_resid_post"]                                         # [S, d]
    norm_f = model.transformer.norm_f
    scale = (x.var(-1, unbiased=False, keepdim=True) + norm_f.eps).rsqrt()            # [S, 1]
    unembed = _weight(model.lm_head)                                                    # [V, d]
    direction = _weight(norm_f).float().cpu() * unembed[targets.to(unembed.device)].float().cpu()

    def contribution(c: torch.Tensor) -> torch.Tensor:
        """c [S, ..., d] -> [S, ...] logit units."""
        s, u = scale.view(-1, *[1] * (c.ndim - 1)), direction.view(c.shape[0], *[1] * (c.ndim - 2), -1)
        return ((c - c.mean(-1, keepdim=True)) * s * u).sum(-1)

    S = len(pairs)
    batch = np.array([b for b, _ in pairs])
    position = np.array([t for _, t in pairs])
    frames = [_rows(batch, position, "embed", -1, np.full((S, 1), -1), np.ones((S, 1)),
                    contribution(kept["hook_embed"])[:, None])]
    for i in range(L):
        frames.append(_rows(batch, position, "attn", i, np.full((S, 1), -1), np.ones((S, 1)),
                            contribution(kept[f"blocks.{i}.hook_attn_out"])[:, None]))
        w = kept[f"blocks.{i}.ffn.hook_topk_weights"]                                   # [S, k]
        e = kept[f"blocks.{i}.ffn.hook_topk_experts"].long()
        frames.append(_rows(batch, position, "expert", i, e.numpy(), w.numpy(),
                            contribution(kept[f"blocks.{i}.ffn.hook_expert_out"]) * w))
    components = pd.concat(frames, ignore_index=True)
    tok = model.tokenizer
    strings = np.asarray(tok.token_strings(targets.tolist()) if tok is not None else
                         [str(t) for t in targets.tolist()], dtype=object)
    components["target_id"] = targets.numpy()[components["_s"]]
    components["target"] = strings[components["_s"]]
    components = components.drop(columns="_s")[["batch", "position", "target_id", "target", "component",
                                                 "layer", "expert", "rank", "weight", "contribution"]]
    sums = components.groupby(["batch", "position", "component"])["contribution"].sum().unstack("component")
    totals = pd.DataFrame({"batch": batch, "position": position, "target_id": targets.numpy(), "target": strings,
                           "logit": target_logit.numpy()})
    totals = totals.join(sums.rename(columns={"expert": "experts"}), on=["batch", "position"])
    totals["attributed"] = totals[["embed", "attn", "experts"]].sum(1)
    totals["error"] = totals["logit"] - totals["attributed"]
    return LogitAttribution(components, totals)


def _weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's value, also when accelerate offloaded the module (the parameter is then on meta and its
    value in the module's AlignDevicesHook weights_map). Read-only: the module and its hooks are untouched,
    so this is safe while another thread runs the model."""
    param = getattr(module, name)
    if param.device.type != "meta":
        return param.detach()
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:                                 # SequentialHook or one hook
        weights_map = getattr(h, "weights_map", None)
        if weights_map is not None and getattr(h, "offload", False):
            return weights_map[name].to(param.dtype)
    raise ValueError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds its "
                     f"value: the model was built empty and never loaded")


def _rows(batch, position, component: str, layer: int, experts: np.ndarray, weights: np.ndarray,
          contrib: torch.Tensor) -> pd.DataFrame:
    """Rows for S positions x m slots: experts/weights/contrib [S, m]."""
    S, m = experts.shape
    return pd.DataFrame({"_s": np.repeat(np.arange(S), m), "batch": np.repeat(batch, m),
                         "position": np.repeat(position, m), "component": component, "layer": layer,
                         "expert": experts.reshape(-1),
                         "rank": np.tile(np.arange(m), S) if component == "expert" else -1,
                         "weight": weights.reshape(-1).astype(np.float64),
                         "contribution": contrib.reshape(-1).numpy().astype(np.float64)})
