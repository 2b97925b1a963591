"""How the sampler runs an m2 Transformer: the model's own scan, or unrolled layers.

`ScanForward` calls `Transformer.__call__` as is: a `lax.scan` over the stacked
layer weights and the stacked cache [L, B, K, S, D]. On GPU and TPU, XLA reads
each layer's slice in place, and this is the right choice.

`UnrolledForward` runs the same `Block`s in a Python loop over per-layer
weights and a per-layer cache (`LayerCache`: L separate [B, K, S, D] buffers).
The weights are sliced out of the stacked parameters once per call, before the
decode loop. Why: XLA:CPU copies a layer's weights out of the stacked array on
every use (a dynamic slice inside the scan, or a static slice that is not
hoisted out of the while loop), and rewrites the stacked cache each step; in a
profile of the tiny model at batch 1 those copies took about half of each
decode step. The price is one copy of the layer weights per call, which is why
accelerators keep the scan. The embedding lookup, cache-segment bookkeeping
and final norm mirror `Transformer.__call__`; tests/sampling check that both
forwards give the model's logits.

The unrolled forward also runs attention in its own layout (`_attention`):
the same maths as `modules.Attention`, but with query rows grouped per kv
head ([B, K, T*G, D]) so that scores, probs @ V and the output projection are
plain (batched) matmuls. With the model's layout XLA:CPU computed probs @ V
as a transposed dot and re-laid out the output kernel on every decode step;
in a profile of the tiny model at batch 16 that was about a fifth of a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m2 import parallel
from m2.model.cache import KVCache
from m2.model.config import ModelConfig
from m2.model.modules import rope
from m2.model.quant import maybe_quant

_CACHE_AXES = KVCache.LOGICAL_AXES[1:]  # one layer: batch, kv_heads, cache_length, head_dim


@struct.dataclass
class LayerCache:
  """`KVCache` with one key and one value buffer per layer, so each is updated in place.

  k, v:     tuples of L arrays [batch, kv_heads, max_length, head_dim].
  segments: [batch, max_length] int32; 0 marks an empty or padding slot.
  index:    scalar int32, the next slot to write (shared by the batch).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segments: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_length: int) -> "LayerCache":
    shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)

    def zeros():
      return parallel.constrain(jnp.zeros(shape, cfg.compute_dtype), _CACHE_AXES)

    return cls(k=tuple(zeros() for _ in range(cfg.num_layers)),
               v=tuple(zeros() for _ in range(cfg.num_layers)),
               segments=jnp.zeros((batch, max_length), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.segments.shape[1]

  @property
  def batch(self) -> int:
    return self.segments.shape[0]


class ScanForward:
  """The Transformer's own forward (scan over stacked layers, stacked `KVCache`)."""

  name = "scan"

  def __init__(self, graphdef: nnx.GraphDef, cfg: ModelConfig):
    self.graphdef, self.cfg = graphdef, cfg

  def prepare(self, params) -> Any:
    """Runs once per jitted call, before the decode loop."""
    return nnx.merge(self.graphdef, params)

  def init_cache(self, batch: int, length: int) -> KVCache:
    cache = KVCache.init(self.cfg, batch, length)
    return cache.replace(k=parallel.constrain(cache.k, KVCache.LOGICAL_AXES),
                         v=parallel.constrain(cache.v, KVCache.LOGICAL_AXES))

  def __call__(self, model, tokens, positions, segments, cache):
    """Writes tokens [B, T] at cache.index; returns (final hidden states, cache)."""
    return model(tokens, positions, segments, cache, return_hidden=True)

  def logits(self, model, hidden):
    return model.logits(hidden)


@dataclasses.dataclass(frozen=True)
class _Unrolled:
  model: nnx.Module
  block_def: nnx.GraphDef
  layers: tuple[Any, ...]  # per-layer block states


class UnrolledForward(ScanForward):
  """The Transformer's Blocks over per-layer weights and a `LayerCache`."""

  name = "unrolled"

  def prepare(self, params) -> _Unrolled:
    model = nnx.merge(self.graphdef, params)
    block_def, stacked = nnx.split(model.blocks)
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked)
                   for i in range(self.cfg.num_layers))
    return _Unrolled(model, block_def, layers)

  def init_cache(self, batch: int, length: int) -> LayerCache:
    return LayerCache.init(self.cfg, batch, length)

  def __call__(self, ctx: _Unrolled, tokens, positions, segments, cache: LayerCache):
    cfg, model = self.cfg, ctx.model
    x = jnp.take(model.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
    x = parallel.constrain(x, ("batch", "length", "embed"))
    cache_segments = jax.lax.dynamic_update_slice(cache.segments, segments.astype(jnp.int32),
                                                  (0, cache.index))
    ks, vs = [], []
    for layer, k, v in zip(ctx.layers, cache.k, cache.v):
      x, (k, v) = _block(cfg, nnx.merge(ctx.block_def, layer), x, positions, segments, (k, v),
                         cache_segments, cache.index)
      ks.append(parallel.constrain(k, _CACHE_AXES))
      vs.append(parallel.constrain(v, _CACHE_AXES))
    cache = LayerCache(k=tuple(ks), v=tuple(vs), segments=cache_segments,
                       index=cache.index + tokens.shape[1])
    return model.final_norm(x), cache

  def logits(self, ctx: _Unrolled, hidden):
    return ctx.model.logits(hidden)


def _block(cfg: ModelConfig, block, x, positions, segments, kv, cache_segments, index):
  """`modules.Block.__call__` with a cache, attention by `_attention`."""
  h, kv = _attention(cfg, block.attn, block.attn_norm(x), positions, segments, kv,
                     cache_segments, index)
  x = x + h
  x = x + block.mlp(block.mlp_norm(x))
  return parallel.constrain(x, ("batch", "length", "embed")), kv


def _attention(cfg: ModelConfig, attn, x, positions, segments, kv, cache_segments, index):
  """`modules.Attention.__call__` with a cache: x [B, T, E] -> (y [B, T, E], (k, v)).

  Same projections, RoPE, cache update and mask as the model; query row t * G + g
  of kv head k is query head (k, g) of token t.
  """
  dt = cfg.compute_dtype
  b, t, e = x.shape
  heads, g, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
  qkv = jnp.einsum("bte,ekgd->btkgd", x, maybe_quant(attn.qkv[...], 1, cfg.quant).astype(dt))
  if attn.qkv_bias is not None:
    qkv = qkv + attn.qkv_bias[...].astype(dt)
  q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]
  if cfg.qk_norm:
    q, k = attn.q_norm(q), attn.k_norm(k)
  q = rope(q, positions, cfg.rope_theta)  # [B, T, K, G, D]
  k = rope(k, positions, cfg.rope_theta)  # [B, T, K, D]
  cache_k, cache_v = kv
  k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype),
                                   (0, 0, index, 0))
  v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype),
                                   (0, 0, index, 0))
  q = q.transpose(0, 2, 1, 3, 4).reshape(b, heads, t * g, d)
  q = parallel.constrain(q, ("batch", "kv_heads", None, "head_dim"))

  q_slots = index + jnp.arange(t)
  k_slots = jnp.arange(k.shape[2])
  mask = ((q_slots[:, None] >= k_slots[None, :])[None]
          & (segments[:, :, None] == cache_segments[:, None, :])
          & (cache_segments[:, None, :] != 0))  # [B, T, S]
  mask = jnp.repeat(mask, g, axis=1)[:, None]  # [B, 1, T * G, S]
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k.astype(dt)) * (d ** -0.5)
  scores = jnp.where(mask, scores.astype(jnp.float32), -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dt))  # [B, K, T * G, D]
  out = out.reshape(b, heads, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b * t, heads * g * d)
  w_out = maybe_quant(attn.out[...], 3, cfg.quant).astype(dt)  # [K, G, D, E]
  y = (out @ w_out.reshape(heads * g * d, e)).reshape(b, t, e)
  return y, (k, v)


FORWARDS = {"scan": ScanForward, "unrolled": UnrolledForward}


def make_forward(graphdef: nnx.GraphDef, cfg: ModelConfig, layers: str = "auto") -> ScanForward:
  """layers: "scan", "unrolled", or "auto" (unrolled on CPU, scan on accelerators)."""
  if layers == "auto":
    layers = "unrolled" if jax.default_backend() == "cpu" else "scan"
  if layers not in FORWARDS:
    raise ValueError(f"layers must be 'auto' or one of {sorted(FORWARDS)} (got {layers!r})")
  return FORWARDS[layers](graphdef, cfg)
