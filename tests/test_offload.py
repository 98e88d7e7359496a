"""The expert-offload runtime (dbrx_lab.offload): the same logits and tokens as the resident model, bit for bit,
for every cache size, thread count, dtype and user path; only the routed experts are read; bad input is refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pandas as pd
import pytest
import torch

from dbrx_lab import ExpertAblation, ExpertForce, Record, TopK, load_model, save_pretrained
from dbrx_lab.offload import HIT, MISS, PREFETCHED, SKIPPED, parse_bytes

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def resident():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


@pytest.fixture(scope="module")
def folder(resident, tmp_path_factory):
    return save_pretrained(resident, tmp_path_factory.mktemp("offload") / "ckpt")


@pytest.fixture(scope="module")
def folder_bf16(resident, tmp_path_factory):
    return save_pretrained(resident, tmp_path_factory.mktemp("offload16") / "ckpt", dtype=torch.bfloat16)


def expert_bytes(model, dtype=torch.float32) -> int:
    c = model.config
    return 3 * c.ffn_hidden_size * c.d_model * dtype.itemsize


def offloaded(folder, slots: int, dtype=torch.float32, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    nbytes = 3 * cfg["ffn_config"]["ffn_hidden_size"] * cfg["d_model"] * dtype.itemsize
    return load_model(folder, dtype=dtype, experts="offload", expert_cache=slots * nbytes, **kw)


def ids_of(model, text=PROMPT) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# --- bit for bit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("slots, dtype, n_threads", [
    (1, torch.float32, 2), (3, torch.float32, 1), (3, torch.float32, 2),
    (1, torch.bfloat16, 2), (48, torch.bfloat16, 1)])       # one expert; fewer than a layer's; every expert
def test_forward_and_generation_bit_identical(resident, folder, folder_bf16, slots, dtype, n_threads, make_ids):
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        _bit_identical(resident, folder, folder_bf16, slots, dtype, make_ids)
    finally:
        torch.set_num_threads(before)


def _bit_identical(resident, folder, folder_bf16, slots, dtype, make_ids):
    ref = resident if dtype == torch.float32 else load_model(folder_bf16)
    model = offloaded(folder if dtype == torch.float32 else folder_bf16, slots, dtype)
    assert model.transformer.blocks[0].ffn.experts.mlp.extra_repr().endswith("offloaded")
    assert not any(".experts.mlp." in n for n in model.state_dict())       # no expert weights in memory
    for ids, mask in [(make_ids(1, 1), None), (make_ids(1, 9), None), (make_ids(2, 40, seed=1), None),
                      (make_ids(3, 12, seed=2), torch.tensor([[0] * 4 + [1] * 8, [1] * 12, [0] * 11 + [1]]))]:
        a = ref(ids, attention_mask=mask)
        b = model(ids, attention_mask=mask)
        assert torch.equal(a.logits if hasattr(a, "logits") else a, b.logits if hasattr(b, "logits") else b)
    ids = ids_of(ref)
    assert torch.equal(ref.generate(ids, max_new_tokens=8), model.generate(ids, max_new_tokens=8))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95, seed=3)
    assert torch.equal(ref.generate(ids, **kw), model.generate(ids, **kw))
    stats = model.expert_cache.stats()
    assert (stats["bytes_read"] > 0).all() and stats["needed"].sum() > 0


def test_demo_model_bit_identical(make_ids):
    ref = load_model("demo")                                # stored in bf16, loaded in float32 (converted on read)
    model = load_model("demo", experts="offload", expert_cache="1MiB")
    ids = ids_of(ref, "The capital of France is")
    assert torch.equal(ref(ids).logits, model(ids).logits)
    assert torch.equal(ref.generate(ids, max_new_tokens=10), model.generate(ids, max_new_tokens=10))
    ref16 = load_model("demo", dtype=torch.bfloat16)
    model16 = load_model("demo", dtype=torch.bfloat16, experts="offload", expert_cache="4MiB")
    assert torch.equal(ref16.generate(ids, max_new_tokens=10), model16.generate(ids, max_new_tokens=10))


@pytest.mark.parametrize("inner", ["grouped", "reference"])
def test_inner_kernels_bit_identical(resident, folder, inner, make_ids):
    ref = load_model(folder, experts_impl=inner)
    model = offloaded(folder, 4, experts_impl=inner)
    assert model.expert_runtime.inner == inner and model.kernels()["experts"] == "offload"
    for ids in (make_ids(1, 1), make_ids(2, 30)):
        assert torch.equal(ref(ids).logits, model(ids).logits)


# --- observation and interventions -------------------------------------------------------------------
def test_traces_hooks_and_interventions_identical(resident, folder, threads):
    model = offloaded(folder, 6)
    ids = ids_of(resident)
    rec = Record(router=True, experts=True, residuals=True, attention=True)
    (x, a), (y, b) = resident.run_with_trace(ids, record=rec), model.run_with_trace(ids, record=rec)
    assert a.differences(b, rtol=0, atol=0) == []
    (x, a), (y, b) = (m.generate_with_trace(ids, max_new_tokens=5, record=rec) for m in (resident, model))
    assert torch.equal(x, y) and a.differences(b, rtol=0, atol=0) == []

    def edit(out, hook):                                     # a hook that replaces expert outputs
        return out * 0.5

    for interventions in ([ExpertAblation(1, [0, 3], mode="zero")], [ExpertAblation("all", [2], mode="reroute")],
                          [ExpertForce(0, 5)], [TopK(2, layer=2)]):
        with resident.intervene(*interventions):
            x = resident.generate(ids, max_new_tokens=6)
        with model.intervene(*interventions):
            y = model.generate(ids, max_new_tokens=6)
        assert torch.equal(x, y), interventions
    with resident.hooks([("blocks.1.ffn.hook_expert_out", edit)]):
        x = resident(ids).logits
    with model.hooks([("blocks.1.ffn.hook_expert_out", edit)]):
        y = model(ids).logits
    assert torch.equal(x, y)


def test_ablated_experts_are_not_fetched_unless_observed(resident, folder):
    model = offloaded(folder, 48, expert_prefetch=False)
    ids = ids_of(resident)
    layer, gone = 1, [0, 1, 2, 3, 4, 5, 6, 7]
    abl = ExpertAblation(layer, gone, mode="zero")
    with model.intervene(abl):
        y = model(ids).logits
    with resident.intervene(abl):
        x = resident(ids).logits
    assert torch.equal(x, y)
    fetched = {e for (l, e) in model.expert_cache.cached() if l == layer}
    assert fetched and not fetched & set(gone)
    assert model.expert_cache.stats().loc[layer, "skipped"] > 0
    model.expert_cache.clear()
    with model.intervene(abl):                          # a Record asking for expert outputs fetches them
        _, t = model.run_with_trace(ids, record=Record(experts=True))
    fetched = {e for (l, e) in model.expert_cache.cached() if l == layer}
    routed = set(t.topk_experts[layer].unique().tolist())
    assert routed & set(gone) <= fetched


def test_record_cache_and_stats(resident, folder):
    model = offloaded(folder, 10)
    ids = ids_of(resident)
    model.expert_cache.reset_stats()
    _, t = model.generate_with_trace(ids, max_new_tokens=6, record=Record(cache=True))
    codes = t.cache
    L, k = model.config.n_layers, model.config.moe_top_k
    assert codes.shape == (L, 1, t.seq_len, k) and codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= {HIT, MISS, PREFETCHED, SKIPPED}
    assert (codes[:, :, 0] == MISS).any()                  # a cold cache misses on the first tokens
    assert (codes[:, :, -3:] != MISS).any()               # and hits later
    stats = model.expert_cache.stats()
    assert list(stats.index) == list(range(L))
    for col in ("hits", "misses", "prefetched_hits", "bytes_read", "prefetch_issued", "prefetch_used", "io_wait_s",
                "hit_rate", "prefetch_recall"):
        assert col in stats
    assert stats["prefetch_issued"].iloc[1:].sum() > 0 and stats["prefetch_issued"].iloc[0] == 0
    assert ((stats["hit_rate"] >= 0) & (stats["hit_rate"] <= 1)).all()
    with pytest.raises(ValueError, match="offloaded"):
        resident.run_with_trace(ids, record=Record(cache=True))
    from dbrx_lab.figures import expert_cache_figure

    fig = expert_cache_figure(stats)
    assert {tr.name for tr in fig.data} >= {"hit rate", "prefetch recall"}


def test_prefetch_guesses_the_next_layer(resident, folder):
    """On a decode step the next layer's router on this layer's input guesses part of what it picks; prefetched
    experts are used and counted (a wrong guess costs a slot, never correctness)."""
    model = offloaded(folder, 48)
    ids = ids_of(resident)
    off = offloaded(folder, 48, expert_prefetch=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8), off.generate(ids, max_new_tokens=8))
    s = model.expert_cache.stats()
    assert s["prefetch_used"].sum() > 0 and s["prefetched_hits"].sum() == s["prefetch_used"].sum()
    assert off.expert_cache.stats()["prefetch_issued"].sum() == 0


def test_prefill_reads_each_needed_expert_once_in_runs(resident, folder, monkeypatch):
    """A prefill that routes to every expert of a layer reads each once, adjacent experts in one read."""
    model = offloaded(folder, 48, expert_prefetch=False)
    store = model.expert_runtime.store
    calls = []
    real = store.read_run

    def spy(layer, first, dests):
        calls.append((layer, first, len(dests)))
        return real(layer, first, dests)

    monkeypatch.setattr(store, "read_run", spy)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    model(ids)
    for layer in range(model.config.n_layers):
        runs = [(f, n) for l, f, n in calls if l == layer]
        read = [f + i for f, n in runs for i in range(n)]
        assert len(read) == len(set(read))                   # never twice
        assert len(runs) < len(read)                         # adjacent experts share a read
    assert calls == sorted(calls, key=lambda c: c[0])        # layer by layer


def test_threads_share_one_cache(resident, folder):
    model = offloaded(folder, 5)
    prompts = [ids_of(resident, t) for t in ("x = 1", PROMPT, "for i in range(3):", "import os")]
    want = [resident.generate(p, max_new_tokens=5) for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        got[i] = model.generate(prompts[i], max_new_tokens=5)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert not model.expert_cache.pinned                     # nothing left pinned


def test_two_tier_path_computes_misses_where_their_weights_are(resident, folder):
    """The GPU tier's logic on the CPU: a host cache between the file and the fast tier; expert_compute='cpu'
    runs misses from the host cache (the "grouped" kernel, as on a GPU) with the resident model's results."""
    ref = load_model(folder, experts_impl="grouped")
    model = offloaded(folder, 2, experts_impl="grouped", expert_compute="cpu",
                      expert_host_cache=48 * expert_bytes(resident))
    ids = ids_of(resident)
    assert torch.equal(ref.generate(ids, max_new_tokens=6), model.generate(ids, max_new_tokens=6))
    s = model.expert_cache.stats()
    assert s["cpu_computed"].sum() > 0
    fetch = offloaded(folder, 2, experts_impl="grouped", expert_compute="fetch",
                      expert_host_cache=48 * expert_bytes(resident))
    assert torch.equal(ref.generate(ids, max_new_tokens=6), fetch.generate(ids, max_new_tokens=6))
    assert fetch.expert_cache.stats()["cpu_computed"].sum() == 0
    assert fetch.expert_runtime.host.stats()["bytes_read"].sum() > 0     # the file was read through the host tier


# --- bad input ----------------------------------------------------------------------------------------
def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2 ** 30 and parse_bytes("500 MB") == 500 * 10 ** 6
    assert parse_bytes(1234) == 1234 and parse_bytes("1.5kib") == 1536
    for bad in ("8 parsecs", "", "-1GB", -5, None, True, [1]):
        with pytest.raises(ValueError, match="expert_cache"):
            parse_bytes(bad)


def test_bad_input_is_refused_clearly(resident, folder, tmp_path):
    one = expert_bytes(resident)
    with pytest.raises(ValueError, match="smaller than one expert"):
        load_model(folder, experts="offload", expert_cache=one - 1)
    with pytest.raises(ValueError, match="device_map"):
        load_model(folder, experts="offload", expert_cache="1GiB", device_map="auto")
    with pytest.raises(ValueError, match="needs expert_cache"):
        load_model(folder, experts="offload")
    with pytest.raises(ValueError, match="checkpoint folder"):
        load_model("tiny", experts="offload", expert_cache="1GiB")
    with pytest.raises(ValueError, match="'resident' or 'offload'"):
        load_model(folder, experts="disk")
    with pytest.raises(ValueError, match="expert_compute"):
        load_model(folder, experts="offload", expert_cache="1GiB", expert_compute="gpu")
    # experts stored one tensor per expert (not the released fused layout)
    from safetensors.torch import load_file, save_file

    odd = tmp_path / "per_expert"
    odd.mkdir()
    (odd / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    F = resident.config.ffn_hidden_size
    for name in [n for n in state if n.endswith("ffn.experts.mlp.w1")]:
        w = state.pop(name)
        for e in range(resident.config.moe_num_experts):
            state[name.replace("mlp.w1", f"mlp.{e}.w1")] = w[e * F:(e + 1) * F].clone()
    save_file(state, str(odd / "model.safetensors"))
    with pytest.raises(ValueError, match="released fused layout.*experts='resident'"):
        load_model(odd, experts="offload", expert_cache="1GiB")
    # a pickle checkpoint is never read
    pkl = tmp_path / "pickle"
    pkl.mkdir()
    (pkl / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pkl / "pytorch_model.bin")
    with pytest.raises((ValueError, FileNotFoundError), match="safetensors"):
        load_model(pkl, experts="offload", expert_cache="1GiB")
    model = offloaded(folder, 2)
    with pytest.raises(ValueError, match="offloaded"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.set_kernels(experts="cpu")                         # not through the runtime: a clear error, no leak
    with pytest.raises(RuntimeError, match="offload"):
        model(torch.tensor([[1, 2, 3]]))


def test_killed_run_leaves_only_the_checkpoint(folder, tmp_path):
    before = sorted(os.listdir(folder))
    script = textwrap.dedent(f"""
        import torch
        from dbrx_lab import load_model
        m = load_model({str(folder)!r}, experts="offload", expert_cache=2 * 3 * 96 * 64 * 4)
        print("ready", flush=True)
        while True:
            m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=50)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=tmp_path, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(os.listdir(folder)) == before and os.listdir(tmp_path) == []


def test_warm_from_a_trace_or_route_stats(resident, folder, tmp_path):
    """MoE-Infinity's idea: the experts a trace (or a route-stats folder) used most are read before the run."""
    ids = ids_of(resident)
    _, t = resident.run_with_trace(ids)
    small = offloaded(folder, 8, expert_prefetch=False)
    assert len(small.expert_cache.warm(t)) == 8 == len(small.expert_cache.cached())     # up to the cache's size
    model = offloaded(folder, 48, expert_prefetch=False)
    warmed = model.expert_cache.warm(t, limit=8)
    assert len(warmed) == 8 and sorted(model.expert_cache.cached()) == sorted(warmed)
    assert not model.expert_cache.pinned
    from dbrx_lab import analysis

    load = analysis.expert_load(t)
    top = load.sort_values("count", ascending=False, kind="stable").iloc[0]
    assert (int(top["layer"]), int(top["expert"])) in warmed
    model.expert_cache.reset_stats()
    assert torch.equal(model(ids).logits, resident(ids).logits)
    assert model.expert_cache.stats()["hits"].sum() >= 8         # every warmed expert was used: hits
    from dbrx_lab import route_stats

    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": s}) for s in ("x = 1", PROMPT, "import os")) + "\n")
    out = tmp_path / "stats"
    route_stats(resident, str(texts), str(out), progress=False)
    cold = offloaded(folder, 4, expert_prefetch=False)
    assert len(cold.expert_cache.warm(out, limit=3)) == 3
    with pytest.raises(ValueError, match="layer, expert, count"):
        cold.expert_cache.warm(pd.DataFrame({"a": [1]}))


def test_prefetch_guess_follows_the_interventions(resident, folder, monkeypatch):
    """The guess for layer l+1 is that layer's routing with this context's interventions: experts rerouted
    away are never prefetched."""
    model = offloaded(folder, 48)
    issued = []
    real = model.expert_cache.prefetch
    monkeypatch.setattr(model.expert_cache, "prefetch", lambda layer, experts: (issued.append((layer, experts)),
                                                                               real(layer, experts))[1])
    gone = list(range(8))
    with model.intervene(ExpertAblation(1, gone, mode="reroute")):
        model.generate(ids_of(resident), max_new_tokens=4)
    guessed = {e for layer, experts in issued if layer == 1 for e in experts}
    assert guessed and not guessed & set(gone)


def test_adaptive_prefetch_reads_only_guesses_that_pay(resident, folder):
    """Every guess is scored against what the layer then needed; the adaptive policy reads a layer's guess
    only while at least half of its recent guesses were needed ("always" reads every guess)."""
    ids = ids_of(resident)
    model = offloaded(folder, 48)
    rt = model.expert_runtime
    assert rt.prefetch_mode == "adaptive"
    model.generate(ids, max_new_tokens=6)
    s = model.expert_cache.stats()
    assert s["guessed"].iloc[0] == 0 and (s["guessed"].iloc[1:] > 0).all()
    assert ((s["guess_precision"].iloc[1:] >= 0) & (s["guess_precision"].iloc[1:] <= 1)).all()
    rt.precision[2] = [1.0, 100.0]                       # layer 2's guesses were rarely needed: not read
    rt.precision[1] = [90.0, 100.0]                      # layer 1's mostly were: read
    assert not rt.should_read(2) and rt.should_read(1)
    model.expert_cache.clear()
    model.expert_cache.reset_stats()
    rt.precision[2] = [1.0, 1000.0]
    model(ids[:, :1])
    assert model.expert_cache.stats().loc[2, "prefetch_issued"] == 0
    always = offloaded(folder, 48, expert_prefetch="always")
    always.expert_runtime.precision[2] = [1.0, 1000.0]
    always(ids[:, :1])
    assert always.expert_cache.stats().loc[2, "prefetch_issued"] > 0
    with pytest.raises(ValueError, match="expert_prefetch"):
        offloaded(folder, 2, expert_prefetch="sometimes")


def test_unused_prefetches_never_block_slots(resident, folder):
    """A prefetched expert nobody needed is evictable once its read landed (it used to stay "loading" until
    someone waited for it, so unused guesses blocked their slots for good)."""
    model = offloaded(folder, 2, expert_prefetch="always")
    cache = model.expert_cache
    assert cache.prefetch(0, [0, 1]) == 2
    for fut in list(cache.loading.values()):
        fut.result()
    got = cache.acquire(1, [5])                            # both slots hold landed, unused prefetches
    assert list(got) == [5] and (1, 5) in cache.cached()
    cache.release(1, [5])
    assert cache.stats().loc[0, "prefetch_wasted"] == 1 and not cache.pinned


def test_wrong_guesses_not_yet_read_are_cancelled(resident, folder):
    """When a layer comes, prefetches it does not need and that have not started are cancelled (they would
    delay the reads it waits for) and their slots freed; the ones it needs are kept."""
    import time

    model = offloaded(folder, 8)
    cache = model.expert_cache
    cache.pool.submit(time.sleep, 0.5)                     # the IO thread is busy: the prefetches queue
    assert cache.prefetch(1, [0, 1, 2]) == 3
    assert cache.cancel_unneeded(1, {1}) == 2
    assert (1, 1) in cache.loading and (1, 0) not in cache.where and len(cache.free) == 8 - 1
    assert cache.acquire(1, [1]) and (1, 1) in cache.cached()
    cache.release(1, [1])
    assert cache.stats().loc[1, "prefetch_cancelled"] == 2


def test_one_live_expert_in_a_balanced_prefill(resident, folder, two_threads):
    """Every expert but one zero-ablated in a layer whose routing takes the padded path: the one fetched expert
    is computed beside a not-fetched one, and the logits stay the resident model's."""
    model = offloaded(folder, 48)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    for keep in (0, 7, 15):
        abl = ExpertAblation(0, [e for e in range(16) if e != keep], mode="zero")
        with torch.inference_mode():
            with resident.intervene(abl):
                a = resident(ids).logits
            with model.intervene(abl):
                b = model(ids).logits
        assert torch.equal(a, b), keep
    assert model.expert_cache.stats().loc[0, "skipped"] > 0
