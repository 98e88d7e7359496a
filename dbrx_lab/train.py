"""Training support for DBRX in dbrx-lab, and `dbrx-lab train-demo`, which trains the bundled demo model.

Losses (all averaged over layers; router logits per layer are [N, E] for N tokens):
  load balancing  DBRX/MegaBlocks/Switch form  E * sum_e f_e * P_e, f_e = share of the N*k top-k slots that
                  went to expert e, P_e = mean router probability of e. Equals 1 at perfect balance.
                  Weighted by `moe_loss_weight`.
  router z-loss   mean over tokens of logsumexp(logits)^2 (ST-MoE), weighted by `moe_z_loss_weight`.
Router jitter (`moe_jitter_eps`) is applied by `model.Router` in training mode.

Compact vocabulary (exact, cheaper full softmax): ~26k of the 100352 ids occur at least 3 times in the
demo corpus. Training runs a DbrxLM whose vocabulary is those ids plus one shared "rest" id that stands
for all others (in wte and lm_head), so the full softmax over 100352 rows equals a softmax over the
compact rows with log(n_rest) added to the rest logit. That is ~4x fewer softmax rows, and AdamW updates
~4x fewer embedding rows. Exporting copies the rest row into every other id's row: the saved model's full
softmax is exactly the one that was trained.

Threads: on an idle 2-core machine 2 torch threads run a step ~1.6x faster than 1; on a machine busy with
other jobs 2 threads ran ~3x slower than 1 (spin-waiting), hence `--threads`. The log records the threads
and the load average, and the model card reports them.

Mixed precision: bf16 autocast (`--amp`) is available but off: on the 2-core AMD EPYC (Zen 3, AVX2, no
AVX512-BF16/AMX) it made the lm_head + cross-entropy step ~20x slower than float32 (150 s vs 7 s for 2048
tokens over 100352 rows, measured under the same load), so float32 is the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import DbrxConfig
from .lm import DbrxLM

__all__ = ["load_balancing_loss", "router_z_loss", "router_margin_loss", "router_decisiveness", "router_logits_of",
           "set_router_temperature", "fold_router_temperature", "init_from_folder", "TrainConfig", "DEMO_CONFIG", "VocabShortlist", "train",
           "export_demo", "write_model_card", "add_arguments", "run"]

DEMO_CONFIG = DbrxConfig(d_model=64, n_heads=4, kv_n_heads=2, n_layers=4, ffn_hidden_size=160, max_seq_len=512,
                         clip_qkv=8.0, rope_theta=10000.0, moe_num_experts=16, moe_top_k=4,
                         moe_jitter_eps=0.01, moe_loss_weight=0.05, moe_z_loss_weight=0.001,
                         torch_dtype="bfloat16")
MAX_DEMO_BYTES = 32_000_000
ENDOFTEXT = 100257


# ------------------------------------------------------------------------------------------------
# MoE auxiliary losses
def _stack_layers(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(router_logits, torch.Tensor):
        return router_logits[None] if router_logits.ndim == 2 else router_logits
    if len(router_logits) == 0:
        raise ValueError("router_logits is empty: give one [N, E] tensor per layer")
    return torch.stack(list(router_logits))                                      # [L, N, E]


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int, n_experts: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DBRX's load-balancing loss: mean over layers of E * sum_e f_e * P_e (1.0 at perfect balance).

    router_logits: per layer [N, E] (or [L, N, E]); attention_mask [B, T] with N = B*T (1 real, 0 padding)
    keeps padding out of both f and P. f_e: fraction of the N*top_k routed slots that chose e (top-k of the
    softmax, no gradient); P_e: mean softmax probability of e (carries the gradient). Returns a scalar.
    """
    logits = _stack_layers(router_logits)
    L, N, E = logits.shape
    if E != n_experts:
        raise ValueError(f"router logits have {E} experts, expected n_experts={n_experts}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must be in [1, {n_experts}], got {top_k}")
    probs = torch.softmax(logits.float(), dim=-1)                                # [L, N, E]
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, E).sum(-2).float()     # [L, N, E] 0/1
    if attention_mask is None:
        weight = torch.full((N,), 1.0 / N, device=logits.device)
    else:
        mask = attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
        if mask.numel() != N:
            raise ValueError(f"attention_mask has {mask.numel()} positions but router logits have N={N} tokens")
        weight = mask / mask.sum().clamp(min=1.0)
    f = torch.einsum("lne,n->le", chosen, weight) / top_k                        # [L, E], sums to 1
    P = torch.einsum("lne,n->le", probs, weight)                                 # [L, E]
    return (E * (f * P).sum(-1)).mean()


def router_margin_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Top-k boundary: mean over layers and tokens of softplus(l_(k+1) - l_(k)), the logistic loss on the gap
    between the router's k-th and (k+1)-th largest logits (ln 2 at a tie, -> 0 as the gap grows).

    Not part of DBRX's recipe: the language-model loss gives the router no signal at that boundary (only the
    chosen k experts' weights get gradient), so a DBRX-recipe router leaves its k-th and (k+1)-th experts
    nearly tied. The demo adds this with a small weight so its routers decide which k experts they pick.
    """
    logits = _stack_layers(router_logits).float()
    E = logits.shape[-1]
    if not 1 <= top_k < E:
        raise ValueError(f"top_k must be in [1, {E - 1}] (a (k+1)-th expert must exist), got {top_k}")
    top = logits.topk(top_k + 1, dim=-1).values                                  # [L, N, k+1] descending
    return F.softplus(top[..., top_k] - top[..., top_k - 1]).mean()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over layers and tokens of logsumexp(logits)^2; logits per layer [N, E]."""
    logits = _stack_layers(router_logits)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# ------------------------------------------------------------------------------------------------
class VocabShortlist:
    """Maps the vocabulary onto a compact one: the ids seen in training (`ids`, [S]) keep their own rows and
    every other id shares one "rest" row (`size` = S, or S+1 when some ids are unseen).

    Training runs a DbrxLM whose vocab_size is `size` on `to_compact(ids)`; `loss` adds log(n_rest) to the
    rest logit, so it is the exact CE of the full model that `expand` builds (every unseen id gets a copy of
    the rest row in wte and lm_head).
    """

    def __init__(self, seen_ids: np.ndarray | torch.Tensor, vocab_size: int, min_count: int = 1) -> None:
        seen_ids = np.asarray(seen_ids).reshape(-1)
        if seen_ids.size == 0 or seen_ids.min() < 0 or seen_ids.max() >= vocab_size:
            raise ValueError(f"seen ids must be a non-empty array of ids in [0, {vocab_size})")
        counts = np.bincount(seen_ids, minlength=vocab_size)
        ids = torch.as_tensor(np.flatnonzero(counts >= min_count), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"no id occurs at least min_count={min_count} times")
        self.ids, self.vocab_size = ids, vocab_size
        seen = torch.zeros(vocab_size, dtype=torch.bool)
        seen[ids] = True
        self.rest = (~seen).nonzero().squeeze(1)                                 # [n_rest]
        self.size = ids.numel() + (1 if self.rest.numel() else 0)
        self.column = torch.full((vocab_size,), ids.numel(), dtype=torch.long)   # full id -> compact row
        self.column[ids] = torch.arange(ids.numel())
        self.logit_bias = torch.zeros(self.size)                                 # [size]
        if self.rest.numel():
            self.logit_bias[-1] = math.log(self.rest.numel())

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary ids (any shape) -> compact ids in [0, size)."""
        return self.column.to(ids.device)[ids]

    def loss(self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Exact next-token CE (nats) of the expanded model: h [N, d], compact lm_head weight [size, d],
        targets [N] full-vocabulary ids."""
        cols = self.to_compact(targets)
        bias = self.logit_bias.to(device=h.device, dtype=h.dtype)
        logits = torch.addmm(bias, h, weight.T).float()                          # [N, size]
        ce = F.cross_entropy(logits, cols, reduction="none") + bias.float()[cols]
        return ce.mean() if reduction == "mean" else ce

    def expand_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Compact rows [size, d] -> full-vocabulary rows [vocab_size, d] (unseen ids copy the rest row)."""
        return weight[self.column.to(weight.device)]

    @torch.no_grad()
    def expand(self, model: DbrxLM) -> DbrxLM:
        """The full-vocabulary DbrxLM equal to the compact `model` on every input."""
        cfg = dataclasses.replace(model.config, vocab_size=self.vocab_size)
        with torch.device("meta"):
            full = DbrxLM(cfg)
        state = dict(model.state_dict())
        for name in ("transformer.wte.weight", "lm_head.weight"):
            state[name] = self.expand_rows(state[name])
        full.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            full.lm_head.weight = full.transformer.wte.weight
        return full.train(model.training)


def final_hidden(model: DbrxLM, input_ids: torch.Tensor):
    """input_ids [B, T] -> (hidden [B, T, d] after norm_f, router logits per layer [N, E]); lm_head skipped."""
    head = model.lm_head
    head.forward = lambda x: x                                                   # instance override
    try:
        out = model(input_ids, output_router_logits=True)
    finally:
        del head.forward
    return out.logits, out.router_logits


# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The deterministic recipe: AdamW, linear warm-up then cosine decay to `min_lr_ratio` * lr."""

    steps: int = 1800
    batch_size: int = 8             # sequences per step, half prose and half code
    seq_len: int = 256
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 2           # val sequences per domain = eval_batches * batch_size / 2
    save_every: int = 25
    min_count: int = 3              # ids seen fewer times in training share the lm_head "rest" row
    amp: bool = False
    router_temperature: float = 1.0  # training-time router weight = stored / T (folded into the export)
    router_scale: float = 1.0        # router weights multiplied by this before training (initial or loaded)
    router_margin_weight: float = 0.0  # weight of router_margin_loss (0: DBRX's own recipe)
    init_from: str | None = None     # a DBRX folder of the same shape to start from (e.g. an earlier demo)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class _Scaled(torch.nn.Module):
    """Parametrization weight = stored * scale: a router temperature that AdamW sees as a larger step on
    the router's logits (Adam's update size does not scale with the gradient), folded into the weight on export."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.scale                    # registering keeps the router's current weight (and function)


def set_router_temperature(model: DbrxLM, temperature: float, scale: float = 1.0) -> None:
    """Train the routers at `temperature`: their weight becomes a stored parameter / T, so AdamW moves the router
    logits 1/T times faster (< 1: faster-moving routers); the model's current function is kept. `scale` first
    multiplies the router weights (e.g. > 1 sharpens a loaded model's routing at the start). 1.0, 1.0: plain."""
    from torch.nn.utils import parametrize

    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"router temperature must be a finite number > 0, got {temperature}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"router scale must be a finite number > 0, got {scale}")
    if scale != 1.0:
        with torch.no_grad():
            for block in model.transformer.blocks:
                block.ffn.router.layer.weight.mul_(scale)
    if temperature != 1.0:
        for block in model.transformer.blocks:
            parametrize.register_parametrization(block.ffn.router.layer, "weight", _Scaled(1.0 / temperature))


def fold_router_temperature(model: DbrxLM) -> DbrxLM:
    """Replace each router's parametrization by its value (stored / T): a plain DBRX with the same logits."""
    from torch.nn.utils import parametrize

    for block in model.transformer.blocks:
        if parametrize.is_parametrized(block.ffn.router.layer):
            parametrize.remove_parametrizations(block.ffn.router.layer, "weight", leave_parametrized=True)
    return model


@torch.no_grad()
def init_from_folder(model: DbrxLM, shortlist: "VocabShortlist", folder: str | Path) -> None:
    """Copy a saved full-vocabulary DBRX of the same shape into the compact `model` (its rows at the
    shortlist's ids; the shared rest row from an unseen id), so training continues from it."""
    from .loading import load_model

    src = load_model(folder, dtype=torch.float32)
    mine, theirs = dataclasses.asdict(model.config), dataclasses.asdict(src.config)
    diff = [k for k in mine if k not in ("vocab_size", "moe_loss_weight", "moe_z_loss_weight", "moe_jitter_eps",
                                         "torch_dtype") and mine[k] != theirs.get(k)]
    if diff or src.config.vocab_size != shortlist.vocab_size:
        raise ValueError(f"--init-from {folder}: its config differs from the model being trained in "
                         f"{diff or ['vocab_size']}; start from a model of the same shape")
    rows = torch.cat([shortlist.ids, shortlist.rest[:1]])                         # compact row -> full id
    state = src.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        state[name] = state[name][rows]
    model.load_state_dict(state, strict=True)


def batch_at(streams: dict[str, np.ndarray], step: int, tcfg: TrainConfig) -> torch.Tensor:
    """Token windows [B, T+1] for `step`: B/2 from each domain at offsets drawn from (seed, step) only."""
    g = np.random.default_rng([tcfg.seed, step])
    half = tcfg.batch_size // 2
    rows = []
    for i, domain in enumerate(("prose", "code")):
        s = streams[domain]
        n = half if i == 0 else tcfg.batch_size - half
        starts = g.integers(0, s.size - tcfg.seq_len - 1, size=n)
        rows += [s[a:a + tcfg.seq_len + 1] for a in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def val_windows(stream: np.ndarray, n: int, seq_len: int) -> torch.Tensor | None:
    """n evenly spaced windows [n, T+1] of a validation stream (fixed across steps); T shrinks to fit a short
    stream; None when the stream has fewer than 2 tokens."""
    if stream.size < 2:
        return None
    seq_len = min(seq_len, stream.size - 1)
    starts = np.linspace(0, stream.size - seq_len - 1, n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[a:a + seq_len + 1] for a in starts]).astype(np.int64))


def make_optimizer(model: DbrxLM, tcfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=tcfg.lr, betas=tcfg.betas, foreach=True)


def training_loss(model: DbrxLM, batch: torch.Tensor, shortlist: VocabShortlist, amp: bool = False,
                  margin_weight: float = 0.0):
    """Compact `model` (vocab_size = shortlist.size), batch [B, T+1] full-vocabulary ids
    -> (total loss, {"lm", "lb", "z", "margin"} floats); `margin_weight` weights `router_margin_loss`."""
    cfg = model.config
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        h, router_logits = final_hidden(model, shortlist.to_compact(batch[:, :-1]))
        lm = shortlist.loss(h.reshape(-1, h.shape[-1]), model.lm_head.weight, batch[:, 1:].reshape(-1))
    lb = load_balancing_loss(router_logits, cfg.moe_top_k, cfg.moe_num_experts)
    z = router_z_loss(router_logits)
    margin = router_margin_loss(router_logits, cfg.moe_top_k)
    total = lm + cfg.moe_loss_weight * lb + cfg.moe_z_loss_weight * z + margin_weight * margin
    return total, {"lm": lm.item(), "lb": lb.item(), "z": z.item(), "margin": margin.item()}


@torch.no_grad()
def evaluate(model: DbrxLM, windows: dict[str, torch.Tensor], shortlist: VocabShortlist,
             chunk: int = 8) -> dict[str, float]:
    """Mean exact CE (nats/token) per domain of the compact `model` on fixed windows [n, T+1] of full ids."""
    was_training = model.training
    model.eval()
    out = {}
    for domain, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, len(w), chunk):
            b = w[i:i + chunk]
            h, _ = final_hidden(model, shortlist.to_compact(b[:, :-1]))
            ce = shortlist.loss(h.reshape(-1, h.shape[-1]), model.lm_head.weight, b[:, 1:].reshape(-1), "none")
            total, count = total + ce.sum().item(), count + ce.numel()
        out[domain] = total / count
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# resumable checkpoints: safetensors (model + AdamW moments) + JSON (step, configs); no pickle
def save_checkpoint(folder: Path, model: DbrxLM, opt: torch.optim.AdamW, step: int, tcfg: TrainConfig,
                    elapsed_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().reshape(-1).clone() \
                    if key == "step" else value.detach().contiguous()
    tmp = folder / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    meta = {"step": step, "elapsed_s": elapsed_s, "train_config": dataclasses.asdict(tcfg),
            "model_config": model.config.to_dict()}
    (folder / "state.json.tmp").write_text(json.dumps(meta, indent=2))
    tmp.replace(folder / "state.safetensors")
    (folder / "state.json.tmp").replace(folder / "state.json")


def load_checkpoint(folder: Path, model: DbrxLM, opt: torch.optim.AdamW) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"model.{n}"])
    for n, p in model.named_parameters():
        state = {key.rsplit(".", 1)[1]: t for key, t in tensors.items()
                 if key.startswith(f"optim.{n}.") and key.count(".") == n.count(".") + 2}
        if state:
            state["step"] = state["step"].reshape(())
            opt.state[p] = state
    return meta


# ------------------------------------------------------------------------------------------------
def train(out: str | Path, tcfg: TrainConfig, model_cfg: DbrxConfig, corpus, resume: bool = False,
          progress: bool = True, time_limit_s: float | None = None) -> DbrxLM:
    """Train on `corpus` (demo_data.Corpus) -> the full-vocabulary model (`.shortlist` attached); writes
    `out`/checkpoint/ (the compact model and AdamW state) and `out`/training_log.jsonl.

    Every step is a function of (seed, step) only (data offsets, router jitter), so a run resumed from a
    checkpoint continues exactly as the uninterrupted run. Stops early (resumable) after `time_limit_s`.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    ckpt, log_path = out / "checkpoint", out / "training_log.jsonl"
    streams = {d: corpus.stream(d, "train") for d in ("prose", "code")}
    for d, s in streams.items():
        if s.size < tcfg.seq_len + 2:
            raise ValueError(f"{d} training stream has {s.size} tokens; need more than seq_len+1={tcfg.seq_len + 1}")
    shortlist = VocabShortlist(np.concatenate(list(streams.values())), model_cfg.vocab_size, tcfg.min_count)
    n_val = max(1, tcfg.eval_batches * tcfg.batch_size // 2)
    windows = {d: val_windows(corpus.stream(d, "val"), n_val, tcfg.seq_len) for d in ("prose", "code")}
    windows = {d: w for d, w in windows.items() if w is not None}

    torch.manual_seed(tcfg.seed)
    model = DbrxLM(dataclasses.replace(model_cfg, vocab_size=shortlist.size)).float()
    if tcfg.init_from:
        init_from_folder(model, shortlist, tcfg.init_from)
    set_router_temperature(model, tcfg.router_temperature, tcfg.router_scale)
    model.train()
    opt = make_optimizer(model, tcfg)
    start, elapsed = 0, 0.0
    if resume and (ckpt / "state.json").is_file():
        meta = load_checkpoint(ckpt, model, opt)
        start, elapsed = meta["step"], meta["elapsed_s"]
    elif resume:
        print(f"no checkpoint in {ckpt}; starting from step 0", file=sys.stderr)
    if start == 0:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    else:  # drop log lines past the checkpoint (written before an interruption)
        lines = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] < start]
        log_path.write_text("".join(ln + "\n" for ln in lines))

    t0 = time.time() - elapsed
    bar = tqdm(range(start, tcfg.steps), initial=start, total=tcfg.steps, disable=not progress,
               desc="train-demo", unit="step", dynamic_ncols=True)
    with log_path.open("a") as log:
        for step in bar:
            torch.manual_seed(tcfg.seed * 1_000_003 + step)                      # router jitter
            lr = tcfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = batch_at(streams, step, tcfg)
            loss, parts = training_loss(model, batch, shortlist, tcfg.amp, tcfg.router_margin_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip).item()
            opt.step()
            record = {"step": step, "lr": lr, "loss": loss.item(), "lm_loss": parts["lm"],
                      "lb_loss": parts["lb"], "z_loss": parts["z"], "margin_loss": parts["margin"], "grad_norm": grad_norm,
                      "tokens": (step + 1) * tcfg.batch_size * tcfg.seq_len, "elapsed_s": time.time() - t0}
            last = step + 1 == tcfg.steps
            if (step + 1) % tcfg.eval_every == 0 or last or step == 0:
                record.update({f"val_{d}": v for d, v in evaluate(model, windows, shortlist).items()})
                record.update(threads=torch.get_num_threads(), load_avg_1m=os.getloadavg()[0])
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(lm=f"{parts['lm']:.3f}", lb=f"{parts['lb']:.3f}", lr=f"{lr:.1e}")
            timed_out = time_limit_s is not None and time.time() - t0 > time_limit_s
            if (step + 1) % tcfg.save_every == 0 or last or timed_out:
                save_checkpoint(ckpt, model, opt, step + 1, tcfg, time.time() - t0)
            if timed_out and not last:
                print(f"time limit reached after step {step + 1}; continue with --resume", file=sys.stderr)
                break
    bar.close()
    full = shortlist.expand(fold_router_temperature(model)).eval()
    full.shortlist = shortlist
    return full


def export_demo(model: DbrxLM, out: str | Path) -> Path:
    """Write the HF-format folder (config.json + bf16 model.safetensors); refuses over MAX_DEMO_BYTES."""
    from .checkpoint import save_pretrained

    folder = save_pretrained(model, out, dtype=torch.bfloat16)
    size = (Path(folder) / "model.safetensors").stat().st_size
    if model.config.vocab_size == DEMO_CONFIG.vocab_size and size > MAX_DEMO_BYTES:
        raise ValueError(f"model.safetensors is {size} bytes, over the {MAX_DEMO_BYTES} byte budget")
    return Path(folder)


# ------------------------------------------------------------------------------------------------
# CLI: dbrx-lab train-demo
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the model, model card, log and checkpoint")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, one per core; use 1 on a machine busy with "
                             "other jobs, where more threads spin-wait)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="cap on each domain's corpus tokens (default: everything)")
    parser.add_argument("--model", choices=["demo", "tiny-vocab"], default="demo",
                        help="model shape: the demo's, or the small 'tiny-vocab' preset (for quick checks)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop (resumably) after this many minutes")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (slower on CPUs without bf16 units)")
    parser.add_argument("--init-from", default=None, metavar="FOLDER",
                        help="start from the weights of a saved model of the same shape (e.g. 'demo', the bundled "
                             "model) instead of a random initialisation")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--router-temperature", type=float, default=TrainConfig.router_temperature,
                        help="train the routers at this temperature: router weight = stored parameter / T, so "
                             "AdamW moves router logits 1/T times faster (< 1); folded into the saved weights, and "
                             "a loaded model's function is kept (default %(default)s)")
    parser.add_argument("--router-scale", type=float, default=TrainConfig.router_scale,
                        help="multiply the router weights by this before training, e.g. to sharpen the routing "
                             "of an --init-from model (default %(default)s)")
    parser.add_argument("--router-margin-weight", type=float, default=TrainConfig.router_margin_weight,
                        help="weight of the router margin loss, softplus(l_(k+1) - l_(k)) on the router logits "
                             "(not in DBRX's recipe; default %(default)s)")
    parser.add_argument("--moe-loss-weight", type=float, default=DEMO_CONFIG.moe_loss_weight,
                        help="load-balancing loss weight (default %(default)s)")
    parser.add_argument("--moe-z-loss-weight", type=float, default=DEMO_CONFIG.moe_z_loss_weight,
                        help="router z-loss weight (default %(default)s)")
    parser.add_argument("--n-layers", type=int, default=None,
                        help=f"transformer blocks (default: the shape's own, {DEMO_CONFIG.n_layers} for the demo)")
    parser.add_argument("--no-card", action="store_true", help="skip the model card and its evaluation")
    parser.add_argument("--keep-checkpoint", action="store_true", help="keep <out>/checkpoint after the last step")


def run(args: argparse.Namespace) -> int:
    from .config import PRESETS
    from .demo_data import build_corpus

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (half prose, half code), got {args.batch_size}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model_cfg = dataclasses.replace(DEMO_CONFIG if args.model == "demo" else PRESETS["tiny-vocab"])
    for name, value, low in (("--moe-loss-weight", args.moe_loss_weight, 0.0),
                             ("--moe-z-loss-weight", args.moe_z_loss_weight, 0.0), ("--lr", args.lr, 0.0),
                             ("--router-margin-weight", args.router_margin_weight, 0.0)):
        if not (math.isfinite(value) and value >= low) or (name == "--lr" and value == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == '--lr' else '>= 0'}, got {value}")
    n_layers = model_cfg.n_layers if args.n_layers is None else args.n_layers
    if not 1 <= n_layers <= 64:
        raise ValueError(f"--n-layers must be in [1, 64], got {n_layers}")
    model_cfg = dataclasses.replace(model_cfg, moe_loss_weight=args.moe_loss_weight,
                                    moe_z_loss_weight=args.moe_z_loss_weight, n_layers=n_layers)
    if not 1 <= args.seq_len <= model_cfg.max_seq_len:
        raise ValueError(f"--seq-len must be in [1, {model_cfg.max_seq_len}], got {args.seq_len}")
    tcfg = TrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
                       amp=args.amp, warmup_steps=min(TrainConfig.warmup_steps, max(1, args.steps // 10)),
                       lr=args.lr, router_temperature=args.router_temperature,
                       router_margin_weight=args.router_margin_weight, router_scale=args.router_scale,
                       init_from=None if args.init_from is None else str(args.init_from))
    cap = args.max_tokens
    corpus = build_corpus({"prose": cap, "code": cap} if cap else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").write_text(json.dumps(corpus.stats, indent=2) + "\n")
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(tcfg), indent=2) + "\n")
    t0 = time.time()
    model = train(out, tcfg, model_cfg, corpus, resume=args.resume,
                  time_limit_s=None if args.time_limit is None else 60 * args.time_limit)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    if state["step"] < tcfg.steps:
        print(f"stopped at step {state['step']} of {tcfg.steps}; resume with --resume", file=sys.stderr)
        return 0
    export_demo(model, out)
    if not args.no_card:
        write_model_card(out, corpus=corpus, tcfg=tcfg)
    if not args.keep_checkpoint:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------
# evaluation and model card
EVAL_DIR = Path(__file__).resolve().parent / "data" / "demo_eval"
TOKEN_CLASSES = ("whitespace", "digits", "punctuation", "word")
USED_SHARE = 0.01       # an expert "is used" in a layer when it gets at least 1% of the routed slots


@torch.no_grad()
def text_cross_entropy(model: DbrxLM, ids: Sequence[int] | torch.Tensor) -> float:
    """Mean next-token CE (nats/token, full softmax over all vocab rows) of one token sequence.

    Longer sequences are cut into windows of max_seq_len that overlap by one token, so every token after
    the first is predicted exactly once.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    T = model.config.max_seq_len
    total, count = 0.0, 0
    for s in range(0, ids.numel() - 1, T - 1):
        w = ids[s:s + T][None]
        total += model(w, labels=w).loss.item() * (w.shape[1] - 1)
        count += w.shape[1] - 1
    return total / count


def eval_text_losses(model: DbrxLM) -> dict[str, float]:
    """CE (nats/token) on the texts written for evaluation (data/demo_eval), never seen in training."""
    from .tokenizer import load_tokenizer

    tok = load_tokenizer()
    return {domain: text_cross_entropy(model, tok.encode((EVAL_DIR / name).read_text()))
            for domain, name in (("prose", "prose.txt"), ("code", "code.py"))}


@torch.no_grad()
def route_windows(model: DbrxLM, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """windows [n, T] -> top-k experts [L, n*T, k] (plain routing, no interventions)."""
    return router_logits_of(model, windows, chunk).topk(model.config.moe_top_k, dim=-1).indices


@torch.no_grad()
def router_logits_of(model: DbrxLM, windows: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """windows [n, T] -> router logits [L, n*T, E] float32 (plain routing, no interventions)."""
    was_training = model.training
    model.eval()
    out = []
    for w in windows.split(chunk):
        _, router_logits = final_hidden(model, w)
        out.append(torch.stack([r.float() for r in router_logits]))
    model.train(was_training)
    return torch.cat(out, dim=1)


def router_decisiveness(logits: torch.Tensor, top_k: int) -> dict[str, list[float]]:
    """Router logits [L, N, E] -> per layer means over tokens: softmax entropy (nats; uniform = ln E), top-1
    probability, and the margin p(k) - p(k+1) between the last chosen and the first unchosen expert."""
    p = logits.double().softmax(-1)
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)                              # [L, N]
    sorted_p = p.sort(-1, descending=True).values
    margin = sorted_p[..., top_k - 1] - sorted_p[..., top_k] if top_k < p.shape[-1] else sorted_p[..., -1]
    return {"router_entropy": entropy.mean(-1).tolist(), "router_top1": sorted_p[..., 0].mean(-1).tolist(),
            "router_margin": margin.mean(-1).tolist()}


def expert_shares(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """top-k experts [L, N, k] -> share of the N*k routed slots per expert [L, E] (rows sum to 1)."""
    L = experts.shape[0]
    counts = torch.stack([torch.bincount(experts[l].reshape(-1), minlength=n_experts) for l in range(L)])
    return counts.double() / counts.sum(-1, keepdim=True)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (0..1) between distributions along the last dim."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log2(), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def token_classes(ids: torch.Tensor) -> list[str]:
    """Class of each token id [N]: whitespace, digits, punctuation or word."""
    from .tokenizer import load_tokenizer

    out = []
    for s in load_tokenizer().token_strings(ids, escape_whitespace=False):
        core = s.strip()
        if not core:
            out.append("whitespace")
        elif core.isdigit():
            out.append("digits")
        elif not any(c.isalnum() for c in core):
            out.append("punctuation")
        else:
            out.append("word")
    return out


def routing_report(model: DbrxLM, windows: dict[str, torch.Tensor], init_model: DbrxLM) -> dict:
    """Expert usage and code-vs-prose specialisation on held-out windows {"prose", "code"} [n, T]."""
    E = model.config.moe_num_experts
    report: dict = {}
    per_model = {}
    k = model.config.moe_top_k
    for name, m in (("trained", model), ("init", init_model)):
        logits = {d: router_logits_of(m, w) for d, w in windows.items()}
        experts = {d: lg.topk(k, dim=-1).indices for d, lg in logits.items()}
        report[f"decisiveness_{name}"] = router_decisiveness(torch.cat([logits["prose"], logits["code"]], 1), k)
        shares = {d: expert_shares(e, E) for d, e in experts.items()}
        mixed = expert_shares(torch.cat([experts["prose"], experts["code"]], dim=1), E)
        per_model[name] = (experts, shares, mixed)
        report[f"js_code_prose_bits_{name}"] = js_divergence(shares["code"], shares["prose"]).tolist()
    experts, shares, mixed = per_model["trained"]
    report["share_mixed"] = mixed.tolist()
    report["share_prose"] = shares["prose"].tolist()
    report["share_code"] = shares["code"].tolist()
    report["experts_used"] = (mixed >= USED_SHARE).sum(-1).tolist()
    report["max_share_x_uniform"] = (mixed.max(-1).values * E).tolist()
    report["min_share_x_uniform"] = (mixed.min(-1).values * E).tolist()
    # which expert each token class prefers, per layer: P(e in top-k | class) vs P(e in top-k | any token)
    ids = torch.cat([windows["prose"].reshape(-1), windows["code"].reshape(-1)])
    classes = token_classes(ids)
    all_experts = torch.cat([experts["prose"], experts["code"]], dim=1)           # [L, N, k]
    picked_all = mixed * k                                                        # [L, E]
    favourites = {}
    for c in TOKEN_CLASSES:
        sel = torch.tensor([x == c for x in classes])
        if int(sel.sum()) == 0:
            continue
        picked = expert_shares(all_experts[:, sel], E) * k                        # [L, E]
        lift = picked / picked_all.clamp(min=1e-9)
        best = lift.argmax(-1)
        favourites[c] = {"tokens": int(sel.sum()),
                         "expert": best.tolist(),
                         "picked": picked.gather(-1, best[:, None]).squeeze(-1).tolist(),
                         "picked_overall": picked_all.gather(-1, best[:, None]).squeeze(-1).tolist()}
    for d in ("code", "prose"):
        other = "prose" if d == "code" else "code"
        lift = shares[d] / shares[other].clamp(min=1e-9)
        best = lift.argmax(-1)
        favourites[d] = {"tokens": int(windows[d].numel()), "expert": best.tolist(),
                         "picked": (shares[d].gather(-1, best[:, None]).squeeze(-1) * k).tolist(),
                         "picked_overall": (shares[other].gather(-1, best[:, None]).squeeze(-1) * k).tolist()}
    report["favourite_experts"] = favourites
    return report


def plot_loss_curve(log: list[dict], path: Path, vocab_size: int) -> None:
    """PNG of training and validation CE against tokens seen (matplotlib when installed, else bare lines)."""
    steps = [r for r in log if "lm_loss" in r]
    x = np.array([r["tokens"] for r in steps]) / 1e6
    y = np.array([r["lm_loss"] for r in steps])
    smooth = np.array([y[max(0, i - 9):i + 1].mean() for i in range(len(y))])
    val = {d: [(r["tokens"] / 1e6, r[f"val_{d}"]) for r in log if f"val_{d}" in r] for d in ("prose", "code")}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _bare_line_png(path, [(x, smooth)] + [tuple(map(np.array, zip(*v))) for v in val.values() if v])
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(x, y, color="#9ecae1", lw=0.8, label="train (per step)")
    ax.plot(x, smooth, color="#08519c", lw=1.8, label="train (10-step mean)")
    for d, color in (("prose", "#d94801"), ("code", "#238b45")):
        if val[d]:
            vx, vy = zip(*val[d])
            ax.plot(vx, vy, "o-", color=color, ms=4, label=f"held-out {d}")
    ax.axhline(math.log(vocab_size), color="grey", ls="--", lw=0.8, label=f"uniform ({math.log(vocab_size):.1f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("dbrx-lab demo model: training loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bare_line_png(path: Path, series: list[tuple[np.ndarray, np.ndarray]], w: int = 640, h: int = 360) -> None:
    """Fallback without matplotlib: the curves as dark lines on white, no text."""
    import struct
    import zlib

    img = np.full((h, w), 255, dtype=np.uint8)
    xs = np.concatenate([s[0] for s in series])
    ys = np.concatenate([s[1] for s in series])
    for sx, sy in series:
        px = ((sx - xs.min()) / max(np.ptp(xs), 1e-9) * (w - 21) + 10).astype(int)
        py = (h - 11 - (sy - ys.min()) / max(np.ptp(ys), 1e-9) * (h - 21)).astype(int)
        for (x0, y0), (x1, y1) in zip(zip(px[:-1], py[:-1]), zip(px[1:], py[1:])):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            img[np.linspace(y0, y1, n + 1).astype(int), np.linspace(x0, x1, n + 1).astype(int)] = 0
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def _threads_and_load(log: list[dict]) -> str:
    """'2 torch thread(s); mean 1-minute load average 2.1 while training, ...' from a training log's eval records."""
    evals = [r for r in log if "load_avg_1m" in r]
    if not evals:
        return "torch threads not recorded"
    threads = sorted({r["threads"] for r in evals})
    load = np.mean([r["load_avg_1m"] for r in evals])
    return (f"{'/'.join(map(str, threads))} torch thread(s); mean 1-minute load average {load:.1f} while training, "
            f"its own threads included")


def _fmt_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_model_card(folder: str | Path, corpus=None, tcfg: TrainConfig | None = None, notes: str = "",
                     n_windows: int = 32, previous: str | Path | None = None) -> dict:
    """Evaluate the exported model in `folder`; write MODEL_CARD.md, loss_curve.png and evaluation.json.

    `previous`: an earlier model folder of the same shape (e.g. the one this run was initialised from), measured
    on the same windows and texts for a before/after section.

    Needs folder/config.json + model.safetensors, folder/training_log.jsonl and folder/corpus.json (written
    by `train-demo`). `corpus` is rebuilt from corpus.json's caps when not given. Returns the evaluation dict.
    """
    import platform

    from .loading import load_model
    from .demo_data import build_corpus

    folder = Path(folder)
    stats = json.loads((folder / "corpus.json").read_text())
    if tcfg is None:
        tcfg = TrainConfig(**{k: tuple(v) if k == "betas" else v
                              for k, v in json.loads((folder / "train_config.json").read_text()).items()})
    if corpus is None:
        corpus = build_corpus(stats["max_tokens"] or None, stats["val_fraction"])
    log = [json.loads(ln) for ln in (folder / "training_log.jsonl").read_text().splitlines() if ln.strip()]
    model = load_model(folder, dtype=torch.float32)
    cfg = model.config
    torch.manual_seed(tcfg.seed)
    init_model = DbrxLM(dataclasses.replace(cfg, torch_dtype="float32")).eval()

    windows = {d: val_windows(corpus.stream(d, "val"), n_windows, tcfg.seq_len) for d in ("prose", "code")}
    val_ce = {d: float(np.mean([text_cross_entropy(model, w) for w in windows[d]])) for d in windows}
    eval_ce = eval_text_losses(model)
    routing = routing_report(model, {d: w[:, :-1] for d, w in windows.items()}, init_model)
    before = None
    if previous is not None:
        prev = load_model(previous, dtype=torch.float32)
        prev_routing = routing_report(prev, {d: w[:, :-1] for d, w in windows.items()}, init_model)
        before = {"folder": Path(previous).name, "eval_text_ce": eval_text_losses(prev),
                  "val_ce": {d: float(np.mean([text_cross_entropy(prev, w) for w in windows[d]])) for d in windows},
                  **{k: prev_routing[k] for k in ("js_code_prose_bits_trained", "decisiveness_trained",
                                                  "experts_used", "max_share_x_uniform")}}
    plot_loss_curve(log, folder / "loss_curve.png", cfg.vocab_size)

    last = log[-1]
    size = (folder / "model.safetensors").stat().st_size
    evaluation = {"eval_text_ce": eval_ce, "val_ce": val_ce, "val_windows": {d: list(w.shape) for d, w in windows.items()},
                  "tokens_seen": last["tokens"], "steps": last["step"] + 1, "train_time_s": last["elapsed_s"],
                  "safetensors_bytes": size, "n_params": cfg.n_params, **routing,
                  **({"previous": before} if before else {})}
    (folder / "evaluation.json").write_text(json.dumps(evaluation, indent=1) + "\n")

    L, E = cfg.n_layers, cfg.moe_num_experts
    js_t, js_i = routing["js_code_prose_bits_trained"], routing["js_code_prose_bits_init"]
    uniform = math.log(cfg.vocab_size)
    md = [f"# dbrx-lab demo model",
          "",
          "A small DBRX (same architecture as databricks/dbrx-instruct, tiny widths) trained on this machine so",
          "that routing plots, expert ablations and notebooks have a model whose experts have learned something.",
          "It is a toy: it writes locally plausible English and Python, not correct answers.",
          "",
          "```python",
          "import dbrx_lab",
          "model = dbrx_lab.load_model(\"demo\")   # offline; HF: DbrxForCausalLM.from_pretrained(<this folder>)",
          "```",
          "",
          "## Configuration",
          "",
          _fmt_row(["field", "value"]), _fmt_row(["---", "---"]),
          *[_fmt_row([k, v]) for k, v in (
              ("architecture", "DbrxForCausalLM (GQA + RoPE + clip_qkv attention, 16-expert top-4 GLU MoE, untied lm_head)"),
              ("d_model / n_heads / kv_n_heads / head_dim", f"{cfg.d_model} / {cfg.n_heads} / {cfg.kv_n_heads} / {cfg.head_dim}"),
              ("n_layers", cfg.n_layers), ("ffn_hidden_size (per expert)", cfg.ffn_hidden_size),
              ("experts / top-k / weight norm p", f"{E} / {cfg.moe_top_k} / {cfg.moe_normalize_expert_weights}"),
              ("clip_qkv / rope_theta / max_seq_len", f"{cfg.clip_qkv} / {cfg.rope_theta:g} / {cfg.max_seq_len}"),
              ("moe_loss_weight / moe_z_loss_weight / moe_jitter_eps",
               f"{cfg.moe_loss_weight} / {cfg.moe_z_loss_weight} / {cfg.moe_jitter_eps}"),
              ("vocabulary", f"{cfg.vocab_size} (DBRX's tokenizer: cl100k_base + ChatML specials)"),
              ("parameters", f"{cfg.n_params:,} ({2 * cfg.vocab_size * cfg.d_model:,} in wte + lm_head)"),
              ("weights file", f"model.safetensors, bfloat16, {size:,} bytes"))],
          "",
          "## Training",
          "",
          f"- Recipe (`dbrx-lab train-demo`): seed {tcfg.seed}; AdamW (betas {tuple(tcfg.betas)}, weight decay "
          f"{tcfg.weight_decay} on matrices), peak lr {tcfg.lr:g}, {tcfg.warmup_steps} warm-up steps then cosine decay "
          f"to {tcfg.min_lr_ratio:g} x peak; gradient clipping {tcfg.grad_clip}; {tcfg.batch_size} sequences x "
          f"{tcfg.seq_len} tokens per step, half prose and half code, at offsets drawn from (seed, step); float32.",
          f"- Loss: next-token cross-entropy + {cfg.moe_loss_weight} x load-balancing loss (DBRX form, 1.0 when "
          f"balanced) + {cfg.moe_z_loss_weight} x router z-loss"
          + (f" + {tcfg.router_margin_weight} x router margin loss, softplus(l({cfg.moe_top_k + 1}) - l({cfg.moe_top_k})) "
             f"on each token's sorted router logits (not in DBRX's recipe; `dbrx_lab.train.router_margin_loss`)"
             if tcfg.router_margin_weight else "")
          + f"; router jitter eps {cfg.moe_jitter_eps}."
          + (f" Router weights multiplied by {tcfg.router_scale:g} before training." if tcfg.router_scale != 1 else "")
          + (f" Routers trained at temperature {tcfg.router_temperature:g} (weight = stored parameter / T, so AdamW "
             f"moves router logits 1/T times faster; T folded into the saved router weights: the exported model is "
             f"a plain DBRX)." if tcfg.router_temperature != 1 else ""),
          *([f"- Initialised from `{tcfg.init_from}` (a saved model of the same shape), not at random."]
            if tcfg.init_from else []),
          f"- Compact vocabulary: the ids seen {tcfg.min_count}+ times in the training split get their own wte and "
          f"lm_head rows, all other ids share one row (copied into each of their rows on export), so the softmax "
          f"over {cfg.vocab_size} rows is computed exactly but cheaply (see `dbrx_lab.train.VocabShortlist`).",
          f"- Steps: {last['step'] + 1}; tokens seen: {last['tokens']:,}; training time: "
          f"{last['elapsed_s'] / 60:.1f} min on {platform.machine()} with {os.cpu_count()} CPU cores "
          f"({platform.processor() or 'CPU'}; {_threads_and_load(log)}).",
          "- bf16 autocast was measured and not used: no bf16 units on this CPU, ~20x slower than float32.",
          *([f"- Note: {notes}"] if notes else []),
          "",
          "![loss curve](loss_curve.png)",
          "",
          "## Data",
          "",
          f"Offline sources of the Python {stats['python']} installation (`dbrx_lab.demo_data`), split into "
          f"train/validation by a hash of the document group (validation fraction {stats['val_fraction']}). "
          f"Caps per domain: {stats['max_tokens'] or 'none'}.",
          "",
          _fmt_row(["source", "domain", "train docs", "train tokens", "val docs", "val tokens"]),
          _fmt_row(["---"] * 6),
          *[_fmt_row([name, s["domain"], s["documents"]["train"], f"{s['tokens']['train']:,}", s["documents"]["val"],
                      f"{s['tokens']['val']:,}"]) for name, s in stats["sources"].items()],
          "",
          "## Evaluation",
          "",
          f"Cross-entropy in nats/token over the full {cfg.vocab_size}-row softmax (uniform: {uniform:.2f}).",
          "",
          _fmt_row(["text", "prose", "code", "goal"]), _fmt_row(["---"] * 4),
          _fmt_row(["written for the evaluation, never seen (data/demo_eval)", f"{eval_ce['prose']:.2f}",
                    f"{eval_ce['code']:.2f}", "prose < 6.5, code < 5.0"]),
          _fmt_row([f"held-out validation documents ({n_windows} x {tcfg.seq_len} tokens each)",
                    f"{val_ce['prose']:.2f}", f"{val_ce['code']:.2f}", ""]),
          "",
          "## Expert usage per layer",
          "",
          f"Share of the routed (token, top-{cfg.moe_top_k}) slots per expert on the held-out prose + code windows, in "
          f"units of the uniform share 1/{E}. 'Used' = at least {USED_SHARE:.0%} of the slots.",
          "",
          _fmt_row(["layer", "experts used", "max share (x uniform)", "min share (x uniform)",
                    *[f"e{e}" for e in range(E)]]),
          _fmt_row(["---"] * (4 + E)),
          *[_fmt_row([l, routing["experts_used"][l], f"{routing['max_share_x_uniform'][l]:.2f}",
                      f"{routing['min_share_x_uniform'][l]:.2f}",
                      *[f"{routing['share_mixed'][l][e] * E:.1f}" for e in range(E)]]) for l in range(L)],
          "",
          "## Router decisiveness",
          "",
          f"Per layer, means over the held-out prose + code tokens of the router's softmax: entropy (nats; uniform "
          f"ln {E} = {math.log(E):.2f}), the top-1 probability, and the margin p({cfg.moe_top_k}) - "
          f"p({cfg.moe_top_k + 1}) between the last chosen and the first unchosen expert; trained vs at initialisation.",
          "",
          _fmt_row(["layer", "entropy", "top-1 probability", "margin", "entropy at init", "top-1 at init",
                    "margin at init"]), _fmt_row(["---"] * 7),
          *[_fmt_row([l, *[f"{routing[f'decisiveness_{w}'][key][l]:.3f}" for w in ("trained", "init")
                           for key in ("router_entropy", "router_top1", "router_margin")]]) for l in range(L)],
          "",
          "## Specialisation",
          "",
          "Jensen-Shannon divergence (bits, 0..1) between the expert-usage distributions on held-out code and on "
          "held-out prose, trained model against the same architecture at initialisation (same seed):",
          "",
          _fmt_row(["layer", "JS trained", "JS at init", "ratio"]), _fmt_row(["---"] * 4),
          *[_fmt_row([l, f"{js_t[l]:.4f}", f"{js_i[l]:.4f}", f"{js_t[l] / max(js_i[l], 1e-12):.1f}x"]) for l in range(L)],
          "",
          "Most specific expert per layer for each kind of token: the expert whose top-4 selection rate on that kind "
          "is highest relative to its rate on all tokens (for code/prose: relative to the other domain); "
          "'a% vs b%' = how often it is among the 4 chosen for that kind vs for all tokens (or the other domain).",
          "",
          _fmt_row(["kind (tokens)", *[f"layer {l}" for l in range(L)]]), _fmt_row(["---"] * (L + 1)),
          *[_fmt_row([f"{c} ({f['tokens']:,})",
                      *[f"e{f['expert'][l]}: {f['picked'][l]:.0%} vs {f['picked_overall'][l]:.0%}" for l in range(L)]])
            for c, f in routing["favourite_experts"].items()],
          "",
          *(["## Against the previous model", "",
             f"The previous model (`{before['folder']}`), measured here on the same windows and texts. "
             f"Decisiveness: per layer, as above; specialisation: JS(code, prose) in bits.", "",
             _fmt_row(["measure", "previous", "this model"]), _fmt_row(["---"] * 3),
             _fmt_row(["CE, unseen prose / code (nats/token)",
                       f"{before['eval_text_ce']['prose']:.3f} / {before['eval_text_ce']['code']:.3f}",
                       f"{eval_ce['prose']:.3f} / {eval_ce['code']:.3f}"]),
             _fmt_row(["CE, held-out validation prose / code",
                       f"{before['val_ce']['prose']:.3f} / {before['val_ce']['code']:.3f}",
                       f"{val_ce['prose']:.3f} / {val_ce['code']:.3f}"]),
             *[_fmt_row([label, " / ".join(f"{v:.3f}" for v in before["decisiveness_trained"][key]),
                         " / ".join(f"{v:.3f}" for v in routing["decisiveness_trained"][key])])
               for label, key in (("router entropy by layer (nats)", "router_entropy"),
                                  ("top-1 probability by layer", "router_top1"),
                                  ("margin p(k) - p(k+1) by layer", "router_margin"))],
             _fmt_row(["JS(code, prose) by layer (bits)",
                       " / ".join(f"{v:.4f}" for v in before["js_code_prose_bits_trained"]),
                       " / ".join(f"{v:.4f}" for v in js_t)]),
             _fmt_row(["experts used by layer", " / ".join(map(str, before["experts_used"])),
                       " / ".join(map(str, routing["experts_used"]))]),
             _fmt_row(["max share by layer (x uniform)",
                       " / ".join(f"{v:.2f}" for v in before["max_share_x_uniform"]),
                       " / ".join(f"{v:.2f}" for v in routing["max_share_x_uniform"])]),
             ""] if before else []),
          "## Files",
          "",
          "config.json, generation_config.json, model.safetensors (weights); training_log.jsonl (per-step losses, "
          "lr, validation); corpus.json (sources and token counts); train_config.json (the recipe); "
          "evaluation.json (every number above); loss_curve.png"
          + "".join(f"; {f.name}" for f in sorted(folder.glob("stage*_*.json*"))) + ".",
          "",
          ("Regenerate: the stages in the note above, each a `dbrx-lab train-demo` command" if tcfg.init_from else
           "Regenerate: `dbrx-lab train-demo --out <folder>`") + " (add `--resume` to continue an interrupted run).",
          ""]
    (folder / "MODEL_CARD.md").write_text("\n".join(md))
    return evaluation
