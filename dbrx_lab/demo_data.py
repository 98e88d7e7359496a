"""Offline corpus for the demo model: English prose and Python code that every Python install carries.

Sources (all read from the running interpreter; nothing is downloaded):
  prose  "pydoc topics"       the language reference topics bundled as `pydoc_data.topics`
  prose  "stdlib docstrings"  module, class and function docstrings of the standard library (via `ast`)
  prose  "package readmes"    the long descriptions installed packages carry in their metadata
  code   "stdlib source"      the standard library's own `.py` files

Documents are listed in a deterministic order and split into train/validation by a hash of their
`group` (the stdlib file for docstrings and source, so a module's docstrings and code land in the same
split). Token streams join documents with `<|endoftext|>`.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import inspect
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["Document", "iter_documents", "build_corpus", "Corpus", "DOMAINS"]

DOMAINS = ("prose", "code")
ENDOFTEXT = 100257
# stdlib folders left out: tests, vendored/generated tables and the pydoc topics (prose stored as code)
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo", "config-3.11-x86_64-linux-gnu"}
_MAX_FILE_BYTES = 200_000
_MIN_DOCSTRING_CHARS = 40
_MIN_README_CHARS = 200


@dataclass(frozen=True)
class Document:
    """One text of the corpus. `group` decides the split; `split` is "train" or "val"."""

    doc_id: str
    source: str
    domain: str
    group: str
    text: str
    val_fraction: float = 0.05

    @property
    def split(self) -> str:
        h = int.from_bytes(hashlib.sha256(self.group.encode()).digest()[:8], "big") / 2**64
        return "val" if h < self.val_fraction else "train"


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        files.append(path)
    return files


def _docstrings(tree: ast.Module) -> list[str]:
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
            out.append(doc)
    return out


def iter_documents(domain: str | None = None, val_fraction: float = 0.05) -> Iterator[Document]:
    """The corpus documents in a fixed order (prose: pydoc topics, stdlib docstrings, package readmes;
    code: stdlib files in a hashed order, so a token cap still spans the library). `domain` selects one."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if domain not in (None, *DOMAINS):
        raise ValueError(f"domain must be one of {DOMAINS} or None, got {domain!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files()
    if domain in (None, "prose"):
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield Document(f"pydoc:{name}", "pydoc topics", "prose", f"pydoc:{name}", topics[name].strip(),
                           val_fraction)
        for path in files:
            rel = path.relative_to(root).as_posix()
            tree = _parse(path)
            docs = _docstrings(tree) if tree is not None else []
            if docs:
                yield Document(f"docstrings:{rel}", "stdlib docstrings", "prose", f"stdlib:{rel}",
                               "\n\n".join(docs), val_fraction)
        seen = set()
        dists = sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
        for dist in dists:
            name = (dist.metadata["Name"] or "").lower()
            if not name or name in seen or name == "dbrx-lab":
                continue
            seen.add(name)
            text = dist.metadata["Description"] or dist.metadata.get_payload() or ""
            text = inspect.cleandoc(text) if text else ""
            if len(text) >= _MIN_README_CHARS:
                yield Document(f"readme:{name}", "package readmes", "prose", f"readme:{name}", text, val_fraction)
    if domain in (None, "code"):
        rels = sorted((p.relative_to(root).as_posix() for p in files),
                      key=lambda r: hashlib.sha256(f"source:{r}".encode()).hexdigest())
        for rel in rels:
            if _parse(root / rel) is None:
                continue
            text = (root / rel).read_text(encoding="utf-8")
            if text.strip():
                yield Document(f"source:{rel}", "stdlib source", "code", f"stdlib:{rel}", text, val_fraction)


def _parse(path: Path) -> ast.Module | None:
    """The module's AST, or None when it is not valid UTF-8 Python 3."""
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


@dataclass
class Corpus:
    """Token streams per (domain, split): `tokens[(domain, split)]` int32 [n]; `stats` for the model card."""

    tokens: dict[tuple[str, str], np.ndarray]
    stats: dict

    def stream(self, domain: str, split: str) -> np.ndarray:
        if domain not in DOMAINS or split not in ("train", "val"):
            raise ValueError(f"domain must be one of {DOMAINS} and split 'train' or 'val', got {domain!r}, {split!r}")
        return self.tokens[(domain, split)]


def build_corpus(max_tokens: dict[str, int] | None = None, val_fraction: float = 0.05) -> Corpus:
    """Tokenise the corpus -> Corpus. `max_tokens` caps each domain's train+val tokens (documents are
    taken in order until the cap; None = everything)."""
    from .tokenizer import load_tokenizer

    tok = load_tokenizer()
    max_tokens = dict(max_tokens or {})
    chunks: dict[tuple[str, str], list[list[int]]] = {(d, s): [] for d in DOMAINS for s in ("train", "val")}
    totals = {d: 0 for d in DOMAINS}
    sources: dict[str, dict] = {}

    def _add(doc: Document) -> None:
        ids = tok.encode(doc.text) + [ENDOFTEXT]
        chunks[(doc.domain, doc.split)].append(ids)
        totals[doc.domain] += len(ids)
        entry = sources.setdefault(doc.source, {"domain": doc.domain, "documents": {"train": 0, "val": 0},
                                                "tokens": {"train": 0, "val": 0}})
        entry["documents"][doc.split] += 1
        entry["tokens"][doc.split] += len(ids)

    for domain in DOMAINS:
        cap = max_tokens.get(domain)
        for doc in iter_documents(domain, val_fraction):
            if cap is not None and totals[domain] >= cap:
                break
            _add(doc)
    tokens = {key: np.fromiter((t for c in lists for t in c), dtype=np.int32) for key, lists in chunks.items()}
    stats = {
        "python": sys.version.split()[0],
        "stdlib": sysconfig.get_paths()["stdlib"],
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "sources": sources,
        "tokens": {f"{d}/{s}": int(v.size) for (d, s), v in tokens.items()},
    }
    return Corpus(tokens, stats)
