"""Layers of the Qwen2/Qwen3 Transformer: RMSNorm, RoPE, attention, SwiGLU MLP.

Layout choices, all for speed on small and large shapes alike:
  * q, k and v come from one fused kernel [embed, kv_heads, q_per_kv + 2, head_dim]:
    query heads are stored grouped under the kv head they attend with, so GQA is
    a reshape (no repeated K/V) and tensor parallelism over `kv_heads` keeps
    whole groups on one shard.
  * gate and up projections are one kernel [embed, 2, mlp].
  * the KV cache is [batch, kv_heads, head_dim, length] for keys and
    [batch, kv_heads, length, head_dim] for values, per layer: both attention
    matmuls of a decode step then read the cache in its stored order.
Every parameter carries `logical_axes` metadata; `m2.parallel` maps it to a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from m2 import parallel
from m2.model import kernels
from m2.model.config import ModelConfig
from m2.model.quant import INPUT_AXES, maybe_quant

_init = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs | None, shape, axes, dtype, init=_init) -> nnx.Param:
  value = init(rngs.params(), shape, dtype) if rngs is not None else jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, cfg: ModelConfig, *, axis_name: str = "norm"):
    self.scale = nnx.Param(jnp.ones((dim,), cfg.weight_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, HF "rotate_half" convention. x: [..., T, heads..., D]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  # Broadcast over the head axes between T and D.
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def query_blocks(t: int) -> list[tuple[int, int]]:
  """[lo, hi) query blocks: 64 rows, or T / 16 for long sequences (at most 16 blocks)."""
  size = max(64, -(-t // 16))
  return [(lo, min(lo + size, t)) for lo in range(0, t, size)]


def _after(x, dep):
  """x, but computed only once `dep` is: orders two otherwise independent ops.

  XLA CPU drops `optimization_barrier` before scheduling. Without an order its
  scheduler starts every query block's score matmul up front and keeps all the
  blocks' [B, K, G, rows, keys] tensors live together (at T 2048 that held a
  layer's backward at 16 blocks' scores instead of one's). A non-finite `dep`
  (an earlier block's output or gradient sum) makes x NaN, where the result
  would not be finite anyway.
  """
  return x + jnp.zeros((), x.dtype) * dep.ravel()[0].astype(x.dtype)


def _block_scores(q, k, segments, lo: int, hi: int, after=None):
  """fp32 scores of query rows [lo, hi) against keys [0, hi), masked: [B, K, G, hi-lo, hi].

  after: an array the previous block produced; this block waits for it (`_after`).
  """
  q = q[:, :, :, lo:hi] if after is None else _after(q[:, :, :, lo:hi], after)
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k[:, :, :hi], preferred_element_type=jnp.float32)
  q_seg, k_seg = segments[:, lo:hi, None], segments[:, None, :hi]
  visible = ((jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :])[None]
             & (q_seg == k_seg) & (k_seg != 0))
  return scores + jnp.where(visible, 0.0, -1e30)[:, None, None]


@jax.custom_vjp
def causal_attention(q, k, v, segments):
  """Causal attention within segments, without a cache (training and scoring).

  q [B, K, G, T, D] (already scaled), k, v [B, K, T, D], segments [B, T]
  (0 = padding; a query sees earlier keys of its own segment). Flash-style:
  query rows go in blocks that attend only to keys up to the block's end, so
  the masked upper triangle is skipped, and the forward keeps each row's
  log-sum-exp instead of the [B, K, G, T, T] probabilities; the backward
  recomputes them block by block. A layer's residuals shrink from O(T^2) to
  O(T), and on CPU the tiny model's attention forward + backward (B 8, T 256)
  takes 10-12 ms instead of the plain softmax's 15. Rows of padding (segment
  0) see no key; their output is arbitrary and must not reach the loss.
  """
  return _causal_attention_fwd(q, k, v, segments)[0]


def _causal_attention_fwd(q, k, v, segments):
  outs, lses = [], []
  for lo, hi in query_blocks(q.shape[3]):
    scores = _block_scores(q, k, segments, lo, hi, after=outs[-1] if outs else None)
    top = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v[:, :, :hi],
                     preferred_element_type=jnp.float32)
    outs.append((out / total).astype(q.dtype))
    lses.append(top + jnp.log(total))
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, segments, out, jnp.concatenate(lses, axis=3))


def _causal_attention_bwd(res, d_out):
  q, k, v, segments, out, lse = res
  dt = q.dtype
  # d(score) = p * (d(p) - delta), delta = rowsum(d_out * out) = rowsum(p * d(p)).
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_q, d_k, d_v = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for lo, hi in query_blocks(q.shape[3]):
    p = jnp.exp(_block_scores(q, k, segments, lo, hi, after=d_k) - lse[:, :, :, lo:hi])
    d_out_i = d_out[:, :, :, lo:hi]
    d_v = d_v.at[:, :, :hi].add(jnp.einsum("bkgts,bkgtd->bksd", p.astype(dt), d_out_i,
                                           preferred_element_type=jnp.float32))
    d_p = jnp.einsum("bkgtd,bksd->bkgts", d_out_i, v[:, :, :hi],
                     preferred_element_type=jnp.float32)
    d_s = (p * (d_p - delta[:, :, :, lo:hi])).astype(dt)
    d_q.append(jnp.einsum("bkgts,bksd->bkgtd", d_s, k[:, :, :hi]))
    d_k = d_k.at[:, :, :hi].add(jnp.einsum("bkgts,bkgtd->bksd", d_s, q[:, :, :, lo:hi],
                                           preferred_element_type=jnp.float32))
  return jnp.concatenate(d_q, axis=3), d_k.astype(dt), d_v.astype(dt), None


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def cache_reads(slots: int) -> list[int]:
  """The cache lengths a cached-attention call may read: 256, 512, ... below `slots`,
  then all of them. A call reads the shortest that holds every written slot (the cache
  fills from the front), so decoding early in a long cache neither reads nor masks its
  empty rest. Decoding is bound by reading the cache, and a rollout allocates slots for
  `max_new_tokens` that most replies never fill."""
  reads = []
  while (n := 256 << len(reads)) < slots:
    reads.append(n)
  return reads + [slots]


def cached_attention(q, k, v, cache, q_segments, cache_segments, cache_index):
  """T new tokens attend to the cache and to each other; returns (out, updated cache).

  q [B, K, G, T, D] (already scaled), k [B, K, D, T], v [B, K, T, D]; cache = (keys
  [B, K, D, S] slot-minor, values [B, K, S, D]) (`KVCache`); the new tokens go to
  slots [cache_index, cache_index + T). cache_segments [B, S] already holds theirs.
  Only the first `cache_reads` length that holds slot cache_index + T - 1 is read.
  """
  cache_k, cache_v = cache
  k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)

  def write(index):
    return (jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, index)),
            jax.lax.dynamic_update_slice(cache_v, v, (0, 0, index, 0)))

  t, slots = q.shape[3], jnp.arange(cache_v.shape[2])

  def same_segment(q_seg, k_seg):
    return (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)

  if q.shape[0] > 1:  # attend to the updated cache, which XLA then writes in place
    new_cache = write(cache_index)
    parts = [(*new_cache, ((cache_index + jnp.arange(t))[:, None] >= slots)[None]
              & same_segment(q_segments, cache_segments))]
  else:
    # With one row XLA's dots drop the unit batch dim, and a reader of the updated
    # cache in that shape makes it duplicate the update and copy every layer's cache
    # on every step. So the queries read the cache as it was plus the new keys, and
    # the update is written after (below).
    parts = [(cache_k, cache_v, (slots < cache_index)[None, None]
              & same_segment(q_segments, cache_segments)),
             (k, v, (jnp.arange(t)[:, None] >= jnp.arange(t))[None]
              & same_segment(q_segments, q_segments))]
  dt = q.dtype

  def attend(q, lo, hi, parts):   # query rows [lo, hi) against every part's keys
    # Keys are slot-minor: a plain [G, D] x [D, S] matmul per kv head.
    scores = jnp.concatenate([
        jnp.einsum("bkgtd,bkds->bkgts", q, keys.astype(dt), preferred_element_type=jnp.float32)
        + jnp.where(visible[:, lo:hi], 0.0, -1e30)[:, None, None]
        for keys, _, visible in parts], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    outs, first = [], 0
    for _, values, _ in parts:
      outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs[..., first:first + values.shape[2]],
                             values.astype(dt)))
      first += values.shape[2]
    return sum(outs[1:], outs[0])

  def attend_prefix(n, q, parts):  # reads the cache's first n slots only
    (keys, values, visible), *rest = parts
    parts = [(keys[..., :n], values[:, :, :n], visible[..., :n]), *rest]
    # A long prefill goes in query blocks, one at a time: its [B, K, G, T, S] scores
    # would be tens of GB for 256 rows of 1k-token prompts. A decode step is one block.
    outs = []
    for lo, hi in query_blocks(t):
      q_block = q[:, :, :, lo:hi]
      outs.append(attend(q_block if not outs else _after(q_block, outs[-1]), lo, hi, parts))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)

  reads = cache_reads(cache_v.shape[2])
  read = jnp.searchsorted(jnp.asarray(reads), cache_index + t)  # shortest holding all written
  out = jax.lax.switch(read, [functools.partial(attend_prefix, n) for n in reads], q, parts)
  if q.shape[0] == 1:
    after_read = 0
    if jax.default_backend() == "cpu":
      # XLA:CPU still copies a loop-carried cache that is read and then updated in
      # place, twice a step (~20 % of a batch-1 decode call here), unless the update
      # visibly comes after the read. An index that depends on the output but never
      # changes (x > inf is false, NaN included) says so. (On a sharded accelerator
      # the element read would cost a collective a layer.)
      after_read = (out.reshape(-1)[0] > jnp.inf).astype(jnp.int32)
    new_cache = write(cache_index + after_read)
  return out, new_cache


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, k, g, d = cfg.embed_dim, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
    wd = cfg.weight_dtype
    self.qkv = param(rngs, (e, k, g + 2, d), ("embed", "kv_heads", "heads", "head_dim"), wd)
    self.qkv_bias = (param(None, (k, g + 2, d), ("kv_heads", "heads", "head_dim"), wd)
                     if cfg.qkv_bias else None)
    self.out = param(rngs, (k, g, d, e), ("kv_heads", "heads", "head_dim", "embed"), wd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg, axis_name="head_dim")
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg, axis_name="head_dim")

  def __call__(self, x, positions, q_segments, kv_cache=None, cache_segments=None,
               cache_index=None):
    """x: [B, T, E]. Returns (y, the updated layer cache (k, v), or None without one).

    Without a cache, keys are this call's tokens. With one, the T new keys are
    written at `cache_index` and queries attend to every valid cached slot up
    to their own; `cache_segments` (0 = empty or padding) marks validity.
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    g = cfg.q_per_kv
    w_qkv = maybe_quant(self.qkv[...], INPUT_AXES["qkv"], cfg.quant).astype(dt)
    qkv = jnp.einsum("bte,ekgd->btkgd", x, w_qkv)
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(dt)
    qkv = checkpoint_name(qkv, "qkv_proj")  # what remat_policy="qkv_proj" keeps
    q, k, v = qkv[..., :g, :], qkv[..., g, :], qkv[..., g + 1, :]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope(q, positions, cfg.rope_theta) * jnp.asarray(cfg.head_dim ** -0.5, dt)
    k = rope(k, positions, cfg.rope_theta)  # [B, T, K, D]
    b, t = x.shape[:2]
    new_cache = None
    if kv_cache is None and cfg.attention == "pallas_gpu":
      attn = kernels.gpu_attention(q, k.astype(dt), v.astype(dt), q_segments)
    else:
      # Query heads grouped per kv head, [B, K, G, T, D]: scores and probs @ V are
      # plain batched matmuls over (B, K), with no relayout of K or V.
      q = parallel.constrain(q.transpose(0, 2, 3, 1, 4),
                             ("batch", "kv_heads", "heads", "length", "head_dim"))
      v = v.transpose(0, 2, 1, 3)  # [B, K, T, D]
      if kv_cache is None:
        attend = kernels.tpu_attention if cfg.attention == "pallas_tpu" else causal_attention
        attn = attend(q, k.transpose(0, 2, 1, 3).astype(dt), v.astype(dt), q_segments)
      else:
        attn, new_cache = cached_attention(q, k.transpose(0, 2, 3, 1), v, kv_cache, q_segments,
                                           cache_segments, cache_index)
      attn = attn.transpose(0, 3, 1, 2, 4)  # [B, T, K, G, D]
    # Output projection as one matmul over (K, G, D) = all query heads.
    attn = attn.reshape(b * t, -1)
    w_out = maybe_quant(self.out[...], INPUT_AXES["out"], cfg.quant).astype(dt)
    y = (attn @ w_out.reshape(-1, w_out.shape[-1])).reshape(b, t, -1)
    return y, new_cache


def _gate_up(x, w_gate_up):
  h = jnp.einsum("bte,eim->btim", x, w_gate_up)
  return parallel.constrain(h, ("batch", "length", None, "mlp"))


@jax.custom_vjp
def swiglu_mlp(x, w_gate_up, w_down):
  """down(silu(gate(x)) * up(x)): x [B, T, E], w_gate_up [E, 2, M], w_down [M, E].

  The fused [E, 2, M] kernel makes the forward one matmul. Plain autodiff would
  stack d(gate) and d(up) into a [B, T, 2, M] gradient and transpose it for the
  two weight-gradient and input-gradient matmuls (~40 % of the tiny train
  step's MLP backward on CPU); this VJP keeps them apart: four matmuls on
  [B, T, M] operands, and only the small [E, 2, M] weight gradient is stacked.
  """
  return _swiglu_mlp_fwd(x, w_gate_up, w_down)[0]


def _swiglu_mlp_fwd(x, w_gate_up, w_down):
  h = _gate_up(x, w_gate_up)
  act = jax.nn.silu(h[..., 0, :]) * h[..., 1, :]
  return jnp.einsum("btm,me->bte", act, w_down), (x, h, w_gate_up, w_down)


def _swiglu_mlp_bwd(res, dy):
  x, h, w_gate_up, w_down = res
  shape = x.shape
  x, h, dy = x.reshape(-1, shape[-1]), h.reshape(-1, *h.shape[-2:]), dy.reshape(-1, shape[-1])
  gate, up = h[:, 0], h[:, 1]
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  d_act = dy @ w_down.T
  d_gate = d_act * up * sig * (1 + gate * (1 - sig))
  d_up = d_act * silu
  d_x = d_gate @ w_gate_up[:, 0].T + d_up @ w_gate_up[:, 1].T
  # Weight gradients contract over tokens. Transposing the small [tokens, E]
  # operand first (the barrier keeps XLA from transposing the [tokens, M] one
  # instead, fused with its elementwise producer: ~10x slower on CPU).
  x_t, dy_t = jax.lax.optimization_barrier((x.T, dy.T))
  d_w_gate_up = jnp.stack([x_t @ d_gate, x_t @ d_up], axis=1)
  d_w_down = (dy_t @ (silu * up)).T
  return d_x.reshape(shape), d_w_gate_up, d_w_down


swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    wd = cfg.weight_dtype
    self.gate_up = param(rngs, (cfg.embed_dim, 2, cfg.mlp_dim), ("embed", None, "mlp"), wd)
    self.down = param(rngs, (cfg.mlp_dim, cfg.embed_dim), ("mlp", "embed"), wd)

  def __call__(self, x):
    dt = self.cfg.compute_dtype
    quant = self.cfg.quant
    return swiglu_mlp(x, maybe_quant(self.gate_up[...], INPUT_AXES["gate_up"], quant).astype(dt),
                      maybe_quant(self.down[...], INPUT_AXES["down"], quant).astype(dt))


class Block(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, segments, kv_cache=None, cache_segments=None,
               cache_index=None):
    h, kv = self.attn(self.attn_norm(x), positions, segments, kv_cache, cache_segments,
                      cache_index)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return parallel.constrain(x, ("batch", "length", "embed")), kv
