"""Generation with a preallocated KV cache (gpt-fast style): prefill once, then one token per step."""
from __future__ import annotations

import functools
import math
import operator
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .kernels import LINEAR
from .model import check_attention_mask
from .kernels.unembed import UnembedScreen, screen_for
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from .lm import DbrxLM

__all__ = ["Step", "UnembedScreen", "generate", "generate_text", "stream", "prepare_prompt", "sample_next", "greedy"]


class Step:
    """One generated token per row. index: 0 for the first new token; position: its column in the sequence.
    tokens [B] long; logits [B, V] float32 (before temperature/filtering); finished [B] bool after this step.

    `logits` may be given as a function that computes them: greedy decoding through lm_head's int8 screen
    never forms the full product, and a Step computes it on first access only.
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


def prepare_prompt(model: "DbrxLM", prompt, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tensor/list of ids, a string, a list of strings, or chat messages -> (ids [B, T], mask [B, T] | None).

    Chat messages use dbrx-instruct's template as released: special-token text inside a message becomes a
    control token (role injection). For untrusted content pass the ids of
    `tok.apply_chat_template(messages, tokenize=True, escape_special=True)` instead."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and
                                   (isinstance(prompt[0], (str, dict)))):
        tok = model.tokenizer
        if tok is None:
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
        ids = model.validate_input_ids(prompt)          # float ids are an error, not truncated
    else:
        raise ValueError(f"prompt must be token ids, a string, strings or chat messages, got {type(prompt).__name__}")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    ids = model.validate_input_ids(ids)
    if attention_mask is not None:
        try:
            attention_mask = torch.as_tensor(attention_mask)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"attention_mask must be 0/1 values [batch, tokens]: {err}") from None
        if attention_mask.ndim == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(ids.shape)}")
        check_attention_mask(attention_mask)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask must use left padding (the last column real for every row)")
    return ids, attention_mask


def as_int(value, name: str, minimum: int | None = None) -> int:
    """An int from an int or a numpy/torch integer scalar (not a bool or a float); ValueError naming `name`."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_sampling(model, max_new_tokens, do_sample, temperature, top_k, top_p, prompt_len):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                         f"{limit}; shorten the prompt or ask for at most {max(limit - prompt_len, 0)} new tokens")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a number > 0 (and finite), got {temperature!r}")
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
    # shifted by the row maximum first: a tiny temperature (1e-300) sends the others to -inf, never to inf/NaN;
    # below float32's range (where the temperature itself would round to 0) the division runs in float64
    logits = logits.double() if temperature < 1e-30 else logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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
def _full_logits(model: "DbrxLM", hidden: torch.Tensor) -> torch.Tensor:
    """lm_head's full product for a screened step, [B, V] float32: its linear kernel on the step's hidden state,
    as an unscreened step computes it (no module call: reading Step.logits is not a model step)."""
    head = model.lm_head
    x = hidden[:, -1]
    _, kernel = LINEAR.choose(head.impl, x, head.weight)
    return kernel(x, head.weight).float()


@torch.no_grad()
def stream(model: "DbrxLM", prompt, max_new_tokens: int = 50, *, attention_mask=None, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
           stop: Callable[[], bool] | None = None, process_last: bool = False) -> Iterator[Step]:
    """Yield one Step per new token until every row hit an eos id, max_new_tokens, or `stop()` is true.

    Every step is one call of the model (`model(...)`, every submodule called as a module), so torch hooks,
    nnsight, HookPoints and interventions see the prefill and each generated token.
    process_last: after the last Step, run its tokens through the model too (one more cached forward), so
    hooks see every generated token (generate_with_trace records the last token's routing this way).
    """
    ids, attention_mask = prepare_prompt(model, prompt, attention_mask)
    B, T = ids.shape
    _check_sampling(model, max_new_tokens, do_sample, temperature, top_k, top_p, T)
    cfg = model.config
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id or []
    if isinstance(eos_token_id, (str, bytes)) or not isinstance(eos_token_id, (int, Sequence, torch.Tensor)) and \
            not hasattr(eos_token_id, "__index__"):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    eos_list = [eos_token_id] if hasattr(eos_token_id, "__index__") and not isinstance(eos_token_id, torch.Tensor) \
        else list(eos_token_id.flatten().tolist() if isinstance(eos_token_id, torch.Tensor) else eos_token_id)
    eos = torch.tensor([as_int(e, "eos_token_id") for e in eos_list], dtype=torch.long)
    if pad_token_id is not None:
        pad_token_id = as_int(pad_token_id, "pad_token_id")
    if seed is not None:
        seed = as_int(seed, "seed", 0)
    if pad_token_id is None:   # finished rows keep being fed: the pad id must be a real row of the embedding
        in_vocab = [int(e) for e in eos if 0 <= e < cfg.vocab_size]
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (in_vocab[0] if in_vocab else 0)
    if not 0 <= pad_token_id < cfg.vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} outside the vocabulary [0, {cfg.vocab_size - 1}]")
    device = model.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    if max_new_tokens == 0:
        return
    ids = ids.to(device)
    eos = eos.to(device)
    mask = None if attention_mask is None else attention_mask.to(device).long()
    if mask is not None and bool(mask.all()):
        mask = None
    cache = model.new_cache(B, T + max_new_tokens)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    screen = None if do_sample or max_new_tokens < 2 or model.dispatched() else screen_for(model.lm_head)
    out = model(ids, mask, cache=cache, start=0, last_only=True)
    logits = out.logits[:, -1].float()                                                  # [B, V]
    pos = T
    for i in range(max_new_tokens):
        tokens = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if i > 0 and screen is not None:
            logits = functools.partial(_full_logits, model, out.hidden)           # computed if Step.logits is read
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        finished = finished | torch.isin(tokens, eos)
        yield Step(i, pos, tokens, logits, finished.clone())
        done = bool(finished.all()) or i == max_new_tokens - 1 or (stop is not None and stop())
        if done and not process_last:
            return
        if mask is not None:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(tokens[:, None], mask, cache=cache, start=pos, last_only=True, validate=False,
                    greedy_screen=screen)
        logits = out.logits[:, -1].float()
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
    tok = model.tokenizer or load_tokenizer()
    ids, kwargs["attention_mask"] = prepare_prompt(model, prompt, kwargs.get("attention_mask"))
    out = generate(model, ids, max_new_tokens, **kwargs)[:, ids.shape[1]:]
    eos = set(kwargs.get("eos_token_id") or model.config.eos_token_id or [])
    texts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tok.decode(row[:cut]))
    return texts[0] if len(texts) == 1 else texts
