"""Speed of dbrx-lab next to HF transformers' DbrxForCausalLM, and the cost of recording traces.

Both models live in one process with the same weights (HF's initialisation, copied into DbrxLM), in
float32 on CPU, on the issue's benchmark shape (PRESETS["bench"]: d_model 512, 8 heads, 2 KV heads,
8 layers, ffn 896, 16 experts top-4, vocab 100352). Runs of the two sides are interleaved
(A B, then B A, ...) so that load from other processes hits both alike; tokens/s come from the median
wall time of `--repeats` runs after a warm-up run, ratios are medians of per-round ratios.

    python benchmarks/bench.py            # full run: prints the table, writes results.md and results.json
    python benchmarks/bench.py --quick    # smoke run with short sequences; prints only

See benchmarks/README.md for what each row measures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent

# (benchmark key, goal text, test on the measured value); ratio goals are ours/HF, cost goals are x plain run
GOALS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "prefill": (">= 1.2x HF", lambda r: r >= 1.2),
    "decode": (">= 2x HF", lambda r: r >= 2.0),
    "trace_router": ("<= 1.05x plain", lambda r: r <= 1.05),
    "trace_full": ("<= 1.5x plain", lambda r: r <= 1.5),
    "gen_trace_router": (">= 2x HF", lambda r: r >= 2.0),
    "gen_trace_full": (">= 2x HF", lambda r: r >= 2.0),
}


@dataclass
class Case:
    """A timed callable; `tokens` is the number of tokens one call processes or produces."""

    key: str
    fn: Callable[[], object]
    tokens: int
    wall: list[float] = field(default_factory=list)   # seconds per run
    cpu: list[float] = field(default_factory=list)    # process CPU seconds per run (all threads)

    @property
    def seconds(self) -> float:
        return statistics.median(self.wall)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_interleaved(cases: list[Case], repeats: int, warmup: int) -> None:
    """Run every case `warmup` times untimed, then `repeats` rounds; odd rounds go in reverse order."""
    for _ in range(warmup):
        for case in cases:
            case.fn()
    for r in range(repeats):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            gc.collect()
            gc.disable()
            try:
                w, c = time.perf_counter(), time.process_time()
                case.fn()
                case.wall.append(time.perf_counter() - w)
                case.cpu.append(time.process_time() - c)
            finally:
                gc.enable()
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{c.key} {c.wall[-1]:.2f}s" for c in cases), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_models(cfg, seed: int):
    """HF DbrxForCausalLM with its own initialisation and a DbrxLM holding a copy of the same weights."""
    import transformers

    from dbrx_lab import DbrxLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = transformers.DbrxForCausalLM(cfg.to_hf()).eval()
    hf.generation_config.eos_token_id = None          # always generate the full number of tokens
    hf.generation_config.pad_token_id = 0
    ours = DbrxLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64-token prefill, 8 new tokens, 1 warm-up, 2 repeats; writes nothing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per benchmark (default 7)")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="default 512")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for generation (default 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 64)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.md / results.json (default: benchmarks/; none with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = 1
    prefill_len = args.prefill_tokens or (64 if args.quick else 512)
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    prompt_len = args.prompt_tokens
    out_dir = args.out if args.out is not None else (None if args.quick else HERE)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import transformers

    import dbrx_lab
    from dbrx_lab import PRESETS, Record

    cfg = PRESETS["bench"]
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "dbrx_lab": dbrx_lab.__version__, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "load_average_start": load_average(),
        "config": {k: getattr(cfg, k) for k in ("d_model", "n_heads", "kv_n_heads", "n_layers", "ffn_hidden_size",
                                                "moe_num_experts", "moe_top_k", "vocab_size")},
        "dtype": "float32", "prefill_tokens": prefill_len, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "repeats": repeats, "warmup": warmup,
    }
    print(f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"dbrx-lab {env['dbrx_lab']}")
    print(f"CPU: {env['cpu']} ({env['cpu_count']} logical cores), torch threads: {env['torch_threads']}, "
          f"load average: {env['load_average_start']}")
    print(f"config: {env['config']}, float32; {repeats} timed runs per benchmark after {warmup} warm-up run")

    if busy(env):
        print("warning: the machine is busy; wall times will include waiting for other processes")
    hf, ours = build_models(cfg, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_len), generator=gen)              # [1, T]
    prompt = ids[:, :prompt_len]                                                          # [1, P]
    full = Record(router=True, attention=True, experts=True)
    router = Record(router=True)

    def hf_generate():
        return hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True)

    def ours_generate():
        return ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])

    def hf_prefill():
        return hf(ids, use_cache=True, logits_to_keep=1)

    def ours_prefill():
        return ours(ids, cache=ours.new_cache(1, prefill_len), last_only=True)

    with torch.inference_mode():
        # same weights, same function: check before timing anything
        logit_diff = (hf(ids, use_cache=False).logits - ours(ids).logits).abs().max().item()
        hf_ids, our_ids = hf_generate(), ours_generate()
        greedy_equal = torch.equal(hf_ids, our_ids)
        print(f"check: max |logits HF - ours| over {prefill_len} tokens = {logit_diff:.2e}; "
              f"greedy tokens equal: {greedy_equal}")
        if hf_ids.shape[1] != prompt_len + new_tokens:
            raise RuntimeError(f"HF generated {hf_ids.shape[1] - prompt_len} tokens, expected {new_tokens}")

        forward = [
            Case("hf_forward", lambda: hf(ids, use_cache=False), prefill_len),
            Case("forward", lambda: ours(ids), prefill_len),
            Case("trace_router", lambda: ours.run_with_trace(ids, record=router), prefill_len),
            Case("trace_full", lambda: ours.run_with_trace(ids, record=full), prefill_len),
            Case("hf_prefill", hf_prefill, prefill_len),
            Case("prefill", ours_prefill, prefill_len),
        ]
        generation = [
            Case("hf_decode", hf_generate, new_tokens),
            Case("decode", ours_generate, new_tokens),
            Case("gen_trace_router",
                 lambda: ours.generate_with_trace(prompt, max_new_tokens=new_tokens, record=router, eos_token_id=[]),
                 new_tokens),
            Case("gen_trace_full",
                 lambda: ours.generate_with_trace(prompt, max_new_tokens=new_tokens, record=full, eos_token_id=[]),
                 new_tokens),
        ]
        print(f"forward passes over {prefill_len} tokens:")
        run_interleaved(forward, repeats, warmup)
        print(f"greedy generation of {new_tokens} tokens after a {prompt_len}-token prompt:")
        run_interleaved(generation, repeats, warmup)

    env["load_average_end"] = load_average()
    cases = {c.key: c for c in forward + generation}
    rows = table_rows(cases, prefill_len, prompt_len, new_tokens)
    md = render_markdown(rows, env, logit_diff, greedy_equal)
    print()
    print(md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.md").write_text(md)
        data = {"environment": env, "check": {"max_abs_logit_diff": logit_diff, "greedy_equal": greedy_equal},
                "rows": rows,
                "raw": {k: {"tokens": c.tokens, "wall_s": c.wall, "cpu_s": c.cpu} for k, c in cases.items()}}
        (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {out_dir / 'results.md'} and {out_dir / 'results.json'}")
    return 0


def paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r]. Both runs of a round are close in time, so slow drifts in
    machine load cancel, and a burst that hits one run spoils one round, not the median."""
    return statistics.median(a / b for a, b in zip(num, den))


def table_rows(c: dict[str, Case], prefill_len: int, prompt_len: int, new_tokens: int) -> list[dict]:
    """One dict per table row: median tokens/s of both sides, ours/HF, and ours' time relative to the plain run."""
    def row(label, key, hf_key, plain_key=None):
        ours, hf = c[key], c[hf_key]
        ratio = paired(hf.wall, ours.wall) * ours.tokens / hf.tokens                 # tokens/s, ours over HF
        cpu_ratio = paired(hf.cpu, ours.cpu) * ours.tokens / hf.tokens
        rel = None if plain_key is None else paired(ours.wall, c[plain_key].wall)
        goal = GOALS.get(key)
        measured = rel if key in ("trace_router", "trace_full") else ratio
        return {"key": key, "benchmark": label, "ours_tokens_per_s": ours.tokens_per_s,
                "hf_tokens_per_s": hf.tokens_per_s, "ours_over_hf": ratio, "ours_over_hf_cpu_time": cpu_ratio,
                "time_vs_plain": rel, "ours_median_s": ours.seconds, "hf_median_s": hf.seconds,
                "goal": goal[0] if goal else None, "met": goal[1](measured) if goal else None}

    p, n, t = prompt_len, new_tokens, prefill_len
    return [
        row(f"forward, {t} tokens, logits for every position", "forward", "hf_forward"),
        row(f"prefill, {t} tokens (KV cache + last-position logits)", "prefill", "hf_prefill"),
        row(f"greedy decode, {n} tokens after a {p}-token prompt", "decode", "hf_decode"),
        row(f"forward {t} tokens + router trace", "trace_router", "hf_forward", "forward"),
        row(f"forward {t} tokens + full trace", "trace_full", "hf_forward", "forward"),
        row(f"generate {n} tokens + router trace", "gen_trace_router", "hf_decode", "decode"),
        row(f"generate {n} tokens + full trace", "gen_trace_full", "hf_decode", "decode"),
    ]


def render_markdown(rows: list[dict], env: dict, logit_diff: float, greedy_equal: bool) -> str:
    cfg = env["config"]
    lines = [
        "| benchmark | dbrx-lab (tokens/s) | HF transformers (tokens/s) | ratio ours/HF | ratio by CPU time | "
        "time vs plain run | goal | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        rel = "" if r["time_vs_plain"] is None else f"{r['time_vs_plain']:.2f}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['benchmark']} | {r['ours_tokens_per_s']:.1f} | {r['hf_tokens_per_s']:.1f} | "
                     f"{r['ours_over_hf']:.2f}x | {r['ours_over_hf_cpu_time']:.2f}x | {rel} | {r['goal'] or ''} | "
                     f"{met} |")
    notes = [
        "",
        f"Model: d_model {cfg['d_model']}, {cfg['n_heads']} heads ({cfg['kv_n_heads']} KV), {cfg['n_layers']} layers, "
        f"ffn {cfg['ffn_hidden_size']}, {cfg['moe_num_experts']} experts top-{cfg['moe_top_k']}, vocab "
        f"{cfg['vocab_size']}, float32, batch 1. Same weights on both sides (max |logit difference| "
        f"{logit_diff:.1e}; greedy tokens {'identical' if greedy_equal else 'DIFFERENT'}).",
        f"Machine: {env['cpu']}, torch threads: {env['torch_threads']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, Python {env['python']}. Load average {env['load_average_start']} at the start, "
        f"{env.get('load_average_end')} at the end (including this benchmark's threads).",
        f"tokens/s: median wall time of {env['repeats']} runs after {env['warmup']} warm-up run. The runs of all "
        "rows are interleaved round by round; ratios are medians of per-round ratios (so they can differ a little "
        "from the quotient of the two medians). Router trace = "
        "`Record(router=True)`; full trace = `Record(router=True, attention=True, experts=True)` (attention maps "
        "of all layers and heads, expert output norms). The HF column of the trace rows is HF's plain forward / "
        "generate. Reproduce with `python benchmarks/bench.py`.",
    ]
    if busy(env):
        notes.append(f"**The machine was busy** (load average above half of its {env['cpu_count']} cores at the "
                     "start): wall times include waiting for other processes (with several threads, OpenMP regions "
                     "also wait for descheduled threads). Rerun on an idle machine, or with `--threads 1` and compare "
                     "the ratio by CPU time.")
    return "\n".join(lines + notes) + "\n"


def busy(env: dict) -> bool:
    """Whether the 1-minute load average exceeded half the cores before the benchmark started (the load at
    the end also counts the benchmark's own threads)."""
    load = env.get("load_average_start")
    return load is not None and load[0] > 0.5 * (env["cpu_count"] or 1)


if __name__ == "__main__":
    sys.exit(main())
