from pathlib import Path

import pytest
import torch

from dbrx_lab.tokenizer import DbrxTokenizer, load_tokenizer

REFERENCE_PROMPT = Path("/work/shared/reference/dbrx-instruct/default_system_prompt.txt")
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "dbrx_lab" / "data"
PACKAGE_PROMPT = PACKAGE_DATA / "default_system_prompt.txt"


@pytest.fixture(scope="module")
def tok() -> DbrxTokenizer:
    return load_tokenizer()


def test_load_is_cached(tok):
    assert load_tokenizer() is tok


def test_properties(tok):
    assert tok.vocab_size == 100352
    assert tok.pad_token_id == 100277
    assert tok.im_start_id == 100278
    assert tok.im_end_id == 100279
    assert tok.endoftext_id == 100257
    assert tok.eos_token_ids == [100257, 100279]
    tok.eos_token_ids.append(1)
    assert tok.eos_token_ids == [100257, 100279]


@pytest.mark.parametrize(
    "text, ids",
    [
        ("hello world", [15339, 1917]),
        ("你好", [57668, 53901]),
        ("héllo", [71, 19010, 385]),
        ("", []),
    ],
)
def test_known_cl100k_encodings(tok, text, ids):
    assert tok.encode(text) == ids


def test_special_token_text_becomes_special_token(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|><|pad|><|endoftext|>")
    assert ids == [100278, 882, 198, 6151, 100279, 100277, 100257]
    for text, i in [("<|fim_prefix|>", 100258), ("<|fim_middle|>", 100259),
                    ("<|fim_suffix|>", 100260), ("<|endofprompt|>", 100276)]:
        assert tok.encode(text) == [i]


def test_no_bos_or_eos_added(tok):
    ids = tok.encode("hello")
    assert ids == [15339]


def test_roundtrip(tok):
    text = "Mixture of experts 🎉 — 你好世界 <|im_end|> tabs\tand\nnewlines"
    assert tok.decode(tok.encode(text)) == text


def test_decode_accepts_tensor_and_int(tok):
    assert tok.decode(torch.tensor([15339, 1917])) == "hello world"
    assert tok.decode(15339) == "hello"
    assert tok.decode(torch.tensor(1917)) == " world"


def test_decode_specials_and_skip(tok):
    ids = [100278, 15339, 100279, 100277]
    assert tok.decode(ids) == "<|im_start|>hello<|im_end|><|pad|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_decode_padding_rows_and_unused_ids(tok):
    assert tok.decode([100300]) == "<|extra_100300|>"
    assert tok.decode([100351, 100280]) == "<|extra_100351|><|extra_100280|>"
    assert tok.decode([100256]) == "<|extra_100256|>"
    assert tok.decode([15339, 100300, 100351], skip_special_tokens=True) == "hello"
    assert tok.token_strings([100300, 100257]) == ["<|extra_100300|>", "<|endoftext|>"]


def test_decode_partial_utf8_replaces(tok):
    first = tok.encode("🎉")[0]
    assert tok.decode([first]) == "\ufffd"


@pytest.mark.parametrize("bad", [[-1], [100352], [15339, 10**9], torch.tensor([100352])])
def test_out_of_range_ids_raise(tok, bad):
    with pytest.raises(ValueError, match="outside"):
        tok.decode(bad)
    with pytest.raises(ValueError, match="outside"):
        tok.token_strings(bad)


def test_non_integer_ids_raise(tok):
    with pytest.raises(ValueError):
        tok.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        tok.decode([1.5])
    with pytest.raises(ValueError):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_batch_decode(tok):
    batch = tok(["hello world", "hi"])
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["hello world", "hi"]


# ----------------------------------------------------------------- batching
def test_left_padding_and_mask(tok):
    out = tok(["hello world", "hello", "<|im_start|>a b c"])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    lens = [len(tok.encode(t)) for t in ["hello world", "hello", "<|im_start|>a b c"]]
    width = max(lens)
    assert ids.shape == mask.shape == (3, width)
    for b, n in enumerate(lens):
        assert mask[b].tolist() == [0] * (width - n) + [1] * n
        assert ids[b, : width - n].tolist() == [tok.pad_token_id] * (width - n)
    assert ids[0].tolist() == [100277, 100277, 15339, 1917]
    assert ids[1].tolist() == [100277, 100277, 100277, 15339]


def test_single_string_and_batch_encode(tok):
    out = tok("hello world")
    assert out["input_ids"].tolist() == [[15339, 1917]]
    assert out["attention_mask"].tolist() == [[1, 1]]
    out2 = tok.batch_encode(["hello world", "hello"])
    assert torch.equal(out2["input_ids"], tok(["hello world", "hello"])["input_ids"])


def test_max_length_truncates(tok):
    out = tok.batch_encode(["hello world again", "hello"], max_length=2)
    assert out["input_ids"].tolist() == [[15339, 1917], [100277, 15339]]
    with pytest.raises(ValueError):
        tok.batch_encode(["x"], max_length=0)


def test_return_lists_and_no_padding(tok):
    out = tok(["hello world", "hello"], padding=False, return_tensors=None)
    assert out["input_ids"] == [[15339, 1917], [15339]]
    assert out["attention_mask"] == [[1, 1], [1]]
    with pytest.raises(ValueError, match="padding"):
        tok(["hello world", "hello"], padding=False)
    with pytest.raises(ValueError):
        tok("x", return_tensors="np")


def test_batch_errors(tok):
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="empty"):
        tok.batch_encode([])
    with pytest.raises(ValueError, match="empty"):
        tok(["hello", ""])
    with pytest.raises(TypeError):
        tok(["hello", 3])
    with pytest.raises(TypeError):
        tok.encode(None)


# ----------------------------------------------------------------- token strings
def test_token_strings_one_per_token_cjk(tok):
    ids = tok.encode("你好，世界。DBRX 混合专家模型 🎉🙂")
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids)
    assert all(isinstance(s, str) and s for s in strings)
    for i, s in zip(ids, strings):
        if _is_complete(tok, i):
            assert s == tok.decode([i])


def test_token_strings_complete_tokens_join_to_text(tok):
    text = "中文 hello world, 你好。"
    ids = tok.encode(text)
    assert all(_is_complete(tok, i) for i in ids)
    assert "".join(tok.token_strings(ids)) == text


def test_token_strings_partial_utf8_uses_hex_escapes(tok):
    ids = tok.encode("🎉 世")
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids)
    assert strings[:3] == ["\\xf0\\x9f", "\\x8e", "\\x89"]
    assert strings[3] == " "
    partial = [s for i, s in zip(ids, strings) if not _is_complete(tok, i)]
    assert partial and all(s.startswith("\\x") for s in partial)


def test_token_strings_whitespace_and_specials(tok):
    ids = tok.encode("<|im_start|>user\nhi\tthere<|im_end|>")
    strings = tok.token_strings(ids)
    assert strings[0] == "<|im_start|>" and strings[-1] == "<|im_end|>"
    assert "\\n" in strings
    assert "\n" not in "".join(strings)
    assert "".join(tok.token_strings(ids, escape_whitespace=False)) == (
        "<|im_start|>user\nhi\tthere<|im_end|>"
    )
    assert tok.convert_ids_to_tokens(ids) == strings
    assert tok.token_strings(torch.tensor([15339, 1917])) == ["hello", " world"]


def _is_complete(tok, i):
    try:
        tok._bytes[i].decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ----------------------------------------------------------------- chat template
def test_packaged_system_prompt_matches_reference(tok):
    if not REFERENCE_PROMPT.exists():
        pytest.skip("reference dbrx-instruct files not available")
    assert PACKAGE_PROMPT.read_bytes() == REFERENCE_PROMPT.read_bytes()
    assert tok.default_system_prompt == REFERENCE_PROMPT.read_text(encoding="utf-8")


def test_packaged_system_prompt_text(tok):
    assert tok.default_system_prompt == PACKAGE_PROMPT.read_text(encoding="utf-8")
    assert len(PACKAGE_PROMPT.read_bytes()) == 896
    assert tok.default_system_prompt.startswith("You are DBRX, a Databricks creation")


def test_chat_template_user_only_uses_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    expected = (
        "<|im_start|>system\n" + tok.default_system_prompt.strip() + "<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == expected
    assert text.endswith("usually that means not mentioning this.<|im_end|>\n"
                         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_explicit_system_multi_turn(tok):
    messages = [
        {"role": "system", "content": "  You are terse.\n"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": " Bye \n"},
    ]
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n Bye \n<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected[
        : -len("\n<|im_start|>assistant\n")
    ]


def test_chat_template_without_default_prompt_and_later_system(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": " mid "},
        {"role": "user", "content": "b"},
    ]
    assert tok.apply_chat_template(messages, use_default_system_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>system\n mid <|im_end|>\n"
        "<|im_start|>user\nb<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_tokenize(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == tok.im_start_id
    assert ids.count(tok.im_start_id) == 3
    assert ids.count(tok.im_end_id) == 2
    assert ids[-3:] == [tok.im_start_id, 78191, 198]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ({"role": "user", "content": "x"}, "list"),
        (["hello"], "dict"),
        ([{"role": "user"}], "content"),
        ([{"content": "x"}], "role"),
        ([{"role": "bot", "content": "x"}], "role"),
        ([{"role": "user", "content": None}], "str"),
        ([{"role": "system", "content": "only"}], "system"),
    ],
)
def test_chat_template_validation(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)
