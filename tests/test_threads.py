"""Threads (issue #16, part 5): hooks, interventions and recorders attached in a `with` block belong to the
thread (context) that entered it; other threads' calls see none of them, so concurrent run_with_trace /
generate_with_trace / generate-inside-intervene from several threads give the results of the same calls
run one after another. An accelerate-dispatched model (offloaded weights are swapped in and out per call)
serializes its calls with a per-model lock instead, with the same results.

Every check compares bit for bit (torch.equal) with the same calls run sequentially in the main thread.
Hooks record the thread that calls them: a hook must only ever be called by the forwards of the thread
that attached it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from typing import Callable

import pytest
import torch

from dbrx_lab import PRESETS, DbrxLM, ExpertAblation, HeadAblation, Record, TopK, load_model, save_pretrained

WORKERS = 4
N = 20                      # run_with_trace calls per worker
N_GENERATE = 8              # generate_with_trace / generate calls per worker
TIMEOUT = 60                # seconds any wait may take before the test fails instead of hanging


@pytest.fixture(autouse=True)
def fast_thread_switching():
    """Switch Python threads every 50 µs (default 5 ms), so that the workers' forwards interleave at many
    points (the tiny model's forward takes a few ms)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(before)


# --- helpers ------------------------------------------------------------------------------------------
class ThreadHook:
    """A hook that records the id of every thread that calls it; edit(t) -> t' replaces the value."""

    def __init__(self, edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.edit = edit
        self.threads: list[int] = []

    def __call__(self, t: torch.Tensor, hook) -> torch.Tensor | None:
        self.threads.append(threading.get_ident())
        time.sleep(0)                               # hand the GIL over in the middle of a forward
        return None if self.edit is None else self.edit(t)


def run_threads(target: Callable[[int, threading.Barrier], object], n: int = WORKERS,
                on_error: Callable[[], None] | None = None) -> list:
    """target(w, barrier) in n threads started together -> their results; re-raises the first error
    (an error aborts the barrier and calls on_error(), so the other threads stop instead of waiting)."""
    barrier = threading.Barrier(n, timeout=TIMEOUT)
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            results[w] = target(w, barrier)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            barrier.abort()
            if on_error is not None:
                on_error()

    threads = [threading.Thread(target=run, args=(w,), name=f"worker {w}") for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def trace_tensors(trace) -> dict[str, torch.Tensor]:
    out = {"input_ids": trace.input_ids, "attention_mask": trace.attention_mask}
    for name in ("router_logits", "topk_experts", "topk_weights", "expert_output_norm", "expert_hidden_norm"):
        if getattr(trace, name) is not None:
            out[name] = getattr(trace, name)
    out.update({f"attention[{layer}]": a for layer, a in trace.attention.items()})
    out.update({f"activations[{name}]": a for name, a in trace.activations.items()})
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: {sorted(got)} != {sorted(want)}"
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{where}: differs from the sequential run in {differ}"


def clean(model) -> bool:
    """No hook and no intervention visible from the calling thread."""
    return all(not p.fns for p in model.hook_points.values()) and not model.active_interventions()


# --- the workers: each its own prompts, Record, interventions and hooks ---------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    shape: tuple[int, int]                        # prompt [B, T]
    record: Record
    interventions: Callable[[], list]             # fresh objects for each with-block
    hook_at: str                                  # where the worker's ThreadHook goes
    edit: Callable[[torch.Tensor], torch.Tensor] | None
    one_block: bool                               # one with-block around all calls (else one per call)
    padded: bool = False                          # left-pad row 0 (attention_mask)


JOBS = [
    Job((1, 9), Record(router=True), lambda: [ExpertAblation(0, [0, 1, 2], mode="reroute")],
        "blocks.*.ffn.hook_router_logits", None, one_block=True),
    Job((2, 7), Record(router=True, attention=True), lambda: [TopK(1), ExpertAblation(1, [5, 6], mode="zero")],
        "blocks.0.hook_resid_mid", lambda t: t * 0.5, one_block=False),
    Job((2, 8), Record(router=True, experts=True, residuals=True),
        lambda: [HeadAblation(1, [0, 2], mode="mean"),
                 ExpertAblation("all", [7, 8, 9], mode="renormalize", positions=[1, 3])],
        "blocks.1.attn.hook_z", None, one_block=True, padded=True),
    Job((3, 6), Record(router=True, hooks=("blocks.*.attn.hook_z",)), lambda: [],     # plain: sees any leak
        "hook_embed", None, one_block=False),
]


def prompt(w: int, i: int, make_ids) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T = JOBS[w].shape
    ids = make_ids(B, T, seed=1000 * w + i)
    if not JOBS[w].padded:
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = 0
    return ids, mask


def call(model, kind: str, w: int, i: int, make_ids) -> dict[str, torch.Tensor]:
    ids, mask = prompt(w, i, make_ids)
    record, sample = JOBS[w].record, w % 2 == 1
    if kind == "run_with_trace":
        out, trace = model.run_with_trace(ids, attention_mask=mask, record=record)
        return {"logits": out.logits, **trace_tensors(trace)}
    if kind == "generate_with_trace":
        out, trace = model.generate_with_trace(ids, max_new_tokens=5, record=record, attention_mask=mask,
                                               do_sample=sample, seed=i)
        return {"ids": out, **trace_tensors(trace)}
    assert kind == "generate"
    return {"ids": model.generate(ids, max_new_tokens=6, attention_mask=mask, do_sample=sample, seed=i)}


def worker(model, kind: str, w: int, make_ids, hook: ThreadHook | None, barrier: threading.Barrier | None,
           n: int = N) -> tuple[int, list[dict[str, torch.Tensor]]]:
    """n calls of worker w (hook None: the plain model, no hooks or interventions) -> (thread id, results)."""
    job = JOBS[w]

    def block():
        if hook is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(model.hooks([(job.hook_at, hook)]))
        stack.enter_context(model.intervene(*job.interventions()))
        return stack

    results = []
    with torch.no_grad(), (block() if job.one_block else contextlib.nullcontext()):
        for i in range(n):
            if barrier is not None:
                barrier.wait()                      # all workers call at the same time
            with (contextlib.nullcontext() if job.one_block else block()):
                results.append(call(model, kind, w, i, make_ids))
    return threading.get_ident(), results


# --- (a) concurrent calls give the sequential results ---------------------------------------------------
@pytest.mark.parametrize("kind", ["run_with_trace", "generate_with_trace", "generate"])
def test_four_threads_give_the_sequential_results(tiny_model, make_ids, kind):
    model = tiny_model
    n = N if kind == "run_with_trace" else N_GENERATE
    seq_hooks = [ThreadHook(job.edit) for job in JOBS]
    expected = [worker(model, kind, w, make_ids, seq_hooks[w], None, n)[1] for w in range(WORKERS)]
    plain = [worker(model, kind, w, make_ids, None, None, n)[1] for w in range(WORKERS - 1)]
    for w in range(WORKERS - 1):                    # each worker's edits change its results (leaks would show)
        changed = [i for i in range(n) if any(not torch.equal(expected[w][i][k], plain[w][i][k])
                                             for k in expected[w][i])]
        assert changed, f"worker {w}'s hooks and interventions should change its results"
    assert all(seq_hooks[w].threads for w in range(WORKERS))

    hooks = [ThreadHook(job.edit) for job in JOBS]
    got = run_threads(lambda w, barrier: worker(model, kind, w, make_ids, hooks[w], barrier, n))
    for w, (ident, results) in enumerate(got):
        assert set(hooks[w].threads) == {ident}, f"worker {w}'s hook was called by another thread's forward"
        assert len(hooks[w].threads) == len(seq_hooks[w].threads), f"worker {w}'s hook calls"
        assert len(results) == n
        for i in range(n):
            assert_same(results[i], expected[w][i], f"{kind}: worker {w} call {i}")
    assert clean(model)


# --- (b) a with-block in one thread is invisible to another, step by step -------------------------------
class Steps:
    """Named events for interleaving two threads deterministically."""

    def __init__(self, *names: str) -> None:
        self.events = {n: threading.Event() for n in names}
        self.failed = threading.Event()

    def done(self, name: str) -> None:
        self.events[name].set()

    def wait(self, name: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not self.events[name].wait(0.01):
            assert not self.failed.is_set(), f"the other thread failed before step {name!r}"
            assert time.monotonic() < deadline, f"timed out waiting for step {name!r}"


@torch.no_grad()
def test_a_with_block_belongs_to_the_thread_that_entered_it(tiny_model, make_ids):
    model = tiny_model
    ids = make_ids(2, 8, seed=3)
    spy = ThreadHook()                              # the same function object attached in both threads

    def zero(t, h):
        return torch.zeros_like(t)

    def half(t, h):
        return t * 0.5

    hooks_a = [("blocks.0.hook_resid_mid", spy), ("blocks.1.hook_ffn_out", zero)]
    hooks_b = [("blocks.0.hook_resid_mid", spy), ("blocks.0.hook_attn_out", half)]
    ivs_a = lambda: [ExpertAblation("all", [0, 1, 2, 3], mode="reroute")]                 # noqa: E731
    ivs_b = lambda: [TopK(1)]                                                           # noqa: E731
    plain = model(ids).logits
    with model.hooks(hooks_a), model.intervene(*ivs_a()):
        ref_a = model(ids).logits
    with model.hooks(hooks_b), model.intervene(*ivs_b()):
        ref_b = model(ids).logits
    assert not torch.equal(ref_a, plain) and not torch.equal(ref_b, plain) and not torch.equal(ref_a, ref_b)
    spy.threads.clear()
    steps = Steps("a_in", "b_looked", "a_looked", "b_out", "a_out")
    idents: dict[str, int] = {}

    def fresh_thread_forward() -> torch.Tensor:
        box: dict = {}

        def run():
            with torch.no_grad():
                box["clean"], box["logits"] = clean(model), model(ids).logits

        t = threading.Thread(target=run)
        t.start()
        t.join(TIMEOUT)
        assert box["clean"], "a thread started inside a with-block sees the block's hooks or interventions"
        return box["logits"]

    @torch.no_grad()
    def thread_a(w, barrier) -> None:
        idents["a"] = threading.get_ident()
        with model.hooks(hooks_a), model.intervene(*ivs_a()):
            steps.done("a_in")
            steps.wait("b_looked")                  # B looked while A was inside its block; B is in its own
            n = len(spy.threads)
            assert torch.equal(model(ids).logits, ref_a), "A's forward sees B's block"
            assert spy.threads[n:] == [idents["a"]]
            assert torch.equal(fresh_thread_forward(), plain)
            assert len(spy.threads) == n + 1
            steps.done("a_looked")
            steps.wait("b_out")                     # B left its block (B attached the same spy function)
            n = len(spy.threads)
            assert torch.equal(model(ids).logits, ref_a), "B's exit removed A's hooks or interventions"
            assert spy.threads[n:] == [idents["a"]]
        assert clean(model) and torch.equal(model(ids).logits, plain)
        steps.done("a_out")

    @torch.no_grad()
    def thread_b(w, barrier) -> None:
        idents["b"] = threading.get_ident()
        steps.wait("a_in")
        assert clean(model), "B sees A's hooks or interventions"
        n = len(spy.threads)
        assert torch.equal(model(ids).logits, plain), "B's forward sees A's block"
        assert len(spy.threads) == n, "A's hook was called by B's forward"
        with model.hooks(hooks_b), model.intervene(*ivs_b()):
            assert torch.equal(model(ids).logits, ref_b), "B's forward sees A's block"
            assert spy.threads[n:] == [idents["b"]]
            steps.done("b_looked")
            steps.wait("a_looked")
            assert torch.equal(model(ids).logits, ref_b), "A's forward changed B's block"
        assert clean(model)
        steps.done("b_out")
        steps.wait("a_out")
        assert torch.equal(model(ids).logits, plain)

    run_threads(lambda w, barrier: (thread_a, thread_b)[w](w, barrier), n=2, on_error=steps.failed.set)
    assert sorted(spy.threads) == sorted([idents["a"]] * 2 + [idents["b"]] * 2)
    assert clean(model) and torch.equal(model(ids).logits, plain)


# --- (c) nothing remains after the blocks exit, normally or by an error --------------------------------
class Boom(Exception):
    pass


@torch.no_grad()
def test_nothing_remains_after_the_blocks_exit_even_on_errors(tiny_model, make_ids):
    model = tiny_model
    ids = make_ids(2, 6, seed=5)
    plain = model(ids).logits

    @torch.no_grad()
    def work(w, barrier) -> None:
        for i in range(6):
            barrier.wait()
            try:
                with model.hooks([("blocks.*.hook_resid_post", lambda t, h: t * 2)]), \
                        model.intervene(ExpertAblation(w % 2, [w], mode="zero"), TopK(2)):
                    model(ids)
                    if (i + w) % 2:
                        raise Boom
                    model.generate(ids, max_new_tokens=2)
            except Boom:
                pass
            with pytest.raises(ValueError):         # an invalid intervention after the hooks were attached
                with model.hooks([("hook_embed", lambda t, h: t + 1)]), model.intervene(ExpertAblation(9, [0])):
                    pass
            with pytest.raises(ValueError):         # an unknown hook name after a valid one
                with model.hooks([("hook_final", lambda t, h: t * 0), ("blocks.7.hook_nope", lambda t, h: t)]):
                    pass
            assert clean(model)

    run_threads(work)
    with pytest.raises(Boom), model.hooks([("hook_final", lambda t, h: t * 0)]), model.intervene(TopK(1)):
        raise Boom
    assert clean(model) and torch.equal(model(ids).logits, plain)
    box: dict = {}

    def fresh() -> None:
        with torch.no_grad():
            box["clean"], box["logits"] = clean(model), model(ids).logits

    t = threading.Thread(target=fresh)
    t.start()
    t.join(TIMEOUT)
    assert box["clean"] and torch.equal(box["logits"], plain)


# --- (d) a dispatched model: calls serialized by the model's lock, same results -------------------------
@pytest.fixture
def dispatched(tmp_path, widen):
    """A 4-block model and the same weights loaded with accelerate: two blocks on the CPU, two on disk."""
    model = widen(DbrxLM(dataclasses.replace(PRESETS["tiny"], n_layers=4))).eval()
    folder = save_pretrained(model, tmp_path / "ckpt4", max_shard_size="1MB")
    top = sum(p.numel() * 4 for n, p in model.named_parameters() if ".blocks." not in n)
    block = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    loaded = load_model(folder, device_map="auto", max_memory={"cpu": top + 2 * block},
                        offload_folder=tmp_path / "offload")
    assert "disk" in set(loaded.hf_device_map.values())
    return loaded


def test_dispatched_model_from_four_threads_gives_the_sequential_results(dispatched, make_ids):
    model = dispatched
    active, most = [0], [0]
    guard = threading.Lock()

    def enter(module, args) -> None:                # wte: the first module of a forward
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.001)                           # another thread's forward would start now

    def leave(module, args, out) -> None:           # lm_head: the last one
        with guard:
            active[0] -= 1

    for kind, n in (("run_with_trace", 8), ("generate_with_trace", 2)):
        seq_hooks = [ThreadHook(job.edit) for job in JOBS]
        expected = [worker(model, kind, w, make_ids, seq_hooks[w], None, n)[1] for w in range(WORKERS)]
        hooks = [ThreadHook(job.edit) for job in JOBS]
        handles = [model.transformer.wte.register_forward_pre_hook(enter),
                   model.lm_head.register_forward_hook(leave)]
        try:
            got = run_threads(lambda w, barrier: worker(model, kind, w, make_ids, hooks[w], barrier, n))
        finally:
            for h in handles:
                h.remove()
        assert most[0] == 1, f"{kind}: {most[0]} forwards of the dispatched model ran at once"
        for w, (ident, results) in enumerate(got):
            assert set(hooks[w].threads) == {ident}, f"worker {w}'s hook was called by another thread's forward"
            assert len(hooks[w].threads) == len(seq_hooks[w].threads)
            for i in range(n):
                assert_same(results[i], expected[w][i], f"dispatched {kind}: worker {w} call {i}")
    assert clean(model)
