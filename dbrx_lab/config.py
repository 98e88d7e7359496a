"""DBRX configuration, compatible with HF `config.json` files (released and transformers 5.x style)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DbrxConfig", "PRESETS", "HF_DEFAULTS", "read_json"]

# transformers' class defaults (DbrxConfig, DbrxAttentionConfig, DbrxFFNConfig): what HF uses for a field that
# config.json leaves out (dbrx-instruct's values are not assumed). layer_norm_eps is not an HF field: HF's
# DBRX LayerNorms use torch's 1e-5.
HF_DEFAULTS: dict[str, Any] = {
    "d_model": 2048, "n_heads": 16, "n_layers": 24, "max_seq_len": 2048, "vocab_size": 32000,
    "kv_n_heads": 1, "clip_qkv": None, "rope_theta": 10000.0, "attn_pdrop": 0.0,
    "ffn_hidden_size": 3584, "moe_num_experts": 4, "moe_top_k": 1, "moe_normalize_expert_weights": 1.0,
    "moe_jitter_eps": None, "moe_loss_weight": 0.01, "ffn_act_fn": "silu",
    "resid_pdrop": 0.0, "emb_pdrop": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
    "layer_norm_eps": 1e-5,
}
# Defaulting these changes the model's shapes or arithmetic, so a config without them gets a warning. The
# released dbrx-instruct config.json writes all of them; it leaves out moe_normalize_expert_weights and
# ffn_act_fn, whose HF defaults (1.0, silu) are DBRX's.
WARN_IF_DEFAULTED = ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "kv_n_heads", "clip_qkv",
                     "rope_theta", "ffn_hidden_size", "moe_num_experts", "moe_top_k")
_OPTIONAL_FLOATS = ("clip_qkv", "moe_normalize_expert_weights", "moe_jitter_eps")


def read_json(path: Path) -> Any:
    """A JSON file's value; ValueError naming the file for bytes that are not UTF-8 or text that is not JSON."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None


@dataclass
class DbrxConfig:
    """Shapes and hyper-parameters of a DBRX model.

    Field names follow HF's `DbrxConfig` so a `config.json` round-trips; the nested `attn_config` and
    `ffn_config` of the JSON are flattened here (`kv_n_heads`, `ffn_hidden_size`, ...).
    """

    d_model: int = 6144
    n_heads: int = 48
    n_layers: int = 40
    max_seq_len: int = 32768
    vocab_size: int = 100352
    # attention
    kv_n_heads: int = 8
    clip_qkv: float | None = 8.0
    rope_theta: float = 500000.0
    attn_pdrop: float = 0.0
    # mixture of experts
    ffn_hidden_size: int = 10752
    moe_num_experts: int = 16
    moe_top_k: int = 4
    moe_normalize_expert_weights: float | None = 1.0
    moe_jitter_eps: float | None = None
    moe_loss_weight: float = 0.05
    moe_z_loss_weight: float = 0.0
    ffn_act_fn: str = "silu"
    # misc
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    tie_word_embeddings: bool = False
    torch_dtype: str | None = "bfloat16"
    pad_token_id: int | None = None
    eos_token_id: list[int] | None = field(default_factory=lambda: [100257, 100279])

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "kv_n_heads",
                     "ffn_hidden_size", "moe_num_experts", "moe_top_k"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
                setattr(self, name, value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DbrxConfig.{name} must be a positive integer, got {value!r}")
        for name in ("clip_qkv", "rope_theta", "moe_normalize_expert_weights", "moe_jitter_eps",
                     "moe_loss_weight", "moe_z_loss_weight", "layer_norm_eps", "initializer_range", "attn_pdrop",
                     "resid_pdrop", "emb_pdrop"):
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FLOATS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DbrxConfig.{name} must be a finite number{' or None' * (name in _OPTIONAL_FLOATS)}"
                                 f", got {value!r}")
            setattr(self, name, float(value))
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0 (DBRX: 1e-5), got {self.layer_norm_eps}")
        if self.moe_normalize_expert_weights is not None and self.moe_normalize_expert_weights <= 0:
            raise ValueError(f"moe_normalize_expert_weights (the p of the p-norm) must be > 0 or None, got "
                             f"{self.moe_normalize_expert_weights}")
        for name in ("attn_pdrop", "resid_pdrop", "emb_pdrop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by kv_n_heads ({self.kv_n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be in [1, moe_num_experts={self.moe_num_experts}]")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            raise ValueError(f"clip_qkv must be > 0 or None, got {self.clip_qkv}")
        if self.ffn_act_fn != "silu":
            raise ValueError(f"only the silu GLU of DBRX is supported, got ffn_act_fn={self.ffn_act_fn!r}")
        if isinstance(self.eos_token_id, int) and not isinstance(self.eos_token_id, bool):
            self.eos_token_id = [self.eos_token_id]
        if self.eos_token_id is not None:
            if not isinstance(self.eos_token_id, (list, tuple)) or not all(
                    isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in self.eos_token_id):
                raise ValueError(f"eos_token_id must be a token id >= 0, a list of them or None, got "
                                 f"{self.eos_token_id!r}")
            self.eos_token_id = list(self.eos_token_id)
        if self.pad_token_id is not None and (not isinstance(self.pad_token_id, int) or
                                              isinstance(self.pad_token_id, bool) or self.pad_token_id < 0):
            raise ValueError(f"pad_token_id must be a token id >= 0 or None, got {self.pad_token_id!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count of `DbrxLM` with this config."""
        d, hd, kv = self.d_model, self.head_dim, self.kv_n_heads
        attn = d * (d + 2 * kv * hd) + d * d
        ffn = d * self.moe_num_experts + 3 * self.moe_num_experts * self.ffn_hidden_size * d
        block = attn + ffn + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head

    # --- HF JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "DbrxConfig":
        """Build from an HF config dict (nested attn_config/ffn_config; released or transformers 5.x).

        Each field is read where the released config or HF writes it; a model field absent from both takes
        HF's class default (as transformers would), with a warning naming the fields that shape the model.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"a config must be a JSON object ({{...}}), got {type(cfg).__name__}")
        cfg = dict(cfg)
        if cfg.get("model_type", "dbrx") != "dbrx":
            raise ValueError(f"not a DBRX config: model_type={cfg.get('model_type')!r}")
        sections = {}
        for section in ("attn_config", "ffn_config", "rope_parameters"):
            value = cfg.pop(section, None)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"field {section} must be an object, got {type(value).__name__}: {value!r}")
            sections[section] = dict(value or {})
        attn, ffn, rope_params = sections["attn_config"], sections["ffn_config"], sections["rope_parameters"]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known}
        for key in ("kv_n_heads", "clip_qkv", "attn_pdrop"):
            if key in attn:
                kwargs[key] = attn[key]
        for key in ("ffn_hidden_size", "moe_num_experts", "moe_top_k", "moe_normalize_expert_weights",
                    "moe_jitter_eps", "moe_loss_weight", "moe_z_loss_weight"):
            if key in ffn:
                kwargs[key] = ffn[key]
        act = ffn.get("ffn_act_fn")
        if isinstance(act, dict):
            kwargs["ffn_act_fn"] = act.get("name", "silu")
        elif act is not None:
            kwargs["ffn_act_fn"] = act
        # RoPE base: DBRX keeps it in attn_config; transformers 5.x reads only top-level rope_parameters
        # and writes 10000 there when loading a released config. DBRX's own field wins.
        theta_attn = attn.get("rope_theta")
        theta_top = rope_params.get("rope_theta", cfg.get("rope_theta"))
        if theta_attn is not None:
            kwargs["rope_theta"] = theta_attn
            if theta_top is not None and theta_top != theta_attn:
                warnings.warn(f"config has attn_config.rope_theta={theta_attn} and rope_parameters.rope_theta="
                              f"{theta_top}; using attn_config.rope_theta (DBRX's own field)", stacklevel=2)
        elif theta_top is not None:
            kwargs["rope_theta"] = theta_top
        if rope_params.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope_params['rope_type']!r}; DBRX uses default RoPE")
        if "dtype" in cfg and "torch_dtype" not in cfg:
            kwargs["torch_dtype"] = cfg["dtype"]
        if "layer_norm_epsilon" in cfg:
            kwargs["layer_norm_eps"] = cfg["layer_norm_epsilon"]
        defaulted = [name for name in HF_DEFAULTS if name not in kwargs]
        kwargs.update({name: HF_DEFAULTS[name] for name in defaulted})
        warn = [name for name in defaulted if name in WARN_IF_DEFAULTED]
        if warn:
            warnings.warn("config has no " + ", ".join(f"{n} (using HF's default {HF_DEFAULTS[n]!r})" for n in warn),
                          UserWarning, stacklevel=2)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """HF-compatible dict: loads in transformers 4.x and 5.x with the right RoPE base."""
        return {
            "architectures": ["DbrxForCausalLM"],
            "model_type": "dbrx",
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "max_seq_len": self.max_seq_len,
            "vocab_size": self.vocab_size,
            "attn_config": {"kv_n_heads": self.kv_n_heads, "clip_qkv": self.clip_qkv,
                            "rope_theta": self.rope_theta, "attn_pdrop": self.attn_pdrop},
            "ffn_config": {"ffn_hidden_size": self.ffn_hidden_size, "moe_num_experts": self.moe_num_experts,
                           "moe_top_k": self.moe_top_k,
                           "moe_normalize_expert_weights": self.moe_normalize_expert_weights,
                           "moe_jitter_eps": self.moe_jitter_eps, "moe_loss_weight": self.moe_loss_weight,
                           "moe_z_loss_weight": self.moe_z_loss_weight,
                           "ffn_act_fn": {"name": self.ffn_act_fn}},
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "initializer_range": self.initializer_range,
            "resid_pdrop": self.resid_pdrop,
            "emb_pdrop": self.emb_pdrop,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "router_aux_loss_coef": self.moe_loss_weight,
            "output_router_logits": False,
            "use_cache": True,
        }

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> "DbrxConfig":
        """Read `config.json` from a folder (or the file itself), or return a named preset."""
        if isinstance(source, str) and source in PRESETS:
            return dataclasses.replace(PRESETS[source])
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path} (presets: {sorted(PRESETS)})")
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write folder/config.json atomically; an existing config.json is replaced only if it is a DBRX one."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "config.json"
        if path.exists():
            try:
                ours = read_json(path).get("model_type") == "dbrx"
            except (ValueError, AttributeError, OSError):
                ours = False
            if not ours:
                raise ValueError(f"cannot save to {path}: it exists and is not a DBRX config.json; choose another folder")
        tmp = folder / f".config.json.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def to_hf(self):
        """The equivalent `transformers.DbrxConfig` (test-time helper; needs transformers)."""
        from transformers import DbrxConfig as HFDbrxConfig

        d = self.to_dict()
        return HFDbrxConfig(**{k: v for k, v in d.items() if k != "architectures"})


PRESETS: dict[str, DbrxConfig] = {
    "dbrx-instruct": DbrxConfig(),
    # benchmark shape from the issues
    "bench": DbrxConfig(d_model=512, n_heads=8, kv_n_heads=2, n_layers=8, ffn_hidden_size=896,
                        max_seq_len=2048, torch_dtype="float32"),
    # a few ms per forward: for unit tests
    "tiny": DbrxConfig(d_model=64, n_heads=4, kv_n_heads=2, n_layers=2, ffn_hidden_size=96,
                       max_seq_len=256, vocab_size=512, torch_dtype="float32"),
    "tiny-vocab": DbrxConfig(d_model=64, n_heads=4, kv_n_heads=2, n_layers=3, ffn_hidden_size=96,
                             max_seq_len=256, torch_dtype="float32"),
}
assert math.isclose(PRESETS["dbrx-instruct"].n_params / 1e9, 131.6, abs_tol=0.05)
