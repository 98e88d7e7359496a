"""Training support: MoE auxiliary losses, gradient flow, the exact vocabulary shortlist, resumable training."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dbrx_lab.cli import main
from dbrx_lab.config import PRESETS
from dbrx_lab.demo_data import Corpus
from dbrx_lab import DbrxLM
from dbrx_lab.train import (TrainConfig, VocabShortlist, final_hidden, load_balancing_loss, router_z_loss,
                            train, training_loss)


# ------------------------------------------------------------------------------------------------
def test_load_balancing_loss_hand_computed():
    # 2 tokens, 4 experts, top-1: token 0 -> e0, token 1 -> e1; f = [.5, .5, 0, 0]
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]])
    loss = load_balancing_loss([probs.log()], top_k=1, n_experts=4)
    P = probs.mean(0)                                           # [.4, .35, .15, .1]
    assert loss.item() == pytest.approx(4 * (0.5 * P[0] + 0.5 * P[1]).item())   # 1.5
    assert loss.item() == pytest.approx(1.5)
    # top-2: slots e0,e2 | e1,e2 -> f = [.25, .25, .5, 0]
    loss2 = load_balancing_loss([probs.log()], top_k=2, n_experts=4)
    assert loss2.item() == pytest.approx(4 * (0.25 * 0.4 + 0.25 * 0.35 + 0.5 * 0.15))


def test_load_balancing_loss_is_one_when_balanced_and_averages_layers():
    uniform = torch.zeros(6, 16)
    assert load_balancing_loss([uniform], 4, 16).item() == pytest.approx(1.0)
    # 16 tokens each routed to a different expert with the same confident probability: balanced -> 1
    balanced = torch.full((16, 16), -5.0)
    balanced[torch.arange(16), torch.arange(16)] = 5.0
    assert load_balancing_loss([balanced], 1, 16).item() == pytest.approx(1.0, abs=1e-6)
    # collapsed routing: every token to expert 0 with prob ~1 -> E
    collapsed = torch.full((8, 16), -30.0)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss([collapsed], 1, 16).item() == pytest.approx(16.0, rel=1e-4)
    both = load_balancing_loss([torch.zeros(8, 16), collapsed], 1, 16)
    assert both.item() == pytest.approx((1.0 + 16.0) / 2, rel=1e-4)


def test_load_balancing_loss_ignores_padding_and_validates():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1]]).log()
    pad = torch.tensor([[30.0, -30.0, -30.0, -30.0]])
    padded = torch.cat([pad, probs])                              # [3, 4]: token 0 is padding
    mask = torch.tensor([[0, 1, 1]])
    assert load_balancing_loss([padded], 1, 4, attention_mask=mask).item() == pytest.approx(1.5)
    assert load_balancing_loss([padded], 1, 4).item() != pytest.approx(1.5)
    with pytest.raises(ValueError, match="n_experts"):
        load_balancing_loss([probs], 1, 8)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss([probs], 5, 4)


def test_router_z_loss():
    assert router_z_loss([torch.zeros(5, 16)]).item() == pytest.approx(math.log(16) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.logsumexp(logits, -1).square().item()
    assert router_z_loss([logits, torch.zeros(1, 3)]).item() == pytest.approx((expected + math.log(3) ** 2) / 2)


# ------------------------------------------------------------------------------------------------
def tiny_model(seed=0, **overrides) -> DbrxLM:
    cfg = dataclasses.replace(PRESETS["tiny"], **{"moe_jitter_eps": 0.01, "moe_z_loss_weight": 0.001, **overrides})
    torch.manual_seed(seed)
    model = DbrxLM(cfg)
    model.reset_parameters(std=0.3)
    return model


def test_gradients_reach_every_routed_expert_and_the_router():
    model = tiny_model().train()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    shortlist = VocabShortlist(np.arange(cfg.vocab_size), cfg.vocab_size)
    torch.manual_seed(1)
    routed = []
    handles = [(f"blocks.{i}.ffn.hook_topk_experts", lambda t, hook: routed.append(t.clone()))
               for i in range(cfg.n_layers)]
    with model.hooks(handles):
        loss, parts = training_loss(model, torch.cat([ids, ids[:, :1]], dim=1), shortlist)
    loss.backward()
    F = cfg.ffn_hidden_size
    for layer, experts in enumerate(routed):
        mlp = model.blocks[layer].ffn.experts.mlp
        got = set(experts.reshape(-1).tolist())
        assert len(got) > 1
        for e in range(cfg.moe_num_experts):
            rows = slice(e * F, (e + 1) * F)
            norms = [p.grad[rows].norm().item() for p in (mlp.w1, mlp.v1, mlp.w2)]
            if e in got:
                assert all(n > 0 for n in norms), (layer, e)
            else:
                assert all(n == 0 for n in norms), (layer, e)
        assert model.blocks[layer].ffn.router.layer.weight.grad.norm() > 0
    assert parts["lb"] >= 1.0 - 1e-6 and parts["z"] > 0


def test_router_jitter_only_in_training():
    model = tiny_model(moe_jitter_eps=0.2)
    ids = torch.randint(0, 512, (1, 8))
    model.eval()
    a, b = (final_hidden(model, ids)[1][0] for _ in range(2))
    assert torch.equal(a, b)
    model.train()
    c, d = (final_hidden(model, ids)[1][0] for _ in range(2))
    assert not torch.equal(c, d)


def test_shortlist_loss_is_the_exact_full_softmax_of_the_expanded_model():
    torch.manual_seed(0)
    V = 50
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=V)
    seen = np.array([1, 2, 2, 3, 7, 7, 7, 9, 9, 11])
    shortlist = VocabShortlist(seen, V, min_count=2)             # ids 2, 7, 9 own rows; the rest share one
    assert shortlist.ids.tolist() == [2, 7, 9] and shortlist.rest.numel() == V - 3 and shortlist.size == 4
    compact = DbrxLM(dataclasses.replace(cfg, vocab_size=shortlist.size))
    compact.reset_parameters(std=0.3)
    batch = torch.tensor([[2, 7, 9, 1, 40, 2, 7], [9, 9, 0, 2, 7, 49, 3]])
    h, _ = final_hidden(compact, shortlist.to_compact(batch[:, :-1]))
    loss = shortlist.loss(h.reshape(-1, cfg.d_model), compact.lm_head.weight, batch[:, 1:].reshape(-1), "none")
    full = shortlist.expand(compact)
    assert full.lm_head.weight.shape == (V, cfg.d_model)
    assert torch.equal(full.transformer.wte.weight[0], full.transformer.wte.weight[49])
    assert not torch.equal(full.lm_head.weight[0], full.lm_head.weight[2])
    logits = full(batch[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
def synthetic_corpus(vocab=512, n=6000, seed=0) -> Corpus:
    """Two 'domains' with learnable structure: counting sequences in disjoint id ranges."""
    rng = np.random.default_rng(seed)

    def stream(lo, hi, size):
        starts = rng.integers(lo, hi - 8, size=size // 8)
        return np.concatenate([np.arange(s, s + 8) for s in starts]).astype(np.int32)

    tokens = {("prose", "train"): stream(0, 200, n), ("prose", "val"): stream(0, 200, 600),
              ("code", "train"): stream(200, vocab, n), ("code", "val"): stream(200, vocab, 600)}
    return Corpus(tokens, {"sources": {}})


def tiny_recipe(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=3, eval_batches=1,
                save_every=2, min_count=1)
    base.update(kw)
    return TrainConfig(**base)


def read_log(folder):
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


def test_a_few_training_steps_reduce_the_loss(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], moe_jitter_eps=0.01)
    train(tmp_path, tiny_recipe(steps=60, eval_every=59), cfg, synthetic_corpus(), progress=False)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(60))
    first, last = log[0], log[-1]
    assert np.mean([r["lm_loss"] for r in log[-5:]]) < first["lm_loss"] - 0.5
    assert last["val_prose"] < first["val_prose"] - 0.5 and last["val_code"] < first["val_code"] - 0.5


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = dataclasses.replace(PRESETS["tiny"], moe_jitter_eps=0.05)
    corpus, recipe = synthetic_corpus(), tiny_recipe()
    whole = train(tmp_path / "whole", recipe, cfg, corpus, progress=False)
    # stop after the first step (time limit), then resume the remaining steps
    train(tmp_path / "parts", recipe, cfg, corpus, progress=False, time_limit_s=0.0)
    assert json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())["step"] == 1
    resumed = train(tmp_path / "parts", recipe, cfg, corpus, resume=True, progress=False)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    timing = ("elapsed_s", "load_avg_1m")                        # differ between runs; all else must not
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]   # noqa: E731
    assert strip(read_log(tmp_path / "whole")) == strip(read_log(tmp_path / "parts"))


def test_cli_train_demo_runs_and_exports(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["train-demo", "--out", str(out), "--steps", "2", "--model", "tiny-vocab", "--max-tokens", "4000",
               "--seq-len", "32", "--batch-size", "2", "--no-card"])
    assert rc == 0
    assert len(read_log(out)) == 2
    assert not (out / "checkpoint").exists()
    corpus = json.loads((out / "corpus.json").read_text())
    assert set(corpus["sources"]) == {"pydoc topics", "stdlib source"}
    weights = load_file(str(out / "model.safetensors"))
    assert weights["lm_head.weight"].shape == (100352, 64) and weights["lm_head.weight"].dtype == torch.bfloat16
    assert main(["train-demo", "--out", str(out), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_router_temperature_trains_sharper_routers_and_folds_into_a_plain_dbrx(tmp_path):
    """A router temperature < 1 is a training-time parametrization: the exported model is a plain DBRX (no
    parametrization left) whose routers are more decisive than the same recipe's at temperature 1."""
    from dbrx_lab.train import router_decisiveness, router_logits_of

    cfg = dataclasses.replace(PRESETS["tiny"], moe_jitter_eps=0.0)
    corpus = synthetic_corpus()
    plain = train(tmp_path / "plain", tiny_recipe(steps=30, eval_every=29), cfg, corpus, progress=False)
    sharp = train(tmp_path / "sharp", tiny_recipe(steps=30, eval_every=29, router_temperature=0.1), cfg, corpus,
                  progress=False)
    assert set(plain.state_dict()) == set(sharp.state_dict())               # no parametrization keys
    ids = torch.from_numpy(corpus.stream("code", "val")[:64].astype(np.int64))[None]
    e_plain = router_decisiveness(router_logits_of(plain, ids), cfg.moe_top_k)["router_entropy"]
    e_sharp = router_decisiveness(router_logits_of(sharp, ids), cfg.moe_top_k)["router_entropy"]
    assert all(s < p - 0.1 for s, p in zip(e_sharp, e_plain)), (e_sharp, e_plain)
    with pytest.raises(ValueError, match="router temperature must be a finite number > 0"):
        train(tmp_path / "bad", tiny_recipe(router_temperature=0.0), cfg, corpus, progress=False)


def test_router_decisiveness_known_answers():
    from dbrx_lab.train import router_decisiveness

    uniform = torch.zeros(2, 5, 16)
    out = router_decisiveness(uniform, 4)
    assert out["router_entropy"] == pytest.approx([np.log(16)] * 2)
    assert out["router_top1"] == pytest.approx([1 / 16] * 2) and out["router_margin"] == pytest.approx([0.0] * 2)
    one_hot = torch.full((1, 3, 16), -1e4)
    one_hot[..., 7] = 0
    out = router_decisiveness(one_hot, 4)
    assert out["router_entropy"][0] == pytest.approx(0.0, abs=1e-6) and out["router_top1"][0] == pytest.approx(1.0)
    four = torch.full((1, 1, 16), -1e4)
    four[..., :4] = 0                                                          # four equal winners, then nothing
    assert router_decisiveness(four, 4)["router_margin"][0] == pytest.approx(0.25)


def test_init_from_continues_from_a_saved_model(tmp_path):
    """--init-from copies a saved full-vocabulary model into the compact one exactly: a 1-step run at lr ~0
    exports the same logits, and a model of another shape is refused naming the differing fields."""
    from dbrx_lab.checkpoint import save_pretrained
    from dbrx_lab.lm import DbrxLM

    cfg = dataclasses.replace(PRESETS["tiny"], moe_jitter_eps=0.0)
    corpus = synthetic_corpus()
    torch.manual_seed(3)
    src = DbrxLM(cfg).float().eval()
    with torch.no_grad():                                  # unseen ids share one row, as an exported demo's do
        seen = np.unique(np.concatenate([corpus.stream(d, "train") for d in ("prose", "code")]))
        unseen = torch.ones(cfg.vocab_size, dtype=torch.bool)
        unseen[torch.from_numpy(seen.astype(np.int64))] = False
        for w in (src.transformer.wte.weight, src.lm_head.weight):
            w[unseen] = w[unseen.nonzero()[0]]
    folder = save_pretrained(src, tmp_path / "src", dtype=torch.float32)
    out = train(tmp_path / "cont", tiny_recipe(steps=1, lr=1e-30, init_from=str(folder), weight_decay=0.0), cfg,
                corpus, progress=False)
    ids = torch.from_numpy(corpus.stream("prose", "val")[:32].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)
    # a router temperature changes how fast the routers train, not the loaded function...
    warm = train(tmp_path / "warm", tiny_recipe(steps=1, lr=1e-30, init_from=str(folder), weight_decay=0.0,
                                                router_temperature=0.25), cfg, corpus, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(warm(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)
    # ...and --router-scale multiplies the loaded router weights (sharper routing from the first step)
    sharp = train(tmp_path / "sharp", tiny_recipe(steps=1, lr=1e-30, init_from=str(folder), weight_decay=0.0,
                                                  router_temperature=0.25, router_scale=4.0), cfg, corpus,
                  progress=False)
    for a, b in zip(sharp.transformer.blocks, src.transformer.blocks):
        torch.testing.assert_close(a.ffn.router.layer.weight, 4 * b.ffn.router.layer.weight, rtol=1e-6, atol=0)
    other = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1)
    with pytest.raises(ValueError, match="n_layers"):
        train(tmp_path / "bad", tiny_recipe(steps=1, init_from=str(folder)), other, corpus, progress=False)


def test_router_margin_loss_known_answers_and_gradient():
    from dbrx_lab.train import router_margin_loss

    assert router_margin_loss(torch.zeros(3, 7, 16), 4).item() == pytest.approx(math.log(2))    # all tied
    decided = torch.zeros(1, 2, 16)
    decided[..., [1, 5, 9, 13]] = 30.0                                          # a 30-nat gap at the boundary
    assert router_margin_loss(decided, 4).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 5, 16, requires_grad=True)
    router_margin_loss(logits, 4).backward()
    order = logits.detach().argsort(-1, descending=True)
    g = logits.grad
    assert (g.gather(-1, order[..., 3:4]) < 0).all()        # descent raises the 4th expert's logit...
    assert (g.gather(-1, order[..., 4:5]) > 0).all()        # ...lowers the 5th's...
    assert (g.gather(-1, torch.cat([order[..., :3], order[..., 5:]], -1)) == 0).all()   # ...and no other
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 15\]"):
        router_margin_loss(logits, 16)
