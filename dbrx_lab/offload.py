"""Expert offload: run a checkpoint whose experts do not fit in memory by reading only the routed experts.

`load_model(path, experts="offload", expert_cache="8GiB")` loads the dense part (attention, embeddings,
routers, norms, lm_head) on the model's device and leaves the experts in the checkpoint's safetensors files.
In the released layout an expert e of a layer is rows e*F:(e+1)*F of the fused `ffn.experts.mlp.{w1,v1,w2}`
tensors, i.e. one byte range per tensor, and adjacent experts are adjacent ranges.

Tiers. The fast tier is an `ExpertCache` of whole experts on the model's device, at most `expert_cache` bytes
of slots (LRU). Below it: the file (an `ExpertStore`), read with `os.preadv` straight into the slots (one
system call per run of adjacent experts, scattered into their slots; no intermediate copy when the
checkpoint's dtype is the model's) and dropped from the page cache after each read (`POSIX_FADV_DONTNEED`),
so a run never depends on the OS caching the file. With a GPU, a second `ExpertCache` in pinned host memory
(`expert_host_cache` bytes, optional) sits between the GPU and the file, and a miss is either copied to the
GPU or computed on the CPU where its weights are (Fiddler), as `CostModel` says is sooner.

The runtime is the experts kernel "offload" (`kernels.EXPERTS`): it fetches the layer's needed experts (misses
in contiguous reads, each waited for when the kernel reaches it), issues a speculative prefetch of the next
layer's experts (that layer's routing applied to this layer's input, as mixtral-offloading; read only while
at least half of that layer's recent guesses were needed, and cancelled if not started when the layer comes
without needing them) on a background IO thread, and runs the same inner kernel the
resident model would ("cpu" or "grouped") on the cached weights, so hooks, traces and interventions see the
same tensors and the logits are bit for bit the resident model's. Experts whose applied weight is 0 for every
row (ablated with mode "zero" or "renormalize") are not fetched unless their outputs are observed.
"""
from __future__ import annotations

import collections
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import HookPoint, current_call
from .kernels.experts import _glu_rows
from .kernels.registry import EXPERTS

__all__ = ["parse_bytes", "ExpertStore", "ExpertCache", "CostModel", "OffloadedExperts", "OffloadRuntime",
           "HIT", "MISS", "PREFETCHED", "SKIPPED", "CPU"]

EXPERT_TENSORS = ("w1", "v1", "w2")
HIT, MISS, PREFETCHED, SKIPPED, CPU = 1, 0, 2, -1, 3    # per-token codes of `hook_cache` / Record(cache=True)
CODE_NAMES = {HIT: "hit", MISS: "miss", PREFETCHED: "prefetched", SKIPPED: "skipped", CPU: "cpu"}
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value, name: str = "expert_cache") -> int:
    """A byte count from an int or a string like "8GiB", "500 MB", "1.5GB"; ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number of bytes or a size like '8GiB', got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size like '8GiB' or '500MB' "
                             f"(units: {', '.join(u for u in _UNITS if u)}), got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{name} must be a number of bytes or a size like '8GiB', got {value!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0 bytes, got {value!r}")
    return n


# ------------------------------------------------------------------------------------------------
# slow tier: the checkpoint's files
@dataclass(frozen=True)
class _Span:
    path: str
    offset: int            # absolute byte offset of row 0
    row_bytes: int         # bytes of one expert's F rows
    dtype: torch.dtype


class ExpertStore:
    """Expert weights read by byte range from a checkpoint's safetensors files (the released fused layout)."""

    def __init__(self, found: dict, n_layers: int, n_experts: int, ffn: int, d: int) -> None:
        self.n_layers, self.n_experts, self.ffn, self.d = n_layers, n_experts, ffn, d
        self.spans: dict[tuple[int, str], _Span] = {}
        problems = []
        for layer in range(n_layers):
            for w in EXPERT_TENSORS:
                name = f"transformer.blocks.{layer}.ffn.experts.mlp.{w}"
                info = found.get(name)
                if info is None or tuple(info.shape) != (n_experts * ffn, d):
                    problems.append(f"{name}: expected [{n_experts * ffn}, {d}] (experts fused row-wise), found "
                                    f"{'nothing' if info is None else list(info.shape)}")
                    continue
                row_bytes = ffn * d * info.dtype.itemsize
                self.spans[layer, w] = _Span(str(info.file), info.offset, row_bytes, info.dtype)
        if problems:
            raise ValueError("experts='offload' reads experts as row ranges of the released fused layout "
                             "(ffn.experts.mlp.{w1,v1,w2} of [E*F, d] per layer); this checkpoint differs: "
                             + "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4
                                                         else "") + ". Load it with experts='resident'.")
        self.dtype = self.spans[0, "w1"].dtype
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.expert_bytes = 3 * ffn * d * self.dtype.itemsize     # one expert as stored

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return fd

    def read_run(self, layer: int, first: int, dests: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> int:
        """Experts first, first+1, ... (one per entry of `dests`: (w1, v1, w2) [F, d] CPU tensors in the stored
        dtype) read with one `preadv` per tensor (a contiguous range of the file scattered into the
        destinations); the range is then dropped from the page cache. Returns the bytes read."""
        total = 0
        for i, w in enumerate(EXPERT_TENSORS):
            span = self.spans[layer, w]
            fd = self._fd(span.path)
            offset = span.offset + first * span.row_bytes
            bufs = [memoryview(d[i].view(torch.uint8).numpy()).cast("B") for d in dests]   # writable views
            want = span.row_bytes * len(dests)
            got = 0
            while got < want:                              # preadv may return short counts
                n = os.preadv(fd, _advance(bufs, got), offset + got)
                if n <= 0:
                    raise OSError(f"{span.path}: unexpected end of file reading expert rows of layer {layer}")
                got += n
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, want, os.POSIX_FADV_DONTNEED)
            total += want
        return total

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _advance(bufs: list[memoryview], skip: int) -> list[memoryview]:
    out = []
    for b in bufs:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


# ------------------------------------------------------------------------------------------------
# fast tier
class _Stats:
    FIELDS = ("calls", "needed", "hits", "misses", "prefetched_hits", "skipped", "cpu_computed", "transient_reads",
              "guessed", "guessed_needed", "prefetch_cancelled",
              "bytes_read",
              "prefetch_issued", "prefetch_used", "prefetch_wasted", "io_wait_s", "read_s")

    def __init__(self, n_layers: int) -> None:
        self.rows = [dict.fromkeys(self.FIELDS, 0) for _ in range(n_layers)]

    def add(self, layer: int, **values) -> None:
        row = self.rows[layer]
        for k, v in values.items():
            row[k] += v


class ExpertCache:
    """Whole experts on one device, in slots of three [S, F, d] tensors (w1, v1, w2), evicted least recently
    used; at most `budget` bytes of slots. Reads come from `source` (an ExpertStore, or a host ExpertCache)
    on one background IO thread; `stats()` counts hits, misses, bytes read, prefetches and IO waits per layer."""

    def __init__(self, store: ExpertStore, budget: int, device: torch.device, dtype: torch.dtype,
                 pin: bool = False, source: "ExpertCache | None" = None, name: str = "expert_cache") -> None:
        self.store, self.source, self.device, self.dtype = store, source, torch.device(device), dtype
        L, E, Fh, d = store.n_layers, store.n_experts, store.ffn, store.d
        self.expert_bytes = 3 * Fh * d * dtype.itemsize
        if budget < self.expert_bytes:
            raise ValueError(f"{name}={budget} bytes is smaller than one expert ({self.expert_bytes} bytes = 3 x "
                             f"{Fh} x {d} x {dtype.itemsize}); give at least {self.expert_bytes} (e.g. "
                             f"'{-(-self.expert_bytes // 2 ** 20)}MiB'), or more to cache several experts")
        self.n_slots = min(budget // self.expert_bytes, L * E)
        self.budget = budget
        kw = dict(dtype=dtype, device=self.device)
        if pin and self.device.type == "cpu" and torch.cuda.is_available():
            kw["pin_memory"] = True                   # allocated pinned (a .pin_memory() copy would double it)
        self.slots = [torch.empty(self.n_slots, Fh, d, **kw) for _ in EXPERT_TENSORS]
        self.where: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()   # LRU: oldest first
        self.free = list(range(self.n_slots))[::-1]
        self.loading: dict[tuple[int, int], Future] = {}
        self.from_prefetch: set[tuple[int, int]] = set()
        self.pinned: collections.Counter = collections.Counter()
        self.lock = threading.RLock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dbrx-lab-expert-io")
        self._stats = _Stats(L)
        self._staging: dict[tuple, torch.Tensor] = {}
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.compute_done = None      # CUDA: an event after the last released call's kernels (see `released`)

    # --- public ----------------------------------------------------------------------------------
    def stats(self):
        """Per-layer counters as a pandas DataFrame (hit_rate, prefetch_recall derived)."""
        import pandas as pd

        with self.lock:
            df = pd.DataFrame(self._stats.rows)
        df.index.name = "layer"
        looked = df["hits"] + df["misses"] + df["prefetched_hits"] + df["cpu_computed"]
        df["hit_rate"] = ((df["hits"] + df["prefetched_hits"]) / looked.where(looked > 0)).astype(float)
        wanted = df["prefetched_hits"] + df["misses"] + df["cpu_computed"]
        df["prefetch_recall"] = (df["prefetched_hits"] / wanted.where(wanted > 0)).astype(float)
        df["guess_precision"] = (df["guessed_needed"] / df["guessed"].where(df["guessed"] > 0)).astype(float)
        return df

    def reset_stats(self) -> None:
        with self.lock:
            self._stats = _Stats(self.store.n_layers)

    def clear(self) -> None:
        """Forget every cached expert (waits for reads in flight)."""
        self.wait_all()
        with self.lock:
            self.where.clear()
            self.from_prefetch.clear()
            self.free = list(range(self.n_slots))[::-1]

    def warm(self, source, limit: int | None = None) -> list[tuple[int, int]]:
        """Fill the cache with the experts used most often (MoE-Infinity's idea): `source` is a Trace, a
        route-stats folder, or an `analysis.expert_load` table (columns layer, expert, count). Reads them in
        order of use, up to the cache's size (or `limit` experts); returns the (layer, expert) pairs read."""
        load = _expert_counts(source)
        if not {"layer", "expert", "count"} <= set(load.columns):
            raise ValueError(f"warm() needs a Trace, a route-stats folder or an expert_load table with columns "
                             f"layer, expert, count; got columns {list(load.columns)}")
        load = load.groupby(["layer", "expert"], as_index=False)["count"].sum()
        load = load[(load["count"] > 0) & (load["layer"] < self.store.n_layers) &
                    (load["expert"] < self.store.n_experts)].sort_values("count", ascending=False, kind="stable")
        n = self.n_slots if limit is None else max(0, min(int(limit), self.n_slots))
        chosen = [(int(l), int(e)) for l, e in zip(load["layer"], load["expert"])][:n]
        for layer in sorted({l for l, _ in chosen}):
            experts = sorted(e for l, e in chosen if l == layer)
            self.acquire(layer, experts)                     # contiguous reads, then unpinned
            self.release(layer, experts)
        return chosen

    def cached(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs held now, least recently used first."""
        with self.lock:
            return [key for key in self.where if key not in self.loading]

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots)

    def wait_all(self) -> None:
        for fut in list(self.loading.values()):
            fut.exception()

    def close(self) -> None:
        self.wait_all()
        self.pool.shutdown(wait=True)

    # --- slots -----------------------------------------------------------------------------------
    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(s[slot] for s in self.slots)

    def _take_slot(self) -> int | None:
        """A free slot, or the least recently used one not pinned or loading (evicted); None if all are busy."""
        if self.free:
            return self.free.pop()
        for key, slot in self.where.items():
            fut = self.loading.get(key)
            if fut is not None:
                if not fut.done():
                    continue
                del self.loading[key]                  # a read that landed (a prefetch nobody used, say)
                if fut.cancelled() or fut.exception() is not None:
                    del self.where[key]
                    self.from_prefetch.discard(key)
                    return slot
            if not self.pinned[key]:
                del self.where[key]
                if key in self.from_prefetch:
                    self.from_prefetch.discard(key)
                    self._stats.add(key[0], prefetch_wasted=1)
                return slot
        return None

    def status(self, layer: int, e: int) -> int:
        """HIT, PREFETCHED (brought by a prefetch not yet used) or MISS, without changing anything."""
        key = (layer, e)
        if key in self.where:
            return PREFETCHED if key in self.from_prefetch else HIT
        return MISS

    def acquire(self, layer: int, experts: list[int], wait: bool = True) -> dict[int, int]:
        """Pin experts of a layer (ascending), reading the misses in runs of adjacent experts (one read each);
        returns {expert: slot} for those that fit (the rest: `acquire_one` when the kernel reaches them).
        wait=False returns while reads are in flight: `wait_for(layer, e)` before using a slot."""
        out, todo = {}, []
        with self.lock:
            for e in experts:
                key = (layer, e)
                if key in self.where:
                    self.where.move_to_end(key)
                    self.pinned[key] += 1
                    out[e] = self.where[key]
                    if key in self.from_prefetch:
                        self.from_prefetch.discard(key)
                        self._stats.add(layer, prefetch_used=1)
                else:
                    slot = self._take_slot()
                    if slot is None:
                        break
                    self.where[key] = slot
                    self.pinned[key] += 1
                    out[e] = slot
                    todo.append(e)
        for run in _runs(todo):
            self._read(layer, run, [out[e] for e in run])
        if wait:
            for e in out:
                self._wait(layer, e)
        return out

    def wait_for(self, layer: int, e: int) -> None:
        """Block until expert e of the layer has landed in its slot (a read in flight, or nothing to wait for)."""
        if (layer, e) in self.loading:
            self._wait(layer, e)

    def acquire_one(self, layer: int, e: int) -> int | None:
        got = self.acquire(layer, [e])
        return got.get(e)

    def released(self) -> None:
        """After a call's kernels were queued (CUDA): a new read into a slot it used must wait for them, as
        the GPU runs them later than Python returns."""
        if self._copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.compute_done = event

    def release(self, layer: int, experts) -> None:
        with self.lock:
            for e in experts:
                key = (layer, e)
                self.pinned[key] -= 1
                if self.pinned[key] <= 0:
                    del self.pinned[key]

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Start background reads of experts not held (as many as free or evictable slots allow); returns the
        number issued. A wrong guess costs bandwidth and a slot, never correctness."""
        todo, slots = [], []
        with self.lock:
            for e in experts:
                key = (layer, e)
                if key in self.where:
                    continue
                slot = self._take_slot()
                if slot is None:
                    break
                self.where[key] = slot
                self.from_prefetch.add(key)
                todo.append(e)
                slots.append(slot)
            if todo:
                self._stats.add(layer, prefetch_issued=len(todo))
        for e, slot in zip(todo, slots):                  # one read each: a wrong guess not yet started is
            self._read(layer, [e], [slot])                # cancelled when its layer comes (`cancel_unneeded`)
        return len(todo)

    def cancel_unneeded(self, layer: int, needed) -> int:
        """Cancel prefetches for `layer` that it turned out not to need and whose read has not started (they
        would delay the reads it waits for); their slots are freed. Returns how many were cancelled."""
        n = 0
        with self.lock:
            for key in [k for k in self.from_prefetch if k[0] == layer and k[1] not in needed]:
                fut = self.loading.get(key)
                if fut is not None and fut.cancel():
                    del self.loading[key]
                    self.from_prefetch.discard(key)
                    self.free.append(self.where.pop(key))
                    n += 1
            if n:
                self._stats.add(layer, prefetch_cancelled=n)
        return n

    def read_transient(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e read into new tensors outside the cache (every slot pinned: a cache of one expert)."""
        Fh, d = self.store.ffn, self.store.d
        t0 = time.perf_counter()
        stage = tuple(torch.empty(Fh, d, dtype=self.store.dtype) for _ in EXPERT_TENSORS)
        nbytes = self.store.read_run(layer, e, [stage])
        out = tuple(w.to(self.device, self.dtype) for w in stage)
        with self.lock:
            self._stats.add(layer, bytes_read=nbytes, read_s=time.perf_counter() - t0, transient_reads=1)
        return out

    # --- IO --------------------------------------------------------------------------------------
    def _read(self, layer: int, run: list[int], slots: list[int]) -> None:
        fut = self.pool.submit(self._read_now, layer, run, slots)
        with self.lock:
            for e in run:
                self.loading[layer, e] = fut

    def _wait(self, layer: int, e: int) -> None:
        fut = self.loading.get((layer, e))
        if fut is None:
            return
        t0 = time.perf_counter()
        try:
            fut.result()
        except BaseException:
            with self.lock:
                for key in [k for k, f in self.loading.items() if f is fut]:
                    self.loading.pop(key, None)
                    slot = self.where.pop(key, None)
                    if slot is not None:
                        self.free.append(slot)
            raise
        with self.lock:
            self._stats.add(layer, io_wait_s=time.perf_counter() - t0)
            self.loading.pop((layer, e), None)

    def _read_now(self, layer: int, run: list[int], slots: list[int]) -> None:
        t0 = time.perf_counter()
        done = self.compute_done
        if self._copy_stream is not None and done is not None:
            self._copy_stream.wait_event(done)        # the slots' previous experts are no longer being read
        dests = [self.weights(s) for s in slots]
        if self.source is not None:                    # GPU slot <- host cache (pinned) <- file
            nbytes = 0
            for dst, e in zip(dests, run):
                slot = self.source.acquire_one(layer, e)
                try:
                    src = self.source.weights(slot) if slot is not None else self.source.read_transient(layer, e)
                    with _stream(self._copy_stream):
                        for a, b in zip(dst, src):
                            a.copy_(b, non_blocking=self._copy_stream is not None)
                    if self._copy_stream is not None:
                        self._copy_stream.synchronize()
                finally:
                    if slot is not None:
                        self.source.release(layer, [e])
        elif self.device.type == "cpu" and self.store.dtype == self.dtype:
            nbytes = self.store.read_run(layer, run[0], dests)          # straight into the slots
        else:                                          # staging in the stored dtype, then convert / copy
            nbytes = 0
            for dst, e in zip(dests, run):
                stage = self._stage()
                nbytes += self.store.read_run(layer, e, [stage])
                with _stream(self._copy_stream):
                    for a, b in zip(dst, stage):
                        a.copy_(b, non_blocking=self._copy_stream is not None)
                if self._copy_stream is not None:
                    self._copy_stream.synchronize()
        with self.lock:
            self._stats.add(layer, bytes_read=nbytes, read_s=time.perf_counter() - t0)

    def _stage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = threading.get_ident()
        stage = self._staging.get(key)
        if stage is None:
            Fh, d = self.store.ffn, self.store.d
            stage = torch.empty(3, Fh, d, dtype=self.store.dtype)
            if self.device.type == "cuda":
                stage = stage.pin_memory()
            self._staging[key] = stage
        return tuple(stage)


def _expert_counts(source):
    """(layer, expert, count) rows from a Trace (routed assignments of real tokens), a route-stats folder (its
    expert_load table) or such a table itself; no model runs."""
    import pandas as pd

    if hasattr(source, "columns"):
        return source
    if hasattr(source, "topk_experts"):
        if source.topk_experts is None:
            raise ValueError("warm() needs a Trace recorded with Record(router=True)")
        experts = source.topk_experts                                        # [L, B, T, k]
        real = source.attention_mask.bool()[None, :, :, None].expand_as(experts)
        rows = [(layer, int(e), int(n)) for layer in range(experts.shape[0])
                for e, n in enumerate(torch.bincount(experts[layer][real[layer]].flatten()).tolist()) if n]
        return pd.DataFrame(rows, columns=["layer", "expert", "count"])
    table = os.path.join(os.fspath(source), "load.parquet")
    if not os.path.isfile(table):
        raise ValueError(f"warm() needs a Trace, an expert_load table or a route-stats folder; {os.fspath(source)!r} "
                         f"has no load.parquet")
    return pd.read_parquet(table)


class _stream:
    """`torch.cuda.stream(s)` when s is a CUDA stream, else nothing."""

    def __init__(self, stream) -> None:
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def _runs(experts: list[int]) -> list[list[int]]:
    """Ascending expert ids cut into runs of adjacent ids (each run is one contiguous range of the file)."""
    runs: list[list[int]] = []
    for e in sorted(experts):
        if runs and runs[-1][-1] == e - 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


# ------------------------------------------------------------------------------------------------
class CostModel:
    """When a GPU-tier miss is sooner computed on the CPU (its weights are in host memory) than copied to
    the GPU: copy = bytes / pcie_bw; CPU = rows * 3 * 2 * F * d / cpu_flops + bytes / ram_bw (the weights are
    read once) + the rows' transfers. Bandwidths and throughput are measured once at load (`measure`)."""

    def __init__(self, pcie_bw: float, cpu_flops: float, ram_bw: float) -> None:
        self.pcie_bw, self.cpu_flops, self.ram_bw = pcie_bw, cpu_flops, ram_bw

    def cpu_is_sooner(self, rows: int, expert_bytes: int, ffn: int, d: int, itemsize: int) -> bool:
        copy = expert_bytes / self.pcie_bw
        cpu = rows * 6 * ffn * d / self.cpu_flops + expert_bytes / self.ram_bw + 2 * rows * d * itemsize / self.pcie_bw
        return cpu < copy

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype) -> "CostModel":
        n = 64 * 2 ** 20
        host = torch.empty(n, dtype=torch.uint8).pin_memory()
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        dev.copy_(host)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        pcie = 4 * n / (time.perf_counter() - t0)
        a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        a @ b
        flops = 2 * 512 * 1024 * 1024 / (time.perf_counter() - t0)
        big = torch.empty(n // 4, dtype=torch.float32)
        t0 = time.perf_counter()
        big.sum()
        ram = n / (time.perf_counter() - t0)
        return cls(pcie, flops, ram)


class OffloadedExperts(nn.Module):
    """Stands in for a layer's `ExpertGLU` when its experts are offloaded: no parameters; the kernels read each
    expert's (w1, v1, w2) [F, d] through `expert_weights` / `pair_weights` from the runtime's cache.

    `hook_cache` [batch, pos, k] (int8) says, per routed expert, where it came from in this call: 1 hit,
    2 brought by a prefetch, 0 read on demand (miss), 3 computed on the CPU, -1 not fetched (applied weight
    0 and not observed). It is computed only when something observes it (`Record(cache=True)`)."""

    def __init__(self, runtime: "OffloadRuntime", layer: int, n_experts: int, ffn: int) -> None:
        super().__init__()
        self.runtime, self.layer, self.n_experts, self.ffn = runtime, layer, n_experts, ffn
        self.hook_cache = HookPoint(("batch", "pos", "k"))
        self._call = threading.local()

    # the call's working state (per thread: concurrent forwards on one model share the cache, not this)
    @property
    def null_experts(self) -> frozenset:
        return getattr(self._call, "null", frozenset())

    @property
    def slots(self) -> dict:
        return getattr(self._call, "slots", {})

    def expert_weights(self, e: int):
        if not hasattr(self._call, "slots"):
            raise RuntimeError("an offloaded layer's experts are computed by the 'offload' experts kernel; choose "
                               "the kernel it wraps with model.expert_runtime.inner = 'cpu' | 'grouped' | 'reference'")
        slot = self.slots.get(e)
        if slot is None:
            tmp = self._call.tmp.get(e)
            if tmp is not None:
                return tmp
            slot = self._acquire(e)
            if slot is None:
                return self._call.tmp[e]
        self.runtime.cache.wait_for(self.layer, e)          # reads land while earlier experts compute
        return self.runtime.cache.weights(slot)

    def _acquire(self, e: int) -> int | None:
        """Expert e on demand (the cache holds fewer experts than the layer needs): into a slot, keeping the
        last two on-demand experts pinned (a pair), or, when no slot can be had, into a transient copy."""
        cache, call = self.runtime.cache, self._call
        if len(call.extra) >= 2:                       # the window of two: free the oldest first
            old = call.extra.pop(0)
            call.slots.pop(old, None)
            cache.release(self.layer, [old])
        slot = cache.acquire_one(self.layer, e)
        if slot is None:
            call.tmp[e] = cache.read_transient(self.layer, e)
            return None
        call.slots[e] = slot
        call.extra.append(e)
        return slot

    def pair_weights(self, a: int, b: int):
        """[2, F, d] views of experts a and b over the cache's slot tensors (no copy), ordered by slot; `fix`
        restores (a, b) order. A null expert (not fetched) takes another slot's weights (any: a bmm rounds each
        of its two blocks independently, and a stride-0 pair would round differently), and is zeroed."""
        cache = self.runtime.cache
        null_a, null_b = a in self.null_experts, b in self.null_experts
        slot_of, weights_of = {}, {}
        for e, null in ((a, null_a), (b, null_b)):
            if not null:
                weights_of[e] = self.expert_weights(e)
                slot_of[e] = self.slots.get(e)
        if null_a or null_b:
            real = b if null_a else a
            s_real = slot_of[real]
            filler = next((s for s in range(cache.n_slots) if s != s_real), None) if s_real is not None else None
            sa, sb = (filler, s_real) if null_a else (s_real, filler)
            if filler is None:
                wz = tuple(torch.zeros_like(w) for w in weights_of[real])
                wa, wb = (wz, weights_of[real]) if null_a else (weights_of[real], wz)
        else:
            sa, sb = slot_of[a], slot_of[b]
            wa, wb = weights_of[a], weights_of[b]
        if sa is None or sb is None:                   # a transient copy: the pair as one stacked copy
            views = tuple(torch.stack([x, y]) for x, y in zip(wa, wb))
            sa, sb, stacked = 0, 1, True
        else:
            stacked = False
        swap = sb < sa
        lo, hi = (sb, sa) if swap else (sa, sb)
        if not stacked:
            views = tuple(_pair_view(s, lo, hi) for s in cache.slots)

        def fix(y, h):
            if swap:
                y, h = y.flip(0), h.flip(0)
            if null_a or null_b:
                y, h = y.clone(), h.clone()
                for i, null in enumerate((null_a, null_b)):
                    if null:
                        y[i], h[i] = 0, 0
            return y, h

        fix.swap = swap                                # expert_pair feeds the rows in the views' order
        return views, (fix if swap or null_a or null_b else None)

    def compute_expert(self, x: torch.Tensor, e: int, glu):
        """x [n, d] through expert e ("grouped" kernel): on the fast tier, or on the CPU when the runtime chose
        to compute this miss where its weights are (Fiddler)."""
        if e in self.null_experts:
            return x.new_zeros(x.shape), x.new_zeros(x.shape[0], self.ffn)
        host = getattr(self._call, "on_cpu", {}).get(e)
        if host is not None:
            y, h = glu(x.to("cpu", non_blocking=False), *self.runtime.host.weights(host))
            return y.to(x.device), h.to(x.device)
        return glu(x, *self.expert_weights(e))

    def expert(self, x: torch.Tensor, e: int):
        """x [n, d] through expert e -> (output, GLU hidden): the reference kernel's per-expert step."""
        return _glu_rows(x, *self.expert_weights(e))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, n_experts={self.n_experts}, ffn={self.ffn}, offloaded"


def _pair_view(s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    S, Fh, d = s.shape
    return s.as_strided((2, Fh, d), ((hi - lo) * Fh * d, d, 1), s.storage_offset() + lo * Fh * d)


class OffloadRuntime:
    """The caches, the routers used for prefetch guesses, and the per-call logic of the "offload" kernel."""

    PREFETCH_PRECISION = 0.5        # adaptive prefetch reads a layer's guess only when at least this share of
    PREFETCH_WARMUP = 16            # its recent guesses was needed (after this many guessed experts)
    PREFETCH_DECAY = 0.9            # weight of the past in the running precision

    def __init__(self, model, store: ExpertStore, cache_bytes: int, device: torch.device, dtype: torch.dtype,
                 prefetch: bool | str = True, compute: str = "auto", host_cache_bytes: int = 0) -> None:
        self.check_options(prefetch, compute)
        self.prefetch_mode = "adaptive" if prefetch is True else prefetch
        self.store, self.device, self.dtype = store, torch.device(device), dtype
        self.prefetch_enabled = prefetch is not False
        self.compute = compute
        self.host = None
        if host_cache_bytes:                           # (on a CPU only useful to test the two-tier path)
            self.host = ExpertCache(store, host_cache_bytes, torch.device("cpu"), dtype, pin=True,
                                    name="expert_host_cache")
        self.cache = ExpertCache(store, cache_bytes, self.device, dtype, source=self.host)
        self.cost = None
        if self.device.type == "cuda" and self.host is not None and compute == "auto":
            self.cost = CostModel.measure(self.device, dtype)
        self.moes = [block.ffn for block in model.transformer.blocks]
        L = len(self.moes)
        self.guessed = [None] * L                      # per layer: the last guess made for it (a set)
        self.precision = [[0.0, 0.0] for _ in range(L)]    # per layer: decayed (guessed and needed, guessed)
        self.lock = threading.Lock()
        self.inner = "auto"

    def layer_call(self, mlp: OffloadedExperts, x, experts, weights, observe: bool):
        """Context for one experts call of layer `mlp.layer`: acquire the needed experts, prefetch the next
        layer's guess, emit `hook_cache`, release after."""
        return _LayerCall(self, mlp, x, experts, weights, observe)

    @staticmethod
    def check_options(prefetch, compute) -> None:
        """ValueError naming the valid values of expert_prefetch and expert_compute."""
        if compute not in ("auto", "fetch", "cpu"):
            raise ValueError(f"expert_compute must be 'auto', 'fetch' or 'cpu', got {compute!r}")
        if prefetch not in (True, False, "adaptive", "always"):
            raise ValueError(f"expert_prefetch must be True ('adaptive'), 'always' or False, got {prefetch!r}")

    def score_guess(self, layer: int, needed: list[int]) -> None:
        """Count how much of the last guess for `layer` it needed (the running precision adaptive prefetch uses;
        guesses are scored whether or not they were read)."""
        with self.lock:
            guess, self.guessed[layer] = self.guessed[layer], None
            if not guess:
                return
            p = self.precision[layer]
            p[0] = self.PREFETCH_DECAY * p[0] + len(guess & set(needed))
            p[1] = self.PREFETCH_DECAY * p[1] + len(guess)
            self.cache._stats.add(layer, guessed=len(guess), guessed_needed=len(guess & set(needed)))

    def should_read(self, layer: int) -> bool:
        """Whether to read the guess for `layer`: always ("always"), or while its recent guesses were needed
        often enough ("adaptive"): on one disk a wrong guess takes bandwidth from the reads a step waits for."""
        if self.prefetch_mode == "always":
            return True
        with self.lock:
            hit, total = self.precision[layer]
        return total < self.PREFETCH_WARMUP or hit >= self.PREFETCH_PRECISION * total

    def guess_next(self, layer: int, x: torch.Tensor) -> list[int]:
        """The experts layer+1 would pick for this layer's input x [N, d] (speculative): its router's weight
        applied to x (no module call: hooks and nnsight never see it), then that layer's routing with the
        interventions of this context (`MoE.route`: a rerouting ablation or a router bias changes the guess
        as it changes the choice); experts whose applied weight is 0 everywhere are left out."""
        moe = self.moes[layer + 1]
        w = moe.router.layer.weight
        logits = F.linear(x.to(w.dtype), w)                                   # [N, E]
        experts, weights = moe.route(logits)
        return experts[weights != 0].unique().tolist()


class _LayerCall:
    def __init__(self, runtime: OffloadRuntime, mlp: OffloadedExperts, x, experts, weights, observe) -> None:
        self.rt, self.mlp, self.x, self.experts, self.weights, self.observe = runtime, mlp, x, experts, weights, observe

    def __enter__(self):
        self.host_acquired, self.guess, self.up_front = [], None, True
        try:
            return self._enter()
        except BaseException:
            self.__exit__()
            raise

    def _enter(self):
        rt, mlp, layer = self.rt, self.mlp, self.mlp.layer
        E = mlp.n_experts
        flat = self.experts.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        if self.observe:
            needed_mask = counts > 0
        else:                                          # an expert with weight 0 on every row is not fetched
            live = torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(
                0, flat, (self.weights.reshape(-1) != 0).long())
            needed_mask = live > 0
        rows, live = torch.stack([counts, needed_mask.long()]).tolist()          # one host sync
        needed = [e for e in range(E) if live[e]]
        null = frozenset(e for e in range(E) if rows[e] and not live[e])
        cache = rt.cache
        with cache.lock:
            status = {e: cache.status(layer, e) for e in needed}
        on_cpu: dict[int, int] = {}
        if rt.host is not None and (rt.compute == "cpu" or (rt.compute == "auto" and rt.cost is not None)):
            for e in needed:
                if status[e] != MISS:
                    continue
                if rt.compute == "cpu" or rt.cost.cpu_is_sooner(rows[e], cache.expert_bytes, mlp.ffn,
                                                                self.x.shape[1], self.x.element_size()):
                    on_cpu[e] = None
        fetch = [e for e in needed if e not in on_cpu]
        call = mlp._call
        call.null, call.extra, call.tmp = null, [], {}
        # all at once (misses in contiguous runs) when they fit beside what other threads pin; else on demand
        self.up_front = len(fetch) <= cache.n_slots - len(cache.pinned)
        call.slots = cache.acquire(layer, fetch, wait=False) if self.up_front else {}
        if on_cpu:                                     # computed where their weights are: the host cache
            got = rt.host.acquire(layer, list(on_cpu))
            for e in [e for e in on_cpu if e not in got]:    # the host cache cannot hold them all: fetch those
                del on_cpu[e]
                call.slots.update(cache.acquire(layer, [e]))
            on_cpu = {e: got[e] for e in on_cpu}
        call.on_cpu = on_cpu
        self.acquired = list(call.slots)
        self.host_acquired = list(on_cpu)
        hits = sum(status[e] == HIT for e in needed)
        pre = sum(status[e] == PREFETCHED for e in needed)
        with cache.lock:
            cache._stats.add(layer, calls=1, needed=len(needed), hits=hits, prefetched_hits=pre,
                             misses=len(fetch) - hits - pre, cpu_computed=len(on_cpu), skipped=len(null))
        # the next layer's guess, read while this layer computes; when this layer's experts come on demand
        # (more than the cache holds) the guess is read after it, so it never takes the slots this layer needs
        rt.score_guess(layer, needed)
        cache.cancel_unneeded(layer, set(needed))
        self.guess = None
        if rt.prefetch_enabled and layer + 1 < len(rt.moes):
            guess = rt.guess_next(layer, self.x)
            with rt.lock:
                rt.guessed[layer + 1] = set(guess)
            if rt.should_read(layer + 1):
                self.guess = guess
        if self.guess is not None and self.up_front:
            cache.prefetch(layer + 1, self.guess)
        if mlp.hook_cache.fns:
            lut = torch.full((E,), SKIPPED, dtype=torch.int8)
            for e in needed:
                lut[e] = CPU if e in on_cpu else status[e]
            codes = lut.to(flat.device)[self.experts]                            # [N, k]
            cols = current_call().columns
            t = len(cols) if cols is not None else codes.shape[0]
            mlp.hook_cache(codes.view(-1, t, codes.shape[1]) if t and codes.shape[0] % t == 0
                           else codes[None])
        return self

    def __exit__(self, *exc):
        rt, mlp, layer = self.rt, self.mlp, self.mlp.layer
        call = mlp._call
        rt.cache.released()
        rt.cache.release(layer, list(getattr(call, "slots", ())))
        if not exc or exc[0] is None:
            if getattr(self, "guess", None) is not None and not self.up_front:
                rt.cache.prefetch(layer + 1, self.guess)
        if self.host_acquired:
            rt.host.release(layer, self.host_acquired)
        for name in ("slots", "null", "extra", "on_cpu", "tmp"):
            if hasattr(call, name):
                delattr(call, name)
        return False


@EXPERTS.register("offload")
def offload_experts(mlp, x, experts, weights, observe=False):
    """The expert-offload runtime as an experts kernel: the layer's experts from the cache, then the inner
    kernel the resident model would run ("auto": "cpu" on a CPU, "grouped" elsewhere)."""
    runtime = getattr(mlp, "runtime", None)
    if runtime is None:
        raise ValueError("the 'offload' experts kernel needs a model loaded with load_model(..., experts='offload')")
    name, kernel = EXPERTS.choose(runtime.inner, _Resident(mlp), x)
    with runtime.layer_call(mlp, x, experts, weights, observe):
        return kernel(mlp, x, experts, weights, observe)


class _Resident:
    """What the chooser sees: the resident layer's type, so "auto" picks the kernel the resident model runs."""

    def __init__(self, mlp) -> None:
        self.n_experts, self.ffn = mlp.n_experts, mlp.ffn


# ------------------------------------------------------------------------------------------------
# expected decode speed of real dbrx-instruct (estimates, README and notebook 06)
SETUPS = {
    # name: (fast tier GB for cached experts, host RAM GB for experts (None: no host tier), link GB/s,
    #        RAM GB/s of the CPU, NVMe GB/s)
    "1 x 80 GB GPU + 256 GB RAM + NVMe": dict(fast_gb=80 - 16, host_gb=256 - 26, link_gbs=25.0, ram_gbs=100.0,
                                             nvme_gbs=7.0),
    "1 x H200 (141 GB) + 512 GB RAM": dict(fast_gb=141 - 16, host_gb=512 - 26, link_gbs=50.0, ram_gbs=150.0,
                                          nvme_gbs=7.0),
    "CPU only, 128 GB RAM + NVMe": dict(fast_gb=128 - 26, host_gb=None, link_gbs=None, ram_gbs=60.0, nvme_gbs=7.0),
}


def estimate_decode_speed(hit_rates=(0.3, 0.5, 0.7), io_efficiency: float = 1.0, config=None, setups=None):
    """Estimated decode tokens/s (batch 1) of an offloaded model (default: dbrx-instruct in bf16) per setup and
    fast-tier hit rate: a step reads the dense part once from the fast tier, and each of the layers x k routed
    experts is a hit (computed where cached), or a miss: from host RAM either copied over the link or computed
    on the CPU (memory-bound: bytes / RAM bandwidth), whichever is sooner (`CostModel`), and from the NVMe
    when the host tier cannot hold it (read at nvme_gbs x io_efficiency). GPU compute of cached experts is
    taken as free (HBM streams them ~50x faster than PCIe); on a CPU-only box every expert and the dense
    part are read from RAM. io_efficiency: the measured fraction of the disk's bandwidth the runtime reaches
    (benchmarks/offload.py: IO bound / decode time). These are estimates, not measurements."""
    import pandas as pd

    from .config import PRESETS

    cfg = config or PRESETS["dbrx-instruct"]
    s = 2                                                                        # bf16
    expert = 3 * cfg.ffn_hidden_size * cfg.d_model * s
    n_experts = cfg.n_layers * cfg.moe_num_experts
    dense = (cfg.n_params - n_experts * expert // s) * s
    per_token = cfg.n_layers * cfg.moe_top_k * expert
    rows = []
    for name, st in (setups or SETUPS).items():
        all_gb = n_experts * expert / 1e9
        row = {"setup": name, "experts cached on the fast tier": min(1.0, st["fast_gb"] / all_gb)}
        for h in hit_rates:
            miss = (1 - h) * per_token
            if st["host_gb"] is None:                    # CPU only: RAM is the fast tier, the NVMe the slow one
                t = (dense + per_token) / (st["ram_gbs"] * 1e9) + miss / (st["nvme_gbs"] * 1e9 * io_efficiency)
            else:
                in_host = min(1.0, st["host_gb"] / all_gb)
                per_miss = min(expert / (st["link_gbs"] * 1e9), expert / (st["ram_gbs"] * 1e9))
                t = (miss / expert) * per_miss + miss * (1 - in_host) / (st["nvme_gbs"] * 1e9 * io_efficiency)
            row[f"tokens/s at hit rate {h:g}"] = 1.0 / t
        rows.append(row)
    return pd.DataFrame(rows).set_index("setup")
