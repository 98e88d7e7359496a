"""Kernels (issue #16): every registered kernel against the "reference" one on the same inputs.

- experts ("grouped", "cpu", "auto") vs `model.reference_experts`: many tokens with a balanced routing (the
  cpu kernel's zero-padded bmm) and a skewed one (its sorted-row path: experts alone and in pairs), one token
  with an even and an odd k (the one-token pair path, two threads), in float32, bfloat16 and float64, with
  and without `observe`; observing never changes the output (bit for bit).
- attention ("sdpa" vs "reference"): causal without a mask, one query against a cache, padding masks.
- linear ("split" vs "reference") for 1..5 rows on two threads.
- the whole model with every combination of kernels vs the all-reference model (float64, tight tolerance);
  unknown kernel names raise ValueError listing the valid ones.
- lm_head's greedy int8 screen: same argmax as the full product, exact values where it keeps them.
- traces name the kernels that ran per layer.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from dbrx_lab import PRESETS, Record, load_model
from dbrx_lab import kernels
from dbrx_lab.kernels import ATTENTION, EXPERTS, LINEAR
from dbrx_lab.kernels import experts as experts_mod
from dbrx_lab.kernels.unembed import UnembedScreen
from dbrx_lab.model import ExpertGLU, reference_attention, reference_experts

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
FAST_EXPERTS = ["grouped", "cpu", "auto"]


def tol(dtype: torch.dtype) -> float:
    """Relative (to the largest magnitude) tolerance of two kernels that sum in different orders."""
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    scale = float(want.double().abs().max().clamp_min(1.0))
    err = float((got.double() - want.double()).abs().max())
    assert err <= tol(dtype) * scale, f"{what}: max abs difference {err:.3g} (scale {scale:.3g}, {dtype})"


# ------------------------------------------------------------------------------------------------
# experts
@pytest.fixture(scope="module")
def mlp64() -> ExpertGLU:
    """The tiny preset's experts (E=16, F=96, d=64) with wide float64 weights; cast per test."""
    torch.manual_seed(0)
    mlp = ExpertGLU(dataclasses.replace(PRESETS["tiny"])).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.3)
    return mlp


def mlp_as(mlp64: ExpertGLU, dtype: torch.dtype) -> ExpertGLU:
    m = ExpertGLU(dataclasses.replace(PRESETS["tiny"])).to(dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in mlp64.state_dict().items()})
    return m


def routing(kind: str, k: int = 4, E: int = 16, seed: int = 0) -> torch.Tensor:
    """experts [N, k] long, distinct per row. balanced: 32 tokens, every expert 8 rows; skewed: 64 tokens
    drawn with probabilities ~ 0.7^e (a few experts get most rows, some few or none); one: one token."""
    g = torch.Generator().manual_seed(seed)
    if kind == "balanced":
        N = 32
        base = torch.arange(N * k).view(N, k) % E                                   # each expert N*k/E times
        order = torch.stack([torch.randperm(k, generator=g) for _ in range(N)])
        rows = base.gather(1, order)
        return rows[torch.randperm(N, generator=g)]
    if kind == "skewed":
        probs = 0.7 ** torch.arange(E, dtype=torch.float64)
        return torch.stack([torch.multinomial(probs, k, replacement=False, generator=g) for _ in range(64)])
    if kind == "one":
        return torch.randperm(E, generator=g)[:k][None]
    raise ValueError(kind)


def inputs(experts: torch.Tensor, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    N, k = experts.shape
    x = torch.randn(N, 64, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(N, k, generator=g, dtype=torch.float64) + 0.1
    w = (w / w.sum(-1, keepdim=True)).sort(-1, descending=True).values.to(dtype)   # as the MoE passes them
    return x, w


def cpu_path(mlp: ExpertGLU, x: torch.Tensor, experts: torch.Tensor) -> str:
    """Which path the "cpu" kernel takes for these inputs (mirrors cpu_experts' dispatch)."""
    N, k = experts.shape
    if N == 1 and k > 1 and experts_mod._pairs_pay(mlp, x):
        return "one-token pairs"
    counts = torch.bincount(experts.reshape(-1), minlength=mlp.n_experts)
    if experts_mod.padded_rows_ok(mlp.n_experts, int(counts.max()), N * k) and experts_mod.contiguous_weights(mlp):
        return "padded"
    groups = experts_mod._groups(mlp, counts.tolist(), x)
    return "sorted rows" + (" with pairs" if any(len(g) == 2 for g in groups) else "")


def run_kernel(name: str, mlp, x, experts, w, observe: bool, grad: bool):
    chosen, fn = EXPERTS.choose(name, mlp, x)
    assert name == "auto" or chosen == name
    with torch.set_grad_enabled(grad):
        out, outs, norms = fn(mlp, x, experts, w, observe)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return detach(out), detach(outs), detach(norms)


CASES = [  # (routing, k, threads, expected cpu path)
    ("balanced", 4, 1, "padded"),
    ("skewed", 4, 1, "sorted rows"),
    ("skewed", 4, 2, "sorted rows with pairs"),
    ("one", 4, 2, "one-token pairs"),
    ("one", 3, 2, "one-token pairs"),
    ("one", 1, 2, "sorted rows"),       # k == 1: no pairs, the one expert alone
    ("one", 4, 1, "sorted rows"),       # one thread: no pairs, one expert at a time
]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-k{c[1]}-{c[2]}threads")
def test_experts_kernels_match_reference(mlp64, case, dtype, grad):
    kind, k, threads, path = case
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mlp = mlp_as(mlp64, dtype)
        experts = routing(kind, k)
        x, w = inputs(experts, dtype)
        if not grad:
            assert cpu_path(mlp, x, experts) == path, "the routing no longer exercises the path it is meant for"
        ref_out, ref_outs, ref_norms = run_kernel("reference", mlp, x, experts, w, True, grad)
        assert ref_outs.shape == (*experts.shape, 64) and ref_norms.shape == experts.shape
        assert ref_norms.dtype == torch.float32
        for name in FAST_EXPERTS:
            out, outs, norms = run_kernel(name, mlp, x, experts, w, True, grad)
            plain, none1, none2 = run_kernel(name, mlp, x, experts, w, False, grad)
            assert none1 is None and none2 is None, f"{name}: observe=False must return (out, None, None)"
            assert torch.equal(out, plain), f"{name}: observe=True changed the output ({path})"
            assert_close(out, ref_out, dtype, f"{name} out ({path})")
            assert_close(outs, ref_outs, dtype, f"{name} unweighted outputs ({path})")
            assert norms.dtype == torch.float32
            assert_close(norms, ref_norms, dtype, f"{name} hidden norms ({path})")
    finally:
        torch.set_num_threads(before)


def test_experts_kernels_results_survive_later_calls(mlp64, two_threads):
    """The cpu kernel reuses per-thread scratch buffers: a result must not alias one (an earlier result keeps
    its values after later calls with other inputs)."""
    mlp = mlp_as(mlp64, torch.float32)
    for kind in ("balanced", "skewed"):
        experts = routing(kind)
        x, w = inputs(experts, torch.float32)
        with torch.no_grad():
            first = EXPERTS.impls["cpu"](mlp, x, experts, w, True)
            kept = [t.clone() for t in first]
            x2, w2 = inputs(experts, torch.float32, seed=7)
            EXPERTS.impls["cpu"](mlp, x2 * 3, routing(kind, seed=5), w2, True)
        for a, b in zip(first, kept):
            assert torch.equal(a, b), f"{kind}: a result was overwritten by a later call"


def test_experts_registry_names_and_auto():
    assert EXPERTS.names() == ["auto", *EXPERTS.impls]
    assert {"reference", "grouped", "cpu"} <= set(EXPERTS.impls)
    assert EXPERTS.impls["reference"] is reference_experts
    mlp = ExpertGLU(dataclasses.replace(PRESETS["tiny"]))
    assert EXPERTS.choose("auto", mlp, torch.zeros(2, 64))[0] == "cpu"


# ------------------------------------------------------------------------------------------------
# attention
def qkv(B, H, K, T, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, 16, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, K, S, 16, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, K, S, 16, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def padding_mask(B: int, T: int, S: int, pads: list[int]) -> torch.Tensor:
    """[B, 1, T, S] bool as the model builds it: causal (queries are the last T columns) & real keys, and
    every query sees itself (a padded query row is never empty)."""
    start = S - T
    real = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(pads):
        real[b, :p] = False
    causal = torch.ones(T, S, dtype=torch.bool).tril(start)
    cols = torch.arange(start, S)
    mask = (causal & real[:, None, :]) | (cols[:, None] == torch.arange(S))[None]
    return mask[:, None]


ATTN_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
ATTN_CASES = {  # name: (B, H, K, T, S, mask or None)
    "causal-T==S": (2, 4, 2, 9, 9, None),
    "causal-T==S-no-gqa": (2, 2, 2, 9, 9, None),
    "one-query-vs-cache": (2, 4, 2, 1, 13, None),
    "padding-T==S": (3, 4, 2, 8, 8, padding_mask(3, 8, 8, [0, 3, 7])),
    "padding-one-query": (2, 4, 2, 1, 11, padding_mask(2, 1, 11, [4, 0])),
    "padding-several-queries-after-cache": (2, 4, 2, 3, 10, padding_mask(2, 3, 10, [2, 0])),
    "new-tokens-after-cache-broadcast-mask": (2, 4, 2, 3, 10, torch.ones(3, 10, dtype=torch.bool).tril(7)[None, None]),
}


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ATTN_CASES), ids=str)
def test_attention_kernels_match_reference(case, dtype):
    B, H, K, T, S, mask = ATTN_CASES[case]
    q, k, v = qkv(B, H, K, T, S, dtype)
    want = reference_attention(q, k, v, mask)
    assert not want.isnan().any()
    for name in ATTENTION.names():
        chosen, fn = ATTENTION.choose(name, q, k)
        got = fn(q, k, v, mask)
        # float64: the reference's softmax is float32 (HF's eager attention does the same)
        assert_close(got, want, torch.float32 if dtype == torch.float64 else dtype, f"{name} ({chosen}) {case}")


def test_attention_reference_is_softmax_of_scaled_scores():
    """The reference itself against a plain computation (GQA: query head h reads kv head h // (H/K))."""
    B, H, K, T, S = 2, 4, 2, 5, 5
    q, k, v = qkv(B, H, K, T, S, torch.float32)
    mask = padding_mask(B, T, S, [2, 0])
    kk, vv = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
    scores = (q @ kk.transpose(-1, -2)) / 4.0
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv
    assert_close(reference_attention(q, k, v, mask), want, torch.float32, "reference")


def test_attention_kernels_causal_without_mask_when_queries_follow_a_cache():
    """The registry's contract: mask None means causal with the T queries the LAST T keys, for any T <= S
    (kernels.registry.ATTENTION's signature) - also for 1 < T < S."""
    q, k, v = qkv(1, 4, 2, 3, 7, torch.float32)
    want = reference_attention(q, k, v, None)
    explicit = reference_attention(q, k, v, torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None])
    assert torch.allclose(want, explicit, atol=1e-6)
    for name in ATTENTION.names():
        got = ATTENTION.choose(name, q, k)[1](q, k, v, None)
        assert_close(got, want, torch.float32, f"{name}: mask None with T=3 < S=7")


# ------------------------------------------------------------------------------------------------
# linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed-view"])
def test_linear_split_matches_reference(two_threads, dtype, layout):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 64, generator=g, dtype=torch.float64).to(dtype)
    weight = base if layout == "contiguous" else base.T.contiguous().T          # [256, 64], stride(-1) != 1
    assert (weight.stride(-1) == 1) == (layout == "contiguous")
    for n in range(1, 6):
        x = torch.randn(n, 64, generator=g, dtype=torch.float64).to(dtype)
        want = LINEAR.impls["reference"](x, weight)
        for name in LINEAR.names():
            chosen, fn = LINEAR.choose(name, x, weight)
            if name == "auto":
                assert chosen == ("split" if n <= kernels.linear.SPLIT_MAX_ROWS else "reference")
            got = fn(x, weight)
            assert_close(got, want, dtype, f"linear {name} ({chosen}) n={n} {layout}")
            assert torch.allclose(got, x @ weight.T, rtol=0, atol=tol(dtype) * 50)


# ------------------------------------------------------------------------------------------------
# the whole model
def test_every_kernel_combination_gives_the_reference_model(tiny_model, make_ids):
    """float64 model, every (experts, attention, linear) combination: forward logits with padding, greedy
    tokens and per-step logits of a generation. Each combination matches the model with reference experts and
    linear and the same attention kernel within 1e-10, and the all-reference model within 5e-5 (the reference
    attention takes its softmax in float32, as HF's eager attention does, so sdpa differs from it by float32
    rounding even in a float64 model). The forward runs on one thread (two threads thrash on a loaded 2-core
    machine), the generation on two (the decode steps' paired experts and split products)."""
    model = tiny_model.double()
    ids = make_ids(2, 10, seed=3)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    prompt = make_ids(1, 6, seed=4)

    def run():
        with torch.no_grad():
            logits = model(ids, mask).logits
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            steps = list(model.stream(prompt, 4))
        finally:
            torch.set_num_threads(before)
        return logits, torch.stack([s.tokens for s in steps]), torch.stack([s.logits for s in steps])

    refs = {}
    for attention in ("reference", "sdpa"):
        model.set_kernels(experts="reference", attention=attention, linear="reference")
        assert model.kernels() == {"experts": "reference", "attention": attention, "linear": "reference"}
        refs[attention] = run()
    # "offload" runs only on an offloaded model (load_model(..., experts="offload")): tests/test_offload.py
    experts_kernels = [n for n in EXPERTS.names() if n != "offload"]
    for e, a, lin in itertools.product(experts_kernels, ATTENTION.names(), LINEAR.names()):
        model.set_kernels(experts=e, attention=a, linear=lin)
        assert model.kernels() == {"experts": e, "attention": a, "linear": lin}
        assert all(b.ffn.experts.impl == e and b.norm_attn_norm.attn.impl == a for b in model.transformer.blocks)
        got = run()
        combo = f"experts={e} attention={a} linear={lin}"
        same_attention = "reference" if a == "reference" else "sdpa"            # auto -> sdpa on CPU
        for want, atol in ((refs[same_attention], 1e-10), (refs["reference"], 5e-5)):
            assert torch.allclose(got[0], want[0], rtol=0, atol=atol), f"{combo}: forward logits"
            assert torch.equal(got[1], want[1]), f"{combo}: generated tokens"
            assert torch.allclose(got[2], want[2], rtol=0, atol=atol), f"{combo}: step logits"


@pytest.mark.parametrize("kind", ["experts", "attention", "linear"])
def test_unknown_kernel_names_raise_listing_the_valid_ones(tiny_model, kind):
    registry = {"experts": EXPERTS, "attention": ATTENTION, "linear": LINEAR}[kind]
    before = tiny_model.kernels()
    with pytest.raises(ValueError) as err:
        tiny_model.set_kernels(**{kind: "no-such-kernel"})
    message = str(err.value)
    assert "no-such-kernel" in message
    for name in registry.names():
        assert repr(name) in message or name in message, f"{name!r} missing from: {message}"
    assert tiny_model.kernels() == before, "a rejected name must change nothing"


def test_load_model_takes_kernel_names():
    """spec: load_model(..., experts_impl="auto", attn_impl="auto")."""
    model = load_model("tiny", experts_impl="grouped", attn_impl="reference")
    assert model.kernels()["experts"] == "grouped" and model.kernels()["attention"] == "reference"
    with pytest.raises(ValueError, match="valid"):
        load_model("tiny", experts_impl="no-such-kernel")


# ------------------------------------------------------------------------------------------------
# greedy unembedding screen
def screen_inputs(kind: str, V: int = 4096, d: int = 64, B: int = 6, seed: int = 0):
    """(x [B, d], weight [V, d]) float32. "random": plain random rows. "near-ties": for every row of x, 300
    vocabulary rows of random directions whose exact logits are 20 + 3e-5 * (a distinct rank), above every
    random row's: they differ by far less than the int8 error bound (~0.2) and far more than float32
    rounding, so the int8 products order them at random and the screen must keep them all and compare the
    exact logits."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g) * 0.3
    x = torch.randn(B, d, generator=g)
    if kind == "near-ties":
        rows = torch.randperm(V, generator=g)[:300 * B].view(B, 300)
        for b in range(B):
            w = torch.randn(300, d, generator=g) * 0.3
            target = 20.0 + torch.randperm(300, generator=g).float() * 3e-5
            w += ((target - w @ x[b]) / x[b].dot(x[b]))[:, None] * x[b]              # exact logit = target
            weight[rows[b]] = w
    return x, weight


@pytest.mark.parametrize("kind", ["random", "near-ties"])
def test_unembed_screen_argmax_and_exact_values(kind):
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("torch without the int8 kernel")
    x, weight = screen_inputs(kind)
    assert UnembedScreen.applies(weight)
    screen = UnembedScreen(weight)
    got = screen.logits(x, weight)
    full = x @ weight.T
    assert got.shape == full.shape and got.dtype == torch.float32
    assert torch.equal(got.argmax(-1), full.argmax(-1))
    kept = torch.isfinite(got)
    assert kept.any(-1).all()
    assert torch.allclose(got[kept], full[kept], rtol=0, atol=1e-5)
    if kind == "near-ties":
        assert int(kept.sum(-1).min()) >= 50, "the near-ties should leave many candidates per row"
    else:
        assert int(kept.sum()) < kept.numel() // 4, "the screen should drop most rows of a random matrix"


def test_unembed_screen_falls_back_to_the_full_product():
    """A non-finite x, or more candidates than MAX_CANDIDATES, takes the full product (all entries exact)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("torch without the int8 kernel")
    x, weight = screen_inputs("random")
    screen = UnembedScreen(weight)
    bad = x.clone()
    bad[2, 3] = float("inf")
    got = screen.logits(bad, weight)
    torch.testing.assert_close(got, kernels.linear.linear(bad, weight), rtol=0, atol=0, equal_nan=True)
    x2, w2 = screen_inputs("near-ties")
    s2 = UnembedScreen(w2)
    assert not torch.isfinite(s2.logits(x2, w2)).all(), "with the default MAX_CANDIDATES rows are screened"
    s2.MAX_CANDIDATES = 1
    got = s2.logits(x2, w2)
    assert torch.isfinite(got).all(), "over MAX_CANDIDATES the screen returns the full product"
    assert torch.allclose(got, x2 @ w2.T, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), (x2 @ w2.T).argmax(-1))


# ------------------------------------------------------------------------------------------------
# kernel names in traces
def test_trace_metadata_names_the_kernels_per_layer(tiny_model, make_ids):
    L = tiny_model.config.n_layers
    ids = make_ids(1, 8)
    _, trace = tiny_model.run_with_trace(ids, record=Record(router=True))
    assert trace.metadata["kernels"]["experts"] == ["cpu"] * L
    assert trace.metadata["kernels"]["attention"] == ["sdpa"] * L
    _, trace = tiny_model.generate_with_trace(ids, 3, record=Record(router=True))
    assert trace.metadata["kernels"]["experts"] == ["cpu"] * L
    assert trace.metadata["kernels"]["attention"] == ["sdpa"] * L

    tiny_model.set_kernels(experts="reference")
    for kind, trace in (("forward", tiny_model.run_with_trace(ids)[1]),
                        ("generate", tiny_model.generate_with_trace(ids, 3)[1])):
        assert trace.metadata["kernels"]["experts"] == ["reference"] * L, kind
        assert trace.metadata["kernels"]["attention"] == ["sdpa"] * L, kind
    tiny_model.set_kernels(experts="grouped", attention="reference")
    for kind, trace in (("forward", tiny_model.run_with_trace(ids)[1]),
                        ("generate", tiny_model.generate_with_trace(ids, 3)[1])):
        assert trace.metadata["kernels"]["experts"] == ["grouped"] * L, kind
        assert trace.metadata["kernels"]["attention"] == ["reference"] * L, kind


def test_trace_metadata_names_the_greedy_screen(tiny_vocab_model):
    """Recorder.kernel_names documents an "unembed" entry: a greedy generation of a large-vocab model runs
    lm_head's int8 screen for its decode steps, and its trace says so; a forward never screens."""
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    _, trace = tiny_vocab_model.generate_with_trace(ids, 4)
    assert trace.metadata["kernels"].get("unembed") == ["int8-screen"], trace.metadata["kernels"]
    _, trace = tiny_vocab_model.run_with_trace(ids)
    assert "unembed" not in trace.metadata["kernels"]


def test_scratch_buffers_survive_switching_inference_mode(two_threads):
    """A CPU-kernel buffer made under inference_mode cannot be written outside it: each mode has its own."""
    from dbrx_lab import load_model

    model = load_model("tiny")
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = model(ids).logits
    with torch.no_grad():
        b = model(ids).logits
    assert torch.equal(a, b)
