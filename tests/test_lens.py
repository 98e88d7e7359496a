"""analysis.logit_lens on tiny random models: the last layer's lens is the model's logits, a middle layer's is
norm_f(resid) @ lm_head.T computed by hand, ranks and top guesses agree with the probabilities, padding and bad
arguments are refused with the valid range, the hooks are gone afterwards (also when the forward raises), and
figures_effects draws its tables."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dbrx_lab import DbrxLM, analysis
from dbrx_lab import figures_effects as fe
from dbrx_lab.config import PRESETS


@pytest.fixture(scope="module")
def model() -> DbrxLM:
    torch.manual_seed(0)
    m = DbrxLM(dataclasses.replace(PRESETS["tiny"], n_layers=3)).eval()
    m.reset_parameters(std=0.3)                                       # peaked, varied distributions
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))


def attached(model) -> dict:
    return {name: p.fns for name, p in model.hook_points.items() if p.fns}


def test_last_layer_is_the_model_logits_exactly(model, ids):
    logits = model(ids).logits.float()
    for batch in (0, 1):
        lens = analysis.logit_lens(model, ids, batch=batch, keep_logits=True)
        assert lens.layers == [-1, 0, 1, 2] and lens.positions == list(range(10))
        assert lens.logits.dtype == torch.float32 and lens.logits.shape == (4, 10, 512)
        assert torch.equal(lens.logits[-1], logits[batch])
        last = lens.table[lens.table.layer == 2].sort_values("position")
        lp = logits[batch].log_softmax(-1)
        target = ids[batch, 1:]
        np.testing.assert_allclose(last.log_prob.to_numpy()[:-1], lp[:-1].gather(-1, target[:, None])[:, 0].numpy(),
                                   rtol=0, atol=1e-6)
        assert (last.top_id.to_numpy() == logits[batch].argmax(-1).numpy()).all()


def test_a_middle_layer_and_the_embeddings_by_hand(model, ids):
    kept = {}
    with model.hooks([("blocks.1.hook_resid_post", lambda x, h: kept.__setitem__("mid", x.clone()))]):
        model(ids)
    norm_f = model.transformer.norm_f
    by_hand = {1: F.layer_norm(kept["mid"][1], (model.config.d_model,), norm_f.weight, None, norm_f.eps)
               @ model.lm_head.weight.T,
               -1: F.layer_norm(model.transformer.wte(ids[1]), (model.config.d_model,), norm_f.weight, None,
                                norm_f.eps) @ model.lm_head.weight.T}                                  # [T, V]
    lens = analysis.logit_lens(model, ids, batch=1, layers=["embed", 1], positions=[2, -3], keep_logits=True)
    assert lens.layers == [-1, 1] and lens.positions == [2, 7]
    for i, layer in enumerate(lens.layers):
        hand = by_hand[layer][[2, 7]]
        torch.testing.assert_close(lens.logits[i], hand, rtol=1e-5, atol=1e-5)
        rows = lens.table[lens.table.layer == layer].sort_values("position")
        lp = hand.log_softmax(-1)
        np.testing.assert_allclose(rows.log_prob, lp.gather(-1, ids[1, [3, 8]][:, None])[:, 0], atol=1e-5)
        np.testing.assert_allclose(rows.prob, np.exp(rows.log_prob), rtol=1e-12)
        assert (rows.target_id.to_numpy() == ids[1, [3, 8]].numpy()).all()
        assert (rows.token_id.to_numpy() == ids[1, [2, 7]].numpy()).all()
    assert torch.equal(model(ids).logits, model(ids).logits)                          # deterministic model


def test_ranks_and_top_guesses_agree_with_the_probabilities(model, ids):
    lens = analysis.logit_lens(model, ids, top_n=7, keep_logits=True)
    table, top = lens.table, lens.top
    assert len(table) == 4 * 10 and len(top) == 4 * 10 * 7
    probs = lens.logits.softmax(-1)                                                  # [L, P, V]
    for row in table.itertuples():
        p = probs[lens.layers.index(row.layer), row.position]
        if row.target_id < 0:                                                        # the last column: no next token
            assert row.position == 9 and np.isnan(row.prob) and row.rank == -1 and row.target is None
            continue
        order = torch.argsort(p, descending=True)                                  # no ties in random floats
        assert row.rank == int((order == row.target_id).nonzero()) + 1
        assert (row.rank == 1) == (row.top_id == row.target_id)
        assert row.top_prob >= row.prob and row.top_prob == pytest.approx(float(p.max()), rel=1e-5)
    for (layer, position), g in top.groupby(["layer", "position"]):
        assert list(g["rank"]) == list(range(1, 8))
        assert (np.diff(g["prob"].to_numpy()) <= 0).all()
        cell = table[(table.layer == layer) & (table.position == position)].iloc[0]
        assert g["token_id"].iloc[0] == cell.top_id and g["prob"].iloc[0] == pytest.approx(cell.top_prob)
        hit = g[g.is_target]
        if cell.target_id >= 0 and cell["rank"] <= 7:                                  # the target is in the top 7
            assert len(hit) == 1 and hit["rank"].iloc[0] == cell["rank"]
        else:
            assert hit.empty


def test_works_under_inference_mode_and_leaves_outputs_and_hooks_alone(model, ids):
    before = model(ids).logits
    with torch.inference_mode():
        lens = analysis.logit_lens(model, ids, keep_logits=True)
        assert torch.equal(lens.logits[-1], model(ids).logits[0])
    assert torch.equal(model(ids).logits, before)
    assert attached(model) == {}


def test_hooks_are_gone_even_when_the_forward_raises(model, ids):
    def boom(x, hook):
        raise RuntimeError("boom inside the forward")

    with model.hooks([("blocks.1.hook_resid_mid", boom)]):
        with pytest.raises(RuntimeError, match="boom"):
            analysis.logit_lens(model, ids)
        assert list(attached(model)) == ["blocks.1.hook_resid_mid"]                  # only the caller's own hook
    assert attached(model) == {}
    with pytest.raises(ValueError, match="layer"):
        analysis.logit_lens(model, ids, layers=[0, 3])
    assert attached(model) == {}
    assert analysis.logit_lens(model, ids).table.prob.notna().sum() == 4 * 9           # still usable afterwards


def test_padding_is_skipped_by_default_and_refused_when_asked_for(model, ids):
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0                                                                  # row 1: left padding
    logits = model(ids, mask).logits.float()
    lens = analysis.logit_lens(model, ids, attention_mask=mask, batch=1, keep_logits=True)
    assert lens.positions == list(range(4, 10)) and set(lens.table.position) == set(range(4, 10))
    assert torch.equal(lens.logits[-1], logits[1, 4:])
    full = analysis.logit_lens(model, ids, attention_mask=mask, batch=0, keep_logits=True)
    assert torch.equal(full.logits[-1], logits[0])
    with pytest.raises(ValueError, match=r"position 2 of batch row 1 is padding; its real tokens are columns 4 to 9"):
        analysis.logit_lens(model, ids, attention_mask=mask, batch=1, positions=[2, 5])
    with pytest.raises(ValueError, match="left padding"):
        analysis.logit_lens(model, ids, attention_mask=mask.flip(-1), batch=1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=10), r"position 10 out of range: valid columns are -10 to 9"),
    (dict(positions=[0, -11]), r"valid columns are -10 to 9"),
    (dict(positions=[]), r"valid columns are -10 to 9"),
    (dict(layers=3), r"layer 3 out of range: valid layers are -1 \(the embeddings, also 'embed'\) to 2"),
    (dict(layers=[-2]), r"valid layers are -1"),
    (dict(layers="resid"), r"valid layers are -1"),
    (dict(batch=2), r"batch 2 out of range: .* valid rows are 0 to 1"),
    (dict(top_n=0), r"top_n must be an int from 1 to the vocabulary size 512"),
])
def test_bad_arguments_name_the_valid_range(model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        analysis.logit_lens(model, ids, **kwargs)


def test_text_input_uses_the_tokenizer():
    from dbrx_lab import load_tokenizer
    torch.manual_seed(0)
    m = DbrxLM(PRESETS["tiny-vocab"]).eval()
    m.tokenizer = tok = load_tokenizer()
    texts = ["Hello there, world", "Hi"]
    lens = analysis.logit_lens(m, texts, batch=1, keep_logits=True)                  # left-padded batch of two
    ids = tok.encode("Hi")
    assert list(lens.table[lens.table.layer == -1].token) == tok.token_strings(ids)
    single = analysis.logit_lens(m, "Hi", keep_logits=True)
    torch.testing.assert_close(lens.logits, single.logits, rtol=1e-4, atol=1e-4)     # padding does not leak in


def test_figures_effects_draw_its_tables(model, ids):
    lens = analysis.logit_lens(model, ids, positions=range(9), top_n=4)
    assert set(fe.LENS_COLUMNS) <= set(lens.table.columns)
    fig = fe.logit_lens_heatmap(lens.table)
    z = np.asarray(fig.data[0].z, dtype=float)
    expected = lens.table.pivot(index="layer", columns="position", values="prob").sort_index()
    np.testing.assert_allclose(z, expected.to_numpy())
    assert list(fig.layout.yaxis.ticktext) == ["embed", "0", "1", "2"]
    rank = fe.logit_lens_heatmap(lens.table, value="rank")
    np.testing.assert_allclose(np.asarray(rank.data[0].z, dtype=float),
                               np.log10(lens.table.pivot(index="layer", columns="position", values="rank")))
    top = lens.top_tokens(5)
    assert top.attrs == dict(position=5, token=str(int(ids[0, 5])), target=str(int(ids[0, 6])))
    assert set(fe.TOP_TOKEN_COLUMNS) <= set(top.columns) and len(top) == 4 * 4
    fig = fe.lens_top_tokens(top)
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float),
                               top.pivot(index="layer", columns="rank", values="prob").sort_index().to_numpy())
    assert len(fig.data[1].x) == int(top.is_target.sum())
    with pytest.raises(ValueError, match=r"position 9 was not read; positions read: \[0, 1, .*8\]"):
        lens.top_tokens(9)
    whole = analysis.logit_lens(model, ids)                                           # with the last column
    fe.logit_lens_heatmap(whole.table)                                                # its blank cells draw too
    assert "target" not in whole.top_tokens().attrs
