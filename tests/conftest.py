"""Shared test fixtures.

Reference models use a *widened* random init (`widen_`: matrices ~ N(0, 0.3^2), norm weights ~ 1 + N(0, 0.1^2))
instead of the default std 0.02, so that routing is decisive and spread over all experts, clip_qkv
actually clamps, and logits differ clearly between tokens (greedy decoding has no near-ties).

Fixtures (session-scoped ones are shared: treat them as read-only, never load weights into them, and only
attach hooks/interventions with the context managers, which clean up):
  tiny_cfg            function  fresh copy of PRESETS["tiny"] (vocab 512, 2 layers, 16 experts, top-4)
  widen               function  the `widen_(model, std=0.3, seed=0)` helper
  widened_state_dict  session   HF-named float32 state dict of the widened tiny model
  hf_pair             session   (transformers DbrxForCausalLM, DbrxLM) with identical widened weights, eval()
  tiny_model          function  a fresh widened DbrxLM (eval) that a test may modify
  hf_checkpoint       session   folder written by HF's save_pretrained from hf_pair's model
  tiny_vocab_model    session   load_model("tiny-vocab"): real 100352-token vocab with the tokenizer attached
  make_ids            function  make_ids(B, T, seed=0, vocab=512) -> LongTensor [B, T] of random token ids
  two_threads         function  torch.set_num_threads(2) for the test, restored afterwards
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dbrx_lab import PRESETS, DbrxConfig, DbrxLM, load_model

# hypothesis (tests/test_properties.py): derandomized and bounded by default, so the suite is deterministic
# and fast; HYPOTHESIS_PROFILE=dev explores more (random seeds, more examples).
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, database=None,
                              print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:                     # hypothesis is a dev extra; test_properties skips without it
    pass

# Test models are tiny: one intra-op thread is faster than two, and avoids thread thrashing (10x slower
# decoding measured) when other processes share the 2 cores.
torch.set_num_threads(1)


@torch.no_grad()
def widen_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Deterministic wide init by parameter name (same names -> same values in HF's and our model)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        r = torch.randn(p.shape, generator=g)
        p.copy_(r * std if p.ndim > 1 else 1.0 + 0.1 * r)
    return model


@pytest.fixture
def two_threads():
    """Two intra-op threads for one test, as on the 2-core machine: decoding takes its multi-threaded paths
    (the split linear kernel's products, kernels.experts.expert_pair)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg() -> DbrxConfig:
    return dataclasses.replace(PRESETS["tiny"])


@pytest.fixture
def widen():
    return widen_


@pytest.fixture(scope="session")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(PRESETS["tiny"])
    hf = widen_(transformers.DbrxForCausalLM(cfg.to_hf())).eval()
    ours = DbrxLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.fixture(scope="session")
def widened_state_dict(hf_pair) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in hf_pair[1].state_dict().items()}


@pytest.fixture
def tiny_model(widened_state_dict) -> DbrxLM:
    model = DbrxLM(dataclasses.replace(PRESETS["tiny"])).eval()
    model.load_state_dict(widened_state_dict, strict=True)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(hf_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_checkpoint")
    hf_pair[0].save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vocab_model() -> DbrxLM:
    return load_model("tiny-vocab")


@pytest.fixture(scope="module")
def text_model() -> DbrxLM:
    """A 2-layer, 8-expert random model (std 0.3, seed 0) with DBRX's vocabulary and tokenizer: route-stats
    and anything else that needs real text. One per test module."""
    from dbrx_lab.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = DbrxConfig(d_model=16, n_heads=2, kv_n_heads=1, n_layers=2, ffn_hidden_size=16, max_seq_len=64,
                     moe_num_experts=8, moe_top_k=2, torch_dtype="float32")
    m = DbrxLM(cfg).eval()
    m.reset_parameters(std=0.3)
    m.requires_grad_(False)
    m.tokenizer = load_tokenizer()
    return m


@pytest.fixture
def make_ids():
    def make(B: int, T: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
        return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))

    return make
