"""GPU tier: the model on a real CUDA GPU, in float32 and bfloat16 (issue #16).

Every test here is marked `cuda` and skipped without a CUDA device. Run the tier with
`bash scripts/gpu_tier.sh` (or `python -m pytest -m cuda tests/` with a CUDA build of torch).

- HF parity on the GPU: float32 logits (tight, left padding too), router logits and choices in traces,
  greedy generation token for token; bfloat16 logits and greedy tokens (statistical bounds, see below).
- Observing changes nothing, in bfloat16: Records, read-only hook points and torch module hooks leave
  forward, run_with_trace, generate and generate_with_trace bit-identical; a generated token is one
  module call of the model.
- Traces hold CPU tensors equal to what the hooks saw (the copies to the CPU have landed), and a traced
  call leaves no GPU memory allocated.
- Determinism: under torch.use_deterministic_algorithms(True) two runs give bit-identical outputs.
- Kernels: each named kernel against "reference", per layer on identical inputs (bfloat16) and end to end
  (float32).
- Interventions inside generate: the same tokens on the GPU as on the CPU (float32).
- Layouts: resident on cuda:0; accelerate dispatch (load_model's device_map, and dispatch_model by hand)
  with cuda:0 as the main device and wte, norm_f, lm_head and some blocks offloaded to the CPU (and
  disk): model.device is cuda:0 and every output is bit-identical to the resident model's.

Models: conftest's widened tiny model (float32 / bfloat16), a 4-block variant for the layouts, and one
bench-sized model (PRESETS["bench"]: d_model 512, 8 layers, 16 experts, vocab 100352) in bfloat16.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os

# cuBLAS refuses deterministic mode without a fixed workspace; read when cuBLAS starts, so set before any
# CUDA work (scripts/gpu_tier.sh exports it too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import widen_  # noqa: E402

from dbrx_lab import (PRESETS, DbrxLM, ExpertAblation, ExpertForce, ExpertScale, HeadAblation,  # noqa: E402
                      Record, RoutingPatch, TopK, load_model, save_pretrained)

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bash scripts/gpu_tier.sh on a GPU machine)")]
needs_bf16 = pytest.mark.skipif(HAS_CUDA and not torch.cuda.is_bf16_supported(),
                                reason="this GPU has no bfloat16 support")

GPU = torch.device("cuda", 0)
BF16 = torch.bfloat16
CFG = dataclasses.replace(PRESETS["tiny"])                   # conftest's hf_pair / hf_checkpoint config
L, E, K, H = CFG.n_layers, CFG.moe_num_experts, CFG.moe_top_k, CFG.n_heads
FULL = Record(router=True, attention=True, experts=True)
EVERYTHING = Record(router=True, attention=True, experts=True, residuals=True,
                    hooks=["blocks.*.attn.hook_z", "blocks.*.hook_attn_out", "blocks.*.hook_ffn_out"])
NO_EOS = []                                                  # bench vocabulary holds the eos ids: no early stop

# float32 on the GPU vs HF on the GPU. Measured on CPU (torch 2.13, seeds 0-3, [2, 16]): |ours - float64| and
# |HF - float64| <= 4.6e-5 at |logits| <= 10.8; GPU kernels sum their reductions in other orders, so the
# two sides may differ by about the sum. ~5x that:
FP32_ATOL = 5e-4


# ------------------------------------------------------------------------------------------------
# helpers
def ids_of(B: int, T: int, seed: int = 0, vocab: int = CFG.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 12] with rows of 12, 9 and 5 real tokens (left padding with id 0), and the mask."""
    ids = ids_of(3, 12, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 7)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def settle() -> None:
    gc.collect()
    torch.cuda.synchronize()


def trace_tensors(trace) -> dict[str, torch.Tensor]:
    """Every tensor a Trace holds, by field (dict fields as field[key])."""
    fields = ([f.name for f in dataclasses.fields(trace)] if dataclasses.is_dataclass(trace) else list(vars(trace)))
    found = {}
    for name in fields:
        value = getattr(trace, name)
        for key, t in (value.items() if isinstance(value, dict) else [(None, value)]):
            if isinstance(t, torch.Tensor):
                found[name if key is None else f"{name}[{key!r}]"] = t
    return found


def assert_on_cpu(trace) -> None:
    tensors = trace_tensors(trace)
    assert tensors, "the trace holds no tensors"
    elsewhere = {n: str(t.device) for n, t in tensors.items() if t.device.type != "cpu"}
    assert not elsewhere, f"trace tensors not on the CPU: {elsewhere}"


def assert_traces_equal(a, b) -> None:
    ta, tb = trace_tensors(a), trace_tensors(b)
    assert ta.keys() == tb.keys()
    differ = [n for n in ta if ta[n].shape != tb[n].shape or ta[n].dtype != tb[n].dtype
              or not torch.equal(ta[n], tb[n])]
    assert not differ, f"trace tensors differ: {differ}"


def generate_logged(model, ids, n: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """model.generate -> (ids [B, T + n] on the CPU, per-step logits [B, n, V] float32 on the CPU)."""
    logits = []
    out = model.generate(ids, max_new_tokens=n, streamer=lambda s: logits.append(s.logits.float().cpu()), **kwargs)
    return out.cpu(), torch.stack(logits, dim=1)


def generate_with_trace_logged(model, ids, n: int, **kwargs):
    """model.generate_with_trace -> (ids on the CPU, per-step logits [B, n, V] float32, trace)."""
    logits = []
    out, trace = model.generate_with_trace(ids, max_new_tokens=n,
                                           on_step=lambda s, routing: logits.append(s.logits.float().cpu()), **kwargs)
    return out.cpu(), torch.stack(logits, dim=1), trace


def hf_generate(hf, ids: torch.Tensor, n: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF greedy generation on hf's device -> ids on the CPU. The mask is explicit: with pad_token_id=0 and no
    mask HF would take prompt tokens with id 0 for padding."""
    dev = next(hf.parameters()).device
    mask = torch.ones_like(ids) if mask is None else mask
    return hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0).cpu()


@contextlib.contextmanager
def kernels(model, experts: str = "auto", attention: str = "auto"):
    model.set_kernels(experts=experts, attention=attention)
    try:
        yield model
    finally:
        model.set_kernels(experts="auto", attention="auto")


@contextlib.contextmanager
def module_hooks(model, fn):
    """A torch forward hook fn(module, inputs, output) on every module of model, removed on exit."""
    handles = [m.register_forward_hook(fn) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.fixture
def deterministic():
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


# ------------------------------------------------------------------------------------------------
# models (conftest's session pair stays on the CPU, untouched)
@pytest.fixture(scope="module")
def fp32_pair(hf_checkpoint):
    """(HF DbrxForCausalLM, DbrxLM) in float32 on the GPU, conftest's widened weights."""
    import transformers

    hf = transformers.DbrxForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).to(GPU).eval()
    return hf, load_model(hf_checkpoint).to(GPU)


@pytest.fixture(scope="module")
def bf16_pair(hf_checkpoint):
    """(HF, ours) in bfloat16 on the GPU, the same weights (ours allocated on the GPU by load_model)."""
    import transformers

    hf = transformers.DbrxForCausalLM.from_pretrained(hf_checkpoint, dtype=BF16).to(GPU).eval()
    return hf, load_model(hf_checkpoint, dtype=BF16, device=GPU)


@pytest.fixture(scope="module")
def cpu32(widened_state_dict):
    """A float32 CPU copy of the widened tiny model of our own (interventions: GPU vs CPU)."""
    model = DbrxLM(dataclasses.replace(CFG)).eval()
    model.load_state_dict(widened_state_dict, strict=True)
    return model


@pytest.fixture(scope="module")
def bench16():
    """The one bench-sized model, bfloat16 on the GPU, widened with std 0.1 (at d_model 512 about the gain per
    layer of the tiny model's 0.3 at 64): decisive routing spread over all experts."""
    model = load_model("bench", dtype=BF16, device=GPU)
    widen_(model, std=0.1, seed=1)
    return model.eval()


BENCH_V = PRESETS["bench"].vocab_size
BENCH_L = PRESETS["bench"].n_layers


# ------------------------------------------------------------------------------------------------
# HF parity, float32
def test_fp32_logits_match_hf(fp32_pair, hf_pair):
    hf, ours = fp32_pair
    assert ours.device == GPU and next(hf.parameters()).device == GPU
    ids = ids_of(4, 32)
    with torch.no_grad():
        ref = hf(ids.to(GPU)).logits.cpu()
        out = ours(ids).logits                                   # CPU ids: moved to model.device
        on_cpu = hf_pair[1](ids).logits
    assert out.device == GPU and out.dtype == torch.float32
    assert ref.std() > 1.0                                       # logits are not trivially small
    torch.testing.assert_close(out.cpu(), ref, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out.cpu(), on_cpu, atol=FP32_ATOL, rtol=0)


def test_fp32_logits_left_padded_match_hf(fp32_pair):
    hf, ours = fp32_pair
    ids, mask = left_padded()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids.to(GPU), attention_mask=mask.to(GPU), position_ids=position_ids.to(GPU)).logits.cpu()
        out = ours(ids, mask).logits.cpu()
        alone = ours(ids[2:, 7:]).logits.cpu()                   # row 2 without its padding
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out[2, 7:], alone[0], atol=FP32_ATOL, rtol=0)


def test_trace_router_logits_match_hf(fp32_pair, hf_pair):
    hf, ours = fp32_pair
    ids = ids_of(2, 16, seed=1)
    with torch.no_grad():
        ref = hf(ids.to(GPU), output_router_logits=True).router_logits     # L x [B*T, E]
    out, trace = ours.run_with_trace(ids, record=Record(router=True))
    _, cpu_trace = hf_pair[1].run_with_trace(ids, record=Record(router=True))
    assert_on_cpu(trace)
    assert trace.router_logits.shape == (L, 2, 16, E) and trace.router_logits.dtype == torch.float32
    assert trace.topk_experts.shape == trace.topk_weights.shape == (L, 2, 16, K)
    assert len(ref) == L
    for layer in range(L):
        theirs = ref[layer].float().cpu()
        mine = trace.router_logits[layer].reshape(-1, E)
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=0)
        want = theirs.softmax(-1).topk(K, dim=-1).indices.sort(-1).values
        got = trace.topk_experts[layer].reshape(-1, K).sort(-1).values
        assert torch.equal(got, want), f"layer {layer}: different experts chosen than HF"
        assert got.unique().numel() >= 12                        # routing is spread over the experts
    sums = trace.topk_weights.sum(-1)                            # p=1 normalisation: weights sum to 1
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert torch.equal(trace.topk_experts, cpu_trace.topk_experts)
    torch.testing.assert_close(trace.router_logits, cpu_trace.router_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(trace.topk_weights, cpu_trace.topk_weights, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "left-padded"])
def test_fp32_greedy_generation_matches_hf(fp32_pair, hf_pair, padded):
    hf, ours = fp32_pair
    ids, mask, n = (*left_padded(), 12) if padded else (ids_of(1, 6, seed=2), None, 20)
    ref = hf_generate(hf, ids, n, mask)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=n).cpu()
    assert out.shape == (ids.shape[0], ids.shape[1] + n)
    assert torch.equal(out, ref)
    assert torch.equal(out, hf_pair[1].generate(ids, attention_mask=mask, max_new_tokens=n))    # = the CPU's


def test_fp32_generate_with_trace_on_gpu(fp32_pair, hf_pair):
    """Cached decoding on the GPU records what a forward over the final ids records (float32, decisive
    routing), and what the CPU records."""
    _, ours = fp32_pair
    ids, mask = left_padded(seed=3)
    out_ids, trace = ours.generate_with_trace(ids, attention_mask=mask, max_new_tokens=8, record=Record(router=True))
    assert_on_cpu(trace)
    assert torch.equal(out_ids.cpu(), ours.generate(ids, attention_mask=mask, max_new_tokens=8).cpu())
    full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype)], dim=1)
    _, fwd = ours.run_with_trace(out_ids.cpu(), full_mask, record=Record(router=True))
    real = full_mask.bool()
    assert torch.equal(trace.topk_experts[:, real], fwd.topk_experts[:, real])
    torch.testing.assert_close(trace.router_logits[:, real], fwd.router_logits[:, real], atol=1e-4, rtol=0)
    cpu_ids, cpu_trace = hf_pair[1].generate_with_trace(ids, attention_mask=mask, max_new_tokens=8,
                                                        record=Record(router=True))
    assert torch.equal(out_ids.cpu(), cpu_ids.cpu())
    assert torch.equal(trace.topk_experts[:, real], cpu_trace.topk_experts[:, real])


# ------------------------------------------------------------------------------------------------
# HF parity, bfloat16
# Measured on CPU (torch 2.13, transformers 5.25; widened tiny pair, ids [8, 32], seeds 0-5): routing (top-4
# sets) agrees with HF's in 0.939-0.971 of token-layers (HF takes the router softmax in bf16, we in float32);
# 87-170 of 256 positions are "settled" (same routing at every layer here and at every earlier position);
# |ours - HF| there: mean 0.035-0.046, 95th percentile 0.105-0.141; over all positions mean 0.063-0.098;
# mean |ours - fp32| / mean |HF - fp32| = 0.87-1.04; argmax equal to fp32's at 0.86-0.92 of positions.
# Bounds ~2-3x those (GPU kernels round in other orders):
BF16_ROUTING_AGREEMENT = 0.90
BF16_MIN_SETTLED = 48
BF16_SETTLED_MEAN, BF16_SETTLED_Q95 = 0.12, 0.35
BF16_MEAN = 0.25
BF16_VS_FP32_RATIO = 1.5
BF16_ARGMAX_AGREEMENT = 0.8


@needs_bf16
def test_bf16_logits_close_to_hf_and_fp32(bf16_pair, fp32_pair):
    hf16, ours16 = bf16_pair
    assert ours16.dtype == BF16 and ours16.device == GPU
    ids = ids_of(8, 32, seed=0)
    raw_qkv, values, experts = [], [], []
    clip = ours16.config.clip_qkv
    handle = ours16.blocks[0].norm_attn_norm.attn.Wqkv.register_forward_hook(lambda m, i, o: raw_qkv.append(o))
    hooks = [("blocks.0.attn.hook_v", lambda t, h: values.append(t)),
             ("blocks.*.ffn.hook_topk_experts", lambda t, h: experts.append(t.reshape(-1, K).sort(-1).values.cpu()))]
    try:
        with torch.no_grad(), ours16.hooks(hooks):
            out16 = ours16(ids).logits.float().cpu()
    finally:
        handle.remove()
    with torch.no_grad():
        ref = hf16(ids.to(GPU), output_router_logits=True)
        fp32 = fp32_pair[0](ids.to(GPU)).logits.cpu()
    ref16 = ref.logits.float().cpu()
    assert raw_qkv[0].abs().max() > clip                         # the clamp has work to do ...
    assert values[0].abs().max() <= clip                         # ... and does it
    assert len(experts) == L and all(e.unique().numel() >= 8 for e in experts)

    hf_experts = [torch.softmax(x, dim=-1, dtype=x.dtype).topk(K, dim=-1).indices.sort(-1).values.cpu()
                  for x in ref.router_logits]                    # HF's own choice (softmax in bf16)
    agree = torch.stack([(a == b).all(-1) for a, b in zip(experts, hf_experts)]).view(L, 8, 32)
    assert agree.float().mean() >= BF16_ROUTING_AGREEMENT
    settled = agree.all(0).long().cumprod(-1).bool()             # [B, T]
    assert settled.sum() >= BF16_MIN_SETTLED
    diff = (out16 - ref16).abs()
    at_settled = diff[settled]
    assert at_settled.mean() <= BF16_SETTLED_MEAN, at_settled.mean()
    assert at_settled.flatten().quantile(0.95) <= BF16_SETTLED_Q95, at_settled.flatten().quantile(0.95)
    assert diff.mean() <= BF16_MEAN, diff.mean()
    ours_err, hf_err = (out16 - fp32).abs().mean().item(), (ref16 - fp32).abs().mean().item()
    assert ours_err <= BF16_VS_FP32_RATIO * hf_err, (ours_err, hf_err)
    assert (out16.argmax(-1) == fp32.argmax(-1)).float().mean() >= BF16_ARGMAX_AGREEMENT


def agreed_prefix(a: torch.Tensor, b: torch.Tensor, T: int) -> torch.Tensor:
    """Per row, how many generated tokens (after column T) agree before the first difference."""
    differ = a[:, T:] != b[:, T:]
    return torch.where(differ.any(1), differ.int().argmax(1), torch.tensor(differ.shape[1])).float()


@needs_bf16
def test_bf16_greedy_tokens(bf16_pair, fp32_pair):
    """Greedy decoding in bfloat16: the same tokens as HF's bfloat16 greedy where the models can agree, as
    close to float32 greedy as HF's own, and every token the argmax of a bfloat16 forward over the result.

    Measured on CPU (128 prompts of 6 tokens, 8 new tokens, seeds 0-3): the first token agrees with HF's
    bf16 in 0.94-1.0 of rows, all 8 in 0.66-0.70 (a near-tie, or one router flip, and greedy paths part);
    mean agreed prefix with float32 greedy: ours 5.1-5.9, HF's 5.6-5.8; tokens equal to the argmax of a
    bf16 forward over the generated ids (cached vs uncached computation): 0.981-0.993."""
    hf16, ours16 = bf16_pair
    T, n = 6, 8
    ids = ids_of(128, T, seed=0)
    ours = ours16.generate(ids, max_new_tokens=n).cpu()
    theirs = hf_generate(hf16, ids, n)
    fp32 = fp32_pair[1].generate(ids, max_new_tokens=n).cpu()
    with_hf = agreed_prefix(ours, theirs, T)
    assert (with_hf > 0).float().mean() >= 0.85
    assert (with_hf == n).float().mean() >= 0.45
    assert agreed_prefix(ours, fp32, T).mean() >= 0.75 * agreed_prefix(theirs, fp32, T).mean()
    with torch.no_grad():
        forward = ours16(ours).logits[:, T - 1:-1].float().argmax(-1).cpu()
    assert (forward == ours[:, T:]).float().mean() >= 0.95


# ------------------------------------------------------------------------------------------------
# observing changes nothing (bfloat16, bench-sized)
RECORDS = {"router": Record(router=True), "router+experts": Record(router=True, experts=True),
           "router+attention+experts": FULL, "everything": EVERYTHING}


@needs_bf16
@pytest.mark.parametrize("record", list(RECORDS.values()), ids=list(RECORDS))
def test_records_leave_forward_bit_identical(bench16, record):
    ids = ids_of(2, 64, seed=1, vocab=BENCH_V)
    with torch.no_grad():
        plain = bench16(ids).logits
    out, trace = bench16.run_with_trace(ids, record=record)
    assert_on_cpu(trace)
    assert torch.equal(out.logits, plain)
    with torch.no_grad():
        assert torch.equal(bench16(ids).logits, plain)          # nothing left behind


READ_ONLY = {"residual points": "blocks.*.hook_resid_*", "ffn points": "blocks.*.ffn.hook_*",
             "attention points": "blocks.*.attn.hook_*", "every point": "*"}


@needs_bf16
@pytest.mark.parametrize("selector", list(READ_ONLY.values()), ids=list(READ_ONLY))
def test_read_only_hooks_leave_everything_bit_identical(bench16, selector):
    ids = ids_of(2, 48, seed=2, vocab=BENCH_V)
    reads = []

    def read(t, hook):                                           # reads, returns None
        reads.append(t.detach().float().abs().amax())

    with torch.no_grad():
        plain = bench16(ids).logits
    plain_out, plain_trace = bench16.run_with_trace(ids, record=FULL)
    plain_ids, plain_steps = generate_logged(bench16, ids, 6, eos_token_id=NO_EOS)
    gen_ids, gen_steps, gen_trace = generate_with_trace_logged(bench16, ids, 6, record=FULL, eos_token_id=NO_EOS)
    with bench16.hooks([(selector, read)]):
        with torch.no_grad():
            hooked = bench16(ids).logits
        out, trace = bench16.run_with_trace(ids, record=FULL)
        hooked_ids, hooked_steps = generate_logged(bench16, ids, 6, eos_token_id=NO_EOS)
        hooked_gen_ids, hooked_gen_steps, hooked_gen_trace = generate_with_trace_logged(
            bench16, ids, 6, record=FULL, eos_token_id=NO_EOS)
    assert reads
    assert torch.equal(hooked, plain)
    assert torch.equal(out.logits, plain) and torch.equal(plain_out.logits, plain)
    assert_traces_equal(trace, plain_trace)
    assert torch.equal(hooked_ids, plain_ids) and torch.equal(hooked_steps, plain_steps)
    assert torch.equal(gen_ids, plain_ids) and torch.equal(gen_steps, plain_steps)     # recording changes nothing
    assert torch.equal(hooked_gen_ids, plain_ids) and torch.equal(hooked_gen_steps, plain_steps)
    assert_traces_equal(hooked_gen_trace, gen_trace)


@needs_bf16
def test_torch_module_hooks_leave_everything_bit_identical(bench16):
    ids = ids_of(2, 48, seed=3, vocab=BENCH_V)
    calls = []
    with torch.no_grad():
        plain = bench16(ids).logits
    plain_ids, plain_steps = generate_logged(bench16, ids, 5, eos_token_id=NO_EOS)
    _, plain_trace = bench16.run_with_trace(ids, record=FULL)
    with module_hooks(bench16, lambda m, i, o: calls.append(type(m).__name__)):
        with torch.no_grad():
            hooked = bench16(ids).logits
        out, trace = bench16.run_with_trace(ids, record=FULL)
        hooked_ids, hooked_steps = generate_logged(bench16, ids, 5, eos_token_id=NO_EOS)
    assert calls
    assert torch.equal(hooked, plain) and torch.equal(out.logits, plain)
    assert_traces_equal(trace, plain_trace)
    assert torch.equal(hooked_ids, plain_ids) and torch.equal(hooked_steps, plain_steps)


@needs_bf16
def test_generation_is_one_module_call_per_token(bench16):
    """Every generated token is one call of the model (nnsight and torch hooks see n forwards for n tokens),
    and each call goes through every block as a module."""
    ids = ids_of(2, 16, seed=4, vocab=BENCH_V)
    top, blocks = [], []
    handles = [bench16.register_forward_hook(lambda m, i, o: top.append(1)),
               *[b.register_forward_hook(lambda m, i, o: blocks.append(1)) for b in bench16.blocks]]
    try:
        out = bench16.generate(ids, max_new_tokens=7, eos_token_id=NO_EOS)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (2, 16 + 7)
    assert len(top) == 7 and len(blocks) == 7 * BENCH_L


# ------------------------------------------------------------------------------------------------
# traces: CPU tensors, complete copies, no GPU memory kept
@needs_bf16
def test_trace_holds_what_the_hooks_saw(bench16):
    """The recorder's copies to the CPU have landed when run_with_trace returns: every kept tensor equals a
    blocking copy taken by a hook at the same point (attention patterns: to bf16 rounding)."""
    B, T = 4, 256
    ids = ids_of(B, T, seed=5, vocab=BENCH_V)
    last = BENCH_L - 1
    record = Record(router=True, attention=[0, last], experts=True, residuals=[3], dtype=torch.float32)
    seen = {}

    def grab(t, hook):
        seen[hook.name] = t.detach().float().cpu()

    points = ["blocks.*.ffn.hook_router_logits", "blocks.*.ffn.hook_topk_experts", "blocks.3.hook_resid_post",
              "blocks.0.attn.hook_pattern", f"blocks.{last}.attn.hook_pattern"]
    with bench16.hooks([(p, grab) for p in points]):
        _, trace = bench16.run_with_trace(ids, record=record)
    assert_on_cpu(trace)
    E_b = bench16.config.moe_num_experts
    for layer in range(BENCH_L):
        assert torch.equal(trace.router_logits[layer],
                           seen[f"blocks.{layer}.ffn.hook_router_logits"].reshape(B, T, E_b)), layer
        assert torch.equal(trace.topk_experts[layer],
                           seen[f"blocks.{layer}.ffn.hook_topk_experts"].long().reshape(B, T, -1)), layer
    assert torch.equal(trace.activations["blocks.3.hook_resid_post"], seen["blocks.3.hook_resid_post"])
    for layer in (0, last):          # the trace's pattern: a float32 softmax computed beside the attention;
        kept = trace.attention[layer]   # hook_pattern's: the same softmax rounded to bf16
        assert kept.shape == (B, bench16.config.n_heads, T, T) and kept.dtype == torch.float32
        torch.testing.assert_close(kept, seen[f"blocks.{layer}.attn.hook_pattern"], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(kept.sum(-1), torch.ones(B, bench16.config.n_heads, T), atol=1e-4, rtol=0)
    assert trace.expert_output_norm.shape == (BENCH_L, B, T, bench16.config.moe_top_k)
    assert torch.isfinite(trace.expert_output_norm).all() and (trace.expert_output_norm > 0).all()


@needs_bf16
def test_traced_calls_leave_no_gpu_memory(bench16):
    """After a traced call only the CPU trace remains: torch.cuda.memory_allocated() is back where it was
    (measured after a first call of the same kind, which may build lasting caches)."""
    ids = ids_of(2, 64, seed=6, vocab=BENCH_V)

    def traced_forward():
        return bench16.run_with_trace(ids, record=EVERYTHING)[1]

    def traced_generation():
        return bench16.generate_with_trace(ids, max_new_tokens=8, record=EVERYTHING, eos_token_id=NO_EOS)[1]

    for call in (traced_forward, traced_generation):
        call()
        settle()
        base = torch.cuda.memory_allocated()
        trace = call()
        settle()
        assert torch.cuda.memory_allocated() == base, (call.__name__, torch.cuda.memory_allocated() - base)
        assert_on_cpu(trace)
        del trace
        settle()
        assert torch.cuda.memory_allocated() == base, call.__name__


# ------------------------------------------------------------------------------------------------
# determinism
@needs_bf16
@pytest.mark.parametrize("experts,attention", [("auto", "auto"), ("reference", "reference"), ("grouped", "sdpa")])
def test_deterministic_algorithms_give_identical_runs(bench16, deterministic, experts, attention):
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    ids = ids_of(2, 64, seed=7, vocab=BENCH_V)
    with kernels(bench16, experts, attention), torch.no_grad():
        first, second = bench16(ids).logits, bench16(ids).logits
        assert torch.equal(first, second)
        (out_a, trace_a), (out_b, trace_b) = (bench16.run_with_trace(ids, record=FULL) for _ in range(2))
        assert torch.equal(out_a.logits, out_b.logits)
        assert_traces_equal(trace_a, trace_b)
        runs = [generate_logged(bench16, ids, 6, eos_token_id=NO_EOS) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
        sampled = [bench16.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9, seed=3,
                                    eos_token_id=NO_EOS).cpu() for _ in range(2)]
        assert torch.equal(sampled[0], sampled[1])


# ------------------------------------------------------------------------------------------------
# kernels against "reference"
# bf16 vs float32 on identical inputs (bench shape widened by 0.1, CPU): per layer max |attn_out diff| <= 1.5%
# and max |ffn_out diff| <= 1.3% of the layer's max |output|. Two bf16 kernels differ by at most about the sum.
KERNEL_REL_TOL = 0.04


def per_layer(model, ids, patch=None):
    """run_with_trace keeping each layer's input, attention output and MoE output (float32 copies of the
    bf16 values); patch: {layer: resid_pre} fed to each layer instead of the previous layer's output."""
    names = ["blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_ffn_out"]
    record = Record(router=True, hooks=names, dtype=torch.float32)
    hooks = []
    if patch is not None:
        def replace(t, hook):
            return patch[hook.name].to(device=t.device, dtype=t.dtype)
        hooks = [(name, replace) for name in patch]
    with model.hooks(hooks):
        return model.run_with_trace(ids, record=record)[1]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


@needs_bf16
@pytest.mark.parametrize("shape", [(2, 64), (8, 1), (1, 1)], ids=["2x64", "8x1", "1x1"])
@pytest.mark.parametrize("site,name", [("experts", "grouped"), ("experts", "auto"), ("attention", "sdpa"),
                                       ("attention", "auto")])
def test_kernel_matches_reference_per_layer_bf16(bench16, deterministic, site, name, shape):
    """Each layer gets the reference run's input; the kernel's output of that layer is compared with the
    reference's (same routing: the router is no kernel and sees identical inputs)."""
    ids = ids_of(*shape, seed=8, vocab=BENCH_V)
    with kernels(bench16, "reference", "reference"):
        ref = per_layer(bench16, ids)
    for kind in ("experts", "attention"):
        assert ref.metadata["kernels"][kind] == ["reference"] * BENCH_L, ref.metadata["kernels"]
    patch = {f"blocks.{i}.hook_resid_pre": ref.activations[f"blocks.{i}.hook_resid_pre"] for i in range(BENCH_L)}
    with kernels(bench16, **{"experts": "reference", "attention": "reference", site: name}):
        got = per_layer(bench16, ids, patch)
    used = got.metadata["kernels"][site]
    assert len(used) == BENCH_L and (name == "auto" or used == [name] * BENCH_L), used
    for i in range(BENCH_L):
        attn, ffn = f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_ffn_out"
        if site == "attention":
            err = rel_err(got.activations[attn], ref.activations[attn])
            assert err <= KERNEL_REL_TOL, (i, err)
        else:
            assert torch.equal(got.activations[attn], ref.activations[attn]), i    # attention unchanged
            assert torch.equal(got.topk_experts[i], ref.topk_experts[i]), i
            err = rel_err(got.activations[ffn], ref.activations[ffn])
            assert err <= KERNEL_REL_TOL, (i, err)


@pytest.mark.parametrize("experts,attention", [("grouped", "reference"), ("auto", "reference"),
                                               ("reference", "sdpa"), ("reference", "auto"), ("auto", "auto")])
def test_kernels_match_reference_end_to_end_fp32(fp32_pair, experts, attention):
    """float32 on the GPU: forward logits, routing and greedy generation (cached decoding) per kernel."""
    _, ours = fp32_pair
    ids, mask = left_padded(seed=9)
    with kernels(ours, "reference", "reference"):
        ref_out, ref_trace = ours.run_with_trace(ids, mask, record=Record(router=True))
        ref_ids, ref_steps = generate_logged(ours, ids, 10, attention_mask=mask)
    with kernels(ours, experts, attention):
        out, trace = ours.run_with_trace(ids, mask, record=Record(router=True))
        got_ids, got_steps = generate_logged(ours, ids, 10, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real.to(GPU)].cpu(), ref_out.logits[real.to(GPU)].cpu(),
                               atol=FP32_ATOL, rtol=0)
    assert torch.equal(trace.topk_experts[:, real], ref_trace.topk_experts[:, real])
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_steps, ref_steps, atol=FP32_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# interventions inside generate: GPU == CPU (float32)
HALF = list(range(8))
INTERVENTIONS = {
    "reroute": lambda: [ExpertAblation(layer="all", experts=HALF, mode="reroute")],
    "reroute-generated-positions": lambda: [ExpertAblation(layer=[0, 1], experts=HALF, mode="reroute",
                                                           positions=list(range(12, 24)))],
    "zero": lambda: [ExpertAblation(layer=1, experts=HALF, mode="zero")],
    "renormalize": lambda: [ExpertAblation(layer=0, experts=HALF, mode="renormalize")],
    "force": lambda: [ExpertForce(layer=1, expert=3)],
    "scale": lambda: [ExpertScale(layer=0, expert=HALF, factor=0.25)],
    "topk": lambda: [TopK(k=1)],
    "head-zero": lambda: [HeadAblation(layer=0, heads=[0, 2], mode="zero")],
    "head-mean+reroute": lambda: [HeadAblation(layer=1, heads=[1, 3], mode="mean"),
                                  ExpertAblation(layer=0, experts=[1, 5, 9, 13], mode="reroute")],
}


@pytest.mark.parametrize("make", list(INTERVENTIONS.values()), ids=list(INTERVENTIONS))
def test_interventions_in_generation_gpu_equals_cpu(fp32_pair, cpu32, make):
    gpu32 = fp32_pair[1]
    ids, mask = left_padded(seed=1)
    n = 12
    base = cpu32.generate(ids, attention_mask=mask, max_new_tokens=n)
    with cpu32.intervene(*make()):
        want, want_trace = cpu32.generate_with_trace(ids, attention_mask=mask, max_new_tokens=n)
    with gpu32.intervene(*make()):
        got, got_trace = gpu32.generate_with_trace(ids, attention_mask=mask, max_new_tokens=n)
        plain = gpu32.generate(ids, attention_mask=mask, max_new_tokens=n)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(plain.cpu(), want.cpu())
    assert not torch.equal(want.cpu(), base.cpu())              # the intervention changed the generation
    assert_on_cpu(got_trace)
    real = got_trace.attention_mask
    assert torch.equal(got_trace.topk_experts[:, real], want_trace.topk_experts[:, real])
    torch.testing.assert_close(got_trace.topk_weights[:, real], want_trace.topk_weights[:, real], atol=1e-5, rtol=0)
    with torch.no_grad():                                        # and it is gone on exit
        assert torch.equal(gpu32.generate(ids, attention_mask=mask, max_new_tokens=n).cpu(), base.cpu())


def test_routing_patch_from_a_gpu_trace_in_generation(fp32_pair, cpu32):
    """A trace recorded on the GPU (CPU tensors) replays its routing into a GPU and a CPU generation alike."""
    gpu32 = fp32_pair[1]
    ids, mask = left_padded(seed=1)
    _, source = gpu32.run_with_trace(ids_of(3, 16, seed=11), record=Record(router=True))
    patch = lambda: RoutingPatch(source, layers=[1], positions=list(range(4, 16)))  # noqa: E731
    with cpu32.intervene(patch()):
        want = cpu32.generate(ids, attention_mask=mask, max_new_tokens=4)
    with gpu32.intervene(patch()):
        got = gpu32.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(got.cpu(), want.cpu())
    assert not torch.equal(want.cpu(), cpu32.generate(ids, attention_mask=mask, max_new_tokens=4).cpu())


# ------------------------------------------------------------------------------------------------
# layouts: resident vs accelerate dispatch with cuda:0 as the main device (bfloat16)
OFFLOADED = {"transformer.wte": "cpu", "transformer.blocks.0": 0, "transformer.blocks.1": "cpu",
             "transformer.blocks.2": "disk", "transformer.blocks.3": 0, "transformer.norm_f": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def block4_folder(tmp_path_factory):
    """A widened 4-block tiny model saved as an HF-format folder (float32)."""
    model = widen_(DbrxLM(dataclasses.replace(CFG, n_layers=4))).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("gpu_block4") / "ckpt", max_shard_size="1MB")


@pytest.fixture(scope="module")
def resident4(block4_folder):
    return load_model(block4_folder, dtype=BF16, device=GPU)


def dispatch_by_hand(folder):
    """load to CPU, then accelerate.dispatch_model with cuda:0 as main device; CPU-mapped modules offloaded."""
    from accelerate import dispatch_model

    model = load_model(folder, dtype=BF16)
    device_map = {k: ("cpu" if v == "disk" else v) for k, v in OFFLOADED.items()}
    dispatch_model(model, device_map=device_map, main_device="cuda:0",
                   preload_module_classes=[type(model.blocks[0]).__name__])
    model.execution_device = GPU                                  # what load_model sets (spec)
    return model


@pytest.fixture(scope="module", params=["load_model", "dispatch_model"])
def dispatched4(request, block4_folder, tmp_path_factory):
    if request.param == "load_model":
        return load_model(block4_folder, dtype=BF16, device_map=OFFLOADED,
                          offload_folder=tmp_path_factory.mktemp("gpu_offload"))
    return dispatch_by_hand(block4_folder)


@needs_bf16
def test_dispatched_model_runs_on_cuda0(dispatched4, resident4):
    assert resident4.device == GPU
    assert dispatched4.device == GPU                               # the main device, not lm_head's (offloaded)
    assert dispatched4.dtype == BF16
    assert {str(d) for d in dispatched4.hf_device_map.values()} >= {"0", "cpu"}
    for name in ("transformer.wte", "transformer.norm_f", "lm_head", "transformer.blocks.1"):
        assert all(p.device.type != "cuda" for p in dispatched4.get_submodule(name).parameters()), name
    assert all(p.device == GPU for p in dispatched4.blocks[0].parameters())


@needs_bf16
def test_dispatched_forward_and_traces_bit_identical(dispatched4, resident4):
    ids = ids_of(2, 24, seed=12)
    with torch.no_grad():
        ref = resident4(ids).logits.cpu()
        out = dispatched4(ids).logits.cpu()
    assert torch.equal(out, ref)
    ref_out, ref_trace = resident4.run_with_trace(ids, record=EVERYTHING)
    got_out, got_trace = dispatched4.run_with_trace(ids, record=EVERYTHING)
    assert torch.equal(got_out.logits.cpu(), ref_out.logits.cpu())
    assert_on_cpu(got_trace)
    assert_traces_equal(got_trace, ref_trace)


@needs_bf16
def test_dispatched_generation_bit_identical(dispatched4, resident4):
    ids, mask = left_padded(seed=13)
    ref_ids, ref_steps = generate_logged(resident4, ids, 8, attention_mask=mask)
    got_ids, got_steps = generate_logged(dispatched4, ids, 8, attention_mask=mask)
    assert torch.equal(got_ids, ref_ids) and torch.equal(got_steps, ref_steps)
    ref_gen, _, ref_trace = generate_with_trace_logged(resident4, ids, 8, attention_mask=mask, record=FULL)
    got_gen, _, got_trace = generate_with_trace_logged(dispatched4, ids, 8, attention_mask=mask, record=FULL)
    assert torch.equal(got_gen, ref_gen)
    assert_traces_equal(got_trace, ref_trace)
    sample = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=50, seed=5)
    assert torch.equal(dispatched4.generate(ids, attention_mask=mask, **sample).cpu(),
                       resident4.generate(ids, attention_mask=mask, **sample).cpu())


@needs_bf16
def test_dispatched_hooks_and_interventions_bit_identical(dispatched4, resident4):
    ids, mask = left_padded(seed=14)

    def run(model):
        seen = []
        hooks = [("blocks.*.ffn.hook_router_logits", lambda t, h: seen.append((h.name, t.float().cpu()))),
                 ("blocks.2.hook_ffn_out", lambda t, h: torch.zeros_like(t))]   # an edit in the disk/CPU block
        with torch.no_grad(), model.hooks(hooks):
            logits = model(ids, mask).logits.cpu()
        with model.intervene(ExpertAblation(layer=[1, 2], experts=HALF, mode="reroute"),
                             HeadAblation(layer=2, heads=[0, 3], mode="mean")):
            generated = model.generate(ids, attention_mask=mask, max_new_tokens=8).cpu()
        return logits, seen, generated

    (ref, ref_seen, ref_gen), (out, seen, gen) = run(resident4), run(dispatched4)
    assert [n for n, _ in seen] == [f"blocks.{i}.ffn.hook_router_logits" for i in range(4)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, ref_seen))
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert not torch.equal(gen, resident4.generate(ids, attention_mask=mask, max_new_tokens=8).cpu())


# --- expert offload on the GPU (issue 17) -------------------------------------------------------------
@pytest.fixture(scope="module")
def offload_folder(tmp_path_factory):
    model = widen_(load_model("tiny-vocab"), std=0.3, seed=1)
    return save_pretrained(model, tmp_path_factory.mktemp("gpu_offload") / "ckpt", dtype=BF16)


def _expert_bytes(model) -> int:
    c = model.config
    return 3 * c.ffn_hidden_size * c.d_model * 2


@needs_bf16
@pytest.mark.parametrize("slots", [2, 48])
def test_offload_fetch_bit_identical_on_gpu(offload_folder, slots):
    """experts="offload" on cuda:0 with every miss copied to the GPU ("fetch", through the pinned host tier or
    straight from the file): logits, greedy and sampled tokens equal the resident model's on the GPU."""
    ref = load_model(offload_folder, device=GPU)
    for host in (0, 48 * _expert_bytes(ref)):
        model = load_model(offload_folder, device=GPU, experts="offload", expert_cache=slots * _expert_bytes(ref),
                           expert_compute="fetch", expert_host_cache=host)
        assert model.expert_cache.slots[0].device == GPU
        ids = torch.tensor([ref.tokenizer.encode("def add(a, b):\n    return a + b")], device=GPU)
        assert torch.equal(ref(ids).logits, model(ids).logits)
        assert torch.equal(ref.generate(ids, max_new_tokens=8), model.generate(ids, max_new_tokens=8))
        kw = dict(max_new_tokens=8, do_sample=True, seed=2)
        assert torch.equal(ref.generate(ids, **kw), model.generate(ids, **kw))
        with ref.intervene(ExpertAblation(1, [0, 1, 2], mode="zero")):
            x = ref.generate(ids, max_new_tokens=6)
        with model.intervene(ExpertAblation(1, [0, 1, 2], mode="zero")):
            y = model.generate(ids, max_new_tokens=6)
        assert torch.equal(x, y)
        _, t = model.generate_with_trace(ids, max_new_tokens=4, record=Record(cache=True, experts=True))
        assert t.cache is not None and t.cache.device.type == "cpu"


@needs_bf16
def test_offload_cpu_compute_within_rounding_on_gpu(offload_folder):
    """Misses computed on the CPU from the pinned host tier (Fiddler): the same routing, logits within the
    kernel tests' bfloat16 tolerance of the GPU-resident model."""
    ref = load_model(offload_folder, device=GPU)
    model = load_model(offload_folder, device=GPU, experts="offload", expert_cache=2 * _expert_bytes(ref),
                       expert_compute="cpu", expert_host_cache=48 * _expert_bytes(ref))
    ids = torch.tensor([ref.tokenizer.encode("def add(a, b):\n    return a + b")], device=GPU)
    (a, ta), (b, tb) = ref.run_with_trace(ids), model.run_with_trace(ids)
    assert torch.equal(ta.topk_experts, tb.topk_experts)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), rtol=0.05, atol=0.05)
    assert model.expert_cache.stats()["cpu_computed"].sum() > 0
    auto = load_model(offload_folder, device=GPU, experts="offload", expert_cache=2 * _expert_bytes(ref),
                      expert_host_cache=48 * _expert_bytes(ref))
    assert auto.expert_runtime.cost is not None and auto.expert_runtime.cost.pcie_bw > 0
    auto(ids)
