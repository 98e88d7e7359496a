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

Several processes (torch.distributed; `torchrun --nproc-per-node N -m dbrx_lab.cli route-stats ...`,
`accelerate launch`, or srun starting torchrun on several nodes): each process holds one model replica
(on the GPUs that LOCAL_RANK and --gpus-per-replica give it) and the folder --out must be shared by every
rank (one file system, e.g. NFS or Lustre). Rank 0 checks the folder and plans the run before anything is
sharded: it tokenizes the texts and cuts them into the parts one process writes (batches of batch_size
consecutive texts; a part ends with the batch that brings it to part_tokens tokens), so the plan does not
depend on N. Ranks take whole parts, balanced by tokens, and route them; a rank commits a part by renaming
its parquet file into place and writing `routing/part-NNNNN.json` (texts, tokens, rows, sha256 of its
texts) beside it; rank 0 moves those records into manifest.json in plan order, and when every part is in
computes the aggregate tables from the parts in order. The folder then holds the same files, byte for
byte, as a single process writes (summary.json and the logs aside), whatever N is. A rerun with any N
resumes from every committed part. A rank that fails (bad input, an error) tells the others through the
job's store; they stop after their current batch, and every rank reports the error (exit status 2).
Collectives and waits for other ranks time out after --dist-timeout seconds (a killed rank: the others
stop, committed parts are kept). One progress bar (rank 0, tokens of every rank); per-rank logs in
`--log-dir` (default --out/logs/rank-NNNNN.log, appended).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
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

from . import distributed
from .analysis.routing import (CoactivationCounts, ConfidenceStats, FragileTokens, LoadCounts, RepetitionCounts,
                               Routing, TransitionCounts, iter_routing)
from .analysis.specialization import VocabCounts, specialization_from_load

__all__ = ["route_stats", "read_texts", "RouteStatsResult", "add_arguments", "run"]

PART_TOKENS = 20_000           # tokens per committed part file
PREDICT_CHUNK = 256            # tokens per lm_head chunk when computing predictions
SPLITS = ("paragraph", "line")
MANIFEST_FORMAT = "dbrx_lab.route_stats"
PART_NAME = re.compile(r"part-\d{5}\.(parquet|json)(\.tmp)?")   # files route-stats writes in routing/
PART_FILE = re.compile(r"part-\d{5}\.parquet")                 # a committed part
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
        all(isinstance(p, dict) and isinstance(p.get("file"), str) and PART_FILE.fullmatch(p["file"])
            for p in state["parts"]) and \
        isinstance(state.get("texts_done"), int) and isinstance(state.get("tokens_done"), int) and \
        isinstance(state.get("texts_sha256"), str)
    if not ok:
        raise ValueError(f"{path} was not written by route-stats (another tool's manifest.json); route-stats "
                         f"does not touch a folder it did not write: choose another --out")
    return state


class _Manifest:
    """Progress of a run: committed part files (in text order), texts done and the sha256 of those texts.

    Only rank 0 writes it. With several processes a rank commits a part by renaming its parquet file into
    place and then writing its record beside it (`part-NNNNN.json`); rank 0 moves the records that continue
    the manifest's texts into it, in plan order, so the manifest always lists a prefix of the texts."""

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
        files = [f for f in self.parts_dir.iterdir() if PART_NAME.fullmatch(f.name) and f.is_file()]
        for f in files:                         # the part being written when interrupted, stale parts (ours only)
            if f.name.endswith(".tmp"):
                f.unlink()
            elif f.suffix == ".json":           # a rank's commit record: kept while its part may continue the run
                if f.with_suffix(".parquet").name in committed or not f.with_suffix(".parquet").is_file():
                    f.unlink()
            elif f.name not in committed and not f.with_suffix(".json").is_file():
                f.unlink()

    def commit(self, part: "_Part", rows: int) -> None:
        self.state["parts"].append({"file": part.file, "texts": [part.start, part.stop], "tokens": part.tokens,
                                    "rows": rows})
        self.state["texts_done"] = part.stop
        self.state["tokens_done"] += part.tokens
        self.state["texts_sha256"] = part.sha_after
        _write_json(self.path, self.state)

    def record(self, part: "_Part") -> dict | None:
        """The commit record of `part` written by a rank, when it matches the plan (else None)."""
        side = self.parts_dir / (part.file[:-len(".parquet")] + ".json")
        try:
            rec = json.loads(side.read_text())
            ok = rec.get("texts") == [part.start, part.stop] and rec.get("tokens") == part.tokens and \
                rec.get("sha256") == part.sha and (self.parts_dir / part.file).is_file()
        except (OSError, ValueError, AttributeError):
            return None
        return rec if ok else None

    def merge(self, parts: list["_Part"], known: dict[str, int] | None = None) -> int:
        """Move the committed parts that continue the manifest's texts into it (plan order) -> parts moved.
        known: {file: rows} of parts the ranks reported committed in this run (through the final gather): used
        when a record is not visible yet (a shared file system may cache a file's absence for a while)."""
        moved = []
        for part in parts:
            if part.stop <= self.state["texts_done"]:
                continue
            rec = self.record(part) if part.start == self.state["texts_done"] else None
            if rec is None and part.start == self.state["texts_done"] and part.file in (known or {}):
                rec = {"rows": known[part.file]}
            if rec is None:
                break
            self.state["parts"].append({"file": part.file, "texts": [part.start, part.stop],
                                        "tokens": part.tokens, "rows": rec["rows"]})
            self.state["texts_done"] = part.stop
            self.state["tokens_done"] += part.tokens
            self.state["texts_sha256"] = part.sha_after
            moved.append(part)
        if moved:
            _write_json(self.path, self.state)
            for part in moved:
                (self.parts_dir / (part.file[:-len(".parquet")] + ".json")).unlink(missing_ok=True)
        return len(moved)


@dataclass
class _Part:
    """A planned part: whole batches of consecutive texts [start, stop), cut where a batch ends with at least
    part_tokens tokens in the part (what a single process always did), so the parts do not depend on N."""
    index: int
    start: int
    stop: int
    tokens: int
    sha: str                   # sha256 of this part's texts
    sha_after: str             # running sha256 of every text up to stop (the manifest's texts_sha256)

    @property
    def file(self) -> str:
        return f"part-{self.index:05d}.parquet"


class _PartWriter:
    """Row groups of one part file (written to a .tmp name, renamed into place when committed)."""

    def __init__(self, parts_dir: Path, schema: pa.Schema) -> None:
        self.parts_dir, self.schema = parts_dir, schema
        self.writer: pq.ParquetWriter | None = None
        self.tokens = self.rows = 0

    def write(self, part: _Part, table: pa.Table, tokens: int) -> None:
        if self.writer is None:
            self.tmp = self.parts_dir / (part.file + ".tmp")
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.tokens = self.rows = 0
        self.writer.write_table(table)
        self.tokens += tokens
        self.rows += table.num_rows

    def commit(self, part: _Part) -> int:
        """Close and rename into place -> rows."""
        self.writer.close()
        self.writer = None
        os.replace(self.tmp, self.parts_dir / part.file)
        return self.rows

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.tmp.unlink(missing_ok=True)


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
                part_tokens: int | None = None, dist_timeout: float | None = None, gpus_per_replica: int = 0,
                log_dir: str | os.PathLike | None = None) -> RouteStatsResult:
    """Stream the texts of `data` through `model` (a DbrxLM, or a name for `load_model`: "demo", a preset,
    a checkpoint folder) in batches, write per-token routing to `out`/routing/*.parquet and the aggregate
    tables to `out` (see the module doc). resume: continue a previous run in `out` with the same settings
    (False: start over, deleting its routing parts). max_tokens_per_text: the limit per text (default and
    maximum: the model's max_seq_len); longer texts are an error naming the line unless truncate=True.
    min_count: occurrences a token needs for the vocabulary tables. predictions: also record the model's
    top-1 next-token prediction at every token (the lm_head over the whole vocabulary at every position:
    most of the time for a tiny model, little for DBRX); False leaves predicted_id -1.

    Under a launcher (torchrun, `accelerate launch`: WORLD_SIZE > 1) every process calls this with the same
    arguments and runs one replica data-parallel (see "Several processes" in the module doc); `out` must be
    a folder every rank sees. dist_timeout: seconds a collective or a wait for other ranks may take (default
    1800; raise it for slow offloaded replicas). gpus_per_replica: CUDA devices per replica when `model` is
    a name (rank with LOCAL_RANK r takes [r*g, (r+1)*g); 0: CPU). log_dir: per-rank log files
    (rank-NNNNN.log; default `out`/logs with several processes, none for one).
    """
    part_tokens = PART_TOKENS if part_tokens is None else part_tokens
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(part_tokens, int) or part_tokens < 1:
        raise ValueError(f"part_tokens must be an integer >= 1, got {part_tokens!r}")
    ctx = distributed.context(dist_timeout)
    try:
        return _route_stats(ctx, model, Path(data), Path(out), batch_size, max_tokens_per_text, resume, truncate,
                            split, min_count, predictions, progress, part_tokens, gpus_per_replica, log_dir)
    finally:
        for handler in list(logging.getLogger(f"dbrx_lab.route_stats.rank{ctx.rank}").handlers):
            handler.close()            # the log file is closed (it is reopened in append mode by the next run)
        ctx.close()


def _load(model, ctx: distributed.Context, gpus_per_replica: int):
    """-> (model, its name or None): a name is loaded on this rank's GPUs (or the CPU)."""
    if not isinstance(model, (str, os.PathLike)):
        return model, None
    from .loading import load_model

    devices = distributed.replica_devices(ctx.local_rank, gpus_per_replica)
    if not devices:
        return load_model(model), model
    if len(devices) == 1:
        return load_model(model, device=f"cuda:{devices[0]}"), model
    memory = {d: torch.cuda.get_device_properties(d).total_memory for d in devices}
    return load_model(model, device_map="auto", max_memory=memory), model


def _plan(texts: Iterator[TextItem], tok, limit: int, truncate: bool, batch_size: int, part_tokens: int,
          done: int, first_index: int, hasher, data: Path, max_seq_len: int) -> tuple[list[_Part], ValueError | None]:
    """Tokenize the texts after the first `done` (already hashed into `hasher`) and cut them into parts of
    whole batches: a batch is batch_size consecutive texts, a part ends with the first batch that brings it
    to part_tokens tokens. Bad input ends the plan before it -> (parts, the error)."""
    parts: list[_Part] = []
    start, tokens, in_batch, part_hash = done, 0, 0, hashlib.sha256()
    stop = done

    def close(stop: int) -> None:
        nonlocal start, tokens, part_hash
        parts.append(_Part(first_index + len(parts), start, stop, tokens, part_hash.hexdigest(), hasher.hexdigest()))
        start, tokens, part_hash = stop, 0, hashlib.sha256()

    bad = None
    try:
        for item in texts:
            tokens += len(_encode(tok, item, limit, truncate, data, max_seq_len))
            item.fingerprint(hasher)
            item.fingerprint(part_hash)
            stop, in_batch = item.index + 1, in_batch + 1
            if in_batch == batch_size:
                in_batch = 0
                if tokens >= part_tokens:
                    close(stop)
    except ValueError as err:          # bad input: every text before it is routed, then it is reported
        bad = err
    if stop > start:
        close(stop)
    return parts, bad


def _encode(tok, item: TextItem, limit: int, truncate: bool, data: Path, max_seq_len: int) -> list[int]:
    try:
        ids = tok.encode(item.text)
    except ValueError as err:
        raise ValueError(f"{data}:{item.line}: the tokenizer cannot encode this text ({err})") from None
    if len(ids) > limit:
        if not truncate:
            raise ValueError(f"{data}:{item.line}: text of {len(ids)} tokens is longer than the limit of {limit} "
                             f"(max_seq_len={max_seq_len}); shorten it, or pass "
                             f"--truncate to keep its first {limit} tokens")
        ids = ids[:limit]
    return ids


def _assign(parts: list[_Part], pending: list[bool], world: int) -> list[int]:
    """Owner rank of each part: in plan order, the rank with the fewest tokens so far (ties: lowest rank), so
    ranks take whole parts balanced by tokens and rank 0 keeps the manifest's prefix moving."""
    load = [0] * world
    owners = []
    for part, todo in zip(parts, pending):
        if not todo:
            owners.append(-1)
            continue
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += part.tokens
        owners.append(rank)
    return owners


def _peak_rss_mib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def _logger(ctx: distributed.Context, out: Path, log_dir) -> logging.Logger:
    log = logging.getLogger(f"dbrx_lab.route_stats.rank{ctx.rank}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if ctx.distributed or log_dir is not None:
        folder = Path(log_dir) if log_dir is not None else out / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / f"rank-{ctx.rank:05d}.log", mode="a")     # appended, never replaced
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {ctx.rank}/{ctx.world} %(message)s"))
        log.addHandler(handler)
    else:                              # one process: no log file, and nothing on stderr (the CLI reports errors)
        log.addHandler(logging.NullHandler())
    return log


def _route_stats(ctx: distributed.Context, model, data: Path, out: Path, batch_size: int,
                 max_tokens_per_text, resume: bool, truncate: bool, split: str, min_count: int, predictions: bool,
                 progress: bool, part_tokens: int, gpus_per_replica: int, log_dir) -> RouteStatsResult:
    error = None
    try:                               # every rank: its replica and the input checks
        model, model_name = _load(model, ctx, gpus_per_replica)
        cfg = model.config
        limit = cfg.max_seq_len if max_tokens_per_text is None else max_tokens_per_text
        if not isinstance(limit, int) or not 1 <= limit <= cfg.max_seq_len:
            raise ValueError(f"max_tokens_per_text must be in [1, {cfg.max_seq_len}] (the model's max_seq_len), "
                             f"got {max_tokens_per_text!r}")
        tok = model.tokenizer
        if tok is None:
            from .tokenizer import VOCAB_SIZE, load_tokenizer

            if cfg.vocab_size < VOCAB_SIZE:
                raise ValueError(f"route-stats encodes text with the DBRX tokenizer ({VOCAB_SIZE} ids); this "
                                 f"model's vocabulary has {cfg.vocab_size}: use a real-vocabulary model (demo, "
                                 f"tiny-vocab, ...)")
            tok = model.tokenizer = load_tokenizer()
        read_texts(data, split)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder (new, empty, or an earlier route-stats output)")
    except Exception as err:           # noqa: BLE001 (reported on every rank, raised here)
        error = err
    ctx.agree(error)
    settings = {"data": str(data.resolve()), "split": split, "model": str(model_name) if model_name else None,
                "config": cfg.to_dict(), "max_tokens_per_text": limit, "truncate": truncate,
                "predictions": predictions}

    # rank 0: the folder, the plan (independent of the number of processes) and who routes which part
    manifest, bad, setup = None, None, None
    if ctx.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            manifest = _Manifest(out, settings, resume)
            meta = {"n_layers": cfg.n_layers, "n_experts": cfg.moe_num_experts, "top_k": cfg.moe_top_k,
                    "model": settings["model"], "data": settings["data"]}
            _write_json(out / "meta.json", meta)
            texts = read_texts(data, split)
            hasher = hashlib.sha256()
            done = manifest.state["texts_done"]
            for item in texts if done else ():
                item.fingerprint(hasher)
                if item.index + 1 == done:
                    break
            if hasher.hexdigest() != manifest.state["texts_sha256"]:
                raise ValueError(f"the first {done} texts of {data} changed since the run in {out} began; start "
                                 f"over with --overwrite (resume=False)")
            parts, bad = _plan(texts, tok, limit, truncate, batch_size, part_tokens, done,
                               len(manifest.state["parts"]), hasher, data, cfg.max_seq_len)
            planned = {part.file: part for part in parts}
            for side in sorted(manifest.parts_dir.glob("part-*.json")):   # records that do not match the plan
                part = planned.get(side.with_suffix(".parquet").name)       # (stale, ours) go, with their parts
                if PART_NAME.fullmatch(side.name) and (part is None or manifest.record(part) is None):
                    side.unlink()
                    side.with_suffix(".parquet").unlink(missing_ok=True)
            manifest.merge(parts)
            pending = [part.stop > manifest.state["texts_done"] and manifest.record(part) is None for part in parts]
            setup = {"parts": parts, "owners": _assign(parts, pending, ctx.world), "run": os.urandom(8).hex(),
                     "bad": None if bad is None else str(bad), "texts_done": manifest.state["texts_done"],
                     "tokens_done": manifest.state["tokens_done"] + sum(   # recorded, not yet in the manifest
                         p.tokens for p, todo in zip(parts, pending)
                         if not todo and p.stop > manifest.state["texts_done"])}
        except Exception as err:       # noqa: BLE001
            error = err
            setup = {"error": distributed._describe(err)}
    setup = ctx.broadcast(setup)
    if error is not None:
        raise error
    if "error" in setup:
        raise distributed.RankFailed(f"stopped because rank 0 failed: {setup['error']}")
    parts, owners = setup["parts"], setup["owners"]
    ctx.prefix = f"dbrx_lab/route_stats/{setup['run']}/"
    log = _logger(ctx, out, log_dir)
    mine = [p for p, o in zip(parts, owners) if o == ctx.rank]
    log.info("%d parts planned (%d to route, %d tokens), this rank routes %d parts (%d tokens)", len(parts),
             sum(o >= 0 for o in owners), sum(p.tokens for p, o in zip(parts, owners) if o >= 0), len(mine),
             sum(p.tokens for p in mine))
    total = setup["tokens_done"] + sum(p.tokens for p, o in zip(parts, owners) if o >= 0)
    bar = tqdm(desc="route-stats", unit=" tokens", total=total, initial=setup["tokens_done"],
               disable=not progress or ctx.rank != 0, unit_scale=True)
    last_merge = [time.monotonic()]

    committed_here: dict[str, int] = {}

    def on_progress(force: bool = False, known: dict[str, int] | None = None) -> None:
        bar.update(setup["tokens_done"] + ctx.add("tokens", 0) - bar.n)
        if manifest is not None and (force or (ctx.distributed and time.monotonic() - last_merge[0] > 2)):
            manifest.merge(parts, known)
            last_merge[0] = time.monotonic()

    def commit(part: _Part, rows: int) -> None:
        """A part is in place: into the manifest when it continues it (rank 0), else a record beside it."""
        committed_here[part.file] = rows
        if manifest is not None and part.start == manifest.state["texts_done"]:
            manifest.commit(part, rows)
            manifest.merge(parts)
        else:                          # rank 0 moves the record into the manifest when the texts before are in
            _write_json(out / "routing" / (part.file[:-len(".parquet")] + ".json"),
                        {"file": part.file, "texts": [part.start, part.stop], "tokens": part.tokens,
                         "rows": rows, "sha256": part.sha, "rank": ctx.rank})

    start = time.perf_counter()
    new_tokens = 0
    error = None
    try:
        try:
            new_tokens = _work(ctx, model, tok, data, split, limit, truncate, batch_size, predictions, out / "routing",
                               commit, mine, _schema(cfg.moe_top_k), on_progress, log)
        except Exception as err:       # noqa: BLE001 (the others are told to stop; raised below)
            error = err
            log.error("failed: %s", distributed._describe(err))
            if ctx.distributed and isinstance(err, torch.distributed.DistError):   # the store (rank 0) is gone
                error = distributed.RankFailed(f"lost contact with the other ranks ({err}); the committed parts "
                                               f"are kept: rerun the same command to resume")
            elif not isinstance(err, distributed.RankFailed):
                ctx.fail(distributed._describe(err))
        ctx.finished()
        try:
            if ctx.rank == 0:
                ctx.wait_all_done(on_progress)
            statuses = ctx.gather((None if error is None or isinstance(error, distributed.RankFailed)
                                   else distributed._describe(error), new_tokens, committed_here))
        except Exception as err:       # noqa: BLE001 (a rank died or hangs: keep what was committed)
            if manifest is not None:
                manifest.merge(parts)
            log.error("the other ranks did not finish: %s", err)
            if error is not None and not isinstance(error, distributed.RankFailed):
                raise error
            raise distributed.RankFailed(f"the job stopped: {err}; the committed parts are kept: rerun the same "
                                         f"command (with any number of processes) to resume") from None
        if manifest is not None:
            on_progress(force=True, known={f: n for *_, done in statuses for f, n in done.items()})
    finally:
        bar.close()
    if error is not None and not isinstance(error, distributed.RankFailed):
        raise error
    for rank, (message, *_) in enumerate(statuses):
        if message is not None:
            raise distributed.RankFailed(f"stopped because rank {rank} failed: {message}")
    if bad is not None:
        raise bad
    if setup["bad"] is not None:
        raise distributed.RankFailed(f"stopped because rank 0 failed: {setup['bad']}")
    seconds = time.perf_counter() - start
    new_tokens = sum(n for _, n, _ in statuses)
    log.info("routed %d new tokens in %.1f s (all ranks); peak RSS of this rank %.0f MiB", new_tokens, seconds,
             _peak_rss_mib())

    if ctx.rank != 0:                  # done: rank 0 writes the tables (no collective waits for that: at corpus
        log.info("done")               # scale it may outlast --dist-timeout; the launcher waits for rank 0)
        return RouteStatsResult(out, parts[-1].stop if parts else setup["texts_done"], total, new_tokens, seconds, {})
    # rank 0: the manifest is complete; the aggregate tables, in part order (as one process computes them)
    if manifest.state["texts_done"] != (parts[-1].stop if parts else manifest.state["texts_done"]):
        raise RuntimeError(f"parts are missing after the run: texts done {manifest.state['texts_done']}")
    t0 = time.perf_counter()
    tables = _aggregate(out, min_count, predictions)
    state = manifest.state
    _write_json(out / "summary.json", {"texts": state["texts_done"], "tokens": state["tokens_done"],
                                       "parts": len(state["parts"]), "seconds_last_run": round(seconds, 3),
                                       "tokens_last_run": new_tokens, "processes": ctx.world})
    log.info("done: %d texts, %d tokens; tables in %.1f s", state["texts_done"], state["tokens_done"],
             time.perf_counter() - t0)
    return RouteStatsResult(out, state["texts_done"], state["tokens_done"], new_tokens, seconds, tables)


def _work(ctx: distributed.Context, model, tok, data: Path, split: str, limit: int, truncate: bool, batch_size: int,
          predictions: bool, parts_dir: Path, commit, mine: list[_Part], schema: pa.Schema, on_progress,
          log) -> int:
    """Route this rank's parts (one pass over the data file, reading only their texts) -> tokens routed."""
    writer = _PartWriter(parts_dir, schema)
    todo = iter(mine)
    part = next(todo, None)
    batch: list[TextItem] = []
    encoded: list[list[int]] = []
    routed = 0
    t0 = time.perf_counter()
    for item in read_texts(data, split) if part is not None else ():
        if item.index < part.start:
            continue
        batch.append(item)
        encoded.append(_encode(tok, item, limit, truncate, data, model.config.max_seq_len))
        last = item.index + 1 == part.stop
        if len(batch) == batch_size or last:
            frame, n = _route_batch(model, tok, batch, encoded, predictions)
            writer.write(part, pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False), n)
            batch.clear()
            encoded.clear()
            routed += n
            ctx.add("tokens", n)
            if ctx.rank == 0:
                on_progress()
            if ctx.distributed and (message := ctx.failed()) is not None:
                writer.discard()
                raise distributed.RankFailed(f"stopped because {message}")
        if last:
            if writer.tokens != part.tokens:
                raise ValueError(f"{data} changed during the run (texts {part.start}..{part.stop - 1} have "
                                 f"{writer.tokens} tokens, {part.tokens} when planned); rerun to resume")
            commit(part, writer.commit(part))
            log.info("committed %s: texts %d..%d, %d tokens (%.0f tokens/s on this rank)", part.file, part.start,
                     part.stop - 1, part.tokens, routed / max(time.perf_counter() - t0, 1e-9))
            part = next(todo, None)
            if part is None:
                break
    if part is not None:
        raise ValueError(f"{data} changed during the run: it ends before text {part.start}; rerun to resume")
    return routed


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
    parser.add_argument("--part-tokens", type=int, default=None,
                        help=f"tokens per committed part file (default {PART_TOKENS:,}); also the unit of work "
                             f"and of resumption with several processes")
    parser.add_argument("--dist-timeout", type=float, default=None,
                        help=f"several processes: seconds a collective, or a wait for the other ranks' progress, "
                             f"may take before the job stops (default {distributed.DEFAULT_TIMEOUT:.0f}; raise it "
                             f"for slow offloaded replicas)")
    parser.add_argument("--gpus-per-replica", type=int, default=0,
                        help="CUDA devices per model replica: the process with LOCAL_RANK r uses devices "
                             "r*g .. r*g+g-1 (one: the whole model there; several: device_map=auto over them); "
                             "0 (default): the CPU")
    parser.add_argument("--log-dir", default=None,
                        help="folder for per-rank logs rank-NNNNN.log (default with several processes: OUT/logs)")


def run(args: argparse.Namespace) -> int:
    result = route_stats(args.model, args.data, args.out, batch_size=args.batch_size,
                         max_tokens_per_text=args.max_tokens_per_text, resume=not args.overwrite,
                         truncate=args.truncate, split=args.split, min_count=args.min_count,
                         predictions=not args.no_predictions, progress=not args.no_progress,
                         part_tokens=args.part_tokens, dist_timeout=args.dist_timeout,
                         gpus_per_replica=args.gpus_per_replica, log_dir=args.log_dir)
    if int(os.environ.get("RANK", "0")) != 0:          # one line per job, from rank 0
        return 0
    rate = result.seconds / max(result.new_tokens, 1) * 1000
    print(f"{result.texts} texts, {result.tokens} tokens -> {result.out} "
          f"({result.new_tokens} new tokens, {rate:.2f} s per 1,000 tokens)")
    return 0
