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
def test_generation_steps_are_cached_forwards(tiny_cfg, widen, make_ids, variant, padded, two_threads):
    """Generation's inner loop is a plain cached `model(tok[:, None], cache=..., start=pos, last_only=True)`:
    the steps' logits equal such a manual loop bit for bit, and equal an uncached forward over the whole
    sequence; the manual loop's cache equals the one a single prefill of all tokens fills."""
    model = widen(DbrxLM(dataclasses.replace(tiny_cfg, **variant))).eval()
    ids = make_ids(2, 6)
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    steps = list(model.stream(ids, 4, attention_mask=mask[:, :6], eos_token_id=[]))
    new = torch.stack([s.tokens for s in steps], dim=1)                              # [2, 4]
    full_ids = torch.cat([ids, new[:, :3]], dim=1)                                   # [2, 9]
    cache, prefilled = model.new_cache(2, 9), model.new_cache(2, 9)
    with torch.no_grad():
        manual = [model(ids, mask[:, :6], cache=cache, last_only=True).logits[:, -1]]
        for pos, tok in zip(range(6, 9), new.T):
            manual.append(model(tok[:, None], mask[:, :pos + 1], cache=cache, start=pos, last_only=True).logits[:, -1])
        full = model(full_ids, mask).logits                                          # [2, 9, V]
        model(full_ids, mask, cache=prefilled)
    for i, (step, ref) in enumerate(zip(steps, manual)):
        assert torch.equal(step.logits, ref.float()), i                              # the same calls
        torch.testing.assert_close(ref, full[:, 5 + i], atol=1e-4, rtol=1e-4)        # = an uncached forward
    assert torch.equal(new, torch.stack([m.argmax(-1) for m in manual], dim=1))
    for a, b in zip(cache, prefilled):
        torch.testing.assert_close(a.k, b.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.v, b.v, atol=1e-5, rtol=1e-5)


def test_generation_steps_call_every_hook_point_as_forward_does(tiny_model, make_ids, two_threads):
    """Hooks on all points (patterns and per-expert outputs included) see the same names, shapes and values in
    a generation step as in a manual cached forward, and a hook that replaces a value changes the logits
    alike (in the prefill too: the generated token depends on it)."""
    ids = make_ids(1, 5)
    runs = []
    with torch.no_grad():
        for generated in (False, True):
            seen = []
            hooks = [("*", lambda t, h: seen.append((h.name, t.clone(), h.ctx.positions.tolist(), h.ctx.is_prefill))),
                     ("blocks.0.hook_ffn_out", lambda t, h: t * 0.5)]
            with tiny_model.hooks(hooks):
                if generated:
                    steps = list(tiny_model.stream(ids, 2, eos_token_id=[]))
                    logits = steps[1].logits                                         # the step at column 5
                else:
                    cache = tiny_model.new_cache(1, 6)
                    tok = tiny_model(ids, cache=cache, last_only=True).logits[:, -1].argmax(-1)
                    logits = tiny_model(tok[:, None], cache=cache, start=5, last_only=True).logits[:, -1]
            runs.append((logits, [s for s in seen if not s[3]]))                     # the decoding step's hooks
    (ref, ref_seen), (out, seen) = runs
    assert len(ref_seen) == len(tiny_model.hook_names()) and [s[0] for s in seen] == [s[0] for s in ref_seen]
    for (name, a, pos_a, pre_a), (_, b, pos_b, pre_b) in zip(ref_seen, seen):
        assert a.shape == b.shape and (pos_a, pre_a) == (pos_b, pre_b) == ([[5]], False), name
        assert torch.equal(b, a), name
    assert torch.equal(out, ref.float())
    with torch.no_grad():
        plain = tiny_model.generate(ids, max_new_tokens=2, eos_token_id=[])
    assert not torch.allclose(ref, tiny_model(plain[:, :6]).logits[:, -1])           # the edit changed the logits


MODULES = ["transformer.wte", "transformer.norm_f", "lm_head"] + [
    f"transformer.blocks.{i}{m}" for i in range(2) for m in (
        "", ".norm_attn_norm", ".norm_attn_norm.norm_1", ".norm_attn_norm.attn", ".norm_attn_norm.attn.Wqkv",
        ".norm_attn_norm.attn.out_proj", ".norm_attn_norm.norm_2", ".ffn", ".ffn.router", ".ffn.router.layer",
        ".ffn.experts")]


def test_every_generation_step_is_one_model_call(tiny_model, make_ids):
    """generate calls the model (nn.Module __call__) once for the prefill and once per later token, and every
    submodule as a module each time; hooks fire in each step; an intervention applies in each step."""
    from dbrx_lab import ExpertAblation

    calls, fired = [], {name: 0 for name in MODULES}
    handles = [tiny_model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((tuple(args[0].shape), kwargs.get("start", 0))), with_kwargs=True)]
    for name in MODULES:
        handles.append(tiny_model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: fired.__setitem__(name, fired[name] + 1)))
    ids = make_ids(1, 4)
    try:
        plain = tiny_model.generate(ids, max_new_tokens=5)
        assert calls == [((1, 4), 0), ((1, 1), 4), ((1, 1), 5), ((1, 1), 6), ((1, 1), 7)]   # prefill, then steps
        assert fired == {name: 5 for name in MODULES}
        seen = []
        with tiny_model.hooks([("blocks.1.ffn.hook_topk_experts", lambda t, h: seen.append(t))]):
            hooked = tiny_model.generate(ids, max_new_tokens=5)
        # the prefill's last block runs for the last token; its hook also sees the other 3 (a side pass)
        assert len(calls) == 10 and [tuple(t.shape) for t in seen] == [(1, 3, 4)] + [(1, 1, 4)] * 5
        chosen = []
        with tiny_model.intervene(ExpertAblation(layer=1, experts=int(seen[-1][0, 0, 0]))), \
                tiny_model.hooks([("blocks.1.ffn.hook_topk_experts", lambda t, h: chosen.append(t))]):
            tiny_model.generate(ids, max_new_tokens=5)
        assert len(calls) == 15 and len(chosen) == 6
        assert all(int(seen[-1][0, 0, 0]) not in t.flatten().tolist() for t in chosen)   # ablated at every step
    finally:
        for h in handles:
            h.remove()
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
    from dbrx_lab.kernels.linear import linear
    from dbrx_lab.kernels.unembed import UnembedScreen

    weight, x = case()
    exact = linear(x, weight)
    ref = greedy(exact)
    screen = UnembedScreen(weight)
    int8_only = torch._weight_int8pack_mm(x.bfloat16(), screen.q, screen.scale).float().argmax(-1)
    assert (int8_only != ref).sum() >= 4                                         # the int8 product alone errs
    logits = screen.logits(x, weight)                                           # batched
    assert logits.shape == exact.shape and logits.dtype == torch.float32
    assert torch.equal(greedy(logits), ref)
    kept = torch.isfinite(logits)
    assert kept.any(-1).all() and (~kept).any(-1).all()                          # a few candidates per row
    assert torch.all(logits[~kept] == float("-inf"))
    torch.testing.assert_close(logits[kept], exact[kept], atol=1e-5, rtol=1e-6)  # exact where kept
    assert torch.equal(torch.cat([greedy(screen.logits(row[None], weight)) for row in x]), ref)
    for bad in (float("inf"), float("nan")):                                    # full product; NaN wins as in argmax
        y = x[:3].clone()
        y[1, 5] = bad
        assert torch.equal(greedy(screen.logits(y, weight)), greedy(linear(y, weight)))


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_with_the_screen_equals_the_full_product(tiny_vocab_model, batch, two_threads, monkeypatch):
    """The demo-sized vocabulary (100352 x 64) takes the screen by default; same tokens and step logits without."""
    from dbrx_lab.kernels.unembed import UnembedScreen, screen_for

    model = tiny_vocab_model
    ids = torch.randint(0, 100352, (batch, 7), generator=torch.Generator().manual_seed(batch))
    runs = []
    screened_calls = []
    original = UnembedScreen.logits
    monkeypatch.setattr(UnembedScreen, "logits", lambda self, *a: screened_calls.append(1) or original(self, *a))
    try:
        for flag in (None, False):
            model.screen_greedy = flag
            assert (screen_for(model.lm_head) is not None) == (flag is None)
            steps = []
            runs.append((model.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=steps.append), steps))
            if flag is None:
                assert len(screened_calls) == 11                  # every step after the prefill
    finally:
        model.screen_greedy = None
    assert len(screened_calls) == 11                              # none with the screen off
    (screened, steps), (full, ref_steps) = runs
    assert torch.equal(screened, full)
    for s, r in zip(steps, ref_steps):
        torch.testing.assert_close(s.logits, r.logits, atol=1e-5, rtol=0)


def test_the_screen_follows_in_place_edits_of_lm_head(tiny_model, make_ids):
    """An edit through `.data` (which autograd's version counter does not see) still rebuilds the int8 copy."""
    tiny_model.screen_greedy = True
    ids = make_ids(1, 4, seed=1)
    before = tiny_model.generate(ids, max_new_tokens=4)[0, 4:].tolist()
    second, unused = before[1], next(t for t in range(512) if t not in before)
    w = tiny_model.lm_head.weight
    w.data[[second, unused]] = w.data[[unused, second]]                            # swap two rows in place
    reference = DbrxLM(tiny_model.config).eval()                 # the edited weights, without the screen
    reference.load_state_dict(tiny_model.state_dict())
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
