"""Interventions held against independent per-token implementations on HF transformers' DbrxForCausalLM.

The HF side re-implements each intervention from its definition, token by token in plain Python:
routing edits replace `DbrxFFN.route_tokens_to_experts` on the instance, head edits are a forward
pre-hook on `out_proj`. Both models share weights (widened init so routing and clip_qkv are exercised).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dbrx_lab import (PRESETS, ExpertAblation, ExpertForce, ExpertScale, HeadAblation,  # noqa: E402
                      Intervention, Record, RoutingPatch, TopK)

TOL = 1e-4
CFG = dataclasses.replace(PRESETS["tiny"])
E, K, L, H = CFG.moe_num_experts, CFG.moe_top_k, CFG.n_layers, CFG.n_heads
D = CFG.head_dim
assert CFG.moe_normalize_expert_weights == 1.0  # the HF-side references renormalise by the sum


class HFRef:
    """Tracks, for HF's forward calls, each token's absolute column and whether the call is a prefill."""

    def __init__(self, hf) -> None:
        self.hf = hf
        self.cols: torch.Tensor | None = None   # [B, T]
        self.mask: torch.Tensor | None = None   # [B, S]
        self.prefill = True

    @contextlib.contextmanager
    def tracking(self):
        handle = self.hf.transformer.register_forward_pre_hook(self._track, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _track(self, module, args, kwargs):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        B, T = ids.shape
        mask = kwargs.get("attention_mask")
        S = T if mask is None else mask.shape[1]
        self.cols = torch.arange(S - T, S).expand(B, T)
        self.mask = torch.ones(B, S, dtype=torch.long) if mask is None else mask
        self.prefill = S == T

    @contextlib.contextmanager
    def routing(self, rule):
        """rule(layer, logits [E], row, col) -> (experts list[k], weights list[k]) for every token."""
        ffns = [b.ffn for b in self.hf.transformer.blocks]

        def make(layer):
            def route(logits):                                         # [N, E]
                B, T = self.cols.shape
                experts, weights = [], []
                for n in range(logits.shape[0]):
                    e, w = rule(layer, logits[n].clone(), n // T, int(self.cols.reshape(-1)[n]))
                    experts.append(list(e))
                    weights.append([float(x) for x in w])
                return torch.tensor(weights, dtype=logits.dtype), torch.tensor(experts, dtype=torch.long)
            return route

        for i, ffn in enumerate(ffns):
            ffn.route_tokens_to_experts = make(i)
        try:
            with self.tracking():
                yield
        finally:
            for ffn in ffns:
                del ffn.route_tokens_to_experts

    @contextlib.contextmanager
    def heads(self, layer, heads, mode, positions=None):
        """Zero / prompt-mean the heads' slice of out_proj's input at `layer`."""
        means = {}

        def pre(module, args):
            x = args[0].clone()                                        # [B, T, H*D]
            B, T, _ = x.shape
            z = x.view(B, T, H, D)
            if mode == "mean" and self.prefill:
                valid = self.mask[:, -T:].bool()
                for b in range(B):
                    means[b] = {h: z[b, valid[b], h].mean(0) for h in heads}
            for b in range(B):
                for t in range(T):
                    if positions is not None and int(self.cols[b, t]) not in positions:
                        continue
                    for h in heads:
                        z[b, t, h] = 0.0 if mode == "zero" else means[b][h]
            return (x,)

        handle = self.hf.transformer.blocks[layer].norm_attn_norm.attn.out_proj.register_forward_pre_hook(pre)
        try:
            with self.tracking():
                yield
        finally:
            handle.remove()


def natural(logits, k=K):
    """Plain DBRX routing of one token: (experts, weights (sum 1), probs [E])."""
    probs = torch.softmax(logits.float(), -1)
    w, e = probs.topk(k)
    return e.tolist(), (w / w.sum()).tolist(), probs


def applies(layers, positions, layer, col):
    return (layers == "all" or layer in layers) and (positions is None or col in positions)


def rule_ablation(layers, experts, mode, positions=None):
    def rule(layer, logits, b, col):
        if not applies(layers, positions, layer, col):
            return natural(logits)[:2]
        if mode == "reroute":
            logits[list(experts)] = float("-inf")
            return natural(logits)[:2]
        e, w, _ = natural(logits)
        w = [0.0 if ex in experts else x for ex, x in zip(e, w)]
        if mode == "renormalize":
            total = sum(w)
            w = [x / total if total else 0.0 for x in w]
        return e, w
    return rule


def rule_force(layers, expert, weight=None):
    def rule(layer, logits, b, col):
        e, w, probs = natural(logits)
        if layer not in layers:
            return e, w
        if expert not in e:
            lowest = min(range(K), key=lambda i: probs[e[i]])
            e[lowest] = expert
        w = [float(probs[x]) for x in e]
        w = [x / sum(w) for x in w]
        if weight is not None:
            rest = sum(x for ex, x in zip(e, w) if ex != expert)
            w = [weight if ex == expert else x * (1 - weight) / rest for ex, x in zip(e, w)]
        return e, w
    return rule


def rule_scale(layers, expert, factor):
    def rule(layer, logits, b, col):
        e, w, _ = natural(logits)
        if layer in layers:
            w = [x * factor if ex == expert else x for ex, x in zip(e, w)]
        return e, w
    return rule


def rule_topk(layers, k):
    return lambda layer, logits, b, col: natural(logits, k if layers == "all" or layer in layers else K)[:2]


def rule_patch(src_e, src_w, layers="all", positions=None):
    def rule(layer, logits, b, col):
        Bs, Ts = src_e.shape[1:3]
        if applies(layers, positions, layer, col) and col < Ts:
            bs = 0 if Bs == 1 else b
            return src_e[layer, bs, col].tolist(), src_w[layer, bs, col].tolist()
        return natural(logits)[:2]
    return rule


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(hf_pair):
    """The shared widened tiny pair (conftest), a left-padded batch and its baseline routing."""
    hf, model = hf_pair
    assert model.config == CFG
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    env = SimpleNamespace(hf=hf, model=model, ref=HFRef(hf), ids=ids, mask=mask)
    env.base_e, env.base_w = record_routing(model, ids, mask)
    # the experts each layer uses most on this batch, so ablating them changes something
    env.busy = [torch.bincount(env.base_e[l][mask.bool()].reshape(-1), minlength=E).argsort(descending=True)[:3]
                .tolist() for l in range(L)]
    return env


def record_routing(model, ids, mask=None):
    """topk_experts, topk_weights [L, B, T, k] through raw hooks (a duck-typed source trace)."""
    experts, weights = {}, {}

    def keep(store):
        def fn(x, hook):
            store[hook.layer] = x.detach().clone()
        return fn

    B, T = ids.shape
    with model.hooks([("blocks.*.ffn.hook_topk_experts", keep(experts)),
                      ("blocks.*.ffn.hook_topk_weights", keep(weights))]), torch.no_grad():
        model(ids, mask)
    stack = lambda d: torch.stack([d[l].view(B, T, -1) for l in range(L)])   # noqa: E731
    return stack(experts), stack(weights)


@torch.no_grad()
def ours(env):
    return env.model(env.ids, env.mask).logits


@torch.no_grad()
def theirs(env):
    return env.hf(env.ids, attention_mask=env.mask, position_ids=(env.mask.cumsum(-1) - 1).clamp(min=0)).logits


def real(env, logits):
    """Logits at non-padding positions only (padding rows are not comparable across implementations)."""
    return logits[env.mask.bool()]


def assert_matches(env, a, b):
    diff = (real(env, a) - real(env, b)).abs().max().item()
    assert diff < TOL, f"max |ours - HF| = {diff}"


def assert_changed(env, logits):
    diff = (real(env, logits) - real(env, ours(env))).abs().max().item()
    assert diff > 1e-2, "the intervention did not change the logits"


def hf_generate(env, ids, mask, n):
    return env.hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reroute", "zero", "renormalize"])
@pytest.mark.parametrize("layer", [0, [0, 1], "all"])
def test_expert_ablation_matches_hf(env, mode, layer):
    experts = env.busy[layer if isinstance(layer, int) else 1][:2]
    iv = ExpertAblation(layer=layer, experts=experts, mode=mode)
    with env.model.intervene(iv):
        got = ours(env)
    layers = [layer] if isinstance(layer, int) else layer
    with env.ref.routing(rule_ablation(layers, experts, mode)):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)


@pytest.mark.parametrize("mode", ["reroute", "zero", "renormalize"])
def test_expert_ablation_at_positions(env, mode):
    positions = [6, 7, 9]                      # absolute columns; row 0 is padded up to column 3
    iv = ExpertAblation(layer="all", experts=env.busy[0][:2] + env.busy[1][:1], mode=mode, positions=positions)
    with env.model.intervene(iv):
        got = ours(env)
    with env.ref.routing(rule_ablation("all", iv.experts, mode, positions)):
        want = theirs(env)
    assert_matches(env, got, want)
    base = ours(env)
    torch.testing.assert_close(got[:, :6], base[:, :6], rtol=0, atol=1e-5)   # causal: earlier columns untouched
    assert (got[:, 6:] - base[:, 6:]).abs().max() > 1e-2


def test_reroute_never_in_recorded_topk(env):
    gone = env.busy[1][:3]
    positions = [4, 5, 8, 11]
    with env.model.intervene(ExpertAblation(layer=1, experts=gone, mode="reroute", positions=positions)):
        experts, weights = record_routing(env.model, env.ids, env.mask)
    cols = torch.arange(12)
    at = torch.isin(cols, torch.tensor(positions))
    assert not torch.isin(experts[1][:, at], torch.tensor(gone)).any()
    assert torch.isin(experts[1][:, ~at], torch.tensor(gone)).any()      # elsewhere they are still chosen
    assert torch.equal(experts[0], env.base_e[0])
    torch.testing.assert_close(weights.sum(-1), torch.ones(L, 2, 12))
    assert (weights[..., :-1] >= weights[..., 1:]).all()                  # descending weight order


def test_zero_ablation_records_zero_weight(env):
    ablated = env.busy[0][0]
    with env.model.intervene(ExpertAblation(layer=0, experts=ablated, mode="zero")):
        experts, weights = record_routing(env.model, env.ids, env.mask)
    assert torch.equal(experts[0].sort(-1).values, env.base_e[0].sort(-1).values)   # routing unchanged
    hit = experts[0] == ablated
    assert hit.any() and (weights[0][hit] == 0).all()
    assert (weights[0][~hit] > 0).all()


@pytest.mark.parametrize("weight", [None, 0.5])
def test_expert_force_matches_hf(env, weight):
    rare = int(env.base_e[1].reshape(-1).bincount(minlength=E).argmin())   # hardly ever chosen naturally
    with env.model.intervene(ExpertForce(layer=1, expert=rare, weight=weight)):
        got = ours(env)
        experts, weights = record_routing(env.model, env.ids, env.mask)
    with env.ref.routing(rule_force([1], rare, weight)):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)
    assert (experts[1] == rare).any(-1).all()
    assert torch.equal(experts[0], env.base_e[0])
    if weight is not None:
        torch.testing.assert_close(weights[1][experts[1] == rare], torch.full((24,), 0.5))
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, 12))


def test_expert_force_several_and_positions(env):
    force = env.busy[0][-1:] + [int(env.base_e[0].reshape(-1).bincount(minlength=E).argmin())]
    with env.model.intervene(ExpertForce(layer=0, expert=force, weight=0.25, positions=[10, 11])):
        experts, weights = record_routing(env.model, env.ids, env.mask)
    for e in force:
        assert (experts[0][:, 10:] == e).any(-1).all()
        torch.testing.assert_close(weights[0][:, 10:][experts[0][:, 10:] == e], torch.full((4,), 0.25))
    assert torch.equal(experts[0][:, :10], env.base_e[0][:, :10])
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 12))


@pytest.mark.parametrize("factor", [2.5, 0.0])
def test_expert_scale_matches_hf(env, factor):
    expert = env.busy[0][0]
    with env.model.intervene(ExpertScale(layer=[0, 1], expert=expert, factor=factor)):
        got = ours(env)
    with env.ref.routing(rule_scale([0, 1], expert, factor)):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)


@pytest.mark.parametrize("k,layer", [(1, "all"), (6, [1]), (E, 0)])
def test_topk_matches_hf(env, k, layer):
    with env.model.intervene(TopK(k, layer=layer)):
        got = ours(env)
        experts, _ = record_routing(env.model, env.ids, env.mask) if layer == "all" else (None, None)
    with env.ref.routing(rule_topk([layer] if isinstance(layer, int) else layer, k)):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)
    if experts is not None:
        assert experts.shape == (L, 2, 12, k)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("positions", [None, [5, 8]])
def test_head_ablation_matches_hf(env, mode, positions):
    with env.model.intervene(HeadAblation(layer=1, heads=[0, 2], mode=mode, positions=positions)):
        got = ours(env)
    with env.ref.heads(1, [0, 2], mode, positions):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)


def test_head_mean_ablation_in_generation_matches_hf(env):
    iv = HeadAblation(layer=0, heads=[1, 3], mode="mean")
    with env.model.intervene(iv):
        got = env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=8)
    with env.ref.heads(0, [1, 3], "mean"):
        want = hf_generate(env, env.ids, env.mask, 8)
    assert torch.equal(got, want)
    assert not torch.equal(got, env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=8))
    # the means were taken from the prompt's non-padding positions (row 0 has 3 pads)
    assert iv.means[0].shape == (2, 2, D)


def test_reroute_in_generation_matches_hf(env):
    layers, gone, positions = [0, 1], env.busy[1][:2], list(range(12, 20))   # generated columns only
    with env.model.intervene(ExpertAblation(layer=layers, experts=gone, mode="reroute", positions=positions)):
        got = env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=8)
    with env.ref.routing(rule_ablation(layers, gone, "reroute", positions)):
        want = hf_generate(env, env.ids, env.mask, 8)
    base = env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=8)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :13], base[:, :13])            # the first new token comes from the prompt's columns
    assert not torch.equal(got, base)


def test_routing_patch_from_another_prompt_matches_hf(env):
    other = torch.randint(0, CFG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(7))
    src_e, src_w = record_routing(env.model, other)
    source = SimpleNamespace(topk_experts=src_e, topk_weights=src_w, input_ids=other)
    with env.model.intervene(RoutingPatch(source, layers="all")):
        got = ours(env)
        experts, _ = record_routing(env.model, env.ids, env.mask)
    with env.ref.routing(rule_patch(src_e, src_w)):
        want = theirs(env)
    assert_matches(env, got, want)
    assert_changed(env, got)
    assert torch.equal(experts[:, :, :8], src_e.expand(L, 2, 8, K))    # broadcast over the batch
    with env.ref.routing(rule_patch(src_e, src_w, layers=[1], positions=[2, 3, 4])):
        want = theirs(env)
    with env.model.intervene(RoutingPatch(source, layers=[1], positions=[2, 3, 4])):
        assert_matches(env, ours(env), want)


def test_routing_patch_of_same_prompt_reproduces_baseline(env):
    source = SimpleNamespace(topk_experts=env.base_e, topk_weights=env.base_w, input_ids=env.ids)
    with env.model.intervene(RoutingPatch(source)):
        got = ours(env)
    assert torch.equal(got, ours(env))


def test_routing_patch_replays_ablated_run(env):
    """Patching in the routing of a rerouted run reproduces that run's routing decisions and logits."""
    gone = env.busy[0][:2]
    with env.model.intervene(ExpertAblation(layer="all", experts=gone, mode="reroute")):
        ablated = ours(env)
        src_e, src_w = record_routing(env.model, env.ids, env.mask)
    with env.model.intervene(RoutingPatch(SimpleNamespace(topk_experts=src_e, topk_weights=src_w))):
        got = ours(env)
    torch.testing.assert_close(real(env, got), real(env, ablated), rtol=0, atol=1e-5)


def test_composition_matches_hf(env):
    gone = env.busy[0][:2]
    ivs = [ExpertAblation(layer=0, experts=gone, mode="reroute"), TopK(2, layer=1),
           HeadAblation(layer=1, heads=[3], mode="zero")]
    with env.model.intervene(*ivs):
        got = ours(env)
    with env.model.intervene(ivs[0]), env.model.intervene(*ivs[1:]):          # nested blocks compose
        nested = ours(env)

    def rule(layer, logits, b, col):
        if layer == 0:
            return rule_ablation([0], gone, "reroute")(layer, logits, b, col)
        return natural(logits, 2)[:2]

    with env.ref.routing(rule), env.ref.heads(1, [3], "zero"):
        want = theirs(env)
    assert_matches(env, got, want)
    assert torch.equal(got, nested)
    for iv in ivs:                                          # each one matters
        with env.model.intervene(*[o for o in ivs if o is not iv]):
            assert (real(env, ours(env)) - real(env, got)).abs().max() > 1e-3


def test_reroute_with_topk_composition_checks(env):
    with env.model.intervene(TopK(2), ExpertAblation(layer=0, experts=list(range(14)), mode="reroute")):
        experts, _ = record_routing(env.model, env.ids, env.mask)
    assert set(experts[0].unique().tolist()) == {14, 15}
    with pytest.raises(ValueError, match=r"layer 0: rerouting experts .* leaves 2 experts, fewer than top_k=4"):
        with env.model.intervene(ExpertAblation(layer=0, experts=list(range(14)), mode="reroute")):
            pass
    with pytest.raises(ValueError, match="both forced .* and rerouted"):
        with env.model.intervene(ExpertAblation(layer=1, experts=[3]), ExpertForce(layer=1, expert=3)):
            pass
    with pytest.raises(ValueError, match=r"ExpertForce\(layer, \[e1, e2"):
        with env.model.intervene(ExpertForce(layer=1, expert=3), ExpertForce(layer="all", expert=4)):
            pass
    with env.model.intervene(ExpertForce(layer=1, expert=3, positions=[1]), ExpertForce(1, 4, positions=[2])):
        experts, _ = record_routing(env.model, env.ids, env.mask)
    assert (experts[1][:, 1] == 3).any(-1).all() and (experts[1][:, 2] == 4).any(-1).all()
    assert not any(b.ffn.edits for b in env.model.blocks)


# ------------------------------------------------------------------------------------------------
def edits_of(model):
    return [list(b.ffn.edits) for b in model.blocks] + [list(b.norm_attn_norm.attn.edits) for b in model.blocks]


def test_removed_on_exit_also_on_error(env):
    model = env.model
    empty = edits_of(model)
    outer = ExpertAblation(layer="all", experts=[1])
    with model.intervene(outer):
        with pytest.raises(RuntimeError, match="boom"):
            with model.intervene(HeadAblation(layer=0, heads=0), TopK(1, layer=1)):
                assert len(model.blocks[1].ffn.edits) == 2 and len(model.blocks[0].norm_attn_norm.attn.edits) == 1
                raise RuntimeError("boom")
        assert model.active_interventions() == [outer]
        assert all(b.ffn.edits == (outer,) for b in model.blocks)
        with pytest.raises(AttributeError):                     # read-only: attach with model.intervene
            model.blocks[0].ffn.edits = []
    assert edits_of(model) == empty
    # a validation error half-way attaches nothing
    with pytest.raises(ValueError, match="out of range"):
        with model.intervene(TopK(2), ExpertAblation(layer=7, experts=[1])):
            pass
    assert edits_of(model) == empty
    assert torch.equal(record_routing(model, env.ids, env.mask)[0], env.base_e)


def test_same_object_in_nested_blocks(env):
    iv = ExpertScale(layer=0, expert=env.busy[0][0], factor=2.0)
    with env.model.intervene(iv):
        once = ours(env)
        with env.model.intervene(iv):
            assert env.model.blocks[0].ffn.edits == (iv, iv)
            twice = ours(env)
        assert env.model.blocks[0].ffn.edits == (iv,)
        assert torch.equal(ours(env), once)
    with env.model.intervene(ExpertScale(layer=0, expert=env.busy[0][0], factor=4.0)):
        torch.testing.assert_close(ours(env), twice)


def test_interventions_active_at_every_decode_step(env):
    """Interventions stay active for every decode step and are gone afterwards."""
    gone = env.busy[0][:2]
    seen = []

    def spy(x, hook):
        seen.append(x.clone())

    with env.model.intervene(ExpertAblation(layer=0, experts=gone)), \
            env.model.hooks([("blocks.0.ffn.hook_topk_experts", spy)]):
        env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=5)
    assert [tuple(t.shape) for t in seen] == [(2, 12, K)] + [(2, 1, K)] * 4   # the prefill, then each step
    assert not torch.isin(torch.cat([t.flatten() for t in seen]), torch.tensor(gone)).any()
    assert not env.model.active_interventions()


# ------------------------------------------------------------------------------------------------
def test_trace_records_applied_routing(env):
    gone = env.busy[1][:2]
    ivs = [ExpertAblation(layer=1, experts=gone, mode="reroute"), TopK(3, layer=0)]
    with env.model.intervene(*ivs):
        out, trace = env.model.run_with_trace(env.ids, attention_mask=env.mask, record=Record(router=True))
        want = ours(env)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-6)
    assert sorted(trace.metadata["interventions"]) == sorted(repr(iv) for iv in ivs)
    assert not torch.isin(trace.topk_experts[1], torch.tensor(gone)).any()
    assert (trace.topk_experts[0, ..., 3] == -1).all() and (trace.topk_experts[0, ..., :3] >= 0).all()
    # the recorded routing (k=3 at layer 0, rerouted at layer 1) patches back in exactly
    with env.model.intervene(RoutingPatch(trace)):
        patched = ours(env)
    torch.testing.assert_close(real(env, patched), real(env, want), rtol=0, atol=1e-5)
    assert (real(env, patched) - real(env, ours(env))).abs().max() > 1e-2


def test_generate_with_trace_under_intervention(env):
    gone = env.busy[0][:2]
    iv = ExpertAblation(layer="all", experts=gone, mode="reroute")
    with env.model.intervene(iv):
        ids, trace = env.model.generate_with_trace(env.ids, attention_mask=env.mask, max_new_tokens=6,
                                                   record=Record(router=True))
        want = env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=6)
    assert torch.equal(ids, want)
    assert trace.topk_experts.shape[2] == ids.shape[1]
    full = torch.cat([env.mask, torch.ones(2, 6, dtype=env.mask.dtype)], 1).bool()
    assert not torch.isin(trace.topk_experts[:, full], torch.tensor(gone)).any()
    with env.ref.routing(rule_ablation("all", gone, "reroute")):
        assert torch.equal(ids, hf_generate(env, env.ids, env.mask, 6))
    # replaying the generation's routing regenerates the same tokens without the ablation
    with env.model.intervene(RoutingPatch(trace)):
        assert torch.equal(env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=6), ids)
    assert not torch.equal(env.model.generate(env.ids, attention_mask=env.mask, max_new_tokens=6), ids)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,message", [
    (lambda: ExpertAblation(layer=0, experts=[1], mode="drop"),
     "mode must be one of ('reroute', 'zero', 'renormalize'), got 'drop'"),
    (lambda: ExpertAblation(layer=-1, experts=[1]), "layer must be integers >= 0, got -1"),
    (lambda: ExpertAblation(layer="first", experts=[1]), "layer must be an int, a list of ints or 'all'"),
    (lambda: ExpertAblation(layer=0, experts=[]), "experts must not be empty"),
    (lambda: ExpertAblation(layer=0, experts=[2, 2]), "experts has duplicates"),
    (lambda: ExpertAblation(layer=0, experts=[1], positions=[-3]), "positions must be integers >= 0"),
    (lambda: ExpertForce(layer=0, expert=1, weight=1.5), "weight must be None or a number in [0, 1]"),
    (lambda: ExpertForce(layer=0, expert=[1, 2], weight=0.6), "sums past 1: use at most 0.5"),
    (lambda: ExpertScale(layer=0, expert=1, factor=float("nan")), "factor must be a finite number"),
    (lambda: TopK(0), "k must be an integer >= 1, got 0"),
    (lambda: HeadAblation(layer=0, heads=[0], mode="random"), "mode must be one of ('zero', 'mean')"),
    (lambda: RoutingPatch(SimpleNamespace(topk_experts=None, topk_weights=None)), "Record(router=True)"),
])
def test_invalid_arguments_at_construction(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("iv,message", [
    (ExpertAblation(layer=2, experts=[1]), "layer [2] out of range: this model has layers 0..1"),
    (ExpertAblation(layer=[0, 5], experts=[1]), "layer [5] out of range: this model has layers 0..1"),
    (ExpertAblation(layer=0, experts=[3, 16]), "experts [16] out of range: this model has experts 0..15"),
    (ExpertAblation(layer=0, experts=[3], positions=[300]),
     "positions [300] out of range: this model has positions 0..255"),
    (ExpertForce(layer=1, expert=20), "expert [20] out of range: this model has experts 0..15"),
    (ExpertForce(layer=1, expert=[1, 2, 3, 4, 5]), "layer 1: cannot force 5 experts with top_k=4"),
    (ExpertScale(layer="all", expert=16, factor=2.0), "expert [16] out of range: this model has experts 0..15"),
    (TopK(17), "k=17 out of range: this model has k 1..16"),
    (HeadAblation(layer=0, heads=[4]), "heads [4] out of range: this model has heads 0..3"),
    ([RoutingPatch(SimpleNamespace(topk_experts=torch.zeros(2, 1, 3, 2, dtype=torch.long),
                                   topk_weights=torch.zeros(2, 1, 3, 2))), TopK(3)],
     "layer 0: the source trace chose k=2 experts per token, but this layer chooses k=3"),
    (RoutingPatch(SimpleNamespace(topk_experts=torch.zeros(3, 1, 3, 4, dtype=torch.long),
                                  topk_weights=torch.zeros(3, 1, 3, 4))),
     "source trace has 3 layers, this model has 2"),
])
def test_invalid_arguments_against_the_model(env, iv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        with env.model.intervene(iv):
            pass
    assert not env.model.active_interventions()


def test_routing_patch_batch_mismatch(env):
    src = SimpleNamespace(topk_experts=env.base_e, topk_weights=env.base_w)
    with env.model.intervene(RoutingPatch(src)):
        with pytest.raises(ValueError, match="source trace batch 2 must equal the input batch 3 or be 1"):
            env.model(torch.zeros(3, 4, dtype=torch.long))


def test_not_an_intervention(env):
    with pytest.raises(TypeError, match="not an Intervention"):
        with env.model.intervene("ExpertAblation(0, [1])"):
            pass


def test_describe():
    assert repr(ExpertAblation(layer=3, experts=[5, 11], mode="reroute")) == \
        "ExpertAblation(layer=3, experts=[5, 11], mode='reroute', positions=None)"
    assert ExpertForce(0, 2, weight=0.5, positions=[4, 1]).describe() == \
        "ExpertForce(layer=0, expert=2, weight=0.5, positions=[1, 4])"
    assert repr(ExpertScale([1, 0], 7, 2)) == "ExpertScale(layer=[0, 1], expert=7, factor=2.0, positions=None)"
    assert repr(TopK(2)) == "TopK(k=2, layer='all')"
    assert repr(HeadAblation(1, [0, 3], "mean")) == "HeadAblation(layer=1, heads=[0, 3], mode='mean', positions=None)"
    src = SimpleNamespace(topk_experts=torch.zeros(2, 1, 5, 4, dtype=torch.long), topk_weights=torch.zeros(2, 1, 5, 4))
    assert repr(RoutingPatch(src, layers=1)) == \
        "RoutingPatch(source=<trace batch=1 positions=5 k=4>, layers=1, positions=None)"
    assert isinstance(TopK(1), Intervention)
