"""KV cache: a small pytree the sampler owns and threads through the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from m2.model.config import ModelConfig


@struct.dataclass
class KVCache:
  """Keys and values of every layer, plus which slots hold real tokens.

  k:         [layers, batch, kv_heads, head_dim, max_length]: slot-minor, so a
             decode step's query-key scores are a plain [heads, D] x [D, slots]
             matmul per kv head (no transposed read of the cache each step).
  v:         [layers, batch, kv_heads, max_length, head_dim]
  segments:  [batch, max_length] int32; 0 marks an empty or padding slot.
  index:     scalar int32, the next slot to write (shared by the batch; rows
             whose prompts are shorter simply carry padding slots).
  """

  k: jax.Array
  v: jax.Array
  segments: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_length: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.compute_dtype
    v_shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    k_shape = v_shape[:3] + (cfg.head_dim, max_length)
    return cls(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype),
               segments=jnp.zeros((batch, max_length), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.segments.shape[1]

  @property
  def batch(self) -> int:
    return self.segments.shape[0]

  K_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_length")
  V_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
