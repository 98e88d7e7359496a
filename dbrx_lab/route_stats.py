"""`dbrx-lab route-stats`: stream a text dataset through a model, write per-token routing and aggregate tables.

    dbrx-lab route-stats --model demo --data texts.jsonl --out runs/demo-routing

Input: `.jsonl`, one JSON object per line, {"text": ..., optional "label" or "domain"} (blank lines are
skipped); or `.txt`, one text per paragraph (paragraphs are separated by blank lines; `--split line`:
one text per non-empty line). A text longer than the limit (--max-tokens-per-text, default the model's
max_seq_len) is an error naming its line, unless --truncate keeps its first tokens.

Output folder:
    routing/part-NNNNN.parquet   per (token, layer): text, line, label, position (within the text),
                                 token_id, token, next_id, predicted_id, predicted (the model's top-1 next
                                 token there; -1 with --no-predictions), layer, expert_i, weight_i,
                                 top1_weight, entropy, margin, topk_mass, runner_up
                                 (see dbrx_lab.analysis.routing)
    manifest.json                committed parts and the progress (texts done, hash of those texts)
    meta.json                    model shape (n_layers, n_experts, top_k), model and data names
    load, coactivation, repetition, confidence, fragile_tokens, transitions, vocab_input,
    [vocab_predicted,] top_tokens[, domain].parquet: the aggregate tables (dbrx_lab.analysis)
    summary.json                 texts, tokens, seconds

The folder must be new, empty, or a route-stats output: route-stats never deletes or overwrites a file it did
not write (a non-empty folder without its manifest.json is refused; --overwrite starts over by removing only
its own outputs, and keeps anything else, e.g. notes.txt).

Memory stays bounded: batches are written as row groups of the current part file, and the aggregates are
computed one part at a time. Interrupted runs resume where the last committed part ended (the part being
written is discarded); bad input stops the run with a message naming the line, after committing every
text before it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from .analysis.routing import (CoactivationCounts, ConfidenceStats, FragileTokens, LoadCounts, RepetitionCounts,
                               Routing, TransitionCounts, iter_routing)
from .analysis.specialization import VocabCounts, specialization_from_load

__all__ = ["route_stats", "read_texts", "RouteStatsResult", "add_arguments", "run"]

PART_TOKENS = 20_000           # tokens per committed part file
PREDICT_CHUNK = 256            # tokens per lm_head chunk when computing predictions
SPLITS = ("paragraph", "line")
MANIFEST_FORMAT = "dbrx_lab.route_stats"
PART_NAME = re.compile(r"part-\d{5}\.parquet(\.tmp)?")      # files route-stats writes in routing/
TABLES = ("load", "coactivation", "repetition", "confidence", "fragile_tokens", "transitions", "vocab_input",
          "vocab_predicted", "top_tokens", "domain")


@dataclass
class TextItem:
    index: int                 # 0-based order in the file
    line: int                  # 1-based line where the text starts
    text: str
    label: str | None

    def fingerprint(self, hasher) -> None:
        """Add this text to the running hash that lets a resumed run check the texts it skips."""
        hasher.update(repr((self.line, self.text, self.label)).encode())


@dataclass
class RouteStatsResult:
    out: Path
    texts: int                 # texts in the output (all runs)
    tokens: int                # tokens in the output (all runs)
    new_tokens: int            # tokens this call added
    seconds: float             # time this call spent on them (model + writing; aggregates excluded)
    tables: dict[str, Path]


# ------------------------------------------------------------------------------------------------
# input
def read_texts(path: str | os.PathLike, split: str = "paragraph") -> Iterator[TextItem]:
    """Texts of a .jsonl or .txt file. The file is checked now; texts are read lazily, and a malformed line
    raises ValueError naming it when it is reached."""
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix not in (".jsonl", ".txt"):
        raise ValueError(f"data file {path}: use a .jsonl file ({{\"text\": ...}} per line) or a .txt file")
    return _items(path, split)


def _items(path: Path, split: str) -> Iterator[TextItem]:
    count = 0
    lines = _lines(path)
    items = _jsonl(path, lines) if path.suffix == ".jsonl" else _txt(lines, split)
    for line, text, label in items:
        yield TextItem(count, line, text, label)
        count += 1
    if count == 0:
        raise ValueError(f"data file {path} has no texts (it is empty or only blank lines)")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _jsonl(path: Path, lines) -> Iterator[tuple[int, str, str | None]]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{number}: expected an object with a string "text" field, got '
                             f"{line.strip()[:80]!r}")
        if not obj["text"]:
            raise ValueError(f'{path}:{number}: "text" is empty')
        label = obj.get("label", obj.get("domain"))
        yield number, obj["text"], None if label is None else str(label)


def _txt(lines, split: str) -> Iterator[tuple[int, str, None]]:
    start, block = 0, []
    for number, line in lines:
        line = line.rstrip("\r\n")
        if split == "line":
            if line.strip():
                yield number, line, None
        elif line.strip():
            start = start or number
            block.append(line)
        elif block:
            yield start, "\n".join(block), None
            start, block = 0, []
    if block:
        yield start, "\n".join(block), None


# ------------------------------------------------------------------------------------------------
# output folder
def _schema(k: int) -> pa.Schema:
    fields = [("text", pa.int64()), ("line", pa.int64()), ("label", pa.string()), ("position", pa.int32()),
              ("token_id", pa.int64()), ("token", pa.string()), ("next_id", pa.int64()),
              ("predicted_id", pa.int64()), ("predicted", pa.string()), ("layer", pa.int16())]
    fields += [(f"expert_{i}", pa.int16()) for i in range(k)] + [(f"weight_{i}", pa.float32()) for i in range(k)]
    fields += [("top1_weight", pa.float32()), ("entropy", pa.float32()), ("margin", pa.float32()),
               ("topk_mass", pa.float32()), ("runner_up", pa.int16())]
    return pa.schema(fields)


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (a .tmp beside it, renamed into place; a failed write removes the .tmp)."""
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _own_outputs(out: Path) -> list[Path]:
    """Files of `out` that route-stats writes (and --overwrite may remove); nothing else is ever touched."""
    names = ["manifest.json", "summary.json", "meta.json", *(f"{t}.parquet" for t in TABLES)]
    found = [out / n for n in names + [n + ".tmp" for n in names] if (out / n).is_file()]
    parts = out / "routing"
    if parts.is_dir():
        found += [f for f in parts.iterdir() if PART_NAME.fullmatch(f.name) and f.is_file()]
    return found


def _read_manifest(path: Path) -> dict:
    """A route-stats manifest; ValueError when the file is another tool's (or damaged): the folder is not ours."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is not a route-stats manifest ({err}); route-stats does not touch a folder "
                         f"it did not write: choose another --out") from None
    ok = isinstance(state, dict) and state.get("format", MANIFEST_FORMAT) == MANIFEST_FORMAT and \
        isinstance(state.get("settings"), dict) and isinstance(state.get("parts"), list) and \
        all(isinstance(p, dict) and isinstance(p.get("file"), str) and PART_NAME.fullmatch(p["file"]) and
            not p["file"].endswith(".tmp") for p in state["parts"]) and \
        isinstance(state.get("texts_done"), int) and isinstance(state.get("tokens_done"), int) and \
        isinstance(state.get("texts_sha256"), str)
    if not ok:
        raise ValueError(f"{path} was not written by route-stats (another tool's manifest.json); route-stats "
                         f"does not touch a folder it did not write: choose another --out")
    return state


class _Manifest:
    """Progress of a run: committed part files, texts done and the sha256 of those texts."""

    def __init__(self, out: Path, settings: dict, resume: bool) -> None:
        self.out, self.path, self.parts_dir = out, out / "manifest.json", out / "routing"
        state = _read_manifest(self.path) if self.path.exists() else None
        if state is None:
            others = sorted(p.name for p in out.iterdir() if not (p.name == "routing" and p.is_dir() and
                                                                   not any(p.iterdir())))
            if others:
                raise ValueError(f"{out} is not empty and holds no route-stats run (it has {', '.join(others[:5])}"
                                 f"{', ...' if len(others) > 5 else ''}); route-stats never deletes or overwrites "
                                 f"files it did not write: give a new or empty folder as --out")
        elif not resume:                        # --overwrite: remove this tool's outputs, keep everything else
            for f in _own_outputs(out):
                f.unlink()
            state = None
        elif state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); resume with the "
                             f"same settings, or start over with --overwrite (resume=False)")
        fresh = state is None
        self.state = state or {"format": MANIFEST_FORMAT, "settings": settings, "parts": [], "texts_done": 0,
                               "tokens_done": 0, "texts_sha256": hashlib.sha256().hexdigest()}
        self.state.setdefault("format", MANIFEST_FORMAT)
        if fresh:                               # the folder is marked as ours before anything else is written
            _write_json(self.path, self.state)
        self.parts_dir.mkdir(exist_ok=True)
        committed = {p["file"] for p in self.state["parts"]}
        for f in self.parts_dir.iterdir():      # the part being written when interrupted, stale parts (ours only)
            if PART_NAME.fullmatch(f.name) and f.name not in committed and f.is_file():
                f.unlink()

    def next_file(self) -> str:
        return f"part-{len(self.state['parts']):05d}.parquet"

    def commit(self, file: str, texts: tuple[int, int], tokens: int, rows: int, texts_sha256: str) -> None:
        self.state["parts"].append({"file": file, "texts": list(texts), "tokens": tokens, "rows": rows})
        self.state["texts_done"] = texts[1]
        self.state["tokens_done"] += tokens
        self.state["texts_sha256"] = texts_sha256
        _write_json(self.path, self.state)


class _PartWriter:
    """Row groups of the current part file (written to a .tmp name until committed)."""

    def __init__(self, manifest: _Manifest, schema: pa.Schema) -> None:
        self.manifest, self.schema = manifest, schema
        self.writer: pq.ParquetWriter | None = None
        self.first_text = self.stop_text = self.tokens = self.rows = 0

    def write(self, table: pa.Table, first_text: int, stop_text: int, tokens: int) -> None:
        if self.writer is None:
            self.file = self.manifest.next_file()
            self.tmp = self.manifest.parts_dir / (self.file + ".tmp")
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.first_text, self.tokens, self.rows = first_text, 0, 0
        self.writer.write_table(table)
        self.stop_text = stop_text
        self.tokens += tokens
        self.rows += table.num_rows

    def commit(self, texts_sha256: str) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        os.replace(self.tmp, self.manifest.parts_dir / self.file)
        self.manifest.commit(self.file, (self.first_text, self.stop_text), self.tokens, self.rows, texts_sha256)


# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _route_batch(model, tok, items: list[TextItem], rows: list[list[int]],
                 predictions: bool = True) -> tuple[pd.DataFrame, int]:
    """Run one batch; -> (wide routing DataFrame of its tokens, tokens). Without predictions the logits
    are computed for the last column only (predicted_id -1)."""
    from .trace import Record, run_with_trace

    B, T = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = True
    final = {}
    last = f"blocks.{model.config.n_layers - 1}.hook_resid_post"
    # with last_only the hook sees tokens :-1 (a side pass of the last block), then the last one
    keep = lambda x, hook: final.update(x=torch.cat([final["x"], x], 1) if "x" in final else x)  # noqa: E731
    with model.hooks([(last, keep)] if predictions else []):
        _, trace = run_with_trace(model, ids, None if bool(mask.all()) else mask.long(),
                                  record=Record(router=True), last_only=True)
    predicted = torch.full((int(mask.sum()),), -1, dtype=torch.long)
    if predictions:                    # lm_head in chunks: never the whole [B, T, vocab] logits
        x = final["x"][mask.to(final["x"].device)]                                      # [N, d]
        predicted = torch.cat([model.lm_head(model.transformer.norm_f(x[i:i + PREDICT_CHUNK])).argmax(-1).cpu()
                               for i in range(0, x.shape[0], PREDICT_CHUNK)])
    r = Routing.from_trace(trace, text_offset=items[0].index)
    lengths = np.array([len(row) for row in rows])
    b = r.columns["text"] - items[0].index
    r.columns["position"] = r.columns["position"] - (T - lengths[b])
    r.columns["line"] = np.array([it.line for it in items])[b]
    r.columns["label"] = np.array([it.label for it in items], dtype=object)[b]
    r.columns["predicted_id"] = predicted.numpy()
    r.columns["predicted"] = np.array(tok.token_strings(predicted.tolist()) if predictions else
                                      [None] * len(predicted), dtype=object)
    return r.to_frame(), int(mask.sum())


def _aggregate(out: Path, min_count: int, predictions: bool) -> dict[str, Path]:
    """Aggregate tables over every committed part, one part in memory at a time."""
    stats = {"load": LoadCounts(), "coactivation": CoactivationCounts(), "repetition": RepetitionCounts(),
             "confidence": ConfidenceStats(), "fragile_tokens": FragileTokens(50), "transitions": TransitionCounts()}
    vocab = {"input": VocabCounts("input"), **({"predicted": VocabCounts("predicted")} if predictions else {})}
    domain, labelled = LoadCounts(by="label"), False
    for routing in iter_routing(out):
        labelled = labelled or bool(pd.notna(routing.columns["label"]).any())
        for acc in [*stats.values(), *vocab.values(), domain]:
            acc.update(routing)
    tables = {name: acc.result() for name, acc in stats.items()}
    for by, acc in vocab.items():
        tables[f"vocab_{by}"] = acc.specialization(min_count)
    tables["top_tokens"] = vocab["input"].top_tokens(n=20, min_count=min_count)
    if labelled:
        tables["domain"] = specialization_from_load(domain.result(), "label")
    paths = {}
    for name, df in tables.items():
        paths[name] = out / f"{name}.parquet"
        _atomic(paths[name], lambda tmp: df.to_parquet(tmp, index=False))
    return paths


def route_stats(model, data: str | os.PathLike, out: str | os.PathLike, batch_size: int = 8,
                max_tokens_per_text: int | None = None, resume: bool = True, truncate: bool = False,
                split: str = "paragraph", min_count: int = 10, predictions: bool = True, progress: bool = True,
                part_tokens: int | None = None) -> RouteStatsResult:
    """Stream the texts of `data` through `model` (a DbrxLM, or a name for `load_model`: "demo", a preset,
    a checkpoint folder) in batches, write per-token routing to `out`/routing/*.parquet and the aggregate
    tables to `out` (see the module doc). resume: continue a previous run in `out` with the same settings
    (False: start over, deleting its routing parts). max_tokens_per_text: the limit per text (default and
    maximum: the model's max_seq_len); longer texts are an error naming the line unless truncate=True.
    min_count: occurrences a token needs for the vocabulary tables. predictions: also record the model's
    top-1 next-token prediction at every token (the lm_head over the whole vocabulary at every position:
    most of the time for a tiny model, little for DBRX); False leaves predicted_id -1.
    """
    part_tokens = PART_TOKENS if part_tokens is None else part_tokens
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model_name = model if isinstance(model, (str, os.PathLike)) else None
    if model_name is not None:
        from .loading import load_model

        model = load_model(model_name)
    cfg = model.config
    limit = cfg.max_seq_len if max_tokens_per_text is None else max_tokens_per_text
    if not isinstance(limit, int) or not 1 <= limit <= cfg.max_seq_len:
        raise ValueError(f"max_tokens_per_text must be in [1, {cfg.max_seq_len}] (the model's max_seq_len), "
                         f"got {max_tokens_per_text!r}")
    tok = model.tokenizer
    if tok is None:
        from .tokenizer import VOCAB_SIZE, load_tokenizer

        if cfg.vocab_size < VOCAB_SIZE:
            raise ValueError(f"route-stats encodes text with the DBRX tokenizer ({VOCAB_SIZE} ids); this model's "
                             f"vocabulary has {cfg.vocab_size}: use a real-vocabulary model (demo, tiny-vocab, ...)")
        tok = model.tokenizer = load_tokenizer()
    data, out = Path(data), Path(out)
    texts = read_texts(data, split)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, empty, or an earlier route-stats output)")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": str(data.resolve()), "split": split, "model": str(model_name) if model_name else None,
                "config": cfg.to_dict(), "max_tokens_per_text": limit, "truncate": truncate,
                "predictions": predictions}
    manifest = _Manifest(out, settings, resume)
    meta = {"n_layers": cfg.n_layers, "n_experts": cfg.moe_num_experts, "top_k": cfg.moe_top_k,
            "model": settings["model"], "data": settings["data"]}
    _write_json(out / "meta.json", meta)

    hasher = hashlib.sha256()
    done = manifest.state["texts_done"]
    for item in texts if done else ():
        item.fingerprint(hasher)
        if item.index + 1 == done:
            break
    if hasher.hexdigest() != manifest.state["texts_sha256"]:
        raise ValueError(f"the first {done} texts of {data} changed since the run in {out} began; start over "
                         f"with --overwrite (resume=False)")

    writer = _PartWriter(manifest, _schema(cfg.moe_top_k))
    batch: list[TextItem] = []
    encoded: list[list[int]] = []
    start = time.perf_counter()
    tokens = 0
    bar = tqdm(desc="route-stats", unit=" texts", initial=done, disable=not progress)

    def flush() -> None:
        nonlocal tokens
        if batch:
            frame, n = _route_batch(model, tok, batch, encoded, predictions)
            writer.write(pa.Table.from_pandas(frame[writer.schema.names], schema=writer.schema,
                                              preserve_index=False), batch[0].index, batch[-1].index + 1, n)
            for item in batch:
                item.fingerprint(hasher)
            tokens += n
            bar.update(len(batch))
            bar.set_postfix(tokens=manifest.state["tokens_done"] + writer.tokens)
            batch.clear()
            encoded.clear()
        if writer.tokens >= part_tokens:
            writer.commit(hasher.hexdigest())

    bad_input = None
    try:
        try:
            for item in texts:
                try:
                    ids = tok.encode(item.text)
                except ValueError as err:
                    raise ValueError(f"{data}:{item.line}: the tokenizer cannot encode this text ({err})") from None
                if len(ids) > limit:
                    if not truncate:
                        raise ValueError(f"{data}:{item.line}: text of {len(ids)} tokens is longer than the limit "
                                         f"of {limit} (max_seq_len={cfg.max_seq_len}); shorten it, or pass "
                                         f"--truncate to keep its first {limit} tokens")
                    ids = ids[:limit]
                batch.append(item)
                encoded.append(ids)
                if len(batch) == batch_size:
                    flush()
        except ValueError as err:      # bad input: keep every text before it, then report it
            bad_input = err
        flush()
        writer.commit(hasher.hexdigest())
    finally:
        bar.close()
    if bad_input is not None:
        raise bad_input
    seconds = time.perf_counter() - start
    tables = _aggregate(out, min_count, predictions)
    state = manifest.state
    _write_json(out / "summary.json", {"texts": state["texts_done"], "tokens": state["tokens_done"],
                                       "parts": len(state["parts"]), "seconds_last_run": round(seconds, 3),
                                       "tokens_last_run": tokens})
    return RouteStatsResult(out, state["texts_done"], state["tokens_done"], tokens, seconds, tables)


# ------------------------------------------------------------------------------------------------
# CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help='"demo", a preset (tiny-vocab, bench, ...) or a checkpoint folder')
    parser.add_argument("--data", required=True, help=".jsonl ({\"text\": ..., \"label\": ...} per line) or .txt "
                                                      "(one text per blank-line-separated paragraph)")
    parser.add_argument("--out", required=True, help="output folder (created; a run there is resumed)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument("--max-tokens-per-text", type=int, default=None,
                        help="longest text allowed, in tokens (default: the model's max_seq_len)")
    parser.add_argument("--truncate", action="store_true", help="cut longer texts instead of stopping with an error")
    parser.add_argument("--split", choices=SPLITS, default="paragraph",
                        help=".txt only: a text per paragraph (default) or per non-empty line")
    parser.add_argument("--min-count", type=int, default=10,
                        help="occurrences a token needs in the vocabulary tables (default 10)")
    parser.add_argument("--no-predictions", action="store_true",
                        help="skip the model's next-token prediction per token (faster for small models)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming a run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = route_stats(args.model, args.data, args.out, batch_size=args.batch_size,
                         max_tokens_per_text=args.max_tokens_per_text, resume=not args.overwrite,
                         truncate=args.truncate, split=args.split, min_count=args.min_count,
                         predictions=not args.no_predictions, progress=not args.no_progress)
    rate = result.seconds / max(result.new_tokens, 1) * 1000
    print(f"{result.texts} texts, {result.tokens} tokens -> {result.out} "
          f"({result.new_tokens} new tokens, {rate:.2f} s per 1,000 tokens)")
    return 0
