"""The Pallas flash-attention path (`attention="pallas_gpu"`), run interpreted on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer, kernels
from m2.model.modules import causal_attention
from m2.train.state import lm_loss


def test_flash_attention_matches_blocked_attention_in_value_and_gradient():
  """T = 200 pads to 256 (two 128-row kernel blocks); row 0 packs two segments,
  row 1 ends in padding, whose outputs (and cotangents) a train step never uses."""
  b, k, g, t, d = 2, 1, 2, 200, 8
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(kq, (b, t, k, g, d)) * d ** -0.5
  keys, values = jax.random.normal(kk, (b, t, k, d)), jax.random.normal(kv, (b, t, k, d))
  segments = np.ones((b, t), np.int32)
  segments[0, 90:] = 2
  segments[1, 150:] = 0
  real = jnp.asarray(segments != 0)[:, :, None, None, None]
  cot = jnp.where(real, jax.random.normal(kc, q.shape), 0.0)

  def blocked(q, keys, values):  # the same attention in the blocked path's layout
    out = causal_attention(q.transpose(0, 2, 3, 1, 4), keys.transpose(0, 2, 1, 3),
                           values.transpose(0, 2, 1, 3), jnp.asarray(segments))
    return out.transpose(0, 3, 1, 2, 4)

  @jax.jit
  def value_and_vjp(q, keys, values):  # jitted: interpreted kernels are slow op by op
    flash = lambda *a: kernels.flash_attention(*a, jnp.asarray(segments))
    return [(out, vjp(cot)) for out, vjp in (jax.vjp(f, q, keys, values)
                                             for f in (flash, blocked))]

  (got, got_grads), (want, want_grads) = value_and_vjp(q, keys, values)
  assert got.shape == want.shape
  np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1e-5)
  for name, a, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(a, w, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("t,padded,block", [(8, 16, 16), (100, 128, 128), (1000, 1024, 128)])
def test_block_sizes_pad_to_a_whole_number_of_kernel_blocks(t, padded, block):
  got_padded, sizes = kernels.block_sizes(t)
  assert (got_padded, sizes.block_q, sizes.block_k) == (padded, block, block)
  assert sizes.has_backward_blocks and padded % sizes.block_q_dq == 0


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


def test_a_sharded_model_with_flash_attention_matches_blocked_on_one_device():
  """On a (2, 2, 2) mesh the kernel runs per shard (batch over data x fsdp, kv heads
  over tensor), with packing and padding in the batch."""
  ref_loss, ref_grads = _loss_and_grads(CFG, (1, 1, 1))
  loss, grads = _loss_and_grads(CFG.replace(attention="pallas_gpu"), (2, 2, 2))
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_flash_attention_refuses_rules_that_split_the_sequence():
  rules = tuple((name, "fsdp" if name == "length" else axes)
                for name, axes in parallel.DEFAULT_RULES if name != "batch") + (("batch", None),)
  q, kv = jnp.zeros((2, 64, 2, 2, 8)), jnp.zeros((2, 64, 2, 8))
  with parallel.sharding_context(parallel.make_mesh((1, 8, 1)), rules):
    with pytest.raises(ValueError, match="needs whole sequences"):
      kernels.flash_attention(q, kv, kv, jnp.ones((2, 64), jnp.int32))
