"""Fused attention kernels for accelerators (`ModelConfig.attention`).

"blocked" (`modules.causal_attention`) is plain XLA and runs everywhere; it still
writes each query block's fp32 scores to memory. The kernels keep scores in
on-chip memory, forward and backward:
  * "pallas_gpu": JAX's Pallas/Triton flash attention
    (`jax.experimental.pallas.ops.gpu.attention`), one kv head per query head;
  * "pallas_tpu": JAX's Pallas splash attention
    (`jax.experimental.pallas.ops.tpu.splash_attention`), the multi-query kernel
    once per kv head, so GQA needs no repeated k and v.
On CPU either runs interpreted, slowly, which is how the tests check them against
"blocked". Only the cache-free call (training, scoring) uses a kernel; the
sampler's cached prefill and decode steps stay on the blocked path.

Both compare segment ids only, so padding (segment 0) attends to earlier padding:
as on the blocked path, padding rows' outputs are arbitrary and must not reach
the loss.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from m2 import parallel

log = logging.getLogger(__name__)

KERNEL_BACKENDS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def gpu_block_sizes(t: int) -> tuple[int, triton.BlockSizes]:
  """(padded length, Triton kernel blocks) for t tokens: the kernel's default 128-row
  forward and 32-row backward blocks, smaller for short sequences (at least 16 rows,
  which Triton's matmuls need)."""
  block = max(16, min(128, 1 << (t - 1).bit_length()))
  back = min(32, block)
  return -(-t // block) * block, triton.BlockSizes(
      block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back,
      block_q_dq=back, block_kv_dq=back)


def tpu_block_sizes(t: int) -> tuple[int, splash.BlockSizes]:
  """(padded length, splash blocks) for t tokens: 512-row blocks (as MaxText's
  defaults), smaller for short sequences (at least 128, a TPU tile)."""
  block = max(128, min(512, 1 << (t - 1).bit_length()))
  return -(-t // block) * block, splash.BlockSizes(
      block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
      block_q_dq=block, block_kv_dq=block)


@functools.cache
def _warn_interpreted(kernel: str):
  log.warning("attention=%r on CPU runs the kernel interpreted: correct but slow; use "
              "'blocked' outside tests", kernel)


def _interpret(kernel: str) -> bool:
  backend = jax.default_backend()
  if backend == "cpu":
    _warn_interpreted(kernel)
    return True
  if backend != KERNEL_BACKENDS[kernel]:
    raise ValueError(f"attention={kernel!r} is a {KERNEL_BACKENDS[kernel].upper()} kernel; "
                     f"on {backend} use attention='blocked'")
  return False


def _per_shard(local, q, k, v, segments, q_axes, kv_axes):
  """local(q, k, v, segments) on each device's shard (`jax.shard_map`) under a
  sharding context: XLA cannot partition a custom call, and would gather its
  operands instead. Batch and heads may be sharded; length and head_dim not."""
  ctx = parallel.current()
  if ctx is None:
    return local(q, k, v, segments)
  mesh, rules = ctx
  q_spec = parallel.logical_to_spec(q_axes, rules, q.shape, mesh)
  named = dict(zip(q_axes, q_spec))
  if named["length"] is not None or named["head_dim"] is not None:
    raise ValueError(f"a fused attention kernel needs whole sequences and heads on each "
                     f"device; the rules shard queries {q_axes} as {q_spec}")
  kv_spec = PartitionSpec(*(named[a] for a in kv_axes))
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(named["batch"], None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, segments)


def _pad(x, axis: int, length: int):
  """x with its `axis` zero-padded to `length` (segment 0: padding, sliced off after)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)


def gpu_attention(q, k, v, segments, *, interpret: bool | None = None):
  """"pallas_gpu": q [B, T, K, G, D] (already scaled), k, v [B, T, K, D], segments
  [B, T] -> [B, T, K, G, D]. interpret: default on CPU only."""
  interpret = _interpret("pallas_gpu") if interpret is None else interpret
  return _per_shard(functools.partial(_gpu_attention, interpret=interpret), q, k, v, segments,
                    ("batch", "length", "kv_heads", "heads", "head_dim"),
                    ("batch", "length", "kv_heads", "head_dim"))


def _gpu_attention(q, k, v, segments, *, interpret: bool):
  b, t, kv_heads, g, d = q.shape
  padded, sizes = gpu_block_sizes(t)
  q, k, v, segments = (_pad(x, 1, padded) for x in (q, k, v, segments))
  # The kernel wants one kv head per query head: head h = kv head h // G.
  out = triton.mha(q.reshape(b, padded, kv_heads * g, d), jnp.repeat(k, g, axis=2),
                   jnp.repeat(v, g, axis=2), segments.astype(jnp.int32), sm_scale=1.0,
                   causal=True, block_sizes=sizes, interpret=interpret)
  return out[:, :t].reshape(b, t, kv_heads, g, d)


def tpu_attention(q, k, v, segments, *, interpret: bool | None = None):
  """"pallas_tpu": q [B, K, G, T, D] (already scaled), k, v [B, K, T, D], segments
  [B, T] -> [B, K, G, T, D] (the blocked path's layout). interpret: default on CPU only."""
  interpret = _interpret("pallas_tpu") if interpret is None else interpret
  return _per_shard(functools.partial(_tpu_attention, interpret=interpret), q, k, v, segments,
                    ("batch", "kv_heads", "heads", "length", "head_dim"),
                    ("batch", "kv_heads", "length", "head_dim"))


@functools.cache
def _splash_kernel(q_per_kv: int, padded: int, interpret: bool):
  _, sizes = tpu_block_sizes(padded)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * q_per_kv)
  # Concrete mask tables even when first built inside a trace: the kernel is cached.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _tpu_attention(q, k, v, segments, *, interpret: bool):
  t = q.shape[3]
  padded, _ = tpu_block_sizes(t)
  q, k, v = _pad(q, 3, padded), _pad(k, 2, padded), _pad(v, 2, padded)
  segments = _pad(segments, 1, padded).astype(jnp.int32)
  kernel = _splash_kernel(q.shape[2], padded, interpret)  # [G, T, D] x [T, D] per kv head
  ids = splash.SegmentIds(q=segments, kv=segments)
  per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))     # over kv heads
  return jax.vmap(per_row)(q, k, v, ids)[:, :, :, :t]      # over rows
