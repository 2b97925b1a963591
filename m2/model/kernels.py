"""Fused attention kernels for accelerators (`ModelConfig.attention`).

"blocked" (`modules.causal_attention`) is plain XLA and runs everywhere; it still
writes each query block's fp32 scores to memory. "pallas_gpu" is JAX's Pallas/Triton
flash-attention kernel (`jax.experimental.pallas.ops.gpu.attention`): scores stay in
on-chip memory in the forward and in the backward. On CPU the same kernel runs
interpreted, slowly, which is how the tests check it against "blocked".

Only the cache-free call (training, scoring) uses a kernel; the sampler's cached
prefill and decode steps stay on the blocked path.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
from jax.sharding import PartitionSpec

from m2 import parallel

log = logging.getLogger(__name__)

_MAX_BLOCK = 128  # the kernel's default forward block; Triton needs at least 16 rows
_MAX_BACKWARD_BLOCK = 32


def block_sizes(t: int) -> tuple[int, pallas_gpu.BlockSizes]:
  """(padded length, kernel block sizes) for sequences of t tokens."""
  block = max(16, min(_MAX_BLOCK, 1 << (t - 1).bit_length()))
  back = min(_MAX_BACKWARD_BLOCK, block)
  return -(-t // block) * block, pallas_gpu.BlockSizes(
      block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back,
      block_q_dq=back, block_kv_dq=back)


@functools.cache
def _warn_interpreted():
  log.warning("attention='pallas_gpu' on CPU runs the Triton kernel interpreted: correct "
              "but slow; use 'blocked' outside tests")


def _interpret() -> bool:
  backend = jax.default_backend()
  if backend == "cpu":
    _warn_interpreted()
  elif backend != "gpu":
    raise ValueError(f"attention='pallas_gpu' is a GPU (Triton) kernel; on {backend} "
                     "use attention='blocked'")
  return backend == "cpu"


def flash_attention(q, k, v, segments, *, interpret: bool | None = None):
  """Causal attention within segments: q [B, T, K, G, D] (already scaled), k, v
  [B, T, K, D], segments [B, T] -> [B, T, K, G, D].

  The kernel compares segment ids only, so padding (segment 0) attends to earlier
  padding: as on the blocked path, padding rows' outputs are arbitrary and must not
  reach the loss. interpret: run the kernel interpreted (default: on CPU only).

  Under `parallel.sharding_context` the kernel runs per shard (`jax.shard_map`):
  XLA cannot partition a custom call, and would gather its operands instead.
  """
  if interpret is None:
    interpret = _interpret()
  local = functools.partial(_flash_attention, interpret=interpret)
  ctx = parallel.current()
  if ctx is None:
    return local(q, k, v, segments)
  mesh, rules = ctx
  spec = parallel.logical_to_spec(("batch", "length", "kv_heads", "heads", "head_dim"),
                                  rules, q.shape, mesh)
  batch, length, kv_heads, _, head_dim = spec
  if length is not None or head_dim is not None:
    raise ValueError(f"attention='pallas_gpu' needs whole sequences and heads on each "
                     f"device; the rules shard queries as {spec}")
  kv_spec = PartitionSpec(batch, None, kv_heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, kv_spec, kv_spec,
                                                   PartitionSpec(batch, None)),
                       out_specs=spec, check_vma=False)(q, k, v, segments)


def _flash_attention(q, k, v, segments, *, interpret: bool):
  b, t, kv_heads, g, d = q.shape
  padded, sizes = block_sizes(t)
  if padded != t:  # padding rows of segment 0, sliced off below
    pad = ((0, 0), (0, padded - t))
    q, k, v = (jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2)) for x in (q, k, v))
    segments = jnp.pad(segments, pad)
  # The kernel wants one kv head per query head: head h = kv head h // G.
  out = pallas_gpu.mha(q.reshape(b, padded, kv_heads * g, d), jnp.repeat(k, g, axis=2),
                       jnp.repeat(v, g, axis=2), segments.astype(jnp.int32), sm_scale=1.0,
                       causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :t].reshape(b, t, kv_heads, g, d)
