"""Record / Trace: what run_with_trace and generate_with_trace capture, tables, save/load, budgets."""
import dataclasses
import json
import math

import pytest
import torch

import dbrx_lab.trace as trace_mod
from dbrx_lab import PRESETS, DbrxLM, Record, Trace
from dbrx_lab.hooks import scoped
from dbrx_lab.trace import AttentionBudgetError

CFG = dataclasses.replace(PRESETS["tiny"], n_layers=3)
L, H, E, K = CFG.n_layers, CFG.n_heads, CFG.moe_num_experts, CFG.moe_top_k
FULL = Record(attention=True, experts=True, residuals=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DbrxLM(CFG).eval().requires_grad_(False)
    m.reset_parameters(std=0.1)          # wider than 0.02: decisive routing, varied experts and tokens
    return m


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def padded():
    """Two rows, the second left-padded by 3: (ids [2, 8], mask [2, 8])."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def no_hooks_left(model):
    return all(not p.fns for p in model.hook_points.values())


# ------------------------------------------------------------------------------------------------
def test_routing_matches_the_model_computation(model, ids):
    out, tr = model.run_with_trace(ids)
    plain = model(ids, output_router_logits=True)
    assert torch.equal(out.logits, plain.logits)                        # recording changes nothing
    B, T = ids.shape
    assert tr.router_logits.shape == (L, B, T, E) and tr.topk_experts.shape == tr.topk_weights.shape == (L, B, T, K)
    logits = torch.stack(plain.router_logits).view(L, B, T, E)
    assert torch.allclose(tr.router_logits, logits)
    w, e = torch.softmax(logits, -1).topk(K, dim=-1)
    assert torch.equal(tr.topk_experts, e)
    assert torch.allclose(tr.topk_weights, w / w.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(tr.router_probs, torch.softmax(logits, -1))
    assert torch.equal(tr.input_ids, ids) and tr.attention_mask.all() and tr.prompt_length == T
    assert tr.tokens == [[str(i) for i in row] for row in ids.tolist()]   # no real vocab: str(id)
    assert (tr.n_layers, tr.batch_size, tr.seq_len, tr.n_experts, tr.top_k) == (L, B, T, E, K)
    assert not tr.is_generated.any()
    assert tr.attention == {} and tr.expert_output_norm is None and tr.activations == {}
    meta = tr.metadata
    assert meta["config"]["n_layers"] == L and meta["record"]["router"] is True and meta["interventions"] == []
    assert meta["dbrx_lab_version"] and meta["created"]
    assert no_hooks_left(model)


def test_recorded_tensors_are_on_cpu_in_the_requested_dtype(model, ids):
    _, tr = model.run_with_trace(ids, record=dataclasses.replace(FULL, dtype=torch.bfloat16,
                                                                 hooks=("blocks.0.ffn.hook_topk_experts",)))
    assert tr.router_logits.dtype == tr.topk_weights.dtype == torch.float32
    assert tr.topk_experts.dtype == tr.activations["blocks.0.ffn.hook_topk_experts"].dtype == torch.long
    floats = [tr.expert_output_norm, tr.expert_hidden_norm, *tr.attention.values(),
              *(a for n, a in tr.activations.items() if "topk" not in n)]
    assert all(t.dtype == torch.bfloat16 for t in floats)
    everything = [tr.input_ids, tr.attention_mask, tr.router_logits, tr.topk_experts, tr.topk_weights, *floats]
    assert all(t.device.type == "cpu" for t in everything)
    assert sorted(tr.activations) == sorted([f"blocks.{i}.hook_resid_{w}" for i in range(L)
                                             for w in ("pre", "mid", "post")] + ["blocks.0.ffn.hook_topk_experts"])
    assert tr.activations["blocks.2.hook_resid_post"].shape == (2, 7, CFG.d_model)


def test_expert_norms_and_residuals_hand_checked(model, ids):
    _, tr = model.run_with_trace(ids, record=FULL)
    layer, b, t, rank = 1, 1, 4, 2
    ffn = model.blocks[layer].ffn
    x = model.blocks[layer].norm_attn_norm.norm_2(tr.activations[f"blocks.{layer}.hook_resid_mid"][b, t])
    e = int(tr.topk_experts[layer, b, t, rank])
    out, hidden = ffn.experts.mlp.expert(x[None], e)
    assert math.isclose(float(tr.expert_output_norm[layer, b, t, rank]), float(out.norm()), rel_tol=1e-5)
    assert math.isclose(float(tr.expert_hidden_norm[layer, b, t, rank]), float(hidden.norm()), rel_tol=1e-5)
    assert torch.allclose(ffn.router(x), tr.router_logits[layer, b, t], atol=1e-5)
    # the residual stream chains: post of layer i is pre of layer i + 1
    assert torch.equal(tr.activations["blocks.0.hook_resid_post"], tr.activations["blocks.1.hook_resid_pre"])


def test_attention_selection_of_layers_heads_and_query_positions(model, ids):
    _, full = model.run_with_trace(ids, record=Record(attention=True))
    assert sorted(full.attention) == list(range(L)) and full.attention_query_positions is None
    a = full.attention[1]
    assert a.shape == (2, H, 7, 7)
    assert torch.allclose(a.sum(-1), torch.ones(2, H, 7), atol=1e-5) and torch.all(a.triu(1) == 0)

    rec = Record(attention=[1], heads=[3, 0], query_positions=[5, 2])
    _, tr = model.run_with_trace(ids, record=rec)
    assert list(tr.attention) == [1] and tr.attention_heads == {1: [3, 0]}
    assert tr.attention_query_positions == [5, 2]
    assert tr.attention[1].shape == (2, 2, 2, 7)
    assert torch.allclose(tr.attention[1], a[:, [3, 0]][:, :, [5, 2]], atol=1e-6)
    _, tr = model.run_with_trace(ids, record=Record(attention=[0], heads=[3, 2, 1, 0]))
    assert torch.equal(tr.attention[0], full.attention[0].flip(1))
    _, tr = model.run_with_trace(ids, record=Record(attention=True, layers=[2]))
    assert list(tr.attention) == [2] and tr.attention_heads == {2: list(range(H))}


def reference_pattern(q, k, mask=None):
    """softmax(q k^T / sqrt(D)) by hand from hook_q [B, T, H, D] and hook_k [B, T, K, D] -> [B, H, T, T]; mask
    [B, T] (1 real): keys at padding are masked, except for a padding query itself (it sees itself)."""
    B, T, _, D = q.shape
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D ** 0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool)
    return s.masked_fill(~allowed, float("-inf")).softmax(-1).float()


def test_recording_attention_changes_no_output_and_keeps_sdpa(model, ids, monkeypatch):
    """Recording attention patterns computes them on the side: every layer still runs SDPA, the logits of a
    forward and the tokens and step logits of a generation are bit-identical to unrecorded ones, and the
    recorded pattern is the reference softmax of the layer's q and k."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    plain = model(ids).logits
    assert len(calls) == L
    calls.clear()
    got = {}
    with model.hooks([("blocks.1.attn.hook_q", lambda x, h: got.__setitem__("q", x.clone())),
                      ("blocks.1.attn.hook_k", lambda x, h: got.__setitem__("k", x.clone()))]):
        out, tr = model.run_with_trace(ids, record=Record(attention=[1], experts=True, residuals=True))
    assert len(calls) == L                                    # SDPA in every layer, the recorded one too
    assert torch.equal(out.logits, plain)
    torch.testing.assert_close(tr.attention[1], reference_pattern(got["q"], got["k"]), atol=1e-5, rtol=1e-5)

    calls.clear()
    steps = []
    ref_ids = model.generate(ids, max_new_tokens=3, streamer=steps.append)
    assert len(calls) == 3 * L                                # prefill + 2 decode steps
    calls.clear()
    rec_steps = []
    out_ids, gen = model.generate_with_trace(ids, max_new_tokens=3, record=Record(attention=[0, 2]),
                                             on_step=lambda step, routing: rec_steps.append(step))
    # prefill + 2 decode steps + the extra pass, and the prefill's side pass of the recorded last layer
    assert len(calls) == 4 * L + 1
    assert torch.equal(out_ids, ref_ids)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(rec_steps, steps)) and len(steps) == 3
    assert sorted(gen.attention) == [0, 2]


def test_attention_recording_matches_the_pattern_hook_on_padded_input(model, padded):
    ids, mask = padded
    seen = {}
    with model.hooks([("blocks.0.attn.hook_pattern", lambda x, h: seen.setdefault("p", x.clone())),
                      ("blocks.0.attn.hook_q", lambda x, h: seen.setdefault("q", x.clone())),
                      ("blocks.0.attn.hook_k", lambda x, h: seen.setdefault("k", x.clone()))]):
        model(ids, mask)
    _, tr = model.run_with_trace(ids, mask, record=Record(attention=[0]))
    assert tr.attention[0].shape == seen["p"].shape == (2, H, 8, 8)
    torch.testing.assert_close(tr.attention[0], seen["p"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tr.attention[0], reference_pattern(seen["q"], seen["k"], mask), atol=1e-5, rtol=1e-5)
    assert torch.all(tr.attention[0][1, :, 3:, :3] == 0)                 # real tokens never attend to padding


def test_left_padding_is_marked_and_never_mixed_in(model, padded):
    ids, mask = padded
    _, tr = model.run_with_trace(ids, mask)
    assert torch.equal(tr.attention_mask, mask.bool())
    _, alone = model.run_with_trace(ids[1:, 3:])                          # the padded row without its padding
    assert torch.equal(tr.topk_experts[:, 1, 3:], alone.topk_experts[:, 0])
    assert torch.allclose(tr.router_logits[:, 1, 3:], alone.router_logits[:, 0], atol=1e-5)
    df = tr.to_frame()
    assert len(df) == int(mask.sum()) * L * K
    assert not ((df.batch == 1) & (df.position < 3)).any()
    with_pad = tr.to_frame(include_padding=True)
    assert len(with_pad) == 2 * 8 * L * K
    assert with_pad.is_padding.sum() == 3 * L * K
    assert set(with_pad[with_pad.is_padding].position) == {0, 1, 2}


def test_to_frame_columns_order_and_a_hand_checked_row(model, padded):
    ids, mask = padded
    _, tr = model.run_with_trace(ids, mask)
    df = tr.to_frame()
    assert list(df.columns) == ["batch", "position", "layer", "rank", "token_id", "token", "expert", "weight",
                                "prob", "logit", "is_generated"]
    keys = list(zip(df.batch, df.position, df.layer, df["rank"]))
    assert keys == sorted(keys)
    b, t, layer, rank = 1, 5, 2, 1
    row = df[(df.batch == b) & (df.position == t) & (df.layer == layer) & (df["rank"] == rank)]
    assert len(row) == 1
    row = row.iloc[0]
    e = int(tr.topk_experts[layer, b, t, rank])
    assert row.expert == e and row.token_id == int(ids[b, t]) and row.token == str(int(ids[b, t]))
    assert math.isclose(row.weight, float(tr.topk_weights[layer, b, t, rank]), rel_tol=1e-6)
    assert math.isclose(row.logit, float(tr.router_logits[layer, b, t, e]), rel_tol=1e-6)
    probs = torch.softmax(tr.router_logits[layer, b, t], -1)
    assert math.isclose(row.prob, float(probs[e]), rel_tol=1e-5)
    assert not row.is_generated
    sums = df.groupby(["batch", "position", "layer"]).weight.sum()
    assert len(sums) == int(mask.sum()) * L and ((sums - 1).abs() < 1e-5).all()
    only = tr.to_frame(layers=[2])
    assert set(only.layer) == {2} and len(only) == len(df) // L
    with pytest.raises(ValueError, match=r"out of range \[0, 2\]"):
        tr.to_frame(layers=[3])


def test_select_gives_a_sub_trace(model, padded):
    ids, mask = padded
    _, tr = model.run_with_trace(ids, mask, record=Record(attention=[0], experts=True, residuals=[1]))
    sub = tr.select(batch=1)
    assert sub.batch_size == 1 and sub.tokens == [tr.tokens[1]]
    assert torch.equal(sub.topk_experts, tr.topk_experts[:, 1:])
    assert torch.equal(sub.attention[0], tr.attention[0][1:])
    assert torch.equal(sub.activations["blocks.1.hook_resid_mid"], tr.activations["blocks.1.hook_resid_mid"][1:])
    assert torch.equal(sub.attention_mask, tr.attention_mask[1:])
    assert tr.select([1, 0]).select([1]).allclose(tr.select(0))
    assert not tr.select(0).allclose(tr.select(1))
    with pytest.raises(ValueError, match=r"out of range \[0, 1\]"):
        tr.select(2)


def test_string_input_uses_the_tokenizer_strings():
    from dbrx_lab.tokenizer import load_tokenizer

    cfg = dataclasses.replace(PRESETS["tiny-vocab"], n_layers=1)
    m = DbrxLM(cfg).eval()
    _, tr = m.run_with_trace("Hello world!\n")
    tok = load_tokenizer()
    assert tr.input_ids[0].tolist() == tok.encode("Hello world!\n")
    assert tr.tokens == [tok.token_strings(tok.encode("Hello world!\n"))] == [["Hello", " world", "!\\n"]]


# --- records: validation and budget ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(attention=[3]), r"attention: layers \[3\] out of range \[0, 2\]"),
    (dict(attention=True, layers=[0, 5]), r"layers: layers \[5\] out of range \[0, 2\]"),
    (dict(residuals=[-1]), r"residuals: layers \[-1\] out of range \[0, 2\]"),
    (dict(attention=True, heads=[4]), r"heads: heads \[4\] out of range \[0, 3\]"),
    (dict(attention=True, query_positions=[7]), r"query_positions: positions \[7\] out of range \[0, 6\]"),
    (dict(hooks=("blocks.9.hook_resid_pre",)), r"layer 9 out of range \[0, 2\]"),
    (dict(hooks=("blocks.0.hook_nothing",)), "valid names"),
])
def test_record_out_of_range_is_a_value_error_naming_the_range(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.run_with_trace(ids, record=Record(**kwargs))
    assert no_hooks_left(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attention="yes"), "attention must be True, an int or a list of ints"),
    (dict(heads=[1, 1]), "duplicates"),
    (dict(dtype=torch.int8), "floating torch dtype"),
    (dict(router=1), "router must be True or False"),
    (dict(max_attention_bytes=0), "max_attention_bytes must be > 0"),
    (dict(hooks=(3,)), "hook names or globs"),
])
def test_record_rejects_malformed_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Record(**kwargs)


def test_attention_budget_estimate_and_refusal(model, ids):
    rec = Record(attention=[0, 2], heads=[1, 2, 3], query_positions=[1, 2, 3, 4, 5], max_attention_bytes=1000)
    assert rec.estimate_attention_bytes(CFG, 2, 7) == 2 * 2 * 3 * 5 * 7 * 4
    with pytest.raises(AttentionBudgetError) as err:
        model.run_with_trace(ids, record=rec)
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    for part in ("~0.00 MiB", "2 layers x batch 2 x 3 heads x 5 query positions x 7 keys x 4 bytes",
                 "heads=[...]", "query_positions=[...]", "attention=[...]", "max_attention_bytes"):
        assert part in msg
    assert no_hooks_left(model)
    model.run_with_trace(ids, record=dataclasses.replace(rec, max_attention_bytes=2 * 2 * 3 * 5 * 7 * 4))
    # full DBRX at 4k tokens, every layer and head in bf16: the ~60 GB of design.md, refused by default
    big = Record(attention=True, dtype=torch.bfloat16)
    dbrx = PRESETS["dbrx-instruct"]
    assert big.estimate_attention_bytes(dbrx, 1, 4096) == 40 * 48 * 4096 * 4096 * 2
    with pytest.raises(AttentionBudgetError, match=r"~60\.00 GiB .* over max_attention_bytes=2\.00 GiB"):
        big.check_budget(dbrx, 1, 4096)
    assert Record(attention=[3], heads=[0], query_positions=[4095], dtype=torch.bfloat16).check_budget(
        dbrx, 1, 4096) == 4096 * 2


def test_hooks_are_removed_when_run_with_trace_raises(model, ids):
    def boom(x, hook):
        raise RuntimeError("user hook failed")

    with model.hooks([("blocks.1.hook_resid_mid", boom)]):
        with pytest.raises(RuntimeError, match="user hook failed"):
            model.run_with_trace(ids, record=FULL)
        assert {n for n, p in model.hook_points.items() if p.fns} == {"blocks.1.hook_resid_mid"}
    assert no_hooks_left(model)


class ZeroTopWeight:
    """A routing edit (the interventions protocol): drops the top expert's weight in one layer; top-k 2 in another."""

    def __init__(self, layer, small_k_layer):
        self.layer, self.small_k_layer = layer, small_k_layer

    def edit_logits(self, logits, layer, ctx):
        return logits

    def edit_top_k(self, k, layer):
        return 2 if layer == self.small_k_layer else k

    def edit_experts(self, experts, probs, layer, ctx):
        return experts

    def edit_weights(self, weights, experts, probs, layer, ctx):
        if layer == self.layer:
            weights = weights.clone()
            weights[:, 0] = 0
        return weights

    def __repr__(self):
        return f"ZeroTopWeight(layer={self.layer})"


def test_trace_records_routing_as_applied_after_edits(model, ids):
    _, before = model.run_with_trace(ids)
    edit = ZeroTopWeight(layer=0, small_k_layer=2)
    with scoped("edits", [(block.ffn, edit) for block in model.blocks]):     # as model.intervene attaches
        _, tr = model.run_with_trace(ids)
    assert not any(block.ffn.edits for block in model.blocks)
    assert torch.equal(tr.router_logits[0], before.router_logits[0])           # raw logits
    w = before.topk_weights[0]
    assert torch.allclose(tr.topk_weights[0], torch.cat([w[..., 1:], torch.zeros_like(w[..., :1])], -1), atol=1e-6)
    assert torch.equal(tr.topk_experts[0], before.topk_experts[0].roll(-1, dims=-1))   # re-sorted by weight
    assert torch.equal(tr.topk_experts[2, ..., 2:], torch.full((2, 7, 2), -1))    # smaller top-k padded
    assert torch.equal(tr.topk_weights[2, ..., 2:], torch.zeros(2, 7, 2))
    assert tr.metadata["interventions"] == ["ZeroTopWeight(layer=0)"]
    df = tr.to_frame()
    assert len(df) == 2 * 7 * (K + K + 2) and (df.expert >= 0).all()


# --- save / load ------------------------------------------------------------------------------------
def test_save_load_round_trip(model, padded, tmp_path):
    ids, mask = padded
    rec = Record(attention=[1], heads=[2], query_positions=[7, 4], experts=True, residuals=[0],
                 hooks=("hook_final", "blocks.2.attn.hook_scores"), dtype=torch.bfloat16)
    _, tr = model.run_with_trace(ids, mask, record=rec)
    path = tr.save(tmp_path / "run.safetensors")
    back = Trace.load(path)
    assert back.differences(tr, rtol=0, atol=0) == []
    assert back.metadata == json.loads(json.dumps(tr.metadata))
    assert back.attention[1].dtype == torch.bfloat16 and back.attention_heads == {1: [2]}
    assert back.attention_query_positions == [7, 4] and back.prompt_length == 8
    assert torch.isinf(back.activations["blocks.2.attn.hook_scores"]).any()   # masked scores stay -inf
    assert back.to_frame().equals(tr.to_frame())
    assert list(tmp_path.iterdir()) == [path]                                     # no temporary left behind


def test_load_rejects_another_format_version(model, ids, tmp_path, monkeypatch):
    _, tr = model.run_with_trace(ids)
    monkeypatch.setattr(trace_mod, "FORMAT_VERSION", 99)
    path = tr.save(tmp_path / "future.safetensors")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version 99; this dbrx_lab reads version 2"):
        Trace.load(path)


def test_load_rejects_damaged_and_foreign_files(model, ids, tmp_path):
    from safetensors.torch import save_file

    _, tr = model.run_with_trace(ids, record=Record(experts=True))
    data = tr.save(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        Trace.load(tmp_path / "truncated.safetensors")
    (tmp_path / "half_header.safetensors").write_bytes(data[:50])
    with pytest.raises(ValueError, match="damaged or truncated"):
        Trace.load(tmp_path / "half_header.safetensors")
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF                                                           # inside the tensor data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="does not match the checksum"):
        Trace.load(tmp_path / "flipped.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dbrx_lab trace file"):
        Trace.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        Trace.load(tmp_path / "missing.safetensors")


def test_save_is_atomic(model, ids, tmp_path, monkeypatch):
    from dbrx_lab import checkpoint

    _, old = model.run_with_trace(ids)
    path = old.save(tmp_path / "t.safetensors")
    _, new = model.run_with_trace(ids, record=Record(experts=True))

    def fail_midway(f, tensors, metadata=None):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_safetensors", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert list(tmp_path.iterdir()) == [path]                                     # no partial file anywhere
    assert Trace.load(path).allclose(old)                                         # the old trace is intact


# --- from_routing -------------------------------------------------------------------------------------
def test_from_routing_builds_a_trace_from_crafted_tensors(tmp_path):
    experts = torch.tensor([[[[2, 0], [1, 2]]]])                                  # [L=1, B=1, T=2, k=2]
    logits = torch.tensor([[[[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]]]])
    tr = Trace.from_routing(experts, router_logits=logits, input_ids=torch.tensor([[7, 9]]),
                            tokens=[["a", "b"]])
    p = torch.softmax(logits[0, 0, 0], -1)
    assert torch.allclose(tr.topk_weights[0, 0, 0], torch.stack([p[2], p[0]]) / (p[2] + p[0]))
    assert (tr.n_layers, tr.n_experts, tr.top_k, tr.seq_len) == (1, 3, 2, 2)
    df = tr.to_frame()
    assert df.expert.tolist() == [2, 0, 1, 2] and df.token.tolist() == ["a", "a", "b", "b"]
    assert df.token_id.tolist() == [7, 7, 9, 9]
    assert math.isclose(df.logit[3], 1.0) and math.isclose(df.prob[0], float(p[2]), rel_tol=1e-6)

    plain = Trace.from_routing(experts, n_experts=5)
    assert plain.n_experts == 5 and torch.all(plain.topk_weights == 0.5) and plain.tokens == [["0", "0"]]
    assert plain.to_frame().prob.isna().all()
    assert Trace.load(plain.save(tmp_path / "p.safetensors")).allclose(plain)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        Trace.from_routing(experts, n_experts=2)
    with pytest.raises(ValueError, match=r"integer tensor \[L, B, T, k\]"):
        Trace.from_routing(experts[0])
    with pytest.raises(ValueError, match="topk_weights must match"):
        Trace.from_routing(experts, topk_weights=torch.ones(1, 1, 2, 3))


# --- generation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_generate_with_trace_equals_one_forward_over_the_final_ids(model, padded, dtype):
    """Routing identical, every recorded float within 1e-5 (float32: GEMM rounding of one-token decode
    steps vs a full forward); in float64 the assembled trace matches to 1e-6 (float32 rounding of router data)."""
    copied = DbrxLM(CFG).eval().requires_grad_(False)
    copied.load_state_dict(model.state_dict())
    model = copied.to(dtype)
    ids, mask = padded
    T, n = ids.shape[1], 6
    rec = Record(attention=True, experts=True, heads=[0, 3], query_positions=[0, T - 1, T + 2, T + n - 1],
                 dtype=dtype)
    out_ids, gen = model.generate_with_trace(ids, max_new_tokens=n, attention_mask=mask, record=rec)
    assert torch.equal(out_ids, model.generate(ids, max_new_tokens=n, attention_mask=mask))
    assert gen.input_ids.shape == (2, T + n) and gen.prompt_length == T
    assert torch.equal(gen.attention_mask, torch.cat([mask.bool(), torch.ones(2, n, dtype=torch.bool)], 1))
    assert gen.is_generated[:, T:].all() and not gen.is_generated[:, :T].any()
    assert gen.metadata["kind"] == "generate" and gen.metadata["generation"]["generated"] == n

    _, fwd = model.run_with_trace(out_ids, gen.attention_mask, record=rec)
    assert torch.equal(gen.topk_experts, fwd.topk_experts)
    assert torch.allclose(gen.topk_weights, fwd.topk_weights, rtol=0, atol=1e-5)
    assert torch.allclose(gen.router_logits, fwd.router_logits, rtol=1e-5, atol=1e-5)
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    assert gen.differences(fwd, rtol=0, atol=atol) == [f"prompt_length {T} != {T + n}"]
    a = gen.attention[2]
    assert a.shape == (2, 2, 4, T + n) and gen.attention_query_positions == [0, T - 1, T + 2, T + n - 1]
    assert torch.all(a[:, :, 2, T + 3:] == 0) and torch.allclose(a.sum(-1).float(), torch.ones(2, 2, 4), atol=1e-5)
    df = gen.to_frame()
    assert len(df) == int(gen.attention_mask.sum()) * L * K and df.is_generated.sum() == 2 * n * L * K


def test_on_step_streams_each_tokens_routing(model, ids):
    forwards, calls = [], []

    def on_step(step, routing):
        calls.append((step, routing, len(forwards)))
        model(torch.zeros(2, 3, dtype=torch.long))   # a callback's own forwards are not recorded

    with model.hooks([("hook_embed", lambda x, h: forwards.append(1))]):
        out_ids, tr = model.generate_with_trace(ids, max_new_tokens=4, on_step=on_step)
    _, plain = model.generate_with_trace(ids, max_new_tokens=4)
    assert tr.allclose(plain)
    T = ids.shape[1]
    assert [s.index for s, _, _ in calls] == [0, 1, 2, 3]
    # step i arrives right after the forward that processed its token: prefill + i + 1 generation forwards
    # (the last via the extra pass), plus the i forwards the callback itself ran so far
    assert [n - i for i, (_, _, n) in enumerate(calls)] == [2, 3, 4, 5]
    for step, routing, _ in calls:
        pos = step.position
        assert routing["position"] == pos and torch.equal(out_ids[:, pos], step.tokens)
        assert torch.equal(routing["topk_experts"], tr.topk_experts[:, :, pos])
        assert torch.equal(routing["topk_weights"], tr.topk_weights[:, :, pos])
        assert routing["router_logits"].shape == (L, 2, E)
    assert calls[0][0].position == T and tr.seq_len == T + 4
    assert no_hooks_left(model)


def test_generation_stopping_at_eos_covers_every_token(model, ids):
    first = model.generate(ids, max_new_tokens=3)
    eos = int(first[0, ids.shape[1] + 1])                     # row 0's second token stops it
    out_ids, tr = model.generate_with_trace(ids, max_new_tokens=3, eos_token_id=eos, pad_token_id=5)
    T = ids.shape[1]
    assert torch.equal(out_ids, model.generate(ids, max_new_tokens=3, eos_token_id=eos, pad_token_id=5))
    finished_row0 = tr.attention_mask[0, T:].tolist()
    assert finished_row0[:2] == [True, True] and all(not v for v in finished_row0[2:])   # eos real, after: pad
    _, fwd = model.run_with_trace(out_ids)
    assert torch.equal(tr.topk_experts, fwd.topk_experts)     # every column, the last one included
    assert len(tr.to_frame()) == int(tr.attention_mask.sum()) * L * K

    one_row = ids[:1]
    eos = int(model.generate(one_row, max_new_tokens=1)[0, -1])
    out_ids, tr = model.generate_with_trace(one_row, max_new_tokens=5, eos_token_id=eos,
                                            record=Record(attention=[0], query_positions=[T - 1, T, T + 3]))
    assert out_ids.shape == (1, T + 1) and tr.seq_len == T + 1
    assert tr.attention_query_positions == [T - 1, T] and tr.attention[0].shape == (1, H, 2, T + 1)
    _, fwd = model.run_with_trace(out_ids, record=Record(attention=[0], query_positions=[T - 1, T]))
    assert tr.differences(fwd, rtol=0, atol=1e-5) == [f"prompt_length {T} != {T + 1}"]


def test_generate_with_trace_validates_before_running(model, ids):
    with pytest.raises(ValueError, match=r"query_positions: positions \[12\] out of range \[0, 11\]"):
        model.generate_with_trace(ids, max_new_tokens=5, record=Record(attention=[0], query_positions=[12]))
    with pytest.raises(AttentionBudgetError):
        model.generate_with_trace(ids, max_new_tokens=5, record=Record(attention=True, max_attention_bytes=64))
    with pytest.raises(ValueError, match="temperature"):
        model.generate_with_trace(ids, max_new_tokens=2, temperature=0)
    assert no_hooks_left(model)
    out_ids, tr = model.generate_with_trace(ids, max_new_tokens=0)
    assert torch.equal(out_ids, ids) and tr.seq_len == ids.shape[1]
