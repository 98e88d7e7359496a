"""route-stats throughput with 1 and 2 processes (issue 19): tokens/s and peak RSS per process.

Runs `python -m dbrx_lab.cli route-stats` without a launcher and `torchrun --standalone --nproc-per-node 2
-m dbrx_lab.cli route-stats` on the same corpus, one thread per process (OMP_NUM_THREADS=1), in ABBA order,
checks that the two folders hold the same parts and tables byte for byte, and writes
route_stats_dist_results.md / .json beside this file.

    python benchmarks/route_stats_dist.py                  # demo model, 600 texts (~25k tokens), ~3 min on 2 cores
    python benchmarks/route_stats_dist.py --texts 100 --repeats 1 --out /tmp/rsd     # smoke run

tokens/s: tokens routed / seconds of the routing phase (summary.json `seconds_last_run`: planning, the
forwards and the parquet writes of every rank; model loading and the aggregate tables excluded), and
end-to-end: tokens / wall time of the whole command (interpreter start, model load, tables included).
Peak RSS: `ru_maxrss` of each rank, from its log (`--log-dir`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = ("the a model expert router token layer attention data text cat dog runs over under quickly slowly function "
         "return value code import numpy while for if else print and of to in is was with on").split()


def corpus(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(20, 60))),
                                "label": "ab"[i % 2]}) + "\n")


def run(procs: int, data: Path, out: Path, model: str, part_tokens: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    logs = out.with_name(out.name + "-logs")
    shutil.rmtree(logs, ignore_errors=True)
    args = ["-m", "dbrx_lab.cli", "route-stats", "--model", model, "--data", str(data), "--out", str(out),
            "--part-tokens", str(part_tokens), "--no-progress", "--log-dir", str(logs)]
    launcher = [] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rss = [float(re.search(r"peak RSS of this rank (\d+) MiB", (logs / f"rank-{r:05d}.log").read_text()).group(1))
           for r in range(procs)]
    return {"processes": procs, "tokens": summary["tokens_last_run"], "seconds": summary["seconds_last_run"],
            "wall": round(wall, 2), "tokens_per_s": summary["tokens_last_run"] / summary["seconds_last_run"],
            "tokens_per_s_end_to_end": summary["tokens_last_run"] / wall, "peak_rss_mib": rss}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--part-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2, help="ABBA rounds (default 2: 1, 2, 2, 1 processes)")
    ap.add_argument("--out", default=None, help="where to write the results (default: beside this script)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="route-stats-dist-"))
    data = work / "corpus.jsonl"
    corpus(data, args.texts)
    load = [os.getloadavg()[0]]
    runs = []
    for i in range(args.repeats):
        for procs in ((1, 2) if i % 2 == 0 else (2, 1)):
            runs.append(run(procs, data, work / f"out{procs}", args.model, args.part_tokens))
            print(json.dumps(runs[-1]), flush=True)
    load.append(os.getloadavg()[0])
    identical = files(work / "out1") == files(work / "out2")
    rows = []
    for procs in (1, 2):
        mine = [r for r in runs if r["processes"] == procs]
        rows.append({"processes": procs, "tokens": mine[0]["tokens"],
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                     "tokens_per_s_end_to_end": statistics.median(r["tokens_per_s_end_to_end"] for r in mine),
                     "peak_rss_mib_per_process": max(max(r["peak_rss_mib"]) for r in mine),
                     "runs": len(mine)})
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "load_average_start_end": load, "model": args.model, "texts": args.texts, "part_tokens": args.part_tokens}
    result = {"env": env, "rows": rows, "speedup_2_vs_1": speedup, "identical_outputs": identical, "runs": runs}
    out = Path(args.out) if args.out else HERE
    out.mkdir(parents=True, exist_ok=True)
    (out / "route_stats_dist_results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# route-stats: 1 vs 2 processes ({args.model} model, {rows[0]['tokens']} tokens, 1 thread each)", "",
             "| processes | tokens/s (routing) | tokens/s (whole command) | peak RSS per process |",
             "|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_end_to_end']:.0f} | "
              f"{r['peak_rss_mib_per_process']:.0f} MiB |" for r in rows]
    lines += ["", f"2 processes / 1: {speedup:.2f}x (routing phase). Outputs identical byte for byte: {identical}. "
              f"Load average at start / end: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores "
              f"(median of {args.repeats} ABBA runs each)."]
    (out / "route_stats_dist_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
