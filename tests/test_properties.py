"""Property-based tests (hypothesis) over dbrx-lab's input surfaces (issue 18).

For every generated input the call either works and gives the same result as a known-good path, or raises
ValueError (or a subclass: the project's documented error) whose message names the problem; never an error
from inside torch or a library, never a silent wrong result. The "ci" profile in conftest.py derandomizes
and bounds the examples (HYPOTHESIS_PROFILE=dev explores more).
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dbrx_lab import (PRESETS, DbrxConfig, DbrxLM, ExpertAblation, ExpertForce, ExpertScale, HeadAblation,  # noqa: E402
                      TopK, Trace)
from dbrx_lab import checkpoint  # noqa: E402
from dbrx_lab.tokenizer import SPECIAL_TOKENS, _encode_fallback, load_tokenizer  # noqa: E402
from dbrx_lab.trace import Record, _checksum  # noqa: E402

from conftest import widen_  # noqa: E402

VOCAB = PRESETS["tiny"].vocab_size
# JSON values of every kind, the odd floats included (json.loads accepts NaN and Infinity)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)


@pytest.fixture(scope="module")
def model() -> DbrxLM:
    m = DbrxLM(dataclasses.replace(PRESETS["tiny"])).eval()
    widen_(m)
    return m


def expect_documented_error(err: BaseException) -> None:
    """The project's errors are ValueError (or a subclass) with a message that says something."""
    assert isinstance(err, ValueError), f"{type(err).__name__}: {err}"
    assert len(str(err)) > 10, repr(err)


# --- token ids and attention masks -----------------------------------------------------------------------------
token = st.one_of(st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3), st.floats(-1, VOCAB), st.just(float("nan")),
                  st.booleans(), st.sampled_from([np.int64(3), np.int32(7), np.uint8(9)]))


@given(rows=st.lists(st.lists(token, min_size=0, max_size=6), min_size=0, max_size=3))
def test_token_ids_work_or_raise_value_error(model, rows):
    try:
        out = model(rows).logits
    except Exception as err:                             # noqa: BLE001 (any other type is the failure)
        expect_documented_error(err)
        return
    ids = torch.tensor([[int(t) for t in row] for row in rows])                 # accepted: integer ids only
    assert all(not isinstance(t, (float, bool)) for row in rows for t in row)
    assert torch.equal(out, model(ids).logits)


@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2 ** 16),
       noise=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.sampled_from([0, 1, 2, -1, 0.5])),
                      max_size=2))
def test_masks_work_and_match_unpadded_rows_or_raise(model, lengths, seed, noise):
    """Left-padded rows compute what each row computes alone; any other mask is a ValueError."""
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(lengths), T), generator=g)
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths], dtype=torch.float32)
    for b, t, v in noise:                                                         # maybe damage it
        if b < mask.shape[0] and t < T:
            mask[b, t] = v
    try:
        out = model(ids, mask).logits
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        assert str(err).startswith("attention_mask")
        return
    real = mask != 0
    for b in range(len(lengths)):                                                  # accepted: rows alone agree
        row = ids[b][real[b]][None]
        torch.testing.assert_close(out[b][real[b]], model(row).logits[0], atol=1e-4, rtol=1e-4)


# --- generation settings -------------------------------------------------------------------------------------
number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5), st.booleans(),
                   st.sampled_from([1e-300, 5e-324, 1e-30, 1e-5]))


@given(temperature=number, top_k=st.one_of(st.none(), st.integers(-2, 600), st.floats(0, 3)),
       top_p=st.one_of(st.none(), st.floats(allow_nan=True)), max_new_tokens=st.integers(-1, 3),
       do_sample=st.one_of(st.booleans(), st.just(1)), seed=st.one_of(st.none(), st.integers(0, 100), st.just(1.5)))
@settings(max_examples=40)
def test_generation_settings_work_or_raise_value_error(model, temperature, top_k, top_p, max_new_tokens, do_sample,
                                                       seed):
    ids = torch.tensor([[5, 9, 3, 17]])
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed)
    try:
        out = model.generate(ids, **kwargs)
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        return
    assert out.shape == (1, 4 + max_new_tokens) and torch.equal(out[:, :4], ids)
    assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < VOCAB
    if not do_sample or temperature < 1e-30:                                          # greedy, or its limit
        assert torch.equal(out, model.generate(ids, max_new_tokens=max_new_tokens))


# --- intervention arguments ----------------------------------------------------------------------------------
ints_arg = st.one_of(st.integers(-2, 20), st.lists(st.integers(-1, 20), max_size=3), st.just("all"), st.just("some"),
                     st.floats(0, 3), st.booleans(), st.lists(st.sampled_from([np.int64(1), np.int32(0)]), max_size=2),
                     st.just(np.array([1, 3])), st.none())


@given(kind=st.sampled_from(["ablate", "force", "scale", "topk", "heads"]), layer=ints_arg, which=ints_arg,
       mode=st.sampled_from(["reroute", "zero", "renormalize", "mean", "bogus"]),
       value=st.one_of(st.floats(allow_nan=True), st.integers(-1, 20), st.none()))
def test_intervention_arguments_work_or_raise_value_error(model, kind, layer, which, mode, value):
    ids = torch.tensor([[5, 9, 3, 17, 2]])
    try:
        if kind == "ablate":
            edit = ExpertAblation(layer=layer, experts=which, mode=mode)
        elif kind == "force":
            edit = ExpertForce(layer=layer, expert=which, weight=value)
        elif kind == "scale":
            edit = ExpertScale(layer=layer, expert=which, factor=value)
        elif kind == "topk":
            edit = TopK(value, layer=layer)
        else:
            edit = HeadAblation(layer=layer, heads=which, mode=mode)
        with model.intervene(edit):
            out = model(ids).logits
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        return
    assert torch.isfinite(out).all()
    assert not model.active_interventions()                                          # removed on exit


@given(layer=st.integers(0, 1), experts=st.lists(st.integers(0, 15), min_size=1, max_size=3, unique=True),
       mode=st.sampled_from(ExpertAblation.MODES))
@settings(max_examples=15)
def test_numpy_intervention_arguments_equal_python_ones(model, layer, experts, mode):
    ids = torch.tensor([[5, 9, 3, 17, 2]])
    assume(mode != "reroute" or len(experts) <= 12)
    with model.intervene(ExpertAblation(layer=layer, experts=experts, mode=mode)):
        want = model(ids).logits
    with model.intervene(ExpertAblation(layer=np.int64(layer), experts=np.array(experts), mode=mode)):
        assert torch.equal(model(ids).logits, want)


# --- config.json fields ---------------------------------------------------------------------------------------
FIELDS = [("d_model",), ("n_heads",), ("n_layers",), ("max_seq_len",), ("vocab_size",), ("layer_norm_eps",),
          ("attn_config", "kv_n_heads"), ("attn_config", "clip_qkv"), ("attn_config", "rope_theta"),
          ("ffn_config", "ffn_hidden_size"), ("ffn_config", "moe_num_experts"), ("ffn_config", "moe_top_k"),
          ("ffn_config", "moe_normalize_expert_weights"), ("rope_parameters",), ("attn_config",), ("eos_token_id",),
          ("tie_word_embeddings",), ("ffn_config", "ffn_act_fn")]
edits = st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(st.just("<delete>"), json_values)), max_size=3)


@given(edits=edits, top=st.one_of(st.none(), json_values))
@settings(max_examples=40)
def test_config_fields_load_or_raise_value_error(edits, top):
    d = PRESETS["tiny"].to_dict()
    for path, value in edits:
        parent = d
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else None
            if parent is None:
                break
        if parent is None:
            continue
        if value == "<delete>":
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    source = d if top is None else top                                                # or not an object at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cfg = DbrxConfig.from_dict(source)
        except Exception as err:                         # noqa: BLE001
            expect_documented_error(err)
            return
        assert DbrxConfig.from_dict(cfg.to_dict()) == cfg                             # a valid config round-trips
    for name in ("rope_theta", "layer_norm_eps", "moe_loss_weight"):
        assert math.isfinite(getattr(cfg, name))
    assert cfg.layer_norm_eps > 0 and cfg.rope_theta > 0
    if cfg.d_model * cfg.ffn_hidden_size * cfg.moe_num_experts <= 2 ** 24:
        with torch.device("meta"):
            DbrxLM(dataclasses.replace(cfg, n_layers=1, vocab_size=8))                # it builds a model


# --- safetensors headers and index files ------------------------------------------------------------------------
header_entry = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "X9"]), json_scalars),
                                      "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), json_values),
                                      "data_offsets": st.one_of(st.lists(st.integers(-2, 80), min_size=2, max_size=2),
                                                                json_values)})


@given(entries=st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(header_entry, json_values), max_size=3),
       extra=st.integers(0, 64), garbage=st.one_of(st.none(), st.binary(max_size=40)))
@settings(max_examples=80)
def test_safetensors_headers_read_or_raise_value_error(tmp_path_factory, entries, extra, garbage):
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    raw = garbage if garbage is not None else json.dumps(entries).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * extra)
    try:
        infos = checkpoint.read_header(path)
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        assert str(path) in str(err)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:                                  # accepted: safetensors agrees
        for name, info in infos.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype


@given(tensors=st.dictionaries(st.sampled_from(["a", "b.c", "w"]), st.tuples(st.lists(st.integers(0, 3), max_size=2),
                                                                            st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool])),
                               max_size=3))
@settings(max_examples=30)
def test_write_safetensors_matches_the_library(tmp_path_factory, tensors):
    from safetensors.torch import load_file

    made = {n: torch.arange(math.prod(shape)).reshape(shape).to(dtype) for n, (shape, dtype) in tensors.items()}
    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    with open(path, "wb") as f:
        checkpoint.write_safetensors(f, made, {"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(made) and all(torch.equal(back[n], made[n]) for n in made)
    assert set(checkpoint.read_header(path)) == set(made)


@given(entries=st.lists(st.one_of(st.sampled_from(["model-00001-of-00002.safetensors", "../x.safetensors",
                                                   "/etc/passwd", "", ".", "..", "a/b", "a\\b", "missing.safetensors"]),
                                  st.text(max_size=12), json_scalars), min_size=1, max_size=3))
@settings(max_examples=60)
def test_index_entries_stay_inside_or_raise(tmp_path_factory, entries):
    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    weight_map = {f"t{i}": e for i, e in enumerate(entries)}
    (folder / checkpoint.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    try:
        files, _ = checkpoint.checkpoint_files(folder)
    except FileNotFoundError as err:                     # a missing shard is reported by name
        assert "lists shard(s) that are not in" in str(err)
        return
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        return
    for f in files:
        assert f.parent == folder and f.resolve().parent == folder.resolve()


# --- trace metadata ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_trace(model, tmp_path_factory) -> tuple[Trace, dict, dict]:
    _, trace = model.run_with_trace(torch.tensor([[5, 9, 3, 17], [1, 2, 3, 4]]),
                                    record=Record(attention=[1], heads=[0, 2], query_positions=[3, 1], experts=True))
    path = trace.save(tmp_path_factory.mktemp("trace") / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return trace, dict(f.metadata()), {n: f.get_tensor(n) for n in f.keys()}


KEYS = ["tokens", "prompt_length", "attention_heads", "attention_query_positions", "metadata"]


@given(edits=st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.just("<delete>"), json_values,
                                                                  st.lists(st.lists(st.text(max_size=2), max_size=5), max_size=3),
                                                                  st.dictionaries(st.sampled_from(["0", "1", "x"]),
                                                                                  st.lists(st.integers(-1, 5), max_size=3), max_size=2))),
                      max_size=2))
@settings(max_examples=60)
def test_trace_metadata_loads_or_raises_value_error(saved_trace, tmp_path_factory, edits):
    trace, header, tensors = saved_trace
    info = json.loads(header["trace"])
    for key, value in edits:
        if value == "<delete>":
            info.pop(key, None)
        else:
            info[key] = value
    header = dict(header, trace=json.dumps(info))
    header["sha256"] = _checksum(tensors, header["trace"])                           # a careless tool re-signs it
    path = tmp_path_factory.mktemp("t") / "t.safetensors"
    with open(path, "wb") as f:
        checkpoint.write_safetensors(f, tensors, header)
    try:
        back = Trace.load(path)
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        assert "is damaged: field" in str(err)
        return
    assert back.allclose(trace, rtol=0, atol=0) or back.tokens != trace.tokens        # tensors as saved
    frame = back.to_frame()                                                            # analysis works on it
    assert len(frame) == trace.n_layers * 2 * 4 * trace.top_k


# --- JSONL lines -------------------------------------------------------------------------------------------------------
line = st.one_of(json_values.map(json.dumps), st.text(max_size=20),
                 st.fixed_dictionaries({"text": st.one_of(st.text(max_size=10), json_scalars)},
                                       optional={"label": json_scalars}).map(json.dumps),
                 st.binary(max_size=12).map(lambda b: b.decode("latin-1")))


@given(lines=st.lists(st.one_of(line, st.binary(min_size=1, max_size=6)), min_size=1, max_size=5))
@settings(max_examples=80)
def test_jsonl_lines_read_or_raise_value_error_naming_the_line(tmp_path_factory, lines):
    import importlib

    rs = importlib.import_module("dbrx_lab.route_stats")
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    raw = b"\n".join(x if isinstance(x, bytes) else x.replace("\n", " ").encode("utf-8", "surrogatepass")
                     for x in lines) + b"\n"
    path.write_bytes(raw)
    try:
        items = list(rs.read_texts(path))
    except Exception as err:                             # noqa: BLE001
        expect_documented_error(err)
        assert f"{path}:" in str(err) or "has no texts" in str(err)
        return
    physical = raw.split(b"\n")
    for item in items:                                                                # accepted: what the line says
        obj = json.loads(physical[item.line - 1].decode("utf-8"))
        assert obj["text"] == item.text and isinstance(item.text, str) and item.text


# --- tokenizer ----------------------------------------------------------------------------------------------------------
text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(list(SPECIAL_TOKENS)),
                          st.sampled_from([" " * 40, "\n\n \t", "  x", "'s", "123456", "\r\n"])), max_size=8).map("".join)


@given(s=text)
@settings(max_examples=100)
def test_encode_fallback_equals_tiktoken(s):
    tok = load_tokenizer()
    ids = tok.encode(s)
    assert _encode_fallback(s, True) == ids
    assert tok.decode(ids) == s.encode("utf-8", "replace").decode("utf-8", "replace")


@given(contents=st.lists(text, min_size=1, max_size=3), system=st.one_of(st.none(), text))
@settings(max_examples=60)
def test_escape_special_never_makes_control_tokens_from_content(contents, system):
    tok = load_tokenizer()
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    safe = tok.apply_chat_template(messages, tokenize=True, escape_special=True)
    turns = len(contents) + 1                                               # the system turn is always there
    assert safe.count(SPECIAL_TOKENS["<|im_start|>"]) == turns + 1 and safe.count(SPECIAL_TOKENS["<|im_end|>"]) == turns
    assert not set(safe) & (set(SPECIAL_TOKENS.values()) - {SPECIAL_TOKENS["<|im_start|>"], SPECIAL_TOKENS["<|im_end|>"]})
    rendered = tok.apply_chat_template(messages)
    assert tok.decode(safe) == rendered.encode("utf-8", "replace").decode("utf-8", "replace")
    if not any(t in m["content"] for m in messages for t in SPECIAL_TOKENS):
        assert safe == tok.apply_chat_template(messages, tokenize=True)              # no special text: the same ids
