"""How the sampler runs an m2 Transformer: the model's own scan, or unrolled layers.

`ScanForward` calls `Transformer.__call__` as is: a `lax.scan` over the stacked
layer weights that carries the stacked cache and updates each layer's slice in
place. On GPU and TPU, XLA reads each layer's slice in place, and this is the
right choice.

`UnrolledForward` runs the same `Block`s in a Python loop over per-layer
weights and a per-layer cache (`LayerCache`: L separate key and value buffers).
The weights are sliced out of the stacked parameters by `load`, outside the
jitted calls, once per parameter version (the last version's split is kept).
Why: XLA:CPU copies a layer's weights out of the stacked array on every use (a
dynamic slice inside the scan, or a static slice that is not hoisted out of the
while loop), and rewrites the stacked cache each step; in a profile of the tiny
model at batch 1 those copies took about half of each decode step. Slicing
inside each call instead cost ~5 ms a call there (fresh 12 MB, page-faulted in;
9 % of a 128-token batch-1 generation). The price is a second copy of the layer
weights, which is why accelerators keep the scan. The embedding lookup,
cache-segment bookkeeping and final norm mirror `Transformer.__call__`;
tests/sampling check that both forwards give the model's logits.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m2 import parallel
from m2.model.cache import KVCache
from m2.model.config import ModelConfig

_K_AXES, _V_AXES = KVCache.K_AXES[1:], KVCache.V_AXES[1:]  # one layer's


@struct.dataclass
class LayerCache:
  """`KVCache` with one key and one value buffer per layer, so each is updated in place.

  k, v:     tuples of L arrays, [batch, kv_heads, head_dim, max_length] and
            [batch, kv_heads, max_length, head_dim].
  segments: [batch, max_length] int32; 0 marks an empty or padding slot.
  index:    scalar int32, the next slot to write (shared by the batch).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segments: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_length: int) -> "LayerCache":
    v_shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
    k_shape = v_shape[:2] + (cfg.head_dim, max_length)

    def zeros(shape, axes):
      return parallel.constrain(jnp.zeros(shape, cfg.compute_dtype), axes)

    return cls(k=tuple(zeros(k_shape, _K_AXES) for _ in range(cfg.num_layers)),
               v=tuple(zeros(v_shape, _V_AXES) for _ in range(cfg.num_layers)),
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

  def load(self, params) -> Any:
    """Outside jit, on the checked parameters: what the jitted calls take (and `prepare`
    gets)."""
    return params

  def prepare(self, params) -> Any:
    """Runs once per jitted call, before the decode loop."""
    return nnx.merge(self.graphdef, params)

  def init_cache(self, batch: int, length: int) -> KVCache:
    cache = KVCache.init(self.cfg, batch, length)
    return cache.replace(k=parallel.constrain(cache.k, KVCache.K_AXES),
                         v=parallel.constrain(cache.v, KVCache.V_AXES))

  def __call__(self, model, tokens, positions, segments, cache):
    """Writes tokens [B, T] at cache.index; returns (final hidden states, cache)."""
    return model(tokens, positions, segments, cache, return_hidden=True)

  def logits(self, model, hidden):
    return model.logits(hidden)

  def module(self, model) -> nnx.Module:
    """The Transformer (with its weights) behind a `prepare` result."""
    return model


@struct.dataclass
class UnrolledParams:
  """The model's parameters and, split from them, each layer's block weights."""

  params: Any
  layers: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class _Unrolled:
  model: nnx.Module
  block_def: nnx.GraphDef
  layers: tuple[Any, ...]  # per-layer block states


class UnrolledForward(ScanForward):
  """The Transformer's Blocks over per-layer weights and a `LayerCache`."""

  name = "unrolled"

  def __init__(self, graphdef: nnx.GraphDef, cfg: ModelConfig):
    super().__init__(graphdef, cfg)
    self._split = jax.jit(self._split_layers)
    self._last: tuple[list, tuple] | None = None  # (weakrefs to the params, their layers)

  def _split_layers(self, params) -> tuple[Any, ...]:
    stacked = nnx.state(nnx.merge(self.graphdef, params).blocks)
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.num_layers))

  def load(self, params) -> UnrolledParams:
    """Splits the layers once per parameter version: the split of the last parameters
    seen is reused while every leaf is the same (immutable) jax.Array."""
    leaves = jax.tree.leaves(params)
    last = self._last
    if last is not None and len(last[0]) == len(leaves) and all(
        ref() is leaf for ref, leaf in zip(last[0], leaves)):
      return UnrolledParams(params, last[1])
    layers = self._split(params)
    self._last = None
    if all(isinstance(leaf, jax.Array) for leaf in leaves):  # numpy arrays are mutable
      self._last = ([weakref.ref(leaf) for leaf in leaves], layers)
    return UnrolledParams(params, layers)

  def prepare(self, loaded: UnrolledParams) -> _Unrolled:
    model = nnx.merge(self.graphdef, loaded.params)
    return _Unrolled(model, nnx.graphdef(model.blocks), loaded.layers)

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
      x, (k, v) = nnx.merge(ctx.block_def, layer)(x, positions, segments, (k, v),
                                                  cache_segments, cache.index)
      ks.append(parallel.constrain(k, _K_AXES))
      vs.append(parallel.constrain(v, _V_AXES))
    cache = LayerCache(k=tuple(ks), v=tuple(vs), segments=cache_segments,
                       index=cache.index + tokens.shape[1])
    return model.final_norm(x), cache

  def logits(self, ctx: _Unrolled, hidden):
    return ctx.model.logits(hidden)

  def module(self, ctx: _Unrolled) -> nnx.Module:
    return ctx.model


FORWARDS = {"scan": ScanForward, "unrolled": UnrolledForward}


def make_forward(graphdef: nnx.GraphDef, cfg: ModelConfig, layers: str = "auto") -> ScanForward:
  """layers: "scan", "unrolled", or "auto" (unrolled on CPU, scan on accelerators)."""
  if layers == "auto":
    layers = "unrolled" if jax.default_backend() == "cpu" else "scan"
  if layers not in FORWARDS:
    raise ValueError(f"layers must be 'auto' or one of {sorted(FORWARDS)} (got {layers!r})")
  return FORWARDS[layers](graphdef, cfg)
