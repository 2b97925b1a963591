"""The fused attention kernels (`attention="pallas_gpu"` / `"pallas_tpu"`), interpreted on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer, kernels
from m2.model.modules import causal_attention
from m2.train.state import lm_loss


# (kernel, T): both lengths pad to two kernel blocks (128 rows on GPU, 512 on TPU).
LENGTHS = [("pallas_gpu", 200), ("pallas_tpu", 600)]


@pytest.mark.parametrize("kernel,t", LENGTHS)
def test_kernels_match_blocked_attention_in_value_and_gradient(kernel, t):
  """Row 0 packs two segments; row 1 ends in padding, whose outputs (and cotangents)
  a train step never uses."""
  b, k, g, d = 2, 1, 2, 8
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(kq, (b, k, g, t, d)) * d ** -0.5
  keys, values = jax.random.normal(kk, (b, k, t, d)), jax.random.normal(kv, (b, k, t, d))
  segments = np.ones((b, t), np.int32)
  segments[0, t // 2:] = 2
  segments[1, t - 50:] = 0
  real = jnp.asarray(segments != 0)[:, None, None, :, None]
  cot = jnp.where(real, jax.random.normal(kc, q.shape), 0.0)

  def fused(q, keys, values):  # in the blocked path's layout
    if kernel == "pallas_tpu":
      return kernels.tpu_attention(q, keys, values, jnp.asarray(segments))
    out = kernels.gpu_attention(q.transpose(0, 3, 1, 2, 4), keys.transpose(0, 2, 1, 3),
                                values.transpose(0, 2, 1, 3), jnp.asarray(segments))
    return out.transpose(0, 2, 3, 1, 4)

  @jax.jit
  def value_and_vjp(q, keys, values):  # jitted: interpreted kernels are slow op by op
    blocked = lambda *a: causal_attention(*a, jnp.asarray(segments))  # noqa: E731
    return [(out, vjp(cot)) for out, vjp in (jax.vjp(f, q, keys, values)
                                             for f in (fused, blocked))]

  (got, got_grads), (want, want_grads) = value_and_vjp(q, keys, values)
  assert got.shape == want.shape
  np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1e-5)
  for name, a, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(a, w, atol=1e-4, err_msg=f"d{name}")


def test_the_cached_splash_kernel_serves_later_traces():
  """The kernel is built once per shape, inside the first trace; a later jit reuses it."""
  q, kv, segments = jnp.ones((1, 1, 2, 100, 8)), jnp.ones((1, 1, 100, 8)), jnp.ones((1, 100), int)
  for scale in (1.0, 2.0):
    out = jax.jit(lambda q: kernels.tpu_attention(q * scale, kv, kv, segments))(q)
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize("kernel", ["pallas_gpu", "pallas_tpu"])
def test_kernels_lower_for_their_accelerator_at_32b_shapes(kernel):
  """Forward and backward lower to Triton (CUDA) or Mosaic (TPU) custom calls without the
  hardware (`jax.export`): bf16, 8 kv heads x 5 queries of head_dim 128, 4096 tokens. The
  kernels' block and shape checks run here; only the hardware's compilation does not."""
  b, t, k, g, d = 1, 4096, 8, 5, 128
  if kernel == "pallas_gpu":
    attend, platform, q, kv = kernels.gpu_attention, "cuda", (b, t, k, g, d), (b, t, k, d)
  else:
    attend, platform, q, kv = kernels.tpu_attention, "tpu", (b, k, g, t, d), (b, k, t, d)
  q, kv = jax.ShapeDtypeStruct(q, jnp.bfloat16), jax.ShapeDtypeStruct(kv, jnp.bfloat16)

  def loss(q, k, v, segments):
    return attend(q, k, v, segments, interpret=False).astype(jnp.float32).sum()

  exported = jax.export.export(
      jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(q, kv, kv, jax.ShapeDtypeStruct((b, t), jnp.int32))
  target = "__gpu$xla.gpu.triton" if kernel == "pallas_gpu" else "tpu_custom_call"
  # GPU: forward, the backward's preprocessing, the fused backward; TPU: forward, dq, dk/dv.
  assert exported.mlir_module().count(f"custom_call @{target}") == 3


@pytest.mark.parametrize("sizes,t,padded,block", [
    (kernels.gpu_block_sizes, 8, 16, 16), (kernels.gpu_block_sizes, 100, 128, 128),
    (kernels.gpu_block_sizes, 1000, 1024, 128), (kernels.tpu_block_sizes, 8, 128, 128),
    (kernels.tpu_block_sizes, 600, 1024, 512), (kernels.tpu_block_sizes, 4096, 4096, 512)])
def test_block_sizes_pad_to_a_whole_number_of_kernel_blocks(sizes, t, padded, block):
  got_padded, blocks = sizes(t)
  assert got_padded == padded and blocks.block_q == block and blocks.has_backward_blocks
  assert padded % blocks.block_q_dq == 0


CFG = ModelConfig(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128)


def _loss_and_grads(cfg, mesh_shape):
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  model = parallel.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  segments = np.ones((8, 32), np.int32)
  segments[1, 20:] = 2
  segments[2, 25:] = 0
  batch = {"inputs": rng.integers(0, 256, (8, 32), dtype=np.int32),
           "targets": rng.integers(0, 256, (8, 32), dtype=np.int32),
           "positions": np.where(segments == 2, np.arange(32) - 20, np.arange(32)).astype(np.int32),
           "segments": segments, "loss_mask": (segments != 0).astype(np.int32)}

  @jax.jit
  def grad(params, batch):
    return jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), batch)[0])(params)

  with parallel.sharding_context(mesh):
    return grad(params, {k: jax.device_put(v, parallel.data_sharding(mesh))
                         for k, v in batch.items()})


@functools.cache
def _blocked_on_one_device():
  return _loss_and_grads(CFG, (1, 1, 1))


@pytest.mark.parametrize("kernel", ["pallas_gpu", "pallas_tpu"])
def test_a_sharded_model_with_a_kernel_matches_blocked_on_one_device(kernel):
  """On a (2, 2, 2) mesh the kernel runs per shard (batch over data x fsdp, kv heads
  over tensor), with packing and padding in the batch."""
  ref_loss, ref_grads = _blocked_on_one_device()
  loss, grads = _loss_and_grads(CFG.replace(attention=kernel), (2, 2, 2))
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


@pytest.mark.parametrize("attend,q_shape,kv_shape", [
    (kernels.gpu_attention, (2, 64, 2, 2, 8), (2, 64, 2, 8)),
    (kernels.tpu_attention, (2, 2, 2, 64, 8), (2, 2, 64, 8))])
def test_kernels_refuse_rules_that_split_the_sequence(attend, q_shape, kv_shape):
  rules = tuple((name, "fsdp" if name == "length" else axes)
                for name, axes in parallel.DEFAULT_RULES if name != "batch") + (("batch", None),)
  q, kv = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  with parallel.sharding_context(parallel.make_mesh((1, 8, 1)), rules):
    with pytest.raises(ValueError, match="needs whole sequences"):
      attend(q, kv, kv, jnp.ones((2, 64), jnp.int32))
