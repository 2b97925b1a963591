"""Model configuration for the Qwen2 / Qwen3 families.

One frozen dataclass holds every architectural knob. It validates itself on
construction, so a bad config fails with the field name before anything is
traced. `from_hf_config` / `to_hf_config` translate to and from a transformers
`config.json` (the only place that knows HF's field names).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

FAMILIES = ("qwen2", "qwen3")
HF_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
# How a step computes, not what a checkpoint holds: a resumed run may change these.
EXECUTION_FIELDS = ("dtype", "remat_policy", "scan_layers", "attention")
# Fields a run may set on top of a checkpoint's architecture.
_RUNTIME_FIELDS = EXECUTION_FIELDS + ("param_dtype", "quant")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
ATTENTION = ("blocked", "pallas_gpu", "pallas_tpu")  # m2/model/kernels.py
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only Qwen2/Qwen3 Transformer.

  Qwen2 (and Qwen2.5): GQA, RoPE, RMSNorm, SwiGLU, bias on q/k/v.
  Qwen3: as Qwen2 but RMSNorm on q and k per head ("qk-norm") and no qkv bias.
  """

  family: str = "qwen2"
  vocab_size: int = 8192
  num_layers: int = 4
  embed_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 64
  mlp_dim: int = 1024
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_position_embeddings: int = 32768
  # Numerics: parameters are stored in `param_dtype` (fp32 master weights);
  # matmuls run in `dtype` (bf16 on accelerators).
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Memory: what the scanned layer saves for the backward pass.
  remat_policy: str = "none"
  scan_layers: bool = True
  # Cache-free attention (training, scoring): "blocked" XLA everywhere, or a fused
  # flash-attention kernel, "pallas_gpu" or "pallas_tpu" (m2/model/kernels.py).
  attention: str = "blocked"
  # Weight-only fake quantization of the linear layers (m2/model/quant.py):
  # "none", or e.g. "int4" / "int4_asym" / "int8_g64"; "aqt:int4" runs the symmetric
  # scheme on aqtp's quantizers. "none" changes nothing.
  quant: str = "none"

  def __post_init__(self):
    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"ModelConfig.{field}: {msg} (got {getattr(self, field)!r})")

    check(self.family in FAMILIES, "family", f"must be one of {FAMILIES}")
    for f in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
              "head_dim", "mlp_dim", "max_position_embeddings"):
      check(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive int")
    check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
          f"must divide num_heads={self.num_heads}")
    check(self.head_dim % 2 == 0, "head_dim", "must be even for RoPE")
    check(self.rope_theta > 0, "rope_theta", "must be positive")
    check(self.dtype in _DTYPES, "dtype", f"must be one of {tuple(_DTYPES)}")
    check(self.param_dtype in _DTYPES, "param_dtype", f"must be one of {tuple(_DTYPES)}")
    check(self.remat_policy in REMAT_POLICIES, "remat_policy", f"must be one of {REMAT_POLICIES}")
    check(self.attention in ATTENTION, "attention", f"must be one of {ATTENTION}")
    from m2.model import quant
    try:
      quant.parse(self.quant)
    except ValueError as err:
      check(False, "quant", str(err))

  @property
  def qkv_bias(self) -> bool:
    return self.family == "qwen2"

  @property
  def qk_norm(self) -> bool:
    return self.family == "qwen3"

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    e, h, k, d, m, v = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.mlp_dim, self.vocab_size)
    attn = e * (h + 2 * k) * d + h * d * e + (self.qkv_bias and (h + 2 * k) * d) + (
        self.qk_norm and 2 * d)
    layer = attn + 3 * e * m + 2 * e
    return self.num_layers * layer + v * e * (1 if self.tie_embeddings else 2) + e

  # --- HF config.json translation -------------------------------------------------

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
    """From a config.json dict; rejects what m2 cannot run faithfully."""
    archs = list(hf.get("architectures") or [])
    model_type = hf.get("model_type")
    if model_type not in FAMILIES or any(a not in HF_ARCHITECTURES for a in archs):
      raise ValueError(
          f"unsupported architecture: architectures={archs}, model_type={model_type!r}; "
          f"m2 loads {sorted(HF_ARCHITECTURES)} (model_type 'qwen2' / 'qwen3')")
    if hf.get("quantization_config"):
      raise ValueError(f"quantized checkpoints are not supported "
                       f"(quantization_config={hf['quantization_config']!r})")
    if hf.get("use_sliding_window"):
      raise ValueError("config.json: use_sliding_window=true is not supported; m2 attends "
                       "over the full context")
    # transformers 5 names each layer's attention; only full attention is supported.
    other_layers = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
    if other_layers:
      raise ValueError(f"config.json: layer_types {other_layers} are not supported; m2 "
                       f"attends over the full context in every layer")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported "
                       f"(only 'silu')")
    # transformers 5 keeps RoPE settings in rope_parameters, older versions in rope_scaling.
    # A folder may hold both (a YaRN rope_scaling added by hand to a transformers 5 file).
    rope = {}
    for key in ("rope_scaling", "rope_parameters"):
      section = hf.get(key) or {}
      rope_type = section.get("rope_type", section.get("type"))
      if rope_type not in (None, "default"):
        raise ValueError(f"config.json: {key} has rope_type={rope_type!r}, which is not "
                         f"supported; only default RoPE")
      rope.update(section)
    if model_type == "qwen3" and hf.get("attention_bias"):
      raise ValueError("config.json: attention_bias=true is not supported for qwen3")
    family = model_type
    heads = hf["num_attention_heads"]
    # transformers 5 reads rope_parameters first.
    theta = rope.get("rope_theta") or hf.get("rope_theta") or 10000.0
    return cls(
        family=family,
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        # Qwen3Config's default head_dim is 128, not hidden_size / heads.
        head_dim=hf.get("head_dim") or (128 if family == "qwen3" else hf["hidden_size"] // heads),
        mlp_dim=hf["intermediate_size"],
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        **overrides,
    )

  def to_hf_config(self) -> dict[str, Any]:
    arch = {v: k for k, v in HF_ARCHITECTURES.items()}[self.family]
    out = {
        "architectures": [arch],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "num_hidden_layers": self.num_layers,
        "hidden_size": self.embed_dim,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.mlp_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "dtype": self.param_dtype,
        "torch_dtype": self.param_dtype,  # the name before transformers 5
    }
    if self.family == "qwen3":
      out["attention_bias"] = False
    return out


def _qwen2_5(**kw) -> ModelConfig:
  return ModelConfig(family="qwen2", rms_norm_eps=1e-6, rope_theta=1_000_000.0, **kw)


def _qwen3(**kw) -> ModelConfig:
  return ModelConfig(family="qwen3", vocab_size=151936, head_dim=128, num_kv_heads=8,
                     rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
                     **kw)


# Named shapes. Real checkpoints are read with `from_hf_config`; these are for
# planning memory and for from-scratch runs.
PRESETS = {
    "tiny": lambda: ModelConfig(),
    "qwen2_5_0_5b": lambda: _qwen2_5(vocab_size=151936, num_layers=24, embed_dim=896,
                                     num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864,
                                     tie_embeddings=True),
    "qwen2_5_1_5b": lambda: _qwen2_5(vocab_size=151936, num_layers=28, embed_dim=1536,
                                     num_heads=12, num_kv_heads=2, head_dim=128, mlp_dim=8960,
                                     tie_embeddings=True),
    "qwen2_5_7b": lambda: _qwen2_5(vocab_size=152064, num_layers=28, embed_dim=3584,
                                   num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944),
    "qwen2_5_32b": lambda: _qwen2_5(vocab_size=152064, num_layers=64, embed_dim=5120,
                                    num_heads=40, num_kv_heads=8, head_dim=128, mlp_dim=27648),
    "qwen3_0_6b": lambda: _qwen3(num_layers=28, embed_dim=1024, num_heads=16, mlp_dim=3072,
                                 tie_embeddings=True),
    "qwen3_1_7b": lambda: _qwen3(num_layers=28, embed_dim=2048, num_heads=16, mlp_dim=6144,
                                 tie_embeddings=True),
    "qwen3_4b": lambda: _qwen3(num_layers=36, embed_dim=2560, num_heads=32, mlp_dim=9728,
                               tie_embeddings=True),
    "qwen3_8b": lambda: _qwen3(num_layers=36, embed_dim=4096, num_heads=32, mlp_dim=12288),
    "qwen3_14b": lambda: _qwen3(num_layers=40, embed_dim=5120, num_heads=40, mlp_dim=17408),
    "qwen3_32b": lambda: _qwen3(num_layers=64, embed_dim=5120, num_heads=64, mlp_dim=25600),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]().replace(**overrides)


def model_config_from(section) -> ModelConfig:
  """ModelConfig from an experiment config's `model` section.

  `preset` names the base shape and other fields override it. With
  `hf_checkpoint`, the shape comes from that folder's config.json and only the
  numerics and remat knobs from the section.
  """
  from m2 import configlib

  fields = configlib.to_dict(section)
  name = fields.pop("preset", "")
  hf_checkpoint = fields.pop("hf_checkpoint", "")
  if hf_checkpoint:
    path = os.path.join(hf_checkpoint, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.model.hf_checkpoint: no config.json in {hf_checkpoint}")
    with open(path) as f:
      return ModelConfig.from_hf_config(json.load(f), **{
          k: v for k, v in fields.items() if k in _RUNTIME_FIELDS})
  base = dataclasses.asdict(preset(name)) if name else {}
  return configlib.build(ModelConfig, {**base, **fields}, "config.model")
