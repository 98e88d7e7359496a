import dataclasses
import json
import math
from pathlib import Path

import pytest

from dbrx_lab import PRESETS, DbrxConfig

RELEASED = Path("/work/shared/reference/dbrx-instruct")
needs_released = pytest.mark.skipif(not (RELEASED / "config.json").is_file(), reason="released config not present")


@needs_released
def test_released_config_reads_dbrx_values():
    cfg = DbrxConfig.from_pretrained(RELEASED)
    assert cfg.rope_theta == 500000.0
    assert (cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.n_layers) == (6144, 48, 8, 40)
    assert (cfg.ffn_hidden_size, cfg.moe_num_experts, cfg.moe_top_k) == (10752, 16, 4)
    assert cfg.vocab_size == 100352 and cfg.clip_qkv == 8.0
    assert cfg.moe_normalize_expert_weights == 1.0      # absent from the file: DBRX's default p=1
    assert dataclasses.replace(cfg, moe_jitter_eps=None) == PRESETS["dbrx-instruct"]   # file has jitter 0


@needs_released
def test_released_config_ints_become_floats():
    raw = json.loads((RELEASED / "config.json").read_text())
    assert isinstance(raw["attn_config"]["clip_qkv"], int) and isinstance(raw["attn_config"]["rope_theta"], int)
    cfg = DbrxConfig.from_pretrained(RELEASED)
    for name in ("clip_qkv", "rope_theta", "moe_jitter_eps", "moe_loss_weight", "layer_norm_eps"):
        assert isinstance(getattr(cfg, name), float), name
    assert cfg.moe_jitter_eps == 0.0


@needs_released
def test_transformers5_rope_theta_trap():
    """HF 5.x reads rope_theta only from top-level rope_parameters: the released file loads with 10000 there."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DbrxConfig.from_pretrained(RELEASED)
    assert hf_cfg.rope_parameters["rope_theta"] == 10000.0, "the trap this package guards against is gone"
    ours = DbrxConfig.from_pretrained(RELEASED)
    assert ours.rope_theta == 500000.0
    assert ours.to_hf().rope_parameters["rope_theta"] == 500000.0


def test_hf5_written_config_reads_correctly(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(PRESETS["tiny"], rope_theta=123456.0, clip_qkv=3.0)
    cfg.to_hf().save_pretrained(tmp_path)               # HF 5.x layout: top-level rope_parameters, "dtype"
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"]["rope_theta"] == 123456.0 and "dtype" in raw
    back = DbrxConfig.from_pretrained(tmp_path)
    assert back.rope_theta == 123456.0 and back.clip_qkv == 3.0 and back.torch_dtype == "float32"
    assert (back.d_model, back.n_layers, back.kv_n_heads, back.vocab_size) == (64, 2, 2, 512)


def test_top_level_rope_parameters_only(tmp_path):
    d = PRESETS["tiny"].to_dict()
    del d["attn_config"]["rope_theta"]
    d["rope_parameters"]["rope_theta"] = 2500.0
    assert DbrxConfig.from_dict(d).rope_theta == 2500.0


def test_conflicting_rope_theta_warns_and_uses_attn_config():
    d = PRESETS["tiny"].to_dict()
    d["rope_parameters"]["rope_theta"] = 10000.0
    with pytest.warns(UserWarning, match="attn_config.rope_theta"):
        assert DbrxConfig.from_dict(d).rope_theta == 500000.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_round_trip(name, tmp_path):
    cfg = PRESETS[name]
    assert DbrxConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save_pretrained(tmp_path)
    assert DbrxConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / "config.json").read_text())["attn_config"]["rope_theta"] == cfg.rope_theta


@pytest.mark.parametrize("changes, message", [
    (dict(n_heads=5), r"d_model \(64\) must be divisible by n_heads \(5\)"),
    (dict(kv_n_heads=3), r"n_heads \(4\) must be divisible by kv_n_heads \(3\)"),
    (dict(moe_top_k=17), r"moe_top_k \(17\) must be in \[1, moe_num_experts=16\]"),
    (dict(d_model=0), r"d_model must be a positive integer"),
    (dict(n_layers=2.5), r"n_layers must be a positive integer"),
    (dict(rope_theta=0), r"rope_theta must be > 0"),
    (dict(clip_qkv=-1), r"clip_qkv must be > 0"),
    (dict(ffn_act_fn="gelu"), r"only the silu GLU"),
])
def test_inconsistent_config_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["tiny"], **changes)


def test_not_dbrx_rejected():
    with pytest.raises(ValueError, match="not a DBRX config"):
        DbrxConfig.from_dict({"model_type": "llama"})


def test_presets():
    assert math.isclose(PRESETS["dbrx-instruct"].n_params / 1e9, 131.6, abs_tol=0.05)
    assert PRESETS["tiny"].vocab_size == 512 and PRESETS["tiny-vocab"].vocab_size == 100352
    assert PRESETS["bench"].d_model == 512
    cfg = DbrxConfig.from_pretrained("tiny")
    cfg.n_layers = 7
    assert PRESETS["tiny"].n_layers == 2                 # from_pretrained returns a copy


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DbrxConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DbrxConfig.from_pretrained(tmp_path)
