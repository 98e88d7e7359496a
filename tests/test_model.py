import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import dbrx_lab.kernels.experts as experts_module
from dbrx_lab import PRESETS, DbrxLM
from dbrx_lab.kernels.experts import cpu_experts, grouped_experts
from dbrx_lab.kernels.linear import linear
from dbrx_lab.model import ExpertGLU, reference_experts

transformers = pytest.importorskip("transformers")


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("changes", [{}, dict(n_heads=8, kv_n_heads=1, moe_num_experts=4, moe_top_k=2)])
def test_state_dict_matches_hf_both_ways(changes):
    cfg = dataclasses.replace(PRESETS["tiny"], **changes)
    hf, ours = transformers.DbrxForCausalLM(cfg.to_hf()), DbrxLM(cfg)
    assert shapes(ours) == shapes(hf)
    assert list(shapes(ours)) == list(shapes(hf))                  # same order too
    ours.load_state_dict(hf.state_dict(), strict=True)
    hf.load_state_dict(ours.state_dict(), strict=True)


def test_model_can_be_deep_copied(tiny_model, make_ids):
    """copy.deepcopy gives an independent model (notebooks copy a model to edit its weights; tests did too)."""
    import copy

    ids = make_ids(1, 5)
    with torch.no_grad():
        before = tiny_model(ids).logits
        copied = copy.deepcopy(tiny_model)
        assert torch.equal(copied(ids).logits, before)
        assert copied.hook_points["hook_final"] is copied.transformer.hook_final      # the copy's own points
        seen = []
        with copied.hooks([("hook_final", lambda x, h: seen.append(1))]):
            tiny_model(ids)
            copied(ids)
        assert seen == [1]
        copied.lm_head.weight.zero_()
        assert torch.equal(tiny_model(ids).logits, before)


def test_full_size_on_meta_matches_hf_and_has_131_6b_parameters():
    cfg = PRESETS["dbrx-instruct"]
    with torch.device("meta"):
        ours = DbrxLM(cfg)
        hf = transformers.DbrxForCausalLM(cfg.to_hf())
    assert shapes(ours) == shapes(hf)
    n = ours.num_parameters()
    assert round(n / 1e9, 1) == 131.6 and n == cfg.n_params
    assert shapes(ours)["transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight"] == (8192, 6144)
    assert shapes(ours)["transformer.blocks.39.ffn.experts.mlp.w2"] == (16 * 10752, 6144)
    assert ours.lm_head.weight.device.type == "meta"


def test_hook_names_for_every_block(tiny_model):
    names = set(tiny_model.hook_names())
    per_block = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_scores",
                 "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ffn.hook_router_logits",
                 "ffn.hook_topk_experts", "ffn.hook_topk_weights", "ffn.hook_expert_out", "hook_ffn_out",
                 "hook_resid_post", "ffn.hook_expert_hidden_norm"]
    expected = {"hook_embed", "hook_final"} | {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert names == expected
    assert all(tiny_model.hook_points[n].name == n for n in names)
    assert tiny_model.hook_points["blocks.1.ffn.hook_router_logits"].layer == 1


def test_every_hook_fires_with_documented_shapes(tiny_model, make_ids):
    B, T, cfg = 2, 5, tiny_model.config
    seen = {}
    with torch.no_grad(), tiny_model.hooks([("*", lambda t, h: seen.__setitem__(h.name, tuple(t.shape)))]):
        tiny_model(make_ids(B, T))
    assert set(seen) == set(tiny_model.hook_names())
    H, K, D, E, k, d = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, 16, 4, cfg.d_model
    assert K < H                                                   # q and k/v layouts differ in the head dim
    for i in range(2):                                             # [batch, pos, ...] / [batch, head, query, key]
        assert seen[f"blocks.{i}.attn.hook_q"] == (B, T, H, D) and seen[f"blocks.{i}.attn.hook_z"] == (B, T, H, D)
        assert seen[f"blocks.{i}.attn.hook_k"] == (B, T, K, D) and seen[f"blocks.{i}.attn.hook_v"] == (B, T, K, D)
        assert seen[f"blocks.{i}.attn.hook_scores"] == (B, H, T, T) == seen[f"blocks.{i}.attn.hook_pattern"]
        assert seen[f"blocks.{i}.ffn.hook_router_logits"] == (B, T, E)
        for name in ("hook_topk_experts", "hook_topk_weights", "hook_expert_hidden_norm"):
            assert seen[f"blocks.{i}.ffn.{name}"] == (B, T, k), name
        assert seen[f"blocks.{i}.ffn.hook_expert_out"] == (B, T, k, d)
        for name in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_ffn_out", "hook_resid_post"):
            assert seen[f"blocks.{i}.{name}"] == (B, T, d), name
    assert seen["hook_embed"] == (B, T, d) and seen["hook_final"] == (B, T, d)
    shapes = tiny_model.hook_names(shapes=True)                    # the documented layouts, with sizes
    assert shapes["blocks.0.attn.hook_q"] == f"[batch, pos, head={H}, d_head={D}]"
    assert shapes["blocks.0.attn.hook_k"] == f"[batch, pos, kv_head={K}, d_head={D}]"
    assert shapes["blocks.0.attn.hook_pattern"] == f"[batch, head={H}, query, key]"
    assert shapes["blocks.0.ffn.hook_router_logits"] == f"[batch, pos, expert={E}]"
    assert shapes["blocks.0.ffn.hook_expert_out"] == f"[batch, pos, k={k}, d_model={d}]"
    for name, layout in shapes.items():                            # every hook's layout matches what it got
        assert len(layout.split(", ")) == len(seen[name]), name


@pytest.mark.parametrize("padded", [False, True])
def test_explicit_attention_path_equals_sdpa(tiny_model, make_ids, padded):
    """The reference attention kernel (explicit softmax(q k^T) v) and SDPA give the same logits; observing the
    pattern changes nothing (the output stays SDPA's, bit for bit); a hook that replaces the pattern makes
    the output pattern @ v, which equals SDPA's for an unchanged pattern."""
    ids = make_ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :4] = 0
    with torch.no_grad():
        assert tiny_model.kernels()["attention"] == "auto"
        sdpa = tiny_model(ids, mask).logits
        with tiny_model.hooks([("blocks.*.attn.hook_pattern", lambda t, h: None)]):
            observed = tiny_model(ids, mask).logits
        with tiny_model.hooks([("blocks.*.attn.hook_pattern", lambda t, h: t.clone())]):
            replaced = tiny_model(ids, mask).logits
        tiny_model.set_kernels(attention="reference")
        reference = tiny_model(ids, mask).logits
        tiny_model.set_kernels(attention="sdpa")
        assert torch.equal(tiny_model(ids, mask).logits, sdpa)
    assert torch.equal(observed, sdpa)
    for other in (reference, replaced):
        torch.testing.assert_close(other, sdpa, atol=1e-5, rtol=1e-5)


def test_rows_sum_and_topk_weights_normalised(tiny_model, make_ids):
    got = {}
    hooks = [("blocks.0.attn.hook_pattern", lambda t, h: got.__setitem__("p", t)),
             ("blocks.0.ffn.hook_topk_weights", lambda t, h: got.__setitem__("w", t))]
    with torch.no_grad(), tiny_model.hooks(hooks):
        tiny_model(make_ids(1, 6))
    assert got["p"].shape == (1, 4, 6, 6) and got["w"].shape == (1, 6, 4)   # [B, H, Q, K] and [B, T, k]
    torch.testing.assert_close(got["p"].sum(-1), torch.ones(1, 4, 6))
    assert torch.all(got["p"].triu(1) == 0)                        # causal
    torch.testing.assert_close(got["w"].sum(-1), torch.ones(1, 6))  # p=1 renormalisation
    assert torch.all(got["w"][..., :-1] >= got["w"][..., 1:])       # descending


@pytest.fixture
def expert_calls(monkeypatch):
    """Records (expert index, number of tokens) for every single-expert GLU: ExpertGLU.expert (the reference
    kernel) and kernels.experts.one_expert (the CPU kernel's per-expert path)."""
    calls = []
    original, one = ExpertGLU.expert, experts_module.one_expert

    def spy(self, x, e, *args, **kwargs):
        calls.append((int(e), x.shape[0]))
        return original(self, x, e, *args, **kwargs)

    def spy_one(mlp, x, e, *args, **kwargs):
        calls.append((int(e), x.shape[0]))
        return one(mlp, x, e, *args, **kwargs)

    monkeypatch.setattr(ExpertGLU, "expert", spy)
    monkeypatch.setattr(experts_module, "one_expert", spy_one)
    return calls


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_moe_one_token_computes_only_its_top4_experts(tiny_model, expert_calls, make_ids, kernel):
    tiny_model.set_kernels(experts=kernel)
    chosen = []
    with torch.no_grad(), tiny_model.hooks([("blocks.*.ffn.hook_topk_experts", lambda t, h: chosen.append(t))]):
        tiny_model(make_ids(1, 1))
    assert len(expert_calls) == 2 * 4                                # 2 layers x top-4, never all 16
    for layer in range(2):
        calls = expert_calls[4 * layer: 4 * layer + 4]
        assert sorted(e for e, _ in calls) == sorted(chosen[layer][0, 0].tolist())
        assert all(n == 1 for _, n in calls)


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_moe_groups_tokens_by_expert(tiny_model, expert_calls, make_ids, monkeypatch, kernel):
    monkeypatch.setattr(experts_module, "padded_rows_ok", lambda *a: False)     # the CPU kernel's per-expert loop
    tiny_model.set_kernels(experts=kernel)
    chosen = []
    with torch.no_grad(), tiny_model.hooks([("blocks.0.ffn.hook_topk_experts", lambda t, h: chosen.append(t))]):
        tiny_model(make_ids(2, 7))
    used = Counter(chosen[0].flatten().tolist())
    layer0 = expert_calls[:len(used)]
    assert len(expert_calls) > len(used)                            # layer 1 came after
    assert dict(layer0) == dict(used) and len(dict(layer0)) == len(layer0)   # one call per used expert, n = its tokens


@pytest.mark.parametrize("kernel", ["reference", "grouped", "cpu"])
@pytest.mark.parametrize("tokens", [5, 40])       # 5: one GLU per expert hit; 40: one bmm over all experts
def test_moe_matches_dense_reference(tiny_model, make_ids, tokens, kernel):
    """Every experts kernel's MoE equals a naive per-token loop over the chosen experts."""
    tiny_model.set_kernels(experts=kernel)
    moe = tiny_model.blocks[0].ffn
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, logits = moe(x)
        probs = logits.softmax(-1)
        w, e = probs.topk(4, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ref = torch.stack([sum(w[n, j] * moe.experts.mlp.expert(x[0, n:n + 1], int(e[n, j]))[0][0]
                               for j in range(4)) for n in range(tokens)])
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tokens", [12, 40, 300])
def test_moe_padded_batch_matches_the_per_expert_loop(tiny_model, tokens, monkeypatch):
    """The all-experts bmm over zero-padded [E, m, d] blocks gives what one GLU per expert gives: weighted
    sums, unweighted outputs per slot, hidden norms; taken only when the padding is small."""
    tiny_model.set_kernels(experts="cpu")
    experts = tiny_model.blocks[0].ffn.experts
    E, k, d = tiny_model.config.moe_num_experts, 4, tiny_model.config.d_model
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, d, generator=g)
    idx = torch.rand(tokens, E, generator=g).add_(torch.linspace(0, 0.5, E)).topk(k).indices   # skewed
    w = torch.rand(tokens, k, generator=g)
    m = int(torch.bincount(idx.flatten(), minlength=E).max())
    padded = experts_module.padded_rows_ok(E, m, tokens * k)
    calls = []
    batched = experts_module.glu_bmm
    monkeypatch.setattr(experts_module, "glu_bmm", lambda xp, *a: calls.append(tuple(xp.shape)) or batched(xp, *a))
    with torch.no_grad():
        fast = experts(x, idx, w, observe=True)                        # (out, unweighted, hidden norms)
        monkeypatch.setattr(experts_module, "padded_rows_ok", lambda *a: False)
        slow = experts(x, idx, w, observe=True)
        ref = reference_experts(experts.mlp, x, idx, w, observe=True)
    assert calls == ([(E, m, d)] if padded else [])
    assert padded == (tokens == 40), m          # skewed: m = 8 of 48 pairs, m = 152 of 1200 (too much padding)
    assert [t.shape for t in fast] == [(tokens, d), (tokens, k, d), (tokens, k)]
    for f, s, r in zip(fast, slow, ref):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_padded_rows_rule():
    from dbrx_lab.kernels.experts import padded_rows_ok

    assert padded_rows_ok(16, 10, 32 * 4)              # 32-token prompt: 1.25x padding, weight-bound
    assert not padded_rows_ok(16, 2, 4 * 4)            # fewer than 2 pairs per expert: loop
    assert padded_rows_ok(16, 138, 512 * 4)            # balanced prefill: 1.08x
    assert not padded_rows_ok(16, 261, 512 * 4)        # skewed prefill: 2.04x


def test_loss_matches_hf(hf_pair, make_ids):
    hf, ours = hf_pair
    ids = make_ids(2, 8)
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss
        out = ours(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_kv_cache_decoding_equals_full_forward(tiny_model, make_ids):
    ids = make_ids(2, 10, seed=5)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0                                                # left padding in row 1
    with torch.no_grad():
        full = tiny_model(ids, mask).logits
        cache = tiny_model.new_cache(2, 10)
        steps = [tiny_model(ids[:, :7], mask[:, :7], cache=cache).logits]
        for t in range(7, 10):
            steps.append(tiny_model(ids[:, t:t + 1], mask[:, :t + 1], cache=cache, start=t).logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental[0], full[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(incremental[1, 3:], full[1, 3:], atol=1e-4, rtol=1e-4)


def test_last_only_and_router_logits(tiny_model, make_ids):
    ids = make_ids(2, 6)
    with torch.no_grad():
        full = tiny_model(ids, output_router_logits=True)
        last = tiny_model(ids, last_only=True).logits
    torch.testing.assert_close(last, full.logits[:, -1:])
    assert len(full.router_logits) == 2 and full.router_logits[0].shape == (12, 16)


def test_prompt_continued_in_chunks_is_causal(tiny_model, make_ids):
    """A cached forward of several new tokens (start > 0, no attention_mask) masks them causally."""
    ids = make_ids(2, 10)
    with torch.no_grad():
        full = tiny_model(ids).logits
        cache = tiny_model.new_cache(2, 10)
        first = tiny_model(ids[:, :4], cache=cache).logits
        rest = tiny_model(ids[:, 4:], cache=cache, start=4).logits
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_computes_the_last_block_for_the_last_token_only(tiny_model, make_ids, padded):
    """With last_only and no hook on the last block, its attention output and experts run on one token per
    row; the logits, the filled cache and the next step equal those of a full prefill. A hook on the last
    block still sees every token (a side pass computes the others for it) and changes no output bit."""
    ids = make_ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, :3] = 0
    last = tiny_model.blocks[-1].ffn.experts
    rows = []
    original = last.forward
    last.forward = lambda x, *a, **k: (rows.append(x.shape[0]), original(x, *a, **k))[1]
    seen = []
    try:
        with torch.no_grad():
            full_cache, pruned_cache = tiny_model.new_cache(2, 10), tiny_model.new_cache(2, 10)
            with tiny_model.hooks([("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.clone()))]):
                full_out = tiny_model(ids, mask, cache=full_cache)
            full, resid_post = full_out.logits[:, -1:], seen.pop()
            assert rows == [18] and resid_post.shape == (2, 9, 64)
            pruned = tiny_model(ids, mask, cache=pruned_cache, last_only=True).logits
            assert rows == [18, 2]
            hooked_cache = tiny_model.new_cache(2, 10)
            with tiny_model.hooks([("blocks.1.hook_resid_post",
                                    lambda x, hook: seen.append((x.clone(), hook.ctx.columns)))]):
                hooked = tiny_model(ids, mask, cache=hooked_cache, last_only=True).logits
            assert rows[2:] == [16, 2]                     # the other 8 tokens for the hook, then the last one
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            nxt = [tiny_model(ids[:, -1:], step_mask, cache=c, start=9).logits for c in (full_cache, pruned_cache)]
    finally:
        del last.forward
    # the hook saw every token once, in order, with its columns; the values a full forward computes
    assert [cols for _, cols in seen] == [range(0, 8), range(8, 9)]
    torch.testing.assert_close(torch.cat([x for x, _ in seen], dim=1), resid_post, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pruned, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(hooked, pruned)                     # observing the last block changes nothing
    for a, b in zip(pruned_cache, hooked_cache):           # and fills the prompt's columns of the cache the same
        assert torch.equal(a.k[:, :, :9], b.k[:, :, :9]) and torch.equal(a.v[:, :, :9], b.v[:, :, :9])
    for a, b in zip(full_cache, pruned_cache):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    torch.testing.assert_close(nxt[1], nxt[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 512]]), r"token id 512 outside the vocabulary \[0, 511\]"),
    (torch.tensor([[-1, 3]]), r"token id -1 outside the vocabulary \[0, 511\]"),
    (torch.zeros(1, 0, dtype=torch.long), "input_ids is empty"),
    (torch.zeros(1, 257, dtype=torch.long), "longer than max_seq_len=256"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"input_ids must be \[batch, tokens\]"),
    (torch.zeros(1, 3), "must be integer token ids"),
])
def test_bad_input_rejected(tiny_model, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(ids)


def test_bad_attention_mask_and_start_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, 3\]"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        tiny_model(torch.zeros(1, 3, dtype=torch.long), start=254)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_matches_the_plain_product(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for out, inp in ((1536, 64), (1000, 96), (130, 40)):    # split in 2/3 slices, or not divisible
            w = torch.randn(out, inp, generator=g)
            for n in (1, 3, 4, 9):
                x = torch.randn(n, inp, generator=g)
                assert torch.allclose(linear(x, w), x @ w.T, atol=1e-5, rtol=1e-5), (out, n)
                assert linear(x, w).shape == (n, out)
            h = torch.randn(2, out, generator=g)             # weight as a transposed view: h @ w -> [2, inp]
            assert torch.allclose(linear(h, w.T), h @ w, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("chosen", [[5, 2, 9, 14], [7, 3, 11], [15, 0]])
def test_one_token_expert_pairs_match_the_grouped_path(tiny_model, chosen, two_threads, monkeypatch):
    tiny_model.set_kernels(experts="cpu")
    experts = tiny_model.blocks[0].ffn.experts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, tiny_model.config.d_model, generator=g)
    idx = torch.tensor([chosen])
    w = torch.rand(1, len(chosen), generator=g)
    calls = []
    pair = experts_module.expert_pair
    monkeypatch.setattr(experts_module, "expert_pair", lambda mlp, xs, a, b, *r: calls.append((a, b)) or pair(mlp, xs, a, b, *r))
    with torch.no_grad():
        fast = experts(x, idx, w, observe=True), experts(x, idx, w)
        torch.set_num_threads(1)                                      # the grouped path
        slow = experts(x, idx, w, observe=True), experts(x, idx, w)
    ref = reference_experts(experts.mlp, x, idx, w, observe=True)
    k = len(chosen)
    ids = sorted(chosen)
    pairs = [(ids[i], ids[min(i + 1, k - 1)]) for i in range(0, k, 2)]   # ascending pairs, odd last with itself
    assert calls == pairs * 2                                         # observed call, then plain
    assert fast[1][1] is None and fast[1][2] is None                  # nothing extra unless observed
    assert torch.equal(fast[0][0], fast[1][0])                        # observing does not change the output
    assert [t.shape for t in fast[0]] == [(1, 64), (1, k, 64), (1, k)]
    for f, s, r in zip(fast[0], slow[0], ref):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_grouped_path_pairs_experts_of_similar_size(tiny_model, two_threads, monkeypatch):
    """With two threads, experts with a similar number of rows (at most PAIR_MAX_ROWS) run two at a time in
    one bmm over zero-padded rows; the result equals one GLU per expert (the one-thread path)."""
    monkeypatch.setattr(experts_module, "padded_rows_ok", lambda *a: False)
    tiny_model.set_kernels(experts="cpu")
    experts = tiny_model.blocks[0].ffn.experts
    E, k, tokens = tiny_model.config.moe_num_experts, 4, 60
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, tiny_model.config.d_model, generator=g)
    idx = torch.rand(tokens, E, generator=g).add_(torch.linspace(0, 0.6, E)).topk(k).indices
    w = torch.rand(tokens, k, generator=g)
    n_of = torch.bincount(idx.flatten(), minlength=E).tolist()
    calls = []
    pair = experts_module.expert_pair
    monkeypatch.setattr(experts_module, "expert_pair",
                        lambda mlp, xs, a, b, *r: calls.append((a, b, xs.shape[1])) or pair(mlp, xs, a, b, *r))
    with torch.no_grad():
        fast = experts(x, idx, w, observe=True)
        torch.set_num_threads(1)
        n_pairs = len(calls)
        slow = experts(x, idx, w, observe=True)
    assert calls, n_of
    assert len(calls) == n_pairs                                      # one thread: no pairs
    for a, b, m in calls:
        assert a < b and m == max(n_of[a], n_of[b]) <= 2 * min(n_of[a], n_of[b])
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["padded", "grouped", "pairs"])
def test_moe_scratch_buffers_are_reused_and_never_returned(tiny_model, path, monkeypatch):
    """Without autograd the CPU kernel's temporaries live in kernels.experts.SCRATCH: a second call of the
    same size reuses the same memory, no result aliases it (an earlier result survives a later call), and
    the results equal those of the autograd path, which allocates as usual."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2 if path == "pairs" else 1)   # pairs need threads
    if path != "padded":
        monkeypatch.setattr(experts_module, "padded_rows_ok", lambda *a: False)
    pair, paired = experts_module.expert_pair, []
    monkeypatch.setattr(experts_module, "expert_pair", lambda *a: paired.append(1) or pair(*a))
    tiny_model.set_kernels(experts="cpu")
    experts = tiny_model.blocks[0].ffn.experts
    E, k, d, tokens = tiny_model.config.moe_num_experts, 4, tiny_model.config.d_model, 60
    g = torch.Generator().manual_seed(3)

    def inputs(skew):
        x = torch.randn(tokens, d, generator=g)
        idx = torch.rand(tokens, E, generator=g).add_(torch.linspace(0, skew, E)).topk(k).indices
        return x, idx, torch.rand(tokens, k, generator=g)

    skew = 0.0 if path == "padded" else 0.6
    first, second = inputs(skew), inputs(skew)
    experts_module.SCRATCH.clear()
    buffers = experts_module.SCRATCH.buffers
    with torch.no_grad():
        for x, idx, w in (first, second, first, second):                  # buffers reach their sizes
            experts(x, idx, w, observe=True), experts(x, idx, w)
        ptrs = {key: buf.data_ptr() for key, buf in buffers.items()}
        assert ptrs, "no scratch buffer used"
        out, unweighted, norm = experts(*first, observe=True)
        plain, _, _ = experts(*first)
        kept = out.clone(), norm.clone(), unweighted.clone(), plain.clone()
        experts(*second, observe=True), experts(*second)                 # other values, same buffers
        assert {key: buf.data_ptr() for key, buf in buffers.items()} == ptrs
    assert all(torch.equal(a, b) for a, b in zip((out, norm, unweighted, plain), kept))   # not overwritten
    assert torch.equal(out, plain)                                        # observing changes nothing
    assert bool(paired) == (path == "pairs")
    x, idx, w = first
    out_grad, unweighted_grad, norm_grad = experts(x.clone().requires_grad_(), idx, w, observe=True)   # no scratch
    close = dict(atol=1e-5, rtol=1e-5)               # the autograd path runs no pairs: other rounding
    torch.testing.assert_close(out, out_grad.detach(), **close)
    torch.testing.assert_close(norm, norm_grad, **close)
    torch.testing.assert_close(unweighted, unweighted_grad.detach(), **close)


def test_scratch_is_per_thread_and_per_dtype():
    import threading

    from dbrx_lab.kernels.experts import Scratch

    scratch = Scratch()
    a = scratch.get("x", (4, 8), torch.empty(0))
    assert scratch.get("x", (2, 8), torch.empty(0)).data_ptr() == a.data_ptr()          # smaller: same memory
    assert scratch.get("x", (4, 8), torch.empty(0, dtype=torch.float64)).dtype == torch.float64
    assert scratch.get("x", (4, 8), torch.empty(0)).data_ptr() == a.data_ptr()          # float32 one kept
    assert scratch.get("x", (8, 8), torch.empty(0)).shape == (8, 8)                     # grows
    seen = []
    thread = threading.Thread(target=lambda: seen.append(dict(scratch.buffers)))
    thread.start()
    thread.join()
    assert seen == [{}]
