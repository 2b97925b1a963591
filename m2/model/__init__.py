"""Qwen2/Qwen3-family Transformer in Flax NNX, its KV cache and HF safetensors I/O."""

from m2.model.cache import KVCache
from m2.model.config import ModelConfig, preset
from m2.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer", "preset"]
