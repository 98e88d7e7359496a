"""One faithful forward (issue #16): every generated step is one call of the model, so plain torch hooks,
interventions and hook points see every step; hook names come from module paths; the package has no import
circle and model.py builds on nothing above it; hook errors name the point; a full KV cache says how big to
make it; deterministic algorithms give bit-identical runs.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

import dbrx_lab
from dbrx_lab import PRESETS, DbrxLM, ExpertAblation, ExpertForce, HeadAblation, Record, TopK
from dbrx_lab import model as model_mod
from dbrx_lab.hooks import HookPoint, hook_alias
from dbrx_lab.kernels.unembed import UnembedScreen
from dbrx_lab.model import CacheFullError

T = 7
NEW = 5

MODULE_PATHS = [
    "transformer.blocks.1.ffn.router.layer", "lm_head", "transformer.blocks.0.norm_attn_norm.attn",
    "transformer.blocks.1.ffn.experts", "transformer.norm_f", "transformer.wte", "transformer.blocks.0",
    "transformer.blocks.0.norm_attn_norm.norm_1", "transformer.blocks.0.norm_attn_norm.norm_2",
    "transformer.blocks.0.norm_attn_norm.attn.Wqkv", "transformer.blocks.0.norm_attn_norm.attn.out_proj",
    "transformer.blocks.1", "transformer.blocks.1.ffn", "transformer.blocks.1.ffn.router",
    "transformer.blocks.1.norm_attn_norm",
]


class Calls:
    """Plain torch forward hooks on modules, removed on exit; calls[path] = list of outputs (cloned)."""

    def __init__(self, model, paths) -> None:
        self.model, self.paths = model, paths
        self.calls: dict[str, list] = {p: [] for p in paths}
        self.handles = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for p in self.paths:
            def hook(module, args, output, p=p):
                out = output[0] if isinstance(output, tuple) else output
                self.calls[p].append(out.detach().clone())
            self.handles.append(modules[p].register_forward_hook(hook))
        return self.calls

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------
# (a) plain torch hooks fire once per forward, every generated step included
def test_torch_forward_hooks_fire_once_per_forward(tiny_model, make_ids):
    ids = make_ids(1, T)
    with Calls(tiny_model, MODULE_PATHS) as calls:
        with torch.no_grad():
            tiny_model(ids)
    assert {p: len(c) for p, c in calls.items()} == {p: 1 for p in MODULE_PATHS}
    plain = tiny_model.generate(ids, NEW)
    with Calls(tiny_model, MODULE_PATHS) as calls:
        out = tiny_model.generate(ids, NEW)
    assert torch.equal(out, plain), "torch hooks must not change the generation"
    assert {p: len(c) for p, c in calls.items()} == {p: NEW for p in MODULE_PATHS}, "prefill + 4 steps"
    logits = calls["lm_head"]
    assert logits[0].shape == (1, 1, tiny_model.config.vocab_size)              # the prefill's last position
    assert all(l.shape == (1, 1, tiny_model.config.vocab_size) for l in logits[1:])
    assert torch.equal(torch.stack([l[0, -1].argmax() for l in logits]), out[0, T:])


def test_router_layer_hook_sees_the_trace_routing_at_every_step(tiny_model, make_ids):
    """blocks[1] is the last block of the tiny model: the prefill computes it for the last token only."""
    ids = make_ids(1, T, seed=2)
    path = "transformer.blocks.1.ffn.router.layer"
    with Calls(tiny_model, [path]) as calls:
        out = tiny_model.generate(ids, NEW)
    out_t, trace = tiny_model.generate_with_trace(ids, NEW, record=Record(router=True))
    assert torch.equal(out, out_t)
    seen = calls[path]
    assert len(seen) == NEW and all(s.shape == (1, tiny_model.config.moe_num_experts) for s in seen)
    for i, logits in enumerate(seen):
        assert torch.equal(logits[0], trace.router_logits[1, 0, T - 1 + i]), f"step {i} (position {T - 1 + i})"


def test_router_layer_hook_on_a_middle_block_sees_the_whole_prompt(tiny_vocab_model):
    model = tiny_vocab_model                                                    # 3 layers: blocks[1] is not last
    ids = torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(3))
    path = "transformer.blocks.1.ffn.router.layer"
    with Calls(model, [path]) as calls:
        out = model.generate(ids, NEW)
    out_t, trace = model.generate_with_trace(ids, NEW, record=Record(router=True))
    assert torch.equal(out, out_t)
    seen = calls[path]
    assert [s.shape[0] for s in seen] == [T] + [1] * (NEW - 1)
    assert torch.equal(seen[0], trace.router_logits[1, 0, :T])
    for i, logits in enumerate(seen[1:], start=1):
        assert torch.equal(logits[0], trace.router_logits[1, 0, T - 1 + i]), f"step {i}"


def test_large_vocab_greedy_screen_and_lm_head_hooks(tiny_vocab_model, monkeypatch):
    """The int8 screen runs for greedy decode steps of a large-vocab model; a torch hook on lm_head turns it
    off: the hook fires every step and sees the full logits, and the tokens do not change. Step.logits are
    the full logits either way (the same as with the screen turned off)."""
    model = tiny_vocab_model
    V = model.config.vocab_size
    ids = torch.randint(0, 1000, (1, T), generator=torch.Generator().manual_seed(4))
    screened = []
    real = UnembedScreen.logits

    def counting(self, x, weight):
        screened.append(x.shape)
        return real(self, x, weight)

    monkeypatch.setattr(UnembedScreen, "logits", counting)
    steps = list(model.stream(ids, NEW))
    assert len(screened) == NEW - 1, "every decode step of a greedy generation is screened"
    tokens = torch.stack([s.tokens for s in steps], 1)
    step_logits = torch.stack([s.logits for s in steps])
    assert torch.isfinite(step_logits).all(), "Step.logits are the full logits"

    screened.clear()
    with Calls(model, ["lm_head", "transformer.blocks.1.ffn.router.layer", "transformer.norm_f"]) as calls:
        hooked_steps = list(model.stream(ids, NEW))
    assert screened == [], "a torch hook on lm_head turns the screen off"
    assert {p: len(c) for p, c in calls.items()} == {p: NEW for p in calls}
    seen = torch.stack([c[0, -1] for c in calls["lm_head"]])                     # [NEW, V]
    assert seen.shape == (NEW, V) and torch.isfinite(seen).all()
    assert torch.equal(torch.stack([s.tokens for s in hooked_steps], 1), tokens)
    assert torch.equal(seen.argmax(-1), tokens[0])
    assert torch.equal(torch.stack([s.logits for s in hooked_steps]), step_logits)

    before = model.screen_greedy
    try:
        model.screen_greedy = False
        off = list(model.stream(ids, NEW))
    finally:
        model.screen_greedy = before
    assert screened == []
    assert torch.equal(torch.stack([s.tokens for s in off], 1), tokens)
    assert torch.equal(torch.stack([s.logits for s in off]), step_logits)


# ------------------------------------------------------------------------------------------------
# (b) interventions apply at every step
def run_generation(model, ids):
    steps = list(model.stream(ids, NEW))
    return torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits for s in steps])


def test_expert_ablation_in_generate_equals_the_same_edit_through_hooks(tiny_model, make_ids):
    ids = make_ids(1, T, seed=5)
    gone = [0, 1, 2, 3, 4, 5]
    plain = run_generation(tiny_model, ids)
    with tiny_model.intervene(ExpertAblation("all", gone, mode="reroute")):
        ablated = run_generation(tiny_model, ids)
        _, trace = tiny_model.generate_with_trace(ids, NEW)

    def drop(x, hook):
        x = x.clone()
        x[..., gone] = float("-inf")
        return x

    with tiny_model.hooks([("blocks.*.ffn.hook_router_logits", drop)]):
        hooked = run_generation(tiny_model, ids)
    assert not torch.equal(ablated[1], plain[1]), "the ablation must change the logits"
    assert torch.equal(hooked[0], ablated[0])
    assert torch.equal(hooked[1], ablated[1])
    assert trace.seq_len == T + NEW
    assert not torch.isin(trace.topk_experts, torch.tensor(gone)).any(), "an ablated expert was routed to"


def test_head_ablation_in_generate_equals_zeroing_z_through_hooks(tiny_model, make_ids):
    ids = make_ids(1, T, seed=6)
    plain = run_generation(tiny_model, ids)
    with tiny_model.intervene(HeadAblation(1, [0, 3], mode="zero")):
        ablated = run_generation(tiny_model, ids)

    def zero(x, hook):
        if hook.layer == 1:
            x = x.clone()
            x[:, :, [0, 3]] = 0
            return x

    with tiny_model.hooks([("blocks.*.attn.hook_z", zero)]):
        hooked = run_generation(tiny_model, ids)
    assert not torch.equal(ablated[1], plain[1])
    assert torch.equal(hooked[0], ablated[0])
    assert torch.equal(hooked[1], ablated[1])


@pytest.mark.parametrize("name", ["reroute", "force", "topk", "heads"])
def test_interventions_apply_at_every_position_of_a_generation(tiny_model, make_ids, name):
    ids = make_ids(2, T, seed=7)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :2] = 0
    iv = {"reroute": ExpertAblation(0, [3, 7], mode="reroute"), "force": ExpertForce(1, 9),
          "topk": TopK(2, layer=0), "heads": HeadAblation(0, [0, 1, 2, 3])}[name]
    record = Record(router=True, hooks=["blocks.0.hook_attn_out"])
    with tiny_model.intervene(iv):
        _, trace = tiny_model.generate_with_trace(ids, NEW, record=record, attention_mask=mask)
    real = trace.attention_mask                                                 # [B, T + NEW]
    assert trace.seq_len == T + NEW and bool(real[:, T:].all())
    e = trace.topk_experts                                                      # [L, B, T + NEW, k]
    if name == "reroute":
        assert not torch.isin(e[0][real], torch.tensor([3, 7])).any()
    elif name == "force":
        assert (e[1][real] == 9).any(-1).all()
    elif name == "topk":
        assert (e[0][real][:, 2:] == -1).all() and (e[0][real][:, :2] >= 0).all()
        assert (e[1][real] >= 0).all()
    else:
        out = trace.activations["blocks.0.hook_attn_out"]                       # [B, T + NEW, d]
        assert out[real].abs().max() == 0, "every head of layer 0 ablated: attention output 0 everywhere"


# ------------------------------------------------------------------------------------------------
# (c) no import circle
PACKAGE_DIR = Path(dbrx_lab.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = ["dbrx_lab", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE_DIR.joinpath(*name.split(".")[1:]) / "__init__.py").is_file()


def exists(name: str) -> bool:
    rel = name.split(".")[1:]
    return not rel or is_package(name) or PACKAGE_DIR.joinpath(*rel).with_suffix(".py").is_file()


def runtime_nodes(tree: ast.AST):
    """Every node, skipping the bodies of `if TYPE_CHECKING:` (annotations only, never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test)):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> dbrx_lab modules it imports anywhere (module level, functions, methods), relative or absolute;
    `from X import name` names the submodule X.name when there is one. Importing a.b.c from outside package
    a.b also runs a.b's __init__ (an edge to it; the root package excepted)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        me = module_name(path)
        package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bases = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                bases = [(name, [a.name for a in node.names])]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str) and node.args[0].value.startswith("dbrx_lab")):
                bases = [(node.args[0].value, [])]
            else:
                continue
            for base, names in bases:
                if base != "dbrx_lab" and not base.startswith("dbrx_lab."):
                    continue
                while not exists(base):                         # `import dbrx_lab.x.attr` -> dbrx_lab.x
                    base = base.rsplit(".", 1)[0]
                subs = [f"{base}.{n}" for n in names if exists(f"{base}.{n}")]
                hit = subs + ([base] if len(subs) < len(names) or not names else [])
                for t in hit:
                    targets.add(t)
                    parts = t.split(".")
                    for i in range(2, len(parts)):              # parent packages below the root
                        parent = ".".join(parts[:i])
                        if not (me == parent or me.startswith(parent + ".")):
                            targets.add(parent)
        targets.discard(me)
        graph[me] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_import_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "dbrx_lab.model" in graph["dbrx_lab.lm"]                              # from .model import DbrxModel
    assert {"dbrx_lab.generation", "dbrx_lab.trace", "dbrx_lab.interventions",
            "dbrx_lab.checkpoint"} <= graph["dbrx_lab.lm"]                       # from . import generation, ...
    assert "dbrx_lab.loading" in graph["dbrx_lab.report"]                        # inside a function
    assert "dbrx_lab.trace" in graph["dbrx_lab.analysis.compare"]                # from ..trace import ...
    assert "dbrx_lab.kernels.unembed" in graph["dbrx_lab.model"]
    assert "dbrx_lab.kernels" in graph["dbrx_lab.model"]
    assert "dbrx_lab.lm" not in graph["dbrx_lab.interventions"]                  # TYPE_CHECKING only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle_in_the_package():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_model_and_kernels_build_on_nothing_above_them():
    graph = import_graph()
    above = {f"dbrx_lab.{m}" for m in ("generation", "trace", "interventions", "checkpoint", "loading", "lm")}
    assert not graph["dbrx_lab.model"] & above, f"model.py imports {sorted(graph['dbrx_lab.model'] & above)}"
    assert not closure(graph, "dbrx_lab.model") & above, \
        f"model.py imports (indirectly) {sorted(closure(graph, 'dbrx_lab.model') & above)}"
    for name in graph:
        if name.startswith("dbrx_lab.kernels"):
            assert "dbrx_lab.model" not in closure(graph, name), f"{name} imports the model"


def test_every_module_imports():
    import importlib

    optional = {"dbrx_lab.widgets", "dbrx_lab.figures", "dbrx_lab.report"}      # plotly / ipywidgets
    for name in sorted(import_graph()):
        if any(name == o or name.startswith(o + ".") for o in optional):
            pytest.importorskip("plotly")
            if name.startswith("dbrx_lab.widgets"):
                pytest.importorskip("ipywidgets")
        importlib.import_module(name)


# ------------------------------------------------------------------------------------------------
# (d) hook names derive from module paths
DOCUMENTED = (["hook_embed"]
              + [f"blocks.{{i}}.{n}" for n in (
                  "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_scores",
                  "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ffn.hook_router_logits",
                  "ffn.hook_topk_experts", "ffn.hook_topk_weights", "ffn.hook_expert_hidden_norm",
                  "ffn.hook_expert_out", "hook_ffn_out", "hook_resid_post")]
              + ["hook_final"])


def documented_names(n_layers: int) -> list[str]:
    """hook_embed, then each block's points in forward order, then hook_final."""
    per_block = [n for n in DOCUMENTED if "{i}" in n]
    return [DOCUMENTED[0], *(n.format(i=i) for i in range(n_layers) for n in per_block), DOCUMENTED[-1]]


def test_hook_names_are_module_paths_through_the_alias(tiny_model):
    points = {path: m for path, m in tiny_model.named_modules() if isinstance(m, HookPoint)}
    assert list(tiny_model.hook_points.values()) == list(points.values())
    for path, point in points.items():
        assert point.name == hook_alias(path), path
        assert tiny_model.hook_points[point.name] is point
        m = re.match(r"blocks\.(\d+)\.", point.name)
        assert point.layer == (int(m.group(1)) if m else None)
    assert tiny_model.hook_names() == documented_names(tiny_model.config.n_layers)
    assert hook_alias("transformer.blocks.3.norm_attn_norm.attn.hook_q") == "blocks.3.attn.hook_q"
    assert hook_alias("transformer.blocks.3.norm_attn_norm.hook_resid_mid") == "blocks.3.hook_resid_mid"
    assert hook_alias("transformer.hook_embed") == "hook_embed"


def test_a_new_hook_point_attribute_is_all_it_takes(monkeypatch, make_ids):
    class ProbedRouter(model_mod.Router):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.hook_probe = HookPoint(("token", "expert"))

        def forward(self, x):
            return self.hook_probe(super().forward(x))

    monkeypatch.setattr(model_mod, "Router", ProbedRouter)

    class Extra(DbrxLM):
        def _name_hook_points(self):                                             # setattr before naming
            self.transformer.blocks[1].norm_attn_norm.hook_extra = HookPoint()
            return super()._name_hook_points()

    model = Extra(dataclasses.replace(PRESETS["tiny"])).eval()
    names = model.hook_names()
    assert "blocks.0.ffn.router.hook_probe" in names and "blocks.1.ffn.router.hook_probe" in names
    assert "blocks.1.hook_extra" in names
    assert model.hook_points["blocks.1.ffn.router.hook_probe"].layer == 1
    assert model.hook_points["blocks.1.hook_extra"].layer == 1
    assert model.hook_names(shapes=True)["blocks.0.ffn.router.hook_probe"] == "[token, expert=16]"
    seen = []
    with model.hooks([("blocks.*.ffn.router.hook_probe", lambda x, h: seen.append((h.name, x.shape)))]):
        with torch.no_grad():
            model(make_ids(2, 3))
    assert seen == [("blocks.0.ffn.router.hook_probe", (6, 16)), ("blocks.1.ffn.router.hook_probe", (6, 16))]


def parse_layout(layout: str) -> list[tuple[str, int | None]]:
    dims = []
    for part in layout.strip("[]").split(", "):
        name, _, size = part.partition("=")
        dims.append((name, int(size) if size else None))
    return dims


def test_hook_shapes_match_the_tensors_hooks_see(tiny_model, make_ids):
    B, Tp = 2, 5
    shapes = tiny_model.hook_names(shapes=True)
    assert list(shapes) == tiny_model.hook_names()
    seen: dict[str, list] = {}
    with tiny_model.hooks([(lambda n: True, lambda x, h: seen.setdefault(h.name, []).append(tuple(x.shape)))]):
        cache = tiny_model.new_cache(B, Tp + 1)
        with torch.no_grad():
            tiny_model(make_ids(B, Tp), cache=cache)
            tiny_model(make_ids(B, 1, seed=1), cache=cache, start=Tp)
    assert set(seen) == set(shapes)
    for name, layout in shapes.items():
        dims = parse_layout(layout)
        for call, (t, s) in enumerate(((Tp, Tp), (1, Tp + 1))):
            shape = seen[name][call]
            assert len(shape) == len(dims), f"{name}: {shape} vs {layout}"
            want = {"batch": B, "pos": t, "query": t, "key": s}
            for (dim, size), got in zip(dims, shape):
                expected = size if size is not None else want.get(dim)
                assert expected is not None, f"{name}: unknown dimension {dim!r}"
                assert got == expected, f"{name} call {call}: {dim} is {got}, layout says {expected} ({layout})"


# ------------------------------------------------------------------------------------------------
# (e) a hook returning a wrong tensor raises ValueError naming the point
@pytest.mark.parametrize("bad", ["dtype", "shape", "device", "type"])
def test_hook_returning_a_wrong_value_names_the_point(tiny_model, make_ids, bad):
    name = "blocks.1.hook_resid_mid"
    make = {"dtype": lambda x: x.double(), "shape": lambda x: x[:, :-1],
            "device": lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"),
            "type": lambda x: x.tolist()}[bad]
    ids = make_ids(1, T)
    with tiny_model.hooks([(name, lambda x, h: make(x))]):
        with pytest.raises(ValueError, match=re.escape(name)):
            with torch.no_grad():
                tiny_model(ids)
        with pytest.raises(ValueError, match=re.escape(name)):
            tiny_model.generate(ids, 2)
    with torch.no_grad():
        assert torch.isfinite(tiny_model(ids).logits).all(), "the model still works after the error"


# ------------------------------------------------------------------------------------------------
# (f) a full KV cache
def test_manual_decode_loop_past_the_cache_raises_cache_full(tiny_model, make_ids):
    ids = make_ids(1, T)
    max_len = T + 2
    cache = tiny_model.new_cache(1, max_len)
    with torch.no_grad():
        logits = tiny_model(ids, cache=cache, last_only=True).logits[:, -1]
        pos = T
        for _ in range(2):
            nxt = logits.argmax(-1)
            logits = tiny_model(nxt[:, None], cache=cache, start=pos, last_only=True).logits[:, -1]
            pos += 1
        with pytest.raises(CacheFullError, match=rf"max_len >= {max_len + 1}") as err:
            tiny_model(logits.argmax(-1)[:, None], cache=cache, start=pos, last_only=True)
        assert "new_cache" in str(err.value) and str(max_len) in str(err.value)
        with pytest.raises(CacheFullError, match=rf"max_len >= {T + 3}"):
            tiny_model(make_ids(1, 3), cache=tiny_model.new_cache(1, T), start=T)       # several tokens
        with pytest.raises(CacheFullError, match=rf"max_len >= {T + 1}"):
            tiny_model(make_ids(1, T + 1), cache=tiny_model.new_cache(1, T))            # prefill too long
    assert issubclass(CacheFullError, ValueError)
    small = tiny_model.new_cache(1, 4)[0]                                        # KVCache.update itself
    with pytest.raises(CacheFullError, match=r"max_len >= 5"):
        small.update(3, torch.zeros(1, 2, 2, 16), torch.zeros(1, 2, 2, 16))


# ------------------------------------------------------------------------------------------------
# (g) deterministic algorithms
@pytest.fixture
def deterministic():
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


def test_deterministic_algorithms_give_bit_identical_runs(tiny_model, make_ids, deterministic):
    ids = make_ids(2, T, seed=9)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :2] = 0
    rec = Record(router=True, attention=True, experts=True, residuals=True)
    runs = []
    for _ in range(2):
        gen = tiny_model.generate(ids, NEW, attention_mask=mask)
        sampled = tiny_model.generate(ids, NEW, attention_mask=mask, do_sample=True, seed=3)
        out, trace = tiny_model.run_with_trace(ids, mask, record=rec)
        gen_t, gtrace = tiny_model.generate_with_trace(ids, NEW, record=rec, attention_mask=mask)
        runs.append((gen, sampled, out.logits, trace, gen_t, gtrace))
    a, b = runs
    for i in (0, 1, 2, 4):
        assert torch.equal(a[i], b[i]), f"item {i} differs between two runs"
    assert torch.equal(a[0], a[4])
    for ta, tb in ((a[3], b[3]), (a[5], b[5])):
        assert ta.differences(tb, rtol=0, atol=0) == []
