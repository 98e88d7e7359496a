"""`dbrx-lab route-stats`: input parsing, tables against direct analysis, resume, bad input, CLI."""
import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from dbrx_lab import analysis, cli
from dbrx_lab.trace import Record

rs = importlib.import_module("dbrx_lab.route_stats")   # the module (dbrx_lab.route_stats is the function)
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang over trees".split()


@pytest.fixture(scope="module")
def model(text_model):
    return text_model                                          # conftest: DBRX's vocabulary, 8 experts


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(n)]


def write_jsonl(path, items, labels=True):
    with open(path, "w") as f:
        for i, t in enumerate(items):
            f.write(json.dumps({"text": t, "label": "ab"[i % 2]} if labels else {"text": t}) + "\n")
    return path


def run(model, data, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("min_count", 2)
    return rs.route_stats(model, data, out, **kw)


# ------------------------------------------------------------------------------------------------
def test_read_texts_formats_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nsecond line\n\n\nnext one\n   \nlast\n")
    items = list(rs.read_texts(txt))
    assert [(i.index, i.line, i.text) for i in items] == [(0, 1, "first para\nsecond line"), (1, 5, "next one"),
                                                         (2, 7, "last")]
    assert [i.text for i in rs.read_texts(txt, split="line")] == ["first para", "second line", "next one", "last"]
    js = tmp_path / "b.jsonl"
    js.write_text('{"text": "x", "label": "code"}\n\n{"text": "y", "domain": 3}\n{"text": "z"}\n')
    assert [(i.line, i.text, i.label) for i in rs.read_texts(js)] == [(1, "x", "code"), (3, "y", "3"), (4, "z", None)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rs.read_texts(tmp_path / "missing.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ValueError, match=".jsonl .* or a .txt"):
        rs.read_texts(tmp_path / "c.csv")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="has no texts"):
        list(rs.read_texts(tmp_path / "empty.txt"))
    bad = tmp_path / "bad.jsonl"
    for content, message in [('{"text": "ok"}\n{"text": "x"\n', r"bad.jsonl:2: malformed JSON"),
                             ('{"text": "ok"}\n\n["x"]\n', r'bad.jsonl:3: expected an object with a string "text"'),
                             ('{"text": ""}\n', r'bad.jsonl:1: "text" is empty')]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            list(rs.read_texts(bad))
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid UTF-8"):
        list(rs.read_texts(bad))


def test_tables_match_direct_analysis(model, tmp_path):
    items = texts(11)
    data = write_jsonl(tmp_path / "d.jsonl", items)
    res = run(model, data, tmp_path / "out", batch_size=3, part_tokens=20)
    tok, L = model.tokenizer, model.config.n_layers
    encoded = [tok.encode(t) for t in items]
    assert res.texts == 11 and res.tokens == sum(map(len, encoded)) == res.new_tokens
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["parts"]) > 1                                                # several committed parts
    df = analysis.load_routing(tmp_path / "out")
    assert len(df) == res.tokens * L and df.attrs["n_experts"] == 8
    assert not df.duplicated(["text", "position", "layer"]).any()
    traces = []
    for i, ids in enumerate(encoded):
        rows = df[df["text"] == i].sort_values(["position", "layer"])
        assert rows["position"].unique().tolist() == list(range(len(ids)))       # positions within the text
        first = rows[rows["layer"] == 0]
        assert first["token_id"].tolist() == ids and (rows["label"] == "ab"[i % 2]).all()
        assert first["next_id"].tolist() == ids[1:] + [-1]
        out, tr = model.run_with_trace(torch.tensor([ids]), record=Record(router=True))
        traces.append(tr)
        assert first["predicted_id"].tolist() == out.logits[0].argmax(-1).tolist()
        experts = rows[["expert_0", "expert_1"]].to_numpy().reshape(len(ids), L, 2)
        assert np.array_equal(experts, tr.topk_experts[:, 0].permute(1, 0, 2).numpy())   # padding did not leak
    read = lambda name: pd.read_parquet(tmp_path / "out" / f"{name}.parquet")  # noqa: E731
    labels = ["ab"[i % 2] for i in range(11)]
    check = dict(check_dtype=False, rtol=1e-4)
    pd.testing.assert_frame_equal(read("load"), analysis.expert_load(traces), **check)
    pd.testing.assert_frame_equal(read("repetition"), analysis.routing_repetition(traces), **check)
    pd.testing.assert_frame_equal(read("coactivation"), analysis.coactivation(traces), **check)
    pd.testing.assert_frame_equal(read("transitions"), analysis.layer_transitions(traces), **check)
    pd.testing.assert_frame_equal(read("domain"), analysis.domain_specialization(traces, labels=labels), **check)
    pd.testing.assert_frame_equal(read("confidence"), analysis.confidence_summary(traces), check_dtype=False,
                                  atol=2e-3)                                          # histogram bins
    vocab = analysis.vocab_specialization(traces, min_count=2)
    pd.testing.assert_frame_equal(read("vocab_input"), vocab, **check)
    assert len(vocab) and read("vocab_predicted")["occurrences"].min() >= 2
    assert read("top_tokens")["share_of_token"].between(0, 1).all()


def test_resume_after_interruption_has_no_duplicates(model, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", texts(14, seed=1), labels=False)
    clean = run(model, data, tmp_path / "clean", batch_size=2, part_tokens=15)
    want = analysis.load_routing(tmp_path / "clean")

    calls = []
    original = rs._route_batch

    def flaky(model_, tok, items, *args):
        calls.append([it.index for it in items])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(model_, tok, items, *args)

    monkeypatch.setattr(rs, "_route_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(model, data, tmp_path / "out", batch_size=2, part_tokens=15)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    done = manifest["texts_done"]
    assert 0 < done < 8                                           # committed parts only; the open part is lost
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "out" / "routing").iterdir())
    calls.clear()
    res = run(model, data, tmp_path / "out", batch_size=2, part_tokens=15)
    assert calls[0][0] == done and res.new_tokens < clean.tokens                   # resumed, not restarted
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out" / "routing").iterdir())
    pd.testing.assert_frame_equal(analysis.load_routing(tmp_path / "out"), want)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out" / "load.parquet"),
                                  pd.read_parquet(tmp_path / "clean" / "load.parquet"))
    calls.clear()
    again = run(model, data, tmp_path / "out", batch_size=2)                          # complete: nothing to do
    assert calls == [] and again.new_tokens == 0 and again.tokens == clean.tokens


def test_bad_line_keeps_earlier_texts_and_resumes(model, tmp_path):
    items = texts(9, seed=2)
    lines = [json.dumps({"text": t}) for t in items]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n")
    bad = tmp_path / "d.jsonl"
    bad.write_text("\n".join(lines[:4] + ['{"text": oops}'] + lines[5:]) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:5: malformed JSON"):
        run(model, bad, tmp_path / "out", batch_size=3)
    kept = analysis.load_routing(tmp_path / "out")
    assert sorted(kept["text"].unique()) == [0, 1, 2, 3]                             # everything before line 5
    bad.write_text(good.read_text())
    res = run(model, bad, tmp_path / "out", batch_size=3)
    run(model, good, tmp_path / "clean", batch_size=3)
    assert res.texts == 9
    pd.testing.assert_frame_equal(analysis.load_routing(tmp_path / "out"), analysis.load_routing(tmp_path / "clean"),
                                  atol=1e-5)                                          # other batches, other padding


def test_long_texts_error_or_truncate(model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("a b\n\none two three four five six seven eight\n")
    with pytest.raises(ValueError, match=r"d.txt:3: text of 8 tokens is longer than the limit of 5.*--truncate"):
        run(model, data, tmp_path / "out", max_tokens_per_text=5)
    assert analysis.load_routing(tmp_path / "out")["text"].unique().tolist() == [0]
    res = run(model, data, tmp_path / "trunc", max_tokens_per_text=5, truncate=True)
    assert res.tokens == 2 + 5
    with pytest.raises(ValueError, match=r"max_tokens_per_text must be in \[1, 64\]"):
        run(model, data, tmp_path / "x", max_tokens_per_text=65)


def test_changed_settings_or_data_refuse_to_resume(model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", texts(4, seed=3))
    run(model, data, tmp_path / "out")
    with pytest.raises(ValueError, match="other settings .*max_tokens_per_text.*--overwrite"):
        run(model, data, tmp_path / "out", max_tokens_per_text=30)
    write_jsonl(data, texts(4, seed=4))
    with pytest.raises(ValueError, match="first 4 texts .* changed"):
        run(model, data, tmp_path / "out")
    write_jsonl(data, texts(3, seed=4), labels=False)
    res = run(model, data, tmp_path / "out", resume=False)
    assert res.texts == 3 and not (tmp_path / "out" / "domain.parquet").exists()     # stale table removed


def test_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"route-stats": cli.COMMANDS["route-stats"]})   # only this sub-command
    main = cli.main
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(texts(5, seed=5)) + "\n")
    out = tmp_path / "out"
    assert main(["route-stats", "--model", "tiny-vocab", "--data", str(data), "--out", str(out),
                 "--batch-size", "4", "--no-progress"]) == 0
    assert "5 texts" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["texts"] == 5
    assert (out / "load.parquet").is_file() and (out / "vocab_predicted.parquet").is_file()
    assert main(["route-stats", "--model", "tiny-vocab", "--data", str(data), "--out", str(tmp_path / "fast"),
                 "--no-predictions", "--no-progress"]) == 0
    assert (analysis.load_routing(tmp_path / "fast")["predicted_id"] == -1).all()
    assert not (tmp_path / "fast" / "vocab_predicted.parquet").exists()
    assert (tmp_path / "fast" / "vocab_input.parquet").is_file()
    assert main(["route-stats", "--model", "tiny-vocab", "--data", str(tmp_path / "nope.jsonl"),
                 "--out", str(out), "--no-progress"]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert main(["route-stats", "--model", "tiny", "--data", str(data), "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 2
    assert "real-vocabulary model" in capsys.readouterr().err
