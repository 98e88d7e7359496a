"""Expert offload vs accelerate's block offload on a DBRX-width checkpoint twice the memory limit (issue 17).

    python benchmarks/offload.py [--dir /work/offload-bench] [--limit-gib 11] [--tokens 8]

Writes a 3-layer DBRX-width checkpoint (d_model 6144, 48 heads / 8 KV heads, ffn 10752, 16 experts top-4,
vocab 100352, bf16, random weights: ~22 GB), then runs each configuration in its own process inside a memory
cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`; page cache counts) of `--limit-gib`:
  (a) what users get today: load_model(..., device_map="auto", max_memory=..., offload_folder=...);
  (b) load_model(..., experts="offload", expert_cache=<the same limit minus the dense part and a margin>),
with near-uniform routing (random weights) and with a skewed routing (a router bias, the same for both), on
the same prompt and greedy tokens. Prints decode tokens/s, prefill time, bytes read from disk per token
(/proc/self/io), cache hit rate, prefetch recall and (b)'s IO bound (bytes of routed experts not cached at
each step / the disk's measured sequential read bandwidth); writes benchmarks/offload_results.{md,json}.
The checkpoint and accelerate's offload folder are deleted at the end (unless --keep). Needs root (cgroups).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = dict(d_model=6144, n_heads=48, kv_n_heads=8, n_layers=3, ffn_hidden_size=10752, moe_num_experts=16,
              moe_top_k=4, vocab_size=100352, max_seq_len=4096)
PROMPT_LEN = 16
SKEW = 2.0          # router bias from +SKEW (expert 0) to -SKEW (expert 15): a realistic load imbalance


# ------------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path) -> int:
    """The random bf16 checkpoint, one shard per layer (+ one for embeddings and head); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    from dbrx_lab.config import DbrxConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = DbrxConfig(**CONFIG, torch_dtype="bfloat16")
    if (folder / "model.safetensors.index.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    gen = torch.Generator().manual_seed(0)
    d, Fh, E, H, K, D = cfg.d_model, cfg.ffn_hidden_size, cfg.moe_num_experts, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim

    def rand(*shape, std=0.02):
        out = torch.empty(*shape, dtype=torch.bfloat16)
        flat = out.view(-1)
        for i in range(0, flat.numel(), 1 << 24):          # in chunks: no float32 copy of a whole tensor
            chunk = flat[i:i + (1 << 24)]
            chunk.copy_(torch.randn(chunk.numel(), generator=gen) * std)
        return out

    weight_map = {}
    shards = [("model-dense.safetensors", {
        "transformer.wte.weight": rand(cfg.vocab_size, d), "lm_head.weight": rand(cfg.vocab_size, d),
        "transformer.norm_f.weight": torch.ones(d, dtype=torch.bfloat16)})]
    for i in range(cfg.n_layers):
        p = f"transformer.blocks.{i}."
        t = {p + "norm_attn_norm.norm_1.weight": torch.ones(d, dtype=torch.bfloat16),
             p + "norm_attn_norm.norm_2.weight": torch.ones(d, dtype=torch.bfloat16),
             p + "norm_attn_norm.attn.Wqkv.weight": rand((H + 2 * K) * D, d),
             p + "norm_attn_norm.attn.out_proj.weight": rand(d, H * D),
             p + "ffn.router.layer.weight": rand(E, d)}
        for w in ("w1", "v1", "w2"):
            t[p + f"ffn.experts.mlp.{w}"] = rand(E * Fh, d)
        shards.append((f"model-layer{i}.safetensors", t))
    for name, tensors in shards:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def drop_cache(*folders: Path) -> None:
    """Evict the files' pages from the page cache (so every run starts from the disk)."""
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd) if os.access(f, os.W_OK) else None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def disk_bandwidth(folder: Path, nbytes: int = 2 << 30) -> float:
    """Sequential read bandwidth (bytes/s) of a checkpoint shard, 8 MiB reads, page cache dropped first."""
    f = max(folder.glob("model-layer*.safetensors"), key=lambda p: p.stat().st_size)
    drop_cache(folder)
    buf = memoryview(bytearray(8 << 20))
    fd = os.open(f, os.O_RDONLY)
    t0, n = time.perf_counter(), 0
    while n < nbytes:
        r = os.preadv(fd, [buf], n)
        if r <= 0:
            break
        n += r
    dt = time.perf_counter() - t0
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return n / dt


class Cgroup:
    """A memory cgroup (v1 or v2) that a child process joins before exec."""

    def __init__(self, name: str, limit: int) -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        if v1.is_dir():
            self.path = v1 / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            self.version = 1
        else:
            self.path = Path("/sys/fs/cgroup") / name
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.max").write_text(str(limit))
            self.version = 2

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        try:                                       # the peak of this run only
            (self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")).write_text("0")
        except OSError:
            pass
        procs = self.path / "cgroup.procs"
        cmd = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *args]
        return subprocess.run(cmd, capture_output=True, text=True)

    def peak(self) -> int:
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / f).read_text())
        except (OSError, ValueError):
            return -1

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------
def child(args) -> None:
    """One configuration, run inside the cgroup: prints one JSON line of measurements."""
    import torch

    from dbrx_lab import load_model
    from dbrx_lab.interventions import Intervention, intervene

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    class RouterBias(Intervention):
        """Adds a fixed bias to every layer's router logits (a skewed, realistic load)."""

        def __init__(self, bias):
            super().__init__("all")
            self.bias = bias

        def edit_logits(self, logits, layer, ctx):
            return logits + self.bias.to(logits)

    def io_read() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
        return 0

    t0 = time.perf_counter()
    if args.mode == "accelerate":
        model = load_model(args.ckpt, dtype=torch.bfloat16, device_map="auto",
                           max_memory={"cpu": args.max_memory}, offload_folder=args.offload_folder)
        placement = {k: v for k, v in model.hf_device_map.items() if "blocks" in k}
    else:
        model = load_model(args.ckpt, dtype=torch.bfloat16, experts="offload", expert_cache=args.cache_bytes)
        placement = {"cache_slots": model.expert_cache.n_slots}
    load_s = time.perf_counter() - t0
    E = model.config.moe_num_experts
    bias = torch.linspace(SKEW, -SKEW, E) if args.skew else torch.zeros(E)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    times, tokens, reads, steps = [], [], [], []
    cache = model.expert_cache
    with torch.inference_mode(), intervene(model, RouterBias(bias)):
        r0 = io_read()
        t = time.perf_counter()
        for step in model.stream(prompt, max_new_tokens=args.tokens + 1, eos_token_id=[]):
            now = time.perf_counter()
            times.append(now - t)
            reads.append(io_read() - r0)
            tokens.append(int(step.tokens[0]))
            if cache is not None:
                s = cache.stats()
                steps.append({"routed_not_cached": int((s["misses"] + s["prefetched_hits"]).sum()),
                              "needed": int(s["needed"].sum()), "hits": int(s["hits"].sum()),
                              "prefetched_hits": int(s["prefetched_hits"].sum()),
                              "io_wait_s": float(s["io_wait_s"].sum())})
            r0, t = io_read(), time.perf_counter()
    out = {"mode": args.mode, "skew": args.skew, "load_s": load_s, "prefill_s": times[0],
           "decode_s": times[1:], "tokens": tokens, "read_bytes": reads, "placement": placement}
    if cache is not None:
        s = cache.stats()
        out["stats"] = s.reset_index().to_dict(orient="list")
        out["steps"] = steps
        out["expert_bytes"] = cache.expert_bytes
    print("RESULT " + json.dumps(out))


def summarize(r: dict, bw: float) -> dict:
    dec = r["decode_s"]
    row = {"decode tok/s": len(dec) / sum(dec), "prefill s": r["prefill_s"],
           "GB read / token": sum(r["read_bytes"][1:]) / len(dec) / 1e9}
    if "steps" in r:
        steps = r["steps"]
        eb = r["expert_bytes"]
        per = [dict((k, b[k] - a[k]) for k in b) for a, b in zip(steps[:-1], steps[1:])]   # decode steps only
        uncached = sum(p["routed_not_cached"] for p in per)
        needed = sum(p["needed"] for p in per)
        hits = sum(p["hits"] + p["prefetched_hits"] for p in per)
        row["hit rate"] = hits / needed if needed else float("nan")
        pre, miss = sum(p["prefetched_hits"] for p in per), uncached
        row["prefetch recall"] = pre / miss if miss else float("nan")
        row["IO bound s/token"] = uncached * eb / bw / len(per)
        row["decode s/token"] = sum(dec) / len(dec)
        row["decode / IO bound"] = row["decode s/token"] / row["IO bound s/token"]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work/offload-bench", help="folder for the checkpoint and accelerate's offload")
    ap.add_argument("--limit-gib", type=float, default=11.0, help="memory cgroup limit (page cache included)")
    ap.add_argument("--tokens", type=int, default=8, help="decode steps measured")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and offload folder")
    ap.add_argument("--only", choices=["all", "offload"], default="all",
                    help="offload: rerun only (b), taking (a) from benchmarks/offload_results.json")
    ap.add_argument("--child", choices=["accelerate", "offload"], help=argparse.SUPPRESS)
    ap.add_argument("--skew", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--offload-folder", help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return 0

    base = Path(args.dir)
    ckpt, off = base / "checkpoint", base / "accelerate-offload"
    print(f"writing the checkpoint to {ckpt} ...", flush=True)
    size = write_checkpoint(ckpt)
    limit = int(args.limit_gib * 2 ** 30)
    print(f"checkpoint {size / 1e9:.1f} GB, memory limit {limit / 1e9:.1f} GB ({size / limit:.2f}x)", flush=True)
    bw = disk_bandwidth(ckpt)
    print(f"disk sequential read: {bw / 1e9:.2f} GB/s", flush=True)
    d, V = CONFIG["d_model"], CONFIG["vocab_size"]
    dense = 2 * V * d * 2 + CONFIG["n_layers"] * ((CONFIG["n_heads"] + 2 * CONFIG["kv_n_heads"]) * 128 * d + d * d) * 2
    margin = int(1.5 * 2 ** 30)                  # activations, KV cache, torch and Python
    cache_bytes = limit - dense - margin
    results = []
    if args.only == "offload":
        previous = json.loads((HERE / "offload_results.json").read_text())["results"]
        results = [r for r in previous if r["mode"] == "accelerate"]
    group = Cgroup("dbrx-lab-offload-bench", limit)
    try:
        for skew in (False, True):
            for mode in ("accelerate", "offload") if args.only == "all" else ("offload",):
                drop_cache(ckpt, off) if off.exists() else drop_cache(ckpt)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--ckpt", str(ckpt),
                       "--offload-folder", str(off), "--max-memory", str(limit - margin),
                       "--cache-bytes", str(cache_bytes), "--tokens", str(args.tokens)] + (["--skew"] if skew else [])
                print(f"running ({'a' if mode == 'accelerate' else 'b'}) {mode}, routing "
                      f"{'skewed' if skew else 'near-uniform'} ...", flush=True)
                run_bw = disk_bandwidth(ckpt) if mode == "offload" else bw    # the disk as it is now
                drop_cache(ckpt)
                proc = group.run(cmd)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                    raise SystemExit(f"{mode} run failed (exit {proc.returncode}; -9 = killed by the cgroup)")
                r = json.loads(line[len("RESULT "):])
                r["peak_bytes"] = group.peak()
                r["disk_bw"] = run_bw
                results.append(r)
                print(json.dumps(summarize(r, run_bw)), flush=True)
    finally:
        group.remove()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    write_report(results, bw, size, limit, cache_bytes)
    return 0


def write_report(results: list[dict], bw: float, size: int, limit: int, cache_bytes: int) -> None:
    lines = [f"Checkpoint {size / 1e9:.1f} GB (3 DBRX-width layers, bf16), memory cgroup limit {limit / 2 ** 30:.1f} GiB "
             f"(page cache included), 2 CPU threads; (b)'s cache "
             f"{cache_bytes / 2 ** 30:.1f} GiB. disk GB/s: sequential 8 MiB reads measured just before the run "
             f"(the IO bound uses it); peak: the cgroup's peak usage.", "",
             "| routing | | decode tok/s | vs (a) | prefill s | GB read / token | hit rate | prefetch recall | "
             "IO bound s/token | decode / IO bound | tokens equal | disk GB/s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for skew in (False, True):
        a = next(r for r in results if r["skew"] == skew and r["mode"] == "accelerate")
        b = next(r for r in results if r["skew"] == skew and r["mode"] == "offload")
        sa, sb = summarize(a, a.get("disk_bw", bw)), summarize(b, b.get("disk_bw", bw))
        same = a["tokens"] == b["tokens"]
        for name, r, s in (("(a) accelerate device_map='auto' + disk", a, sa), ("(b) experts='offload'", b, sb)):
            ratio = s["decode tok/s"] / sa["decode tok/s"]
            fmt = lambda k: f"{s[k]:.2f}" if k in s and not math.isnan(s[k]) else "-"  # noqa: E731
            lines.append(f"| {'skewed' if skew else 'near-uniform'} | {name} | {s['decode tok/s']:.3f} | "
                         f"{ratio:.1f}x | {s['prefill s']:.1f} | {s['GB read / token']:.2f} | {fmt('hit rate')} | "
                         f"{fmt('prefetch recall')} | {fmt('IO bound s/token')} | {fmt('decode / IO bound')} | "
                         f"{'yes' if same else 'NO'} | "
                         f"{(format(r['disk_bw'] / 1e9, '.2f') if 'disk_bw' in r and r['mode'] == 'offload' else '-')} | "
                         f"{r.get('peak_bytes', -1) / 2 ** 30:.1f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (HERE / "offload_results.md").write_text(text)
    (HERE / "offload_results.json").write_text(json.dumps({"disk_bw": bw, "size": size, "limit": limit,
                                                           "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
