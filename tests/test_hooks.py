"""Hook points: names and shapes, read/replace, selectors, cleanup, errors, and zero cost when unused."""
import dataclasses
import inspect

import pytest
import torch

from dbrx_lab import PRESETS, DbrxLM
from dbrx_lab.hooks import HookPoint

CFG = dataclasses.replace(PRESETS["tiny"], n_layers=3)
B, T = 2, 5

DESIGN_BLOCK_NAMES = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_scores",
                      "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
                      "ffn.hook_router_logits", "ffn.hook_topk_experts", "ffn.hook_topk_weights",
                      "ffn.hook_expert_out", "hook_ffn_out", "hook_resid_post"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DbrxLM(CFG).eval().requires_grad_(False)
    m.reset_parameters(std=0.3)
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))


def attached(model):
    return {name: len(p.fns) for name, p in model.hook_points.items() if p.fns}


def documented_shape(name: str) -> tuple[int, ...]:
    """[batch, pos, ...] everywhere; scores and pattern [batch, head, query, key]."""
    d, H, K, D, E, k = CFG.d_model, CFG.n_heads, CFG.kv_n_heads, CFG.head_dim, CFG.moe_num_experts, CFG.moe_top_k
    suffix = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    return {"attn.hook_q": (B, T, H, D), "attn.hook_k": (B, T, K, D), "attn.hook_v": (B, T, K, D),
            "attn.hook_scores": (B, H, T, T), "attn.hook_pattern": (B, H, T, T), "attn.hook_z": (B, T, H, D),
            "ffn.hook_router_logits": (B, T, E), "ffn.hook_topk_experts": (B, T, k),
            "ffn.hook_topk_weights": (B, T, k), "ffn.hook_expert_out": (B, T, k, d),
            "ffn.hook_expert_hidden_norm": (B, T, k)}.get(suffix, (B, T, d))


def test_every_design_hook_exists_on_every_block_in_forward_order_with_documented_shapes(model, ids):
    names = model.hook_names()
    for i in range(CFG.n_layers):
        for n in DESIGN_BLOCK_NAMES:
            assert f"blocks.{i}.{n}" in names
    assert names[0] == "hook_embed" and names[-1] == "hook_final"
    assert len(names) == len(set(names)) == 2 + CFG.n_layers * (len(DESIGN_BLOCK_NAMES) + 1)

    seen = []
    with model.hooks([(lambda n: True, lambda x, hook: seen.append((hook.name, tuple(x.shape))))]):
        model(ids)
    assert [n for n, _ in seen] == names                      # every point fires once, in hook_names() order
    assert CFG.kv_n_heads < CFG.n_heads and CFG.moe_top_k < T  # the layouts are told apart by their sizes
    for name, shape in seen:
        assert shape == documented_shape(name), name
    layouts = model.hook_names(shapes=True)                   # the documented layouts name every dimension
    for name, shape in seen:
        assert len(layouts[name].split(", ")) == len(shape), name
    assert model.hook_names("blocks.1.ffn.*") == [f"blocks.1.ffn.hook_{n}" for n in
                                                  ("router_logits", "topk_experts", "topk_weights",
                                                   "expert_hidden_norm", "expert_out")]


def test_hook_reads_tensor_and_context(model, ids):
    got = {}

    def read(x, hook):
        got[hook.name] = (x.clone(), hook.layer, hook.ctx.positions.clone(), hook.ctx.is_prefill)

    with model.hooks([("blocks.2.hook_resid_post", read)]):
        model(ids)
    x, layer, positions, prefill = got["blocks.2.hook_resid_post"]
    assert layer == 2 and prefill
    assert torch.equal(positions, torch.arange(T).expand(B, T))
    # the residual after the last block, through norm_f and lm_head, is the output
    expected = model.lm_head(model.transformer.norm_f(x))
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_replacing_a_tensor_changes_the_output_as_computed_by_hand(model, ids):
    base = model(ids).logits
    shift = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(2))
    with model.hooks([("hook_final", lambda x, hook: x + shift)]):
        shifted = model(ids).logits
    assert torch.allclose(shifted, base + model.lm_head(shift), atol=1e-4)
    with model.hooks([("hook_final", lambda x, hook: None)]):   # None leaves the value alone
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, base)                 # and nothing is left behind


def test_replacing_routing_weights_is_applied(model, ids):
    """Zeroing every layer's applied expert weights leaves only attention in the residual stream."""
    outs = []
    with model.hooks([("blocks.*.ffn.hook_topk_weights", lambda x, hook: torch.zeros_like(x)),
                      ("blocks.*.hook_ffn_out", lambda x, hook: outs.append(x.abs().max()))]):
        model(ids)
    assert len(outs) == CFG.n_layers and all(float(o) == 0.0 for o in outs)


def test_glob_and_predicate_selectors(model, ids):
    calls = []
    log = lambda x, hook: calls.append(hook.name)  # noqa: E731
    with model.hooks([("blocks.*.ffn.hook_router_logits", log), (lambda n: n.endswith("resid_mid"), log),
                      ("blocks.[02].hook_attn_out", log)]):
        assert sum(attached(model).values()) == 2 * CFG.n_layers + 2
        model(ids)
    assert sorted(calls) == sorted([f"blocks.{i}.ffn.hook_router_logits" for i in range(CFG.n_layers)] +
                                   [f"blocks.{i}.hook_resid_mid" for i in range(CFG.n_layers)] +
                                   ["blocks.0.hook_attn_out", "blocks.2.hook_attn_out"])


def test_hooks_run_in_order_and_compose(model, ids):
    order = []
    with model.hooks([("hook_embed", lambda x, h: order.append("a") or x * 2),
                      ("hook_embed", lambda x, h: order.append("b") or x + 1)]):
        with model.hooks([("hook_embed", lambda x, h: order.append("c") or got.append(x))]):
            got = []
            model(ids)
    assert order == ["a", "b", "c"]
    assert torch.allclose(got[0], model.transformer.wte(ids) * 2 + 1)


def test_hooks_are_removed_on_exit_and_when_the_block_raises(model, ids):
    calls = []
    fn = lambda x, hook: calls.append(1)  # noqa: E731
    with model.hooks([("blocks.*.hook_resid_pre", fn)]):
        assert len(attached(model)) == CFG.n_layers
    assert attached(model) == {}
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks([("blocks.*.hook_resid_pre", fn)]):
            raise RuntimeError("boom")
    assert attached(model) == {}

    def explode(x, hook):
        raise KeyError("inside the forward")

    with pytest.raises(KeyError):
        with model.hooks([("blocks.0.hook_resid_mid", explode), ("hook_final", fn)]):
            model(ids)
    assert attached(model) == {}
    model(ids)
    assert calls == []                                           # removed hooks are never called again


def test_nested_blocks_only_remove_their_own_hooks(model):
    fn = lambda x, hook: None  # noqa: E731
    with model.hooks([("hook_embed", fn)]):
        with model.hooks([("hook_embed", fn), ("hook_final", fn)]):
            assert attached(model) == {"hook_embed": 2, "hook_final": 1}
        assert attached(model) == {"hook_embed": 1}
    assert attached(model) == {}


@pytest.mark.parametrize("selector, message", [
    ("blocks.7.hook_resid_pre", r"layer 7 out of range \[0, 2\]"),
    ("blocks.3.*", r"layer 3 out of range \[0, 2\]"),
    ("blocks.0.hook_nonsense", r"valid names are .*hook_resid_pre"),
    ("hook_embedding", r"valid names are .*hook_embed"),
    (lambda n: n.startswith("nothing"), "matched no hook point"),
])
def test_bad_selectors_raise_value_error_and_attach_nothing(model, selector, message):
    fn = lambda x, hook: None  # noqa: E731
    with pytest.raises(ValueError, match=message):
        with model.hooks([("hook_embed", fn), (selector, fn)]):  # the first one is attached, then undone
            pass
    assert attached(model) == {}


def test_non_callable_hook_is_rejected(model):
    with pytest.raises(TypeError, match="not callable"):
        with model.hooks([("hook_embed", "not a function")]):
            pass
    assert attached(model) == {}


def test_hook_returning_wrong_shape_or_type_errors(model, ids):
    def shrink(x, hook):
        return x[:, :1]

    with pytest.raises(ValueError, match=r"hook 'shrink' at blocks\.1\.hook_attn_out must return None or a tensor "
                                         r"of shape \(2, 5, 64\), dtype torch\.float32 on cpu; got \(2, 1, 64\)"):
        with model.hooks([("blocks.1.hook_attn_out", shrink)]):
            model(ids)
    with pytest.raises(ValueError, match="got list"):
        with model.hooks([("hook_embed", lambda x, hook: [1, 2])]):
            model(ids)
    assert attached(model) == {}


def test_nothing_attached_means_no_callbacks_and_sdpa_everywhere(model, ids, monkeypatch):
    """Hook points bypass nn.Module.__call__ (no torch hook machinery) and run no Python hook; attention is
    SDPA's in every layer. A hook on the pattern does not switch that layer to another path: the output is
    still SDPA's, bit for bit; the pattern is computed on the side, in that layer only, and equals the
    reference softmax(q k^T / sqrt(D)) of the hooked q and k."""
    import dbrx_lab.model as model_module
    from dbrx_lab.kernels import ATTENTION

    hookpoint_calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda mod, args: hookpoint_calls.append(1) if isinstance(mod, HookPoint) else None)
    sdpa_calls, reference_calls, side_scores = [], [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    reference = ATTENTION.impls["reference"]
    monkeypatch.setitem(ATTENTION.impls, "reference", lambda *a: reference_calls.append(1) or reference(*a))
    scores = model_module.attention_scores
    monkeypatch.setattr(model_module, "attention_scores", lambda *a: side_scores.append(1) or scores(*a))
    try:
        with model.hooks([("hook_embed", lambda x, h: None)]):
            pass
        base = model(ids).logits
        assert hookpoint_calls == []
        assert len(sdpa_calls) == CFG.n_layers and reference_calls == [] and side_scores == []
        assert all(not p.fns for p in model.hook_points.values())

        sdpa_calls.clear()
        got = {}
        hooks = [("blocks.1.attn.hook_pattern", lambda x, h: got.__setitem__("pattern", x.clone())),
                 ("blocks.1.attn.hook_q", lambda x, h: got.__setitem__("q", x.clone())),
                 ("blocks.1.attn.hook_k", lambda x, h: got.__setitem__("k", x.clone()))]
        with model.hooks(hooks):
            hooked = model(ids).logits
        assert len(sdpa_calls) == CFG.n_layers and reference_calls == []   # still SDPA in every layer
        assert len(side_scores) == 1                                       # the pattern of layer 1 only
        assert hookpoint_calls == []
        assert torch.equal(hooked, base)                                   # recording changes nothing
    finally:
        handle.remove()
    pattern = got["pattern"]
    assert pattern.shape == (B, CFG.n_heads, T, T)
    q = got["q"].transpose(1, 2)                                           # [B, H, T, D]
    k = got["k"].transpose(1, 2).repeat_interleave(CFG.n_heads // CFG.kv_n_heads, dim=1)
    s = (q @ k.transpose(-1, -2)) / CFG.head_dim ** 0.5
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(pattern, s.softmax(-1), atol=1e-5, rtol=1e-5)
    assert torch.allclose(pattern.sum(-1), torch.ones(B, CFG.n_heads, T), atol=1e-6)
    assert torch.all(pattern.triu(1) == 0)                                 # causal


def test_expert_hidden_norm_is_only_computed_when_asked(model, ids, monkeypatch):
    experts_cls = type(model.blocks[0].ffn.experts)
    forward = experts_cls.forward
    signature = inspect.signature(forward)
    wants = []

    def spy(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        wants.append(bound.arguments["observe"])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(experts_cls, "forward", spy)
    model(ids)
    assert wants == [False] * CFG.n_layers
    wants.clear()
    norms = []
    with model.hooks([("blocks.0.ffn.hook_expert_hidden_norm", lambda x, h: norms.append(x))]):
        model(ids)
    assert wants == [True] + [False] * (CFG.n_layers - 1)
    assert norms[0].shape == (B, T, CFG.moe_top_k) and bool((norms[0] > 0).all())


def test_hooks_see_each_decode_step_in_generate(model, ids):
    seen = []
    with model.hooks([("blocks.0.ffn.hook_topk_experts",
                       lambda x, h: seen.append((tuple(x.shape), h.ctx.positions[0].tolist(), h.ctx.is_prefill)))]):
        model.generate(ids, max_new_tokens=3)
    assert seen == [((B, T, CFG.moe_top_k), list(range(T)), True),
                    ((B, 1, CFG.moe_top_k), [T], False),
                    ((B, 1, CFG.moe_top_k), [T + 1], False)]
