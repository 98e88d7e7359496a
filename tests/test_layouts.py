"""Every user-facing path gives the same tokens and logits (torch.equal) on accelerate-dispatched layouts as on
the all-in-memory model.

Layouts, all built on the CPU from one resident model (tiny-vocab, widened so routing is decisive and text
prompts work):
  cpu_disk      load_model(folder, device_map=...) with blocks 0 and 2 on disk (main device: the CPU)
  one_gpu       the 1-GPU layout emulated: what accelerate.dispatch_model does when the main device is a GPU
                (modules mapped to "cpu" are offloaded: meta parameters, weights brought in for each call;
                "disk" ones likewise from the offload folder), with the CPU standing in for the GPU.
                wte and block 0 "on the GPU"; block 1, norm_f and lm_head on "cpu"; block 2 on disk.
  wte_offloaded the same, only the embedding offloaded to "cpu"
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.hooks import attach_align_device_hook_on_blocks
from accelerate.utils import (OffloadedWeightsLoader, extract_submodules_state_dict, find_tied_parameters,
                              offload_state_dict, retie_parameters)

from dbrx_lab import (ExpertAblation, ExpertForce, ExpertScale, HeadAblation, Record, RoutingPatch, TopK, analysis,
                      load_model, save_pretrained)

PROMPT = "def add(a, b):\n    return a + b"
PROMPTS = ["x = 1", "for i in range(10):\n    print(i)"]                  # a batch: the first row left padded
NEW = 6                                                                     # new tokens per generation
MAIN = "main"                                                               # the stand-in GPU in emulated maps
LAYOUTS = ["cpu_disk", "one_gpu", "wte_offloaded"]
ONE_GPU = {"transformer.wte": MAIN, "transformer.blocks.0": MAIN, "transformer.blocks.1": "cpu",
           "transformer.blocks.2": "disk", "transformer.norm_f": "cpu", "lm_head": "cpu"}
WTE_OFFLOADED = {"transformer.wte": "cpu", "transformer.blocks.0": MAIN, "transformer.blocks.1": MAIN,
                 "transformer.blocks.2": MAIN, "transformer.norm_f": MAIN, "lm_head": MAIN}


def dispatch_as_on_one_gpu(model, device_map: dict, offload_dir) -> torch.nn.Module:
    """accelerate.dispatch_model's path for a GPU main device (accelerate 1.x big_modeling.dispatch_model),
    with the CPU as execution device: MAIN modules stay resident behind an AlignDevicesHook; "cpu" modules are
    offloaded to a CPU state dict and "disk" ones to offload_dir (meta parameters, weights loaded for each
    call); blocks load all their weights at once (preload_module_classes, as load_model does)."""
    main = torch.device("cpu")
    state = model.state_dict()
    cpu_modules = [n for n, d in device_map.items() if d == "cpu"]
    disk_modules = [n for n, d in device_map.items() if d == "disk"]
    cpu_state = extract_submodules_state_dict(state, cpu_modules)
    if disk_modules:
        offload_state_dict(str(offload_dir), extract_submodules_state_dict(state, disk_modules))
    execution_device = {name: main for name in device_map}
    execution_device[""] = main
    offload = {name: dev in ("cpu", "disk") for name, dev in device_map.items()}
    weights_map = OffloadedWeightsLoader(state_dict=cpu_state, save_folder=str(offload_dir) if disk_modules else None)
    tied = find_tied_parameters(model)
    attach_align_device_hook_on_blocks(model, execution_device=execution_device, offload=offload,
                                       offload_buffers=False, weights_map=weights_map, skip_keys=None,
                                       preload_module_classes=["Block"], tied_params_map={})
    retie_parameters(model, tied)
    model.hf_device_map = {name: main if dev == MAIN else dev for name, dev in device_map.items()}
    model.execution_device = main
    return model


@pytest.fixture(scope="module")
def resident():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


@pytest.fixture(scope="module")
def folder(resident, tmp_path_factory):
    return save_pretrained(resident, tmp_path_factory.mktemp("layouts") / "ckpt")


@pytest.fixture(scope="module")
def layouts(folder, tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            tmp = tmp_path_factory.mktemp(name)
            if name == "cpu_disk":
                model = load_model(folder, device_map={"": "cpu", "transformer.blocks.0": "disk",
                                                       "transformer.blocks.2": "disk"}, offload_folder=tmp)
                assert model.blocks[0].ffn.experts.mlp.w1.device.type == "meta"        # really on disk
            else:
                model = dispatch_as_on_one_gpu(load_model(folder), ONE_GPU if name == "one_gpu" else WTE_OFFLOADED,
                                               tmp)
                assert model.transformer.wte.weight.device.type == ("cpu" if name == "one_gpu" else "meta")
                if name == "one_gpu":
                    assert model.lm_head.weight.device.type == model.transformer.norm_f.weight.device.type == "meta"
                    assert model.blocks[1].ffn.experts.mlp.w1.device.type == "meta"
            assert model.execution_device == torch.device("cpu")
            built[name] = model
        return built[name]

    return get


@pytest.fixture(params=LAYOUTS)
def pair(request, resident, layouts):
    """(resident, dispatched) for one layout."""
    return resident, layouts(request.param)


def ids_of(model, text=PROMPT) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


def same_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_exact=True)


def same_traces(a, b) -> None:
    assert a.differences(b, rtol=0, atol=0) == []


# --- forward -------------------------------------------------------------------------------------------
def test_device_is_the_execution_device(pair):
    ref, model = pair
    assert model.device == torch.device("cpu")
    assert model.dtype == ref.dtype


def test_forward(pair):
    ref, model = pair
    ids = ids_of(ref)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"last_only": True}):
            out, expected = model(ids, **kwargs).logits, ref(ids, **kwargs).logits
            assert out.device.type == "cpu" and torch.equal(out, expected), kwargs


# --- generation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"do_sample": True, "seed": 3},
                                    {"do_sample": True, "seed": 5, "temperature": 0.7, "top_k": 20, "top_p": 0.9}],
                         ids=["greedy", "sample", "sample_topk_topp"])
def test_generate(pair, kwargs):
    ref, model = pair
    ids = ids_of(ref)
    assert torch.equal(model.generate(ids, NEW, **kwargs), ref.generate(ids, NEW, **kwargs))


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_generate_batch_with_left_padding(pair, do_sample):
    ref, model = pair
    out = model.generate(PROMPTS, NEW, do_sample=do_sample, seed=1)
    assert torch.equal(out, ref.generate(PROMPTS, NEW, do_sample=do_sample, seed=1))
    assert model.generate_text(PROMPTS, NEW) == ref.generate_text(PROMPTS, NEW)


def test_stream(pair):
    ref, model = pair
    steps, expected = list(model.stream(PROMPTS, NEW)), list(ref.stream(PROMPTS, NEW))
    assert len(steps) == len(expected) == NEW
    for a, b in zip(steps, expected):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.finished, b.finished)
        assert torch.equal(a.logits, b.logits)


def test_generate_text(pair):
    ref, model = pair
    assert model.generate_text(PROMPT, NEW) == ref.generate_text(PROMPT, NEW)
    assert model.generate_text(PROMPT, NEW, do_sample=True, seed=2) == ref.generate_text(PROMPT, NEW, do_sample=True,
                                                                                            seed=2)


# --- traces --------------------------------------------------------------------------------------------
RECORD = Record(router=True, attention=True, experts=True)


def test_run_with_trace(pair):
    ref, model = pair
    out, trace = model.run_with_trace(PROMPTS, record=RECORD)
    ref_out, ref_trace = ref.run_with_trace(PROMPTS, record=RECORD)
    assert torch.equal(out.logits, ref_out.logits)
    same_traces(trace, ref_trace)


def test_generate_with_trace(pair):
    ref, model = pair
    ids, trace = model.generate_with_trace(PROMPT, NEW, record=RECORD)
    ref_ids, ref_trace = ref.generate_with_trace(PROMPT, NEW, record=RECORD)
    assert torch.equal(ids, ref_ids)
    same_traces(trace, ref_trace)


# --- interventions -------------------------------------------------------------------------------------
def routing_source(model):
    return model.run_with_trace("while True:\n    pass", record=Record(router=True))[1]


INTERVENTIONS = {
    "ablation_reroute": lambda m: ExpertAblation(1, [0, 1, 2, 3], mode="reroute"),
    "ablation_zero": lambda m: ExpertAblation("all", [4, 5], mode="zero"),
    "ablation_renormalize": lambda m: ExpertAblation(2, [6, 7, 8], mode="renormalize"),
    "force": lambda m: ExpertForce(0, 9),
    "force_weight": lambda m: ExpertForce(1, [2, 3], weight=0.4),
    "scale": lambda m: ExpertScale(2, 5, 3.0),
    "topk": lambda m: TopK(2),
    "heads_zero": lambda m: HeadAblation(0, [1, 2], mode="zero"),
    "heads_mean": lambda m: HeadAblation(1, [0], mode="mean"),
    "routing_patch": lambda m: RoutingPatch(routing_source(m), layers=[0, 2]),
}


@pytest.mark.parametrize("make", list(INTERVENTIONS.values()), ids=list(INTERVENTIONS))
def test_interventions(pair, make):
    ref, model = pair
    ids = ids_of(ref)

    def run(m):
        with torch.no_grad(), m.intervene(make(ref)):
            return m(ids).logits, m.generate(PROMPTS, NEW), m.run_with_trace(ids, record=Record(router=True))[1]

    (logits, gen, trace), (ref_logits, ref_gen, ref_trace) = run(model), run(ref)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(gen, ref_gen)
    same_traces(trace, ref_trace)
    with torch.no_grad():
        assert not torch.equal(ref(ids).logits, ref_logits), "the intervention should change the logits"


# --- analysis, widgets, route-stats ----------------------------------------------------------------------
def test_compare_generations(pair):
    ref, model = pair
    ivs = lambda: [ExpertAblation(0, [1, 2, 3, 4], mode="reroute"), ExpertAblation(1, [5, 6])]  # noqa: E731
    for kwargs in ({}, {"do_sample": True, "seed": 4}):
        res = analysis.compare_generations(model, PROMPT, ivs(), max_new_tokens=NEW, **kwargs)
        exp = analysis.compare_generations(ref, PROMPT, ivs(), max_new_tokens=NEW, **kwargs)
        assert torch.equal(res.baseline_ids, exp.baseline_ids) and torch.equal(res.ablated_ids, exp.ablated_ids)
        assert (res.baseline_text, res.ablated_text, res.first_divergence) == \
            (exp.baseline_text, exp.ablated_text, exp.first_divergence)
        same_frames(res.per_step, exp.per_step)
        same_frames(res.cascade, exp.cascade)


def test_logit_attribution(pair):
    ref, model = pair
    ids = torch.tensor([ref.tokenizer.encode(PROMPTS[1])] * 2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    for kwargs in ({}, {"target": "next", "positions": "all", "attention_mask": mask}, {"target": 17}):
        got, expected = analysis.logit_attribution(model, ids, **kwargs), analysis.logit_attribution(ref, ids, **kwargs)
        same_frames(got.components, expected.components)
        same_frames(got.totals, expected.totals)


def test_ablation_lab_generate(pair):
    from dbrx_lab.widgets import AblationLab

    ref, model = pair
    results = []
    for m in (model, ref):
        lab = AblationLab(m, prompt=PROMPT, experts={0: [1, 2, 3, 4], 1: [5, 6]}, max_new_tokens=NEW,
                          background=False)
        lab.generate_button.click()
        assert lab.last_error is None, lab.error.value
        results.append((lab.result, lab.ablated_text.value, lab.baseline_text.value))
    (res, ablated, baseline), (exp, exp_ablated, exp_baseline) = results
    assert torch.equal(res.baseline_ids, exp.baseline_ids) and torch.equal(res.ablated_ids, exp.ablated_ids)
    same_frames(res.per_step, exp.per_step)
    assert (ablated, baseline) == (exp_ablated, exp_baseline)


def test_route_stats(pair, tmp_path):
    from dbrx_lab import route_stats

    ref, model = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n"
                            for i, t in enumerate([PROMPT, *PROMPTS, "return None", "x = [i * i for i in y]"])))
    kwargs = dict(batch_size=2, progress=False, min_count=1)
    res = route_stats(model, data, tmp_path / "out", **kwargs)
    exp = route_stats(ref, data, tmp_path / "ref", **kwargs)
    assert (res.texts, res.tokens) == (exp.texts, exp.tokens) and sorted(res.tables) == sorted(exp.tables)
    same_frames(analysis.load_routing(tmp_path / "out"), analysis.load_routing(tmp_path / "ref"))
    for name in res.tables:
        if str(res.tables[name]).endswith(".parquet"):
            same_frames(pd.read_parquet(res.tables[name]), pd.read_parquet(exp.tables[name]))
    assert np.array_equal(sorted(p.name for p in (tmp_path / "out").iterdir()),
                          sorted(p.name for p in (tmp_path / "ref").iterdir()))
