"""The decoder-only Transformer (Qwen2/Qwen3 families) in Flax NNX.

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`, so a
64-layer model compiles as fast as a 1-layer one. The scan body is wrapped in
`jax.checkpoint` with the configured remat policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m2 import parallel
from m2.model.cache import KVCache
from m2.model import head
from m2.model.config import ModelConfig
from m2.model.modules import Block, RMSNorm, param

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"),
                       cfg.weight_dtype)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg)
    if not cfg.tie_embeddings:
      self.lm_head = param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"),
                           cfg.weight_dtype)

  def __call__(self, tokens, positions=None, segments=None, cache: KVCache | None = None,
               *, return_hidden: bool = False):
    """Runs the model.

    tokens:    [B, T] int32.
    positions: [B, T] RoPE positions (default 0..T-1). Packed sequences restart
               at 0; left-padded prompts start at 0 on their first real token.
    segments:  [B, T] int32 segment ids; 0 marks padding. Tokens attend only
               within their own segment (default: all ones).
    cache:     optional KVCache; the T tokens are written at `cache.index`.

    Returns (logits [B, T, V] in float32, updated cache or None), and the final
    hidden states in place of logits when `return_hidden`.
    """
    cfg = self.cfg
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segments is None:
      segments = jnp.ones((b, t), jnp.int32)

    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
    x = parallel.constrain(x, ("batch", "length", "embed"))

    block_def, block_state = nnx.split(self.blocks)
    if cache is not None:
      cache_segments = jax.lax.dynamic_update_slice(cache.segments, segments.astype(jnp.int32),
                                                    (0, cache.index))
    else:
      cache_segments = None

    def layer(carry, state):
      # The stacked cache is carried and each layer's slice updated in place: as scan
      # inputs and outputs it would be a second whole cache, rewritten every call.
      x, kv, i = carry
      layer_kv = None if kv is None else jax.tree.map(
          lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), kv)
      y, new_kv = nnx.merge(block_def, state)(
          x, positions, segments, layer_kv, cache_segments,
          None if cache is None else cache.index)
      if kv is not None:
        kv = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
                          kv, new_kv)
      return (y, kv, i + 1), None

    if cfg.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)

    carry = (x, None if cache is None else (cache.k, cache.v), jnp.zeros((), jnp.int32))
    if cfg.scan_layers:
      carry, _ = jax.lax.scan(layer, carry, block_state)
    else:
      for i in range(cfg.num_layers):
        carry, _ = layer(carry, jax.tree.map(lambda a, i=i: a[i], block_state))
    x, kv, _ = carry

    x = self.final_norm(x)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=kv[0], v=kv[1], segments=cache_segments, index=cache.index + t)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache

  def output_embedding(self) -> tuple[jax.Array, str]:
    """The output projection and its axes: the tied table [V, E] or the LM head [E, V]."""
    if self.cfg.tie_embeddings:
      return self.embed[...], "ve"
    return self.lm_head[...], "ev"

  def logits(self, x):
    """fp32 logits [B, T, V] of final hidden states [B, T, E]."""
    return head.logits(x, *self.output_embedding())

  def target_logprobs(self, hidden, targets):
    """(log p(targets), entropy), fp32 [B, T], from final hidden states [B, T, E].

    What training needs, without materialising the log-softmax (`m2.model.head`).
    """
    w, w_axes = self.output_embedding()
    return head.target_logprobs(hidden, w, targets, w_axes)
