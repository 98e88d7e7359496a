"""Observation never changes the computation (issue #16): "For every Record and every read-only hook, the
model's outputs are bit-identical to the unrecorded run, in float32 and in bfloat16, for forward,
run_with_trace and generate_with_trace".

Compared bit for bit (torch.equal): forward logits (full and last_only, where the last block runs for the
last token and observers get a side pass), run_with_trace's logits, generated ids and every Step's logits
(greedy and seeded sampling), batch 1 and a left-padded batch 2, on a widened random tiny model and on
load_model("tiny"). Hooks that edit (return a tensor, or write in place) DO change the output, as an
independent computation says. Recorded attention patterns equal softmax(q k^T / sqrt(D)) from the recorded
q and k; attention captures keep their temporaries within Record.max_attention_bytes; the last block's
routing at every prompt position is recorded in generate_with_trace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable

import pytest
import torch

from dbrx_lab import PRESETS, DbrxLM, ExpertScale, HeadAblation, Record, load_model
from dbrx_lab import trace as trace_mod
from dbrx_lab.trace import AttentionBudgetError, Recorder

DTYPES = [torch.float32, torch.bfloat16]
T = 12                      # prompt length
NEW = 5                     # generated tokens
PAD = 3                     # left padding of row 1 in the batch-2 prompt


@pytest.fixture(scope="module", params=[(k, d) for k in ("widened", "preset") for d in DTYPES],
                ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}")
def model(request, widened_state_dict) -> DbrxLM:
    """Read-only (hooks and records only through context managers)."""
    kind, dtype = request.param
    if kind == "widened":
        m = DbrxLM(dataclasses.replace(PRESETS["tiny"])).eval()
        m.load_state_dict(widened_state_dict, strict=True)
        return m.to(dtype)
    return load_model("tiny", dtype=dtype)


def prompts() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(11)
    one = torch.randint(0, 512, (1, T), generator=g)
    two = torch.randint(0, 512, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :PAD] = 0
    return {"batch1": (one, None), "batch2-left-padded": (two, mask)}


SAMPLING = {"greedy": {}, "sample": {"do_sample": True, "seed": 7, "temperature": 1.3, "top_k": 50}}


# ------------------------------------------------------------------------------------------------
# observers: what runs beside the model
RECORDS = {
    "router": Record(router=True),
    "router+attention+experts": Record(router=True, attention=True, experts=True),
    "attention-layer1-heads02-queries": Record(attention=[1], heads=[0, 2], query_positions=[0, 5, 11]),
    "residuals+hooks": Record(residuals=True, hooks=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_scores",
                                                     "blocks.*.ffn.hook_expert_out", "blocks.*.attn.hook_q"]),
}


def read_only(x, hook):
    return None


class Cloner:
    """Keeps a clone of every tensor it sees (reads the values; never returns anything)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, torch.Tensor]] = []

    def __call__(self, x, hook):
        self.seen.append((hook.name, x.detach().clone()))


def hook_context(kind: str) -> Callable[[DbrxLM], contextlib.AbstractContextManager]:
    fn = read_only if kind == "read-only" else Cloner()
    return lambda model: model.hooks([(lambda name: True, fn)])


def forward(model, ids, mask, last_only=False) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask, last_only=last_only).logits


def generation(model, ids, mask, sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (new tokens [B, n], per-step logits [n, B, V])."""
    steps = list(model.stream(ids, NEW, attention_mask=mask, **SAMPLING[sampling]))
    return torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits for s in steps])


@pytest.fixture(scope="module")
def baseline(model):
    """The unrecorded, unhooked results per prompt: forward logits, last_only logits, generations."""
    out = {}
    for name, (ids, mask) in prompts().items():
        out[name] = {"forward": forward(model, ids, mask), "last_only": forward(model, ids, mask, last_only=True),
                     **{s: generation(model, ids, mask, s) for s in SAMPLING}}
    return out


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs().nan_to_num(posinf=1e30)
        raise AssertionError(f"{what}: not bit-identical (max abs difference {float(diff.max()):.3g})")


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record", list(RECORDS), ids=str)
def test_records_do_not_change_outputs(model, baseline, record):
    rec = RECORDS[record]
    for name, (ids, mask) in prompts().items():
        want = baseline[name]
        B = ids.shape[0]
        # forward with the recorder attached (as run_with_trace attaches it), full and last_only
        for mode, last_only in (("forward", False), ("last_only", True)):
            with Recorder(model, rec, B, T).attached():
                got = forward(model, ids, mask, last_only)
            assert_same(got, want[mode], f"{record} {name} {mode} under a recorder")
        out, trace = model.run_with_trace(ids, mask, record=rec)
        assert_same(out.logits, want["forward"], f"{record} {name} run_with_trace logits")
        assert trace.router_logits is not None
        for sampling in SAMPLING:
            logits: list[torch.Tensor] = []
            ids_out, trace = model.generate_with_trace(ids, NEW, record=rec, attention_mask=mask,
                                                       on_step=lambda step, routing: logits.append(step.logits),
                                                       **SAMPLING[sampling])
            tokens, step_logits = want[sampling]
            assert_same(ids_out[:, T:], tokens, f"{record} {name} generate_with_trace {sampling} ids")
            assert_same(ids_out[:, :T], ids, f"{record} {name} prompt")
            assert_same(torch.stack(logits), step_logits, f"{record} {name} generate_with_trace {sampling} logits")
            assert trace.seq_len == T + NEW


@pytest.mark.parametrize("kind", ["read-only", "cloning"])
def test_read_only_hooks_on_every_point_do_not_change_outputs(model, baseline, kind):
    attach = hook_context(kind)
    for name, (ids, mask) in prompts().items():
        want = baseline[name]
        with attach(model):
            assert_same(forward(model, ids, mask), want["forward"], f"{kind} hooks {name} forward")
            assert_same(forward(model, ids, mask, True), want["last_only"], f"{kind} hooks {name} last_only")
            for sampling in SAMPLING:
                tokens, logits = generation(model, ids, mask, sampling)
                assert_same(tokens, want[sampling][0], f"{kind} hooks {name} {sampling} tokens")
                assert_same(logits, want[sampling][1], f"{kind} hooks {name} {sampling} logits")
            out, _ = model.run_with_trace(ids, mask, record=RECORDS["router+attention+experts"])
            assert_same(out.logits, want["forward"], f"{kind} hooks + recorder {name} run_with_trace")
            logits: list[torch.Tensor] = []
            ids_out, _ = model.generate_with_trace(ids, NEW, attention_mask=mask,
                                                   on_step=lambda step, routing: logits.append(step.logits))
            assert_same(ids_out[:, T:], want["greedy"][0], f"{kind} hooks + recorder {name} generate_with_trace")
            assert_same(torch.stack(logits), want["greedy"][1], f"{kind} hooks + recorder {name} step logits")


def test_cloning_hooks_see_every_point(model):
    """The cloning observer above really reads every hook point (so the comparison covers them all)."""
    cloner = Cloner()
    ids, mask = prompts()["batch2-left-padded"]
    with model.hooks([(lambda name: True, cloner)]):
        forward(model, ids, mask)
    assert {n for n, _ in cloner.seen} == set(model.hook_names())


# ------------------------------------------------------------------------------------------------
# hooks that edit do change the output
@pytest.fixture
def f32(tiny_model) -> DbrxLM:
    return tiny_model


def heads_all(model) -> list[int]:
    return list(range(model.config.n_heads))


def test_zeroed_patterns_equal_ablating_every_head(f32, make_ids):
    """Pattern 0 everywhere -> z = 0 -> attention output out_proj(0) = 0 in every layer: the same as
    HeadAblation(zero) on all heads of all layers (within float32 rounding); returning zeros and zeroing in
    place are the same edit (bit for bit). Also in every decode step of a generation."""
    ids = make_ids(2, T, seed=5)
    plain = forward(f32, ids, None)
    with f32.intervene(HeadAblation("all", heads_all(f32), mode="zero")):
        ablated = forward(f32, ids, None)
        ablated_gen = generation(f32, ids, None, "greedy")
    with f32.hooks([("blocks.*.attn.hook_pattern", lambda x, h: torch.zeros_like(x))]):
        returned = forward(f32, ids, None)
        returned_gen = generation(f32, ids, None, "greedy")
    def zero_in_place(x, hook):
        x.zero_()

    with f32.hooks([("blocks.*.attn.hook_pattern", zero_in_place)]):
        in_place = forward(f32, ids, None)
    assert not torch.allclose(ablated, plain, atol=1e-2), "ablating every head must change the logits"
    assert torch.allclose(returned, ablated, rtol=0, atol=1e-5)
    assert_same(in_place, returned, "in-place zeroing vs returned zeros")
    assert torch.equal(returned_gen[0], ablated_gen[0])
    assert torch.allclose(returned_gen[1], ablated_gen[1], rtol=0, atol=1e-5)


def test_edited_pattern_of_one_head_gives_pattern_times_v(f32, make_ids):
    """A pattern replaced by the uniform causal average in head 1 of layer 0: z of that head is the mean of
    v over the keys seen so far (computed here from hook_v), the other heads unchanged."""
    ids = make_ids(1, T, seed=6)
    seen = {}

    def uniform(x, hook):
        x = x.clone()
        causal = torch.ones(T, T).tril()
        x[:, 1] = (causal / causal.sum(-1, keepdim=True)).to(x.dtype)
        return x

    with f32.hooks([("blocks.0.attn.hook_z", lambda x, h: seen.__setitem__("z0", x.clone())),
                    ("blocks.0.attn.hook_v", lambda x, h: seen.__setitem__("v", x.clone()))]):
        forward(f32, ids, None)
    with f32.hooks([("blocks.0.attn.hook_pattern", uniform),
                    ("blocks.0.attn.hook_z", lambda x, h: seen.__setitem__("z", x.clone()))]):
        forward(f32, ids, None)
    G = f32.config.n_heads // f32.config.kv_n_heads
    v = seen["v"][0, :, 1 // G]                                                      # [T, D] kv head of head 1
    want = v.cumsum(0) / torch.arange(1, T + 1)[:, None]
    assert torch.allclose(seen["z"][0, :, 1], want, rtol=0, atol=1e-5)
    others = [h for h in range(f32.config.n_heads) if h != 1]
    # an edited pattern gives z = pattern @ v for every head (not the kernel's z): float32 rounding apart
    assert torch.allclose(seen["z"][0, :, others], seen["z0"][0, :, others], rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["returned", "in-place"])
def test_edited_expert_outputs_change_the_output(f32, make_ids, how):
    """hook_expert_out scaled by 0.5 in every layer == ExpertScale(0.5) on every expert (the weighted sum is
    linear in the outputs); scaled by 0 at layer 0 == ExpertScale(0) there. In-place edits count too."""
    ids = make_ids(2, T, seed=8)
    E = f32.config.moe_num_experts

    def scale(factor, layer=None):
        def hook(x, h):
            if layer is not None and h.layer != layer:
                return None
            if how == "in-place":
                x.mul_(factor)
                return None
            return x * factor
        return hook

    plain = forward(f32, ids, None)
    for factor, layer in ((0.5, None), (0.0, 0)):
        with f32.hooks([("blocks.*.ffn.hook_expert_out", scale(factor, layer))]):
            hooked = forward(f32, ids, None)
            hooked_gen = generation(f32, ids, None, "greedy")
        with f32.intervene(ExpertScale("all" if layer is None else layer, list(range(E)), factor)):
            want = forward(f32, ids, None)
            want_gen = generation(f32, ids, None, "greedy")
        assert not torch.allclose(hooked, plain, atol=1e-2), f"factor {factor} must change the logits"
        assert torch.allclose(hooked, want, rtol=0, atol=2e-5), f"factor {factor} layer {layer}"
        assert torch.equal(hooked_gen[0], want_gen[0])
        assert torch.allclose(hooked_gen[1], want_gen[1], rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# recorded attention = softmax(q k^T / sqrt(D)) of the recorded q and k
def reference_pattern(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], k [B, T, K, D], real [B, T] bool -> [B, H, T, T]: causal over real keys, a padded query
    sees only itself (as the model masks it)."""
    B, Tq, H, D = q.shape
    G = H // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)                                               # [B, T, H, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) / math.sqrt(D)
    mask = torch.ones(Tq, Tq, dtype=torch.bool).tril() & real[:, None, None, :]
    mask = mask | torch.eye(Tq, dtype=torch.bool)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("prompt", list(prompts()))
def test_recorded_pattern_is_softmax_of_recorded_q_and_k(f32, prompt):
    ids, mask = prompts()[prompt]
    rec = Record(attention=True, hooks=["blocks.*.attn.hook_q", "blocks.*.attn.hook_k",
                                        "blocks.*.attn.hook_pattern"])
    _, trace = f32.run_with_trace(ids, mask, record=rec)
    real = trace.attention_mask
    for layer in range(f32.config.n_layers):
        q = trace.activations[f"blocks.{layer}.attn.hook_q"]
        k = trace.activations[f"blocks.{layer}.attn.hook_k"]
        want = reference_pattern(q, k, real)
        got = trace.attention[layer]
        assert got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5), f"layer {layer}"
        hooked = trace.activations[f"blocks.{layer}.attn.hook_pattern"].transpose(1, 2)     # stored [B, T, H, S]
        assert torch.allclose(hooked.double(), want, rtol=0, atol=1e-5), f"layer {layer} hook_pattern"


def test_generated_attention_rows_match_a_forward_over_the_result(f32, make_ids):
    ids = make_ids(1, T, seed=9)
    out_ids, gen = f32.generate_with_trace(ids, NEW, record=Record(attention=True))
    _, fwd = f32.run_with_trace(out_ids, record=Record(attention=True))
    for layer in range(f32.config.n_layers):
        assert torch.allclose(gen.attention[layer], fwd.attention[layer], rtol=0, atol=1e-5), f"layer {layer}"


# ------------------------------------------------------------------------------------------------
# the attention budget
def test_attention_capture_is_chunked_within_a_tiny_budget(f32, make_ids, monkeypatch):
    ids = make_ids(2, T, seed=10)
    cfg = f32.config
    full_rec = Record(attention=[1])
    need = full_rec.estimate_attention_bytes(cfg, 2, T)
    assert need == 2 * cfg.n_heads * T * T * 4
    _, full = f32.run_with_trace(ids, record=full_rec)

    calls: list[int] = []
    real = trace_mod.attention_pattern

    def counting(q, k, mask, heads, rows):
        calls.append(len(rows))
        out = real(q, k, mask, heads, rows)
        return out

    monkeypatch.setattr(trace_mod, "attention_pattern", counting)
    tight = Record(attention=[1], max_attention_bytes=need)                       # admits the stored pattern
    out, chunked = f32.run_with_trace(ids, record=tight)
    assert torch.equal(out.logits, forward(f32, ids, None))
    per_row = 2 * cfg.n_heads * T * 4                                                # one query row, float32
    assert len(calls) > 1, "a budget of the stored pattern's size must split the capture into chunks"
    assert sum(calls) == T
    assert all(r * per_row * 3 <= need for r in calls), f"chunk rows {calls} exceed the budget's temporaries"
    assert torch.allclose(chunked.attention[1], full.attention[1], rtol=0, atol=1e-6)

    with pytest.raises(AttentionBudgetError):
        f32.run_with_trace(ids, record=Record(attention=[1], max_attention_bytes=need - 1))


def test_attention_budget_counts_pattern_hooks(f32, make_ids):
    ids = make_ids(2, T, seed=12)
    cfg = f32.config
    rec = Record(router=False, hooks=["blocks.0.attn.hook_pattern"])
    need = rec.estimate_attention_bytes(cfg, 2, T, pattern_hooks=1)
    assert need > rec.estimate_attention_bytes(cfg, 2, T) == 0
    with pytest.raises(AttentionBudgetError, match="hook"):
        f32.run_with_trace(ids, record=dataclasses.replace(rec, max_attention_bytes=need - 1))
    with pytest.raises(AttentionBudgetError):
        f32.generate_with_trace(ids, 2, record=dataclasses.replace(rec, max_attention_bytes=need - 1))
    out, trace = f32.run_with_trace(ids, record=dataclasses.replace(rec, max_attention_bytes=need))
    assert trace.activations["blocks.0.attn.hook_pattern"].shape == (2, T, cfg.n_heads, T)
    assert torch.equal(out.logits, forward(f32, ids, None))
    two = Record(router=False, hooks=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_scores"])
    need2 = two.estimate_attention_bytes(cfg, 2, T, pattern_hooks=2 * cfg.n_layers)
    with pytest.raises(AttentionBudgetError):
        f32.run_with_trace(ids, record=dataclasses.replace(two, max_attention_bytes=need2 - 1))


# ------------------------------------------------------------------------------------------------
# the generation prefill computes the last block for the last token only: routing is still recorded
@pytest.mark.parametrize("prompt", list(prompts()))
def test_generate_with_trace_records_last_block_routing_at_every_prompt_position(f32, prompt):
    ids, mask = prompts()[prompt]
    rec = Record(router=True, experts=True)
    _, gen = f32.generate_with_trace(ids, NEW, record=rec, attention_mask=mask)
    _, fwd = f32.run_with_trace(ids, mask, record=rec)
    real = fwd.attention_mask                                                        # [B, T]
    for layer in range(f32.config.n_layers):
        g_logits, f_logits = gen.router_logits[layer, :, :T], fwd.router_logits[layer]
        assert g_logits.abs().sum(-1)[real].min() > 0, f"layer {layer}: prompt routing missing"
        assert torch.allclose(g_logits[real], f_logits[real], rtol=0, atol=1e-5), f"layer {layer} router logits"
        assert torch.equal(gen.topk_experts[layer, :, :T][real], fwd.topk_experts[layer][real]), f"layer {layer}"
        assert torch.allclose(gen.topk_weights[layer, :, :T][real], fwd.topk_weights[layer][real], atol=1e-5)
        assert torch.allclose(gen.expert_output_norm[layer, :, :T][real], fwd.expert_output_norm[layer][real],
                              rtol=1e-5, atol=1e-5)
