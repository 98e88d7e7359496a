"""Expert cards and routing paths (issue 21): known answers on constructed models, the demo model, the offline
site (no network request when opened in Chromium), the CLI and the widget's handlers.

Constructed models: attention outputs and expert outputs are zeroed, so every layer's router sees the token
embedding alone and routing is a function of the token that the test chooses:
  - `planted`: tiny-vocab (real vocabulary) where layer 0's expert 5 fires on number tokens and never on
    anything else; only that expert writes to the residual, so its logit effect and ablation are the only
    non-zero ones of layer 0;
  - `known_paths`: the tiny preset where a token's group g = id % 4 fixes its path: layer 0 sends groups
    {0, 1} to experts 0-3 and {2, 3} to 4-7, layer 1 sends {0, 2} to 8-11 and {1, 3} to 12-15. Each single
    layer mixes two groups (purity 1/2), the path separates all four (purity 1).
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import dbrx_lab
from dbrx_lab import Record, analysis, load_model
from dbrx_lab.analysis import paths as P
from dbrx_lab.analysis.cards import SUMMARY_COLUMNS, expert_cards
from dbrx_lab.card_site import MANIFEST, write_card_site

route_stats = dbrx_lab.route_stats

NUMBERS = "The year 1984 had 12 months, 52 weeks and 365 days; 7 of 10 people said 42."
TEXTS = [NUMBERS, "def add(a, b):\n    return a + b  # 3 and 4", "We sold 250 apples and 75 pears for 9 dollars.",
         "import os\nx = 17\nprint(x, 2024)"]


# ------------------------------------------------------------------------------------------------
# constructed models
def _silence(model) -> None:
    """Zero every attention output and expert output: the residual stays the token embedding."""
    for block in model.transformer.blocks:
        block.norm_attn_norm.attn.out_proj.weight.zero_()
        block.ffn.experts.mlp.w2.zero_()
        block.norm_attn_norm.norm_2.weight.fill_(1.0)


@pytest.fixture(scope="module")
def planted():
    """tiny-vocab with layer 0 expert 5 firing exactly on number tokens (dimension 0 of the embedding is +4
    for numbers and -4 for everything else; expert 5's router row reads only that dimension)."""
    torch.manual_seed(0)
    model = load_model("tiny-vocab")
    with torch.no_grad():
        _silence(model)
        strings = model.tokenizer.token_strings(list(range(model.config.vocab_size)))
        is_number = torch.tensor(P.token_classes(strings) == "number")
        wte = model.transformer.wte.weight
        wte.normal_(0, 1)
        wte[:, 0] = torch.where(is_number, 4.0, -4.0)
        router = model.transformer.blocks[0].ffn.router.layer.weight
        router[:, 0] = 0.0
        router[5] = 0.0
        router[5, 0] = 30.0
        g = torch.Generator().manual_seed(1)
        F = model.config.ffn_hidden_size
        for name in ("w1", "v1", "w2"):                                       # only expert 5 writes
            w = getattr(model.transformer.blocks[0].ffn.experts.mlp, name)
            w[5 * F:6 * F] = torch.randn(F, w.shape[1], generator=g) * 0.3
    model.is_number = is_number
    return model


@pytest.fixture(scope="module")
def planted_stats(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "stats"
    data = out.parent / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "numbers" if i % 2 == 0 else "other"}) + "\n"
                            for i, t in enumerate(TEXTS)))
    route_stats(planted, data, out, batch_size=2, min_count=1, predictions=False, progress=False)
    return out


def test_planted_expert_fires_on_one_token_class(planted, planted_stats):
    cards = expert_cards(planted_stats, planted, layers=[0], n_contexts=4, ablation="zero")
    card = cards[0, 5]
    df = analysis.load_routing(planted_stats)
    first = df[df["layer"] == 0]
    numbers = P.token_classes(first["token"]) == "number"
    assert numbers.sum() >= 10
    # counts: routed exactly to the number tokens
    assert card.stats["count"] == int(numbers.sum()) and card.stats["tokens"] == len(first)
    classes = card.classes.set_index("class")
    assert classes.loc["number", "share"] == 1.0 and classes.loc["number", "count"] == numbers.sum()
    assert classes.drop("number")["count"].sum() == 0
    assert classes.loc["number", "lift"] == pytest.approx(len(first) / numbers.sum())
    row = cards.summary.set_index("card").loc["L0 e5"]
    assert row["top_class"] == "number" and row["class_count"] == numbers.sum()
    assert all(P.token_class(t) == "number" for t in card.contexts["token"])
    # the top token of every context carries the context's weight, and weights are in descending order
    assert all(r["weights"][r["center"]] == pytest.approx(r["weight"], abs=1e-4) for _, r in card.contexts.iterrows())
    assert list(card.contexts["weight"]) == sorted(card.contexts["weight"], reverse=True)
    # only expert 5 writes to the residual: the other experts of layer 0 have no logit effect and no ablation effect
    for e in range(planted.config.moe_num_experts):
        if e == 5:
            continue
        other = cards[0, e]
        if other.promoted is not None:
            assert other.promoted["logit"].abs().max() == 0
        assert other.ablation["kl"] == pytest.approx(0, abs=1e-6)
        assert other.ablation["delta_loss"] == pytest.approx(0, abs=1e-5)
    assert card.ablation["kl"] > 1e-4 and card.ablation["contexts"] >= 1
    assert card.promoted["logit"].iloc[0] > 0 > card.suppressed["logit"].iloc[0]
    assert "L0 e5" in set(cards.search(card.contexts["token"].iloc[0].strip())["card"])


def test_card_logit_effects_match_logit_attribution(planted, planted_stats):
    """A card's promoted logits are the expert's direct logit attribution (`logit_attribution`) at its top
    context, and its ablation delta is the next-token loss change measured directly."""
    cards = expert_cards(planted_stats, planted, layers=[0], experts=[5], n_contexts=1, n_logits=3)
    card = cards[0, 5]
    ctx = card.contexts.iloc[0]
    ids = torch.tensor(ctx["prefix_ids"], dtype=torch.long)[None]
    for target, logit in zip(card.promoted["token_id"], card.promoted["logit"]):
        la = analysis.logit_attribution(planted, ids, target=int(target))
        comp = la.components
        mine = comp[(comp["component"] == "expert") & (comp["layer"] == 0) & (comp["expert"] == 5)]
        assert mine["contribution"].sum() == pytest.approx(logit, rel=1e-4, abs=1e-5)
    with torch.no_grad():
        base = planted(ids).logits[0, -1].log_softmax(-1)
        with planted.intervene(dbrx_lab.ExpertAblation(0, [5], "reroute")):
            abl = planted(ids).logits[0, -1].log_softmax(-1)
    nxt = int(ctx["next_id"])
    assert card.ablation["delta_loss"] == pytest.approx(float(base[nxt] - abl[nxt]), abs=1e-4)
    assert card.ablation["kl"] == pytest.approx(float((base.exp() * (base - abl)).sum()), abs=1e-4)


def test_cards_take_the_causal_audit(planted, planted_stats):
    """issue 20's expert_audit (dataset-wide ablation effects with bootstrap CIs) lands on the cards it covers."""
    audit = analysis.expert_audit(planted, planted_stats, layers=[0], experts=[4, 5], modes=("zero",), n_boot=50,
                                  n_perm=50, progress=False)
    cards = expert_cards(planted_stats, layers=[0], experts=[3, 4, 5], n_contexts=1, audit=audit)
    got = audit.experts.set_index(["layer", "expert"])
    assert cards[0, 3].audit is None and np.isnan(cards.summary.set_index("card").loc["L0 e3", "audit_effect"])
    for e in (4, 5):
        effect = cards[0, e].audit["effects"]["zero"]
        assert effect["effect"] == got.loc[(0, e), "effect_zero"]
        assert effect["lo"] <= effect["effect"] <= effect["hi"]
        assert cards.summary.set_index("card").loc[f"L0 e{e}", "audit_effect"] == effect["effect"]
    assert cards[0, 4].audit["effects"]["zero"]["effect"] == pytest.approx(0, abs=1e-6)    # expert 4 writes nothing
    assert cards[0, 5].audit["effects"]["zero"]["effect"] != 0
    with pytest.raises(ValueError, match="audit must be the CausalAudit"):
        expert_cards(planted_stats, layers=[0], experts=[3], audit="not an audit")


@pytest.fixture(scope="module")
def known_paths():
    """tiny preset (vocab 512, 2 layers, 16 experts, top-4) whose paths follow the token's group id % 4."""
    from conftest import widen_
    from dbrx_lab import PRESETS, DbrxLM
    import dataclasses

    model = widen_(DbrxLM(dataclasses.replace(PRESETS["tiny"])).eval())
    with torch.no_grad():
        _silence(model)
        d = model.config.d_model
        group = torch.arange(model.config.vocab_size) % 4
        model.transformer.wte.weight.copy_(torch.nn.functional.one_hot(group, d).float() * 5)
        sets = {0: {0: range(0, 4), 1: range(0, 4), 2: range(4, 8), 3: range(4, 8)},
                1: {0: range(8, 12), 2: range(8, 12), 1: range(12, 16), 3: range(12, 16)}}
        for layer, by_group in sets.items():
            router = model.transformer.blocks[layer].ffn.router.layer.weight
            router.zero_()
            for g, experts in by_group.items():
                for rank, e in enumerate(experts):
                    router[e, g] = 4.0 - rank                          # top-1 is the set's first expert
    return model


def test_known_paths_purity(known_paths):
    ids = torch.arange(8, 8 + 4 * 12).reshape(4, 12)                  # 48 tokens, 12 of each group
    _, trace = known_paths.run_with_trace(ids, record=Record(router=True))
    groups = (ids.reshape(-1) % 4).numpy()
    paths = analysis.routing_paths(trace, labels=[f"g{g}" for g in groups])
    want = {0: "0.1.2.3|8.9.10.11", 1: "0.1.2.3|12.13.14.15", 2: "4.5.6.7|8.9.10.11", 3: "4.5.6.7|12.13.14.15"}
    assert list(paths["path"]) == [want[g] for g in groups]
    counts = analysis.path_counts(paths)
    assert len(counts) == 4 and set(counts["count"]) == {12} and set(counts["purity"]) == {1.0}
    pur = analysis.path_purity(paths).set_index("grouping")
    assert pur.loc["expert L0", "purity"] == 0.5 and pur.loc["expert L1", "purity"] == 0.5
    assert pur.loc["expert L0", "groups"] == 2
    assert pur.loc["path clusters", "purity"] == 1.0 and pur.loc["distinct paths", "purity"] == 1.0
    assert pur.loc["path clusters", "groups"] == 4 and pur.loc["path clusters", "gain"] > 0.5
    clusters = analysis.cluster_paths(paths, n_clusters=2)
    # two clusters: paths sharing one layer's set have Jaccard 4 / 12 = 1/3, the others 0; every path joins a
    # medoid it shares a set with
    assert clusters.medoids["count"].sum() == 48 and len(clusters.medoids) == 2
    assert np.isclose(clusters.distinct["jaccard_to_medoid"].to_numpy()[:, None], [1.0, 1 / 3]).any(1).all()
    # top-1 paths: experts 0|8, 0|12, 4|8, 4|12
    top1 = analysis.routing_paths(trace, labels=None, rank="top1")
    assert set(top1["path"]) == {"0|8", "0|12", "4|8", "4|12"} and "label" not in top1.columns
    assert "most frequent top-1 expert paths" in dbrx_lab.figures.path_sankey(top1).layout.title.text
    assert pur.attrs["labels"] == "the given labels"
    fig = dbrx_lab.figures.path_sankey(counts, n=3)
    assert fig.data[0].type == "sankey" and len(fig.data[0].node.label) == 4     # 2 sets per layer
    assert "36 of 48 tokens" in fig.layout.title.text


def test_random_routing_gains_nothing():
    """With routing independent of the labels, neither single experts nor path clusters beat shuffled labels."""
    rng = np.random.default_rng(0)
    L, N, k, E = 4, 4000, 4, 16
    experts = np.argsort(rng.random((L, N, E)), -1)[..., :k]
    routing = analysis.Routing(experts, np.full((L, N, k), 1 / k, np.float32), E, np.arange(L),
                               {"text": np.zeros(N, int), "position": np.arange(N)})
    pur = analysis.path_purity(analysis.routing_paths(routing, labels=rng.choice(["a", "b", "c"], N)))
    assert (pur.set_index("grouping").drop("distinct paths")["gain"].abs() < 0.03).all()


def test_token_classes():
    cases = {"foo": "word", " the": "word", "_x": "identifier", "snake_case": "identifier",
             "camelCase": "identifier", "x1": "identifier", " 12": "number", "3.14": "number", " def": "keyword",
             "return": "keyword", "(": "punctuation", "):": "punctuation", "\\n": "whitespace", "   ": "whitespace",
             "\n\n": "whitespace", None: "whitespace"}
    assert {t: P.token_class(t) for t in cases} == cases
    assert set(P.token_classes(list(cases))) <= set(P.TOKEN_CLASSES)


def test_bad_input_names_the_valid_range(planted_stats, tmp_path):
    with pytest.raises(ValueError, match=r"layers \[7\] out of range.*\[0, 1, 2\]"):
        expert_cards(planted_stats, layers=[7])
    with pytest.raises(ValueError, match=r"experts \[16\] out of range: valid experts are 0..15"):
        expert_cards(planted_stats, experts=[16])
    with pytest.raises(ValueError, match="n_contexts must be an integer >= 1"):
        expert_cards(planted_stats, n_contexts=0)
    with pytest.raises(ValueError, match=r"window must be \(before, after\)"):
        expert_cards(planted_stats, window=(3,))
    with pytest.raises(ValueError, match="ablation must be"):
        expert_cards(planted_stats, ablation="drop")
    cards = expert_cards(planted_stats, layers=[1], experts=[2, 3])
    with pytest.raises(ValueError, match=r"no card for layer 0, expert 2: layers 1..1, experts 2..3"):
        cards[0, 2]
    paths = analysis.routing_paths(planted_stats)
    with pytest.raises(ValueError, match="n_clusters must be an integer >= 1"):
        analysis.cluster_paths(paths, n_clusters=0)
    with pytest.raises(ValueError, match=r"labels has 3 entries, fewer than the source.s tokens"):
        analysis.routing_paths(planted_stats, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="no labels"):
        analysis.path_purity(analysis.routing_paths(planted_stats, labels=None))


# ------------------------------------------------------------------------------------------------
# the offline site
def test_site_is_written_atomically_and_never_overwrites_foreign_files(planted, planted_stats, tmp_path):
    cards = expert_cards(planted_stats, planted, layers=[0], experts=[4, 5], n_contexts=2)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and is not a cards site"):
        write_card_site(cards, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_card_site(cards, tmp_path / "file")

    out = tmp_path / "site"
    old = os.umask(0o027)
    try:
        info = write_card_site(cards, out)
    finally:
        os.umask(old)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted([MANIFEST, "index.html", "plotly.min.js", "cards/L0-e4.html", "cards/L0-e5.html"])
    assert info["pages"] == 3 and info["plotly_bytes"] > 1_000_000
    assert all(stat.S_IMODE((out / f).stat().st_mode) == 0o640 for f in files)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    page = (out / "cards/L0-e5.html").read_text()
    assert '<script src="../plotly.min.js">' in page and "Plotly.newPlot" in page
    assert not re.search(r"""(src|href)=["']https?://""", page + (out / "index.html").read_text())
    # rewriting its own output replaces the files it listed, removes the ones no longer written
    write_card_site(expert_cards(planted_stats, layers=[0], experts=[5], n_contexts=2), out)
    assert not (out / "cards/L0-e4.html").exists() and (out / "cards/L0-e5.html").exists()
    (out / "user.txt").write_text("mine")                               # a file it did not write stays
    write_card_site(cards, out)
    assert (out / "user.txt").read_text() == "mine"


def test_cli_writes_the_site(planted, planted_stats, tmp_path, capsys, monkeypatch):
    from dbrx_lab import cli

    monkeypatch.setattr("dbrx_lab.loading.load_model", lambda name, **kw: planted)
    out = tmp_path / "cards"
    assert cli.main(["cards", "--model", "x", "--stats", str(planted_stats), "--out", str(out), "--layers", "0",
                     "--contexts", "2", "--no-progress"]) == 0
    assert "17 pages (16 cards)" in capsys.readouterr().out
    assert "Routing paths" in (out / "index.html").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("a")
    assert cli.main(["cards", "--model", "x", "--stats", str(planted_stats), "--out", str(tmp_path / "other")]) == 2
    assert "not a cards site" in capsys.readouterr().err
    assert cli.main(["cards", "--model", "x", "--stats", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert cli.main(["cards", "--model", "x", "--stats", str(planted_stats), "--out", str(out), "--layers",
                     "a"]) == 2
    assert "--layers must be comma-separated integers" in capsys.readouterr().err
    assert cli.main(["cards", "--model", "x", "--stats", str(planted_stats), "--out", str(out), "--threads",
                     "0"]) == 2
    assert "--threads must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.browser
def test_site_opens_offline_in_chromium(planted, planted_stats, tmp_path):
    """Opened from the file system, the index and a card page draw their figures and request no http(s) URL;
    the index's column sort and token search work."""
    chromium = Path(os.environ.get("DBRX_LAB_CHROMIUM", "/usr/bin/chromium"))
    if not chromium.exists():
        pytest.skip(f"no Chromium at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api")
    cards = expert_cards(planted_stats, planted, layers=[0], n_contexts=3)
    paths = analysis.routing_paths(planted_stats)
    out = tmp_path / "site"
    write_card_site(cards, out, analysis.path_counts(paths), analysis.path_purity(paths))
    requested, network = [], []

    def route(r):
        url = r.request.url
        requested.append(url)
        if url.startswith(("http://", "https://")):
            network.append(url)
            r.abort()
        else:
            r.continue_()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1300, "height": 1600})
        page.route("**/*", route)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "index.html").as_uri())
        page.wait_for_function("() => document.querySelector('.js-plotly-plot')?.data?.length", timeout=30_000)
        n = page.locator("#cards tbody tr").count()
        assert n == 16
        page.locator("#cards th", has_text="routed").click()           # numbers: largest first, then ascending
        counts = [int(x.replace(",", "")) for x in page.locator("#cards tbody tr td:nth-child(2)").all_inner_texts()]
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
        page.locator("#cards th", has_text="routed").click()
        counts = [int(x.replace(",", "")) for x in page.locator("#cards tbody tr td:nth-child(2)").all_inner_texts()]
        assert counts == sorted(counts)
        token = cards[0, 5].contexts["token"].iloc[0].strip()
        page.locator("#search").fill(token)
        visible = [r for r in page.locator("#cards tbody tr").all() if r.is_visible()]
        assert 1 <= len(visible) < n and any("L0 e5" in r.inner_text() for r in visible)
        page.locator("#cards a", has_text="L0 e5").click()
        page.wait_for_function("() => document.querySelector('.js-plotly-plot')?.data?.length", timeout=30_000)
        assert "Layer 0 · expert 5" in page.inner_text("body")
        partner = page.locator("a", has_text="L0 e").nth(0)                # a partner link opens its card
        href = partner.get_attribute("href")
        partner.click()
        page.wait_for_url(f"**/{href}", timeout=30_000)
        page.wait_for_load_state()
        assert f"Layer 0 · expert {href.removesuffix('.html').split('-e')[1]}" in page.inner_text("body")
        browser.close()
    assert not errors, errors
    assert not network, f"the offline site requested {network}"
    assert any(u.endswith("plotly.min.js") for u in requested)


# ------------------------------------------------------------------------------------------------
# the demo model
@pytest.fixture(scope="module")
def demo_stats(tmp_path_factory):
    from dbrx_lab.card_site import demo_texts

    folder = tmp_path_factory.mktemp("demo")
    data = demo_texts(folder / "texts.jsonl")
    model = load_model("demo")
    route_stats(model, data, folder / "stats", batch_size=5, min_count=2, predictions=False, progress=False)
    return model, folder / "stats"


def test_demo_cards_and_paths(demo_stats):
    model, stats = demo_stats
    cards = expert_cards(stats, model, layers=[1], experts=[0, 5, 9], n_contexts=4)
    assert list(cards.summary.columns) == list(SUMMARY_COLUMNS) and len(cards.summary) == 3
    for card in cards:
        s = card.stats
        assert s["count"] > 0 and s["tokens"] >= 1000 and 0 < s["mean_weight"] <= s["max_weight"] <= 1
        assert len(card.contexts) == 4 and card.dla_positions >= 1 and card.ablation["runs"] == 4
        assert np.isfinite(card.ablation["kl"]) and card.ablation["kl"] >= 0
        # promoted tokens are distinct unembedding rows (the demo's shared "rest" row shows up once at most)
        assert card.promoted["token_id"].is_unique and len(card.promoted) == 10
        assert card.promoted["logit"].is_monotonic_decreasing and card.suppressed["logit"].is_monotonic_increasing
        assert set(card.labels["label"]) == {"prose", "code"}
        assert card.classes["count"].sum() == s["count"]
        assert (card.partners["count_both"] > 0).all() and len(card.partners) == 5
        assert json.loads(json.dumps(card.to_dict()))["stats"] == s
    paths = analysis.routing_paths(stats)
    pur = analysis.path_purity(paths).set_index("grouping")
    assert ((pur["purity"] >= pur["baseline"] - 1e-9) & (pur["purity"] <= 1)).all()
    assert pur.loc["path clusters", "groups"] == 16


def test_card_browser_handlers(demo_stats):
    from dbrx_lab.widgets import CardBrowser

    model, stats = demo_stats
    cards = expert_cards(stats, model, layers=[2], n_contexts=2)
    b = CardBrowser(cards)
    assert b.last_error is None and len(b.listing.options) == 16
    assert b.selected == b.listing.value == tuple(b.rows[["layer", "expert"]].iloc[0])
    assert list(b.rows["count"]) == sorted(b.rows["count"], reverse=True)
    b.sort.value = "ablation_delta"
    assert list(b.rows["ablation_delta"]) == sorted(b.rows["ablation_delta"], reverse=True)
    b.descending.value = False
    assert list(b.rows["ablation_delta"]) == sorted(b.rows["ablation_delta"])
    b.listing.value = b.listing.options[-1][1]
    assert b.selected == b.listing.options[-1][1] and f'data-card="L{b.selected[0]} e{b.selected[1]}"' in b.card.value
    enabled = [btn for btn in b.partners.children if not btn.disabled]
    assert len(enabled) == len(cards[b.selected].partners) > 0
    target = int(re.search(r"e(\d+)", enabled[0].description).group(1))
    enabled[0].click()
    assert b.selected == (2, target) and b.last_error is None
    word = cards[2, 0].contexts["token"].iloc[0].strip()
    b.search.value = word
    assert "L2 e0" in set(b.rows["card"]) and len(b.rows) < 16
    b.search.value = "zzzz-no-such-token"
    assert len(b.listing.options) == 0 and b.last_error is None
    assert b.pane.figure is not None
