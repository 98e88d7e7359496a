import dataclasses

import pytest
import torch

from dbrx_lab import DbrxLM
from dbrx_lab.generation import Step, greedy


def new_tokens(out, prompt):
    return out[:, prompt.shape[1]:]


def test_greedy_equals_hf(hf_pair, make_ids):
    hf, ours = hf_pair
    ids = make_ids(2, 5, seed=11)
    ref = hf.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=15, eos_token_id=[]), ref)


@pytest.mark.parametrize("variant", [{}, {"clip_qkv": None, "kv_n_heads": 4, "moe_top_k": 3}])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_step_equals_a_cached_forward(tiny_cfg, widen, make_ids, variant, padded, two_threads):
    """decode_step (generation's inner loop) computes what forward(last_only) computes, cache included."""
    model = widen(DbrxLM(dataclasses.replace(tiny_cfg, **variant))).eval()
    ids = make_ids(2, 6)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    caches = [model.new_cache(2, 9), model.new_cache(2, 9)]
    with torch.no_grad():
        for c in caches:
            model(ids, mask[:, :6], cache=c, last_only=True)
        for pos, tok in zip(range(6, 9), make_ids(3, 2, seed=5)):
            ref = model(tok[:, None], mask[:, :pos + 1], cache=caches[0], start=pos, last_only=True).logits[:, -1]
            out = model.decode_step(tok, caches[1], pos, mask[:, :pos + 1])
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(*caches):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_decode_step_calls_every_hook_point_as_forward_does(tiny_model, make_ids, two_threads):
    """Hooks on all points (patterns and per-expert outputs included) see the same names, shapes and values in
    decode_step as in forward, and a hook that replaces a value changes the logits alike."""
    ids, tok = make_ids(1, 5), make_ids(1, 1, seed=3)[0]
    caches = [tiny_model.new_cache(1, 6), tiny_model.new_cache(1, 6)]
    runs = []
    with torch.no_grad():
        for c in caches:
            tiny_model(ids, cache=c)
        for run in (lambda: tiny_model(tok[:, None], cache=caches[0], start=5, last_only=True).logits[:, -1],
                    lambda: tiny_model.decode_step(tok, caches[1], 5)):
            seen = []
            hooks = [("*", lambda t, h: seen.append((h.name, t.clone(), h.ctx.positions.tolist(), h.ctx.is_prefill))),
                     ("blocks.0.hook_ffn_out", lambda t, h: t * 0.5)]
            with tiny_model.hooks(hooks):
                runs.append((run(), seen))
    (ref, ref_seen), (out, seen) = runs
    assert len(ref_seen) == len(tiny_model.hook_names()) and [s[0] for s in seen] == [s[0] for s in ref_seen]
    for (name, a, pos_a, pre_a), (_, b, pos_b, pre_b) in zip(ref_seen, seen):
        assert a.shape == b.shape and (pos_a, pre_a) == (pos_b, pre_b) == ([[5]], False), name
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_generation_uses_decode_step_unless_intervening_or_training(tiny_model, make_ids):
    from dbrx_lab import ExpertAblation

    calls = []
    step = tiny_model.decode_step
    tiny_model.decode_step = lambda *a: calls.append(a[2]) or step(*a)
    ids = make_ids(1, 4)
    try:
        plain = tiny_model.generate(ids, max_new_tokens=5)
        assert calls == [4, 5, 6, 7]                                   # every step after the prefill
        seen = []
        with tiny_model.hooks([("blocks.1.ffn.hook_topk_experts", lambda t, h: seen.append(t))]):
            hooked = tiny_model.generate(ids, max_new_tokens=5)
        assert len(calls) == 8 and len(seen) == 5                      # hooks fire in decode_step too
        with tiny_model.intervene(ExpertAblation(layer=1, experts=0)):
            tiny_model.generate(ids, max_new_tokens=5)
            assert not tiny_model.decode_step_applies()
        assert len(calls) == 8                                         # interventions take forward
        tiny_model.train()
        assert not tiny_model.decode_step_applies()
    finally:
        del tiny_model.decode_step
    assert torch.equal(plain, hooked)


def test_greedy_is_argmax_of_full_forward(tiny_model, make_ids):
    ids = make_ids(1, 4)
    out = tiny_model.generate(ids, max_new_tokens=6)
    with torch.no_grad():
        logits = tiny_model(out).logits
    assert torch.equal(logits[0, 3:-1].argmax(-1), out[0, 4:])


def near_tied_unembedding(V: int = 4096, d: int = 64, B: int = 24, seed: int = 0):
    """(lm_head weight [V, d], x [B, d]) where, for row b of x, a second weight row is within ~1e-4 relative
    of the largest logit (above it for odd b, below for even b) but ~5 int8 steps away from the best row
    across x, so the two round differently. The int8 product alone cannot tell them apart."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g) * (0.1 + torch.rand(V, 1, generator=g))     # rows of varied scale
    x = torch.randn(B, d, generator=g) * (0.5 + 4 * torch.rand(B, 1, generator=g))
    for b in range(B):
        best = int((x[b] @ weight.T).argmax())
        unit = x[b] / x[b].norm()
        across = torch.randn(d, generator=g)
        across -= (across @ unit) * unit                                        # orthogonal to x[b]
        step = float(weight[best].abs().max()) / 127
        row = V - 1 - b
        shift = (1e-4 if b % 2 else -1e-4) * float(x[b] @ weight[best]) / float(x[b].norm())
        weight[row] = weight[best] + 5 * step * across / across.abs().max() + shift * unit
    return weight, x


def coarse_row_unembedding(V: int = 4096, d: int = 64, B: int = 4, seed: int = 1):
    """(lm_head weight [V, d], x [B, d]) where, for row b of x, row k of the weight wins by 1e-4 relative
    over row j, but k has one huge entry (where x is 0), so its int8 step is coarse, and every other entry
    sits just short of a rounding midpoint, so its int8 logit falls ~10% below; the int8 product picks j."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, d, generator=g)
    x = torch.randn(B, d, generator=g)
    x[:, 0] = 0
    for b in range(B):
        j, k = V - 1 - 2 * b, V - 2 - 2 * b
        base = weight[int((x[b] @ weight.T).argmax())].clone()
        top = float(x[b] @ base)
        huge = 0.1 * top * 127 / (0.45 * float(x[b].abs().sum()))
        step = float(torch.tensor(huge * (1 + 2.0 ** -7) / 127).bfloat16())     # k's int8 step (UnembedScreen)
        row = ((base / step).round() + 0.45 * x[b].sign()) * step
        row[0] = huge
        weight[k] = row
        exact_k = float(x[b] @ row)
        weight[j] = base + (exact_k * (1 - 1e-4) - top) * x[b] / float(x[b] @ x[b])
    return weight, x


@pytest.mark.parametrize("case", [near_tied_unembedding, coarse_row_unembedding])
def test_unembed_screen_finds_the_float32_argmax(case, two_threads):
    from dbrx_lab.generation import UnembedScreen
    from dbrx_lab.model import linear

    weight, x = case()
    ref = greedy(linear(x, weight))
    screen = UnembedScreen(weight)
    int8_only = torch._weight_int8pack_mm(x.bfloat16(), screen.q, screen.scale).float().argmax(-1)
    assert (int8_only != ref).sum() >= 4                                         # the int8 product alone errs
    assert torch.equal(screen.greedy(x, weight), ref)                           # batched
    assert torch.equal(torch.cat([screen.greedy(row[None], weight) for row in x]), ref)
    for bad in (float("inf"), float("nan")):                                    # full product; NaN wins as in argmax
        y = x[:3].clone()
        y[1, 5] = bad
        assert torch.equal(screen.greedy(y, weight), greedy(linear(y, weight)))


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_with_the_screen_equals_the_full_product(tiny_vocab_model, batch, two_threads):
    """The demo-sized vocabulary (100352 x 64) takes the screen by default; same tokens and step logits without."""
    from dbrx_lab.generation import unembed_screen

    model = tiny_vocab_model
    ids = torch.randint(0, 100352, (batch, 7), generator=torch.Generator().manual_seed(batch))
    runs = []
    try:
        for flag in (None, False):
            model.screen_greedy = flag
            assert (unembed_screen(model) is not None) == (flag is None)
            steps = []
            runs.append((model.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=steps.append), steps))
    finally:
        model.screen_greedy = None
    (screened, steps), (full, ref_steps) = runs
    assert torch.equal(screened, full)
    for s, r in zip(steps, ref_steps):
        torch.testing.assert_close(s.logits, r.logits, atol=1e-5, rtol=0)


def test_the_screen_follows_in_place_edits_of_lm_head(tiny_model, make_ids):
    """An edit through `.data` (which autograd's version counter does not see) still rebuilds the int8 copy."""
    import copy

    tiny_model.screen_greedy = True
    ids = make_ids(1, 4, seed=1)
    before = tiny_model.generate(ids, max_new_tokens=4)[0, 4:].tolist()
    second, unused = before[1], next(t for t in range(512) if t not in before)
    w = tiny_model.lm_head.weight
    w.data[[second, unused]] = w.data[[unused, second]]                            # swap two rows in place
    reference = copy.deepcopy(tiny_model)
    reference.screen_greedy = False
    after = tiny_model.generate(ids, max_new_tokens=4)
    assert after[0, 5] == unused and torch.equal(after, reference.generate(ids, max_new_tokens=4))


def test_sampling_reproducible_with_seed(tiny_model, make_ids):
    ids = make_ids(2, 4)
    kw = dict(max_new_tokens=20, do_sample=True, temperature=1.5)
    a = tiny_model.generate(ids, seed=1, **kw)
    assert torch.equal(a, tiny_model.generate(ids, seed=1, **kw))
    assert not torch.equal(a, tiny_model.generate(ids, seed=2, **kw))
    assert not torch.equal(a, tiny_model.generate(ids, max_new_tokens=20))        # not greedy


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_model, make_ids):
    ids = make_ids(2, 4, seed=3)
    greedy = tiny_model.generate(ids, max_new_tokens=10)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=0,
                                           temperature=3.0), greedy)


def test_top_k_restricts_samples(tiny_model, make_ids):
    ids = make_ids(1, 4)
    steps = list(tiny_model.stream(ids, max_new_tokens=8, do_sample=True, top_k=3, temperature=5.0, seed=0))
    for step in steps:
        assert int(step.tokens[0]) in step.logits[0].topk(3).indices.tolist()


def test_stops_at_eos(tiny_model, make_ids):
    ids = make_ids(1, 4, seed=4)
    greedy = new_tokens(tiny_model.generate(ids, max_new_tokens=12), ids)[0].tolist()
    i = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    out = tiny_model.generate(ids, max_new_tokens=12, eos_token_id=greedy[i])
    assert new_tokens(out, ids)[0].tolist() == greedy[:i + 1]                      # eos included, then stop


def test_finished_rows_are_padded(tiny_model, make_ids):
    ids = make_ids(2, 4, seed=5)
    greedy = new_tokens(tiny_model.generate(ids, max_new_tokens=10), ids)
    row0, row1 = greedy.tolist()
    i = next(i for i, t in enumerate(row0) if 1 <= i <= 6 and t not in row0[:i] and t not in row1)
    eos = row0[i]
    out = new_tokens(tiny_model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0), ids)
    assert out[0].tolist() == row0[:i + 1] + [0] * (9 - i)
    assert torch.equal(out[1], greedy[1])                                           # other row unaffected
    # the default pad is the first eos id inside the vocabulary (100257 is not a row of this model)
    out = new_tokens(tiny_model.generate(ids, max_new_tokens=10, eos_token_id=[100257, eos]), ids)
    assert out[0].tolist() == row0[:i + 1] + [eos] * (9 - i)
    with pytest.raises(ValueError, match=r"pad_token_id 600 outside the vocabulary \[0, 511\]"):
        tiny_model.generate(ids, max_new_tokens=2, pad_token_id=600)


def test_left_padded_batch_equals_per_row(tiny_model, make_ids):
    rows = [make_ids(1, n, seed=n)[0] for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    batch = new_tokens(tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10), ids)
    for b, r in enumerate(rows):
        alone = new_tokens(tiny_model.generate(r[None], max_new_tokens=10), r[None])
        assert torch.equal(batch[b], alone[0]), f"row {b}"


def test_streamer_gets_every_token_in_order(tiny_model, make_ids):
    ids = make_ids(2, 4)
    steps = []
    out = tiny_model.generate(ids, max_new_tokens=7, streamer=steps.append)
    assert [s.index for s in steps] == list(range(7))
    assert [s.position for s in steps] == list(range(4, 11))
    assert torch.equal(torch.stack([s.tokens for s in steps], dim=1), new_tokens(out, ids))
    assert all(isinstance(s, Step) and s.logits.shape == (2, 512) and s.logits.dtype == torch.float32 for s in steps)
    assert torch.equal(steps[-1].finished, torch.zeros(2, dtype=torch.bool))


def test_stream_iterator(tiny_model, make_ids):
    ids = make_ids(1, 4)
    it = tiny_model.stream(ids, max_new_tokens=5)
    first = next(it)
    assert first.index == 0 and first.tokens.shape == (1,)
    rest = list(it)
    assert len(rest) == 4
    tokens = torch.stack([first.tokens] + [s.tokens for s in rest], dim=1)
    assert torch.equal(tokens, new_tokens(tiny_model.generate(ids, max_new_tokens=5), ids))


def test_stream_stop_callback_and_zero_tokens(tiny_model, make_ids):
    ids = make_ids(1, 4)
    count = []
    steps = list(tiny_model.stream(ids, max_new_tokens=10, stop=lambda: len(count) >= 3 or count.append(1)))
    assert len(steps) == 4
    assert list(tiny_model.stream(ids, max_new_tokens=0)) == []
    assert torch.equal(tiny_model.generate(ids, max_new_tokens=0), ids)


def test_string_and_chat_prompts(tiny_vocab_model):
    tok = tiny_vocab_model.tokenizer
    prompt = tok.encode("The capital of France is")
    out = tiny_vocab_model.generate("The capital of France is", max_new_tokens=4)
    assert out.shape == (1, len(prompt) + 4) and out[0, :len(prompt)].tolist() == prompt
    chat = [{"role": "user", "content": "Hi!"}]
    templated = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    out = tiny_vocab_model.generate(chat, max_new_tokens=3)
    assert out[0, :len(templated)].tolist() == templated and templated[-3:] == tok.encode("<|im_start|>assistant\n")
    batch = tiny_vocab_model.generate(["a b c d", "hi"], max_new_tokens=3)            # left-padded with <|pad|>
    assert batch[1, 0] == tok.pad_token_id
    assert torch.equal(batch[1, -3:], tiny_vocab_model.generate("hi", max_new_tokens=3)[0, -3:])
    continuation = tiny_vocab_model.generate("The capital of France is", max_new_tokens=4)[0, len(prompt):]
    text = tiny_vocab_model.generate_text("The capital of France is", max_new_tokens=4)
    assert text == tok.decode(continuation.tolist())


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=1, temperature=0), r"temperature must be a number > 0"),
    (dict(max_new_tokens=1, temperature=-1.0), r"temperature must be a number > 0"),
    (dict(max_new_tokens=1, do_sample=True, top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=1, do_sample=True, top_p=1.5), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=1, do_sample=True, top_k=0), r"top_k must be None or an integer >= 1"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=253), r"prompt \(4 tokens\) \+ max_new_tokens \(253\) exceeds max_seq_len=256"),
])
def test_bad_generation_arguments(tiny_model, make_ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(make_ids(1, 4), **kwargs)


@pytest.mark.parametrize("prompt, message", [
    (torch.zeros(1, 257, dtype=torch.long), "longer than max_seq_len=256"),
    (torch.tensor([[3, 600]]), r"token id 600 outside the vocabulary \[0, 511\]"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    ([], "empty"),
])
def test_bad_prompts(tiny_model, prompt, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(prompt, max_new_tokens=1)


def test_right_padding_rejected(tiny_model, make_ids):
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        tiny_model.generate(make_ids(1, 4), attention_mask=mask, max_new_tokens=1)


def test_greedy_equals_argmax_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100352, generator=g)
    logits[1, [5000, 70000]] = 50.0                        # tie across chunks: the first one wins
    logits[2, [7, 8]] = 50.0                               # tie inside a chunk
    logits[3, [300, 90000]] = float("nan")                 # NaN counts as the maximum, first NaN wins
    assert greedy(logits).tolist() == logits.argmax(-1).tolist() == [int(logits[0].argmax()), 5000, 7, 300]
    odd = torch.randn(2, 5000, generator=g)                # not a multiple of the chunk: plain argmax
    assert torch.equal(greedy(odd), odd.argmax(-1))
