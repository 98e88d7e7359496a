"""Generation with a preallocated KV cache (gpt-fast style): prefill once, then one token per step."""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .model import linear

if TYPE_CHECKING:
    from .model import DbrxLM

__all__ = ["Step", "UnembedScreen", "generate", "generate_text", "stream", "prepare_prompt", "sample_next", "greedy",
           "unembed_screen"]


class Step:
    """One generated token per row. index: 0 for the first new token; position: its column in the sequence.
    tokens [B] long; logits [B, V] float32 (before temperature/filtering); finished [B] bool after this step.

    `logits` may be given as a function that computes them: greedy decoding with an UnembedScreen never forms
    the full product, and a Step computes it on first access only.
    """

    __slots__ = ("index", "position", "tokens", "finished", "_logits")

    def __init__(self, index: int, position: int, tokens: torch.Tensor,
                 logits: torch.Tensor | Callable[[], torch.Tensor], finished: torch.Tensor) -> None:
        self.index, self.position, self.tokens, self.finished = index, position, tokens, finished
        self._logits = logits

    @property
    def logits(self) -> torch.Tensor:
        if not isinstance(self._logits, torch.Tensor):
            self._logits = self._logits()
        return self._logits

    def __repr__(self) -> str:
        return (f"Step(index={self.index}, position={self.position}, tokens={self.tokens.tolist()}, "
                f"finished={self.finished.tolist()})")


class UnembedScreen:
    """Greedy next tokens from final hidden states without the full float32 product with lm_head.

    A decoding step at batch 1 spends about a third of its time streaming lm_head (float32 [V, d]). The
    screen keeps an int8 copy (one bfloat16 scale per row, a quarter of the bytes; built once, 0.06-0.5 s)
    and multiplies with it (torch's `_weight_int8pack_mm`, gpt-fast's int8 weight-only kernel). A bound on
    that product's error (int8 rounding of the weights, bfloat16 rounding of x and of the output, float32
    sums) leaves the few rows that can still hold the maximum; their float32 logits are computed exactly and
    the first maximum wins. The token is thus the argmax of the float32 logits, as with the full product, up
    to the float32 rounding any two matrix-vector kernels differ by. An x that is not finite, or more than
    `MAX_CANDIDATES` candidates per row, takes the full product. Bound and tests: docs/design-notes.md.
    """

    MIN_ENTRIES = 1 << 22           # 16 MB in float32; smaller ones gain nothing here (benchmarks/README.md)
    MAX_CANDIDATES = 4096           # per row
    OUT_REL = 2.0 ** -6             # bound on the relative error of the bfloat16 output (its rounding is 2^-8)

    def __init__(self, weight: torch.Tensor) -> None:
        """weight: lm_head's [V, d] float32 CPU matrix, finite, d a multiple of 8."""
        V, d = weight.shape
        w = weight.detach()
        amax = w.abs().amax(1).clamp_(min=1e-30)                                        # [V]
        self.scale = (amax * ((1 + 2.0 ** -7) / 127)).to(torch.bfloat16)               # [V] >= amax / 127
        scale = self.scale.float()
        self.q = torch.div(w, scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)   # [V, d]
        # |w - q * scale| <= scale / 2 (plus float32 rounding of the division); |q * scale| rows <= |w| + that
        self.half_step = float(scale.max()) / 2 * (1 + 2.0 ** -10)
        row_norm = float((w.norm(dim=1) + scale * (d ** 0.5 / 2)).max())
        self.norm_rel = row_norm * (2.0 ** -8 + 4 * d * 2.0 ** -24)   # x in bfloat16; float32 sums here and in full
        self.probe = torch.linspace(-1.0, 1.0, d, dtype=w.dtype)
        self.fingerprint = self._fingerprint(w)
        self.key = self._key(w)

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), tuple(weight.shape), weight.dtype, weight.device

    def _fingerprint(self, weight: torch.Tensor) -> torch.Tensor:
        return linear(self.probe[None], weight)[0]                                       # [V]

    def matches(self, weight: torch.Tensor) -> bool:
        """Whether `weight` still holds the values the screen was built from (any in-place edit shows)."""
        w = weight.detach()
        return self._key(w) == self.key and torch.equal(self._fingerprint(w), self.fingerprint)

    @staticmethod
    def applies(weight: torch.Tensor) -> bool:
        """float32 on CPU with d a multiple of 8 (what the int8 kernel handles; it reads out of bounds else)."""
        return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[1] % 8 == 0
                and hasattr(torch, "_weight_int8pack_mm"))

    def greedy(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [B, d] float32 (lm_head's input), weight lm_head's [V, d] -> argmax_v (x @ weight.T) [B] long."""
        B = x.shape[0]
        a = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)   # [B, V] bf16
        tops = a.amax(-1).tolist()
        bounds = (self.half_step * x.abs().sum(-1) + self.norm_rel * x.norm(dim=-1)).tolist()   # [B]
        thresholds = []
        for top, c in zip(tops, bounds):
            # logit_v lies within a_v +- (c + OUT_REL |a_v|); the largest is >= top - c - OUT_REL |top|
            low = top - 2 * c - self.OUT_REL * abs(top)
            t = low / (1 + math.copysign(self.OUT_REL, low))                    # a candidate has a_v >= t
            thresholds.append(t - abs(t) * 2.0 ** -20 - 1e-30)                  # margin for t in float32
        if not all(map(math.isfinite, thresholds)):
            return greedy(linear(x, weight))
        candidates = a >= torch.tensor(thresholds).view(B, 1)                    # [B, V], compared in float32
        rows, cols = candidates.nonzero(as_tuple=True)                            # ascending per row
        if cols.numel() > B * self.MAX_CANDIDATES:
            return greedy(linear(x, weight))
        if B == 1:
            return cols[(weight.index_select(0, cols) @ x[0]).argmax()].view(1)
        exact = torch.bmm(weight.index_select(0, cols)[:, None], x[rows][:, :, None]).view(-1)   # [n] logits
        counts = torch.bincount(rows, minlength=B).tolist()
        return torch.stack([c[e.argmax()] for c, e in zip(cols.split(counts), exact.split(counts))])


def unembed_screen(model: "DbrxLM") -> UnembedScreen | None:
    """The model's UnembedScreen for greedy decoding, built or rebuilt if lm_head changed; None where it does
    not apply: `model.screen_greedy` False (or None and lm_head under MIN_ENTRIES entries), lm_head not
    float32 on CPU or not finite."""
    weight = model.lm_head.weight
    wanted = model.screen_greedy
    if wanted is None:
        wanted = weight.numel() >= UnembedScreen.MIN_ENTRIES
    screen = model.__dict__.pop("_unembed_screen", None)
    if not (wanted and UnembedScreen.applies(weight)):
        return None
    if screen is None or not screen.matches(weight):
        screen = None                                       # stale: free it before building another
        if not bool(torch.isfinite(weight).all()):
            return None
        screen = UnembedScreen(weight)
    model.__dict__["_unembed_screen"] = screen
    return screen


def prepare_prompt(model: "DbrxLM", prompt, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tensor/list of ids, a string, a list of strings, or chat messages -> (ids [B, T], mask [B, T] | None)."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and
                                   (isinstance(prompt[0], (str, dict)))):
        tok = model.tokenizer
        if tok is None:
            from .tokenizer import load_tokenizer
            tok = load_tokenizer()
        if isinstance(prompt, str):
            ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
        elif isinstance(prompt[0], dict):
            ids = torch.tensor([tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)])
        else:
            batch = tok(list(prompt))
            ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    elif isinstance(prompt, torch.Tensor):
        ids = prompt
    elif isinstance(prompt, (list, tuple)):
        ids = torch.as_tensor(prompt, dtype=torch.long)
    else:
        raise ValueError(f"prompt must be token ids, a string, strings or chat messages, got {type(prompt).__name__}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    ids = model.validate_input_ids(ids)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask must use left padding (the last column real for every row)")
    return ids, attention_mask


def _check_sampling(model, max_new_tokens, do_sample, temperature, top_k, top_p, prompt_len):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                         f"{limit}; shorten the prompt or ask for at most {max(limit - prompt_len, 0)} new tokens")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")


def greedy(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """logits [B, V] -> argmax [B] (first maximum; NaN counts as the maximum, as in torch.argmax).

    torch's argmax over a long row runs at ~1.3-2.5 ns per element; the chunk maxima (a vectorised amax), the
    first chunk that holds the maximum, and an argmax inside that chunk give the same index 2-4x faster.
    """
    B, V = logits.shape
    if V % chunk or V < 4 * chunk:
        return logits.argmax(dim=-1)
    chunks = logits.reshape(B, V // chunk, chunk)                                    # [B, C, chunk]
    best = chunks.amax(-1).argmax(-1)                                               # [B] first chunk with the max
    rows = torch.arange(B, device=logits.device)
    return chunks[rows, best].argmax(-1) + best * chunk


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]: argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p          # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _unembed(model: "DbrxLM", hidden: torch.Tensor) -> torch.Tensor:
    return model.lm_head(hidden).float()                                                # [B, V]


@torch.no_grad()
def stream(model: "DbrxLM", prompt, max_new_tokens: int = 50, *, attention_mask=None, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
           stop: Callable[[], bool] | None = None, process_last: bool = False) -> Iterator[Step]:
    """Yield one Step per new token until every row hit an eos id, max_new_tokens, or `stop()` is true.

    process_last: after the last Step, run its tokens through the model too (one more cached forward), so
    hooks see every generated token (generate_with_trace records the last token's routing this way).
    """
    ids, attention_mask = prepare_prompt(model, prompt, attention_mask)
    B, T = ids.shape
    _check_sampling(model, max_new_tokens, do_sample, temperature, top_k, top_p, T)
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id or []
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), dtype=torch.long)
    if pad_token_id is None:   # finished rows keep being fed: the pad id must be a real row of the embedding
        in_vocab = [int(e) for e in eos if 0 <= e < cfg.vocab_size]
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (in_vocab[0] if in_vocab else 0)
    if not 0 <= pad_token_id < cfg.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary [0, {cfg.vocab_size - 1}]")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(seed))
    if max_new_tokens == 0:
        return
    device = model.device
    ids = ids.to(device)
    eos = eos.to(device)
    mask = None if attention_mask is None else attention_mask.to(device).long()
    cache = model.new_cache(B, T + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    dispatched = model.dispatched()
    screen = None if do_sample or dispatched or max_new_tokens < 2 else unembed_screen(model)   # used from token 2
    logits = model(ids, mask, cache=cache, start=0, last_only=True).logits[:, -1].float()   # [B, V]
    hidden = None           # instead of logits: lm_head's input [B, d] when the screen picks the token
    pos = T
    for i in range(max_new_tokens):
        if hidden is None:
            tokens = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        else:
            tokens = screen.greedy(hidden, model.lm_head.weight)
            logits = functools.partial(_unembed, model, hidden)                    # computed if Step.logits is read
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        finished = finished | torch.isin(tokens, eos)
        yield Step(i, pos, tokens, logits, finished.clone())
        done = bool(finished.all()) or i == max_new_tokens - 1 or (stop is not None and stop())
        if done and not process_last:
            return
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        if not model.decode_step_applies(dispatched):
            hidden = None
            logits = model(tokens[:, None], mask, cache=cache, start=pos, last_only=True).logits[:, -1].float()
        elif screen is not None or done:                                            # done: only for the hooks
            hidden = model.decode_step(tokens, cache, pos, mask, unembed=False)
        else:
            logits = model.decode_step(tokens, cache, pos, mask).float()
        if done:
            return
        pos += 1


def generate(model: "DbrxLM", prompt, max_new_tokens: int = 50, *, streamer: Callable[[Step], Any] | None = None,
             **kwargs) -> torch.Tensor:
    """Prompt -> ids [B, T + n] (n <= max_new_tokens; finished rows padded with pad_token_id).

    Greedy by default; `do_sample=True` with temperature/top_k/top_p, reproducible with `seed`.
    `streamer(step)` is called with each Step as it is produced.
    """
    ids, kwargs["attention_mask"] = prepare_prompt(model, prompt, kwargs.get("attention_mask"))
    new = []
    for step in stream(model, ids, max_new_tokens, **kwargs):
        new.append(step.tokens)
        if streamer is not None:
            streamer(step)
    if not new:
        return ids
    return torch.cat([ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def generate_text(model: "DbrxLM", prompt, max_new_tokens: int = 50, **kwargs) -> str | list[str]:
    """Generated continuation(s) as text, without the prompt and the stop token."""
    from .tokenizer import load_tokenizer

    tok = model.tokenizer or load_tokenizer()
    ids, kwargs["attention_mask"] = prepare_prompt(model, prompt, kwargs.get("attention_mask"))
    out = generate(model, ids, max_new_tokens, **kwargs)[:, ids.shape[1]:]
    eos = set(kwargs.get("eos_token_id") or model.config.eos_token_id or [])
    texts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tok.decode(row[:cut]))
    return texts[0] if len(texts) == 1 else texts
