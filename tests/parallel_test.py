"""Mesh construction, logical-axis rules, sharded init and sharded train-step parity."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.train.optimizer import OptimizerConfig, make_optimizer
from m2.train.state import init_train_state, lm_loss, make_train_step

CFG = ModelConfig(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128)


def make_model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def batch(b=8, t=32, seed=0):
  rng = np.random.default_rng(seed)
  segments = np.ones((b, t), np.int32)
  segments[1, 20:] = 2   # a packed row
  segments[2, 25:] = 0   # a padded row
  positions = np.where(segments == 2, np.arange(t) - 20, np.arange(t)).astype(np.int32)
  return {"inputs": rng.integers(0, 256, (b, t), dtype=np.int32),
          "targets": rng.integers(0, 256, (b, t), dtype=np.int32),
          "positions": positions, "segments": segments,
          "loss_mask": (segments != 0).astype(np.int32)}


def test_make_mesh_fills_the_minus_one_axis():
  mesh = parallel.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("shape", [(3, -1, 1), (2, 2, 3), (-1, -1, 1), (2, 2)])
def test_make_mesh_rejects_shapes_that_do_not_fit(shape):
  with pytest.raises(ValueError, match="mesh shape"):
    parallel.make_mesh(shape)


def test_rules_map_logical_names_and_use_each_mesh_axis_once():
  rules = parallel.DEFAULT_RULES
  assert parallel.logical_to_spec(("batch", "length", "embed"), rules) == P(
      ("data", "fsdp"), None, None)   # fsdp already used by batch
  assert parallel.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  with pytest.raises(ValueError, match="no sharding rule"):
    parallel.logical_to_spec(("embd",), rules)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    parallel.check_rules([("embed", "fsd")])
  with pytest.raises(ValueError, match="unknown logical axis 'mpl'"):
    parallel.check_rules([("mpl", "tensor")])


def test_indivisible_dimension_is_replicated():
  mesh = parallel.make_mesh((1, 8, 1))
  assert parallel.logical_to_spec(("embed",), parallel.DEFAULT_RULES, (12,), mesh) == P(None)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_parameters_are_born_with_the_shardings_the_rules_give(mesh_shape):
  mesh = parallel.make_mesh(mesh_shape)
  model = parallel.init_sharded(make_model, mesh)
  state = nnx.state(model)
  expected = parallel.state_shardings(state, mesh)
  flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path, value in flat_state:
    want = flat_expected[path[:-1]] if path[:-1] in flat_expected else flat_expected[path]
    assert value.sharding == want, jax.tree_util.keystr(path)
  # Sharded for real: e.g. the MLP kernel is split over fsdp and tensor.
  gate_up = model.blocks.mlp.gate_up[...]
  shard = gate_up.addressable_shards[0].data.shape
  assert shard == (2, 64 // mesh.shape["fsdp"], 2, 128 // mesh.shape["tensor"])
  # Same values as an unsharded init from the same seed.
  ref = nnx.state(make_model())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), state, ref)


def _run_steps(mesh_shape, steps=2):
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  tx = make_optimizer(OptimizerConfig(warmup_steps=0, learning_rate=1e-2))
  graphdef, state, shardings = init_train_state(make_model, tx, mesh)
  step = make_train_step(graphdef, tx, lm_loss, mesh, shardings)
  data_sharding = parallel.data_sharding(mesh)
  losses = []
  for i in range(steps):
    b = {k: jax.device_put(v, data_sharding) for k, v in batch(seed=i).items()}
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  return state, losses


def _grads(mesh_shape):
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  model = parallel.init_sharded(make_model, mesh)
  graphdef, params = nnx.split(model)
  b = {k: jax.device_put(v, parallel.data_sharding(mesh)) for k, v in batch().items()}

  @jax.jit
  def grad(params, b):
    return jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), b)[0])(params)

  with parallel.sharding_context(mesh):
    return grad(params, b)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_loss_and_gradients_match_single_device(mesh_shape):
  ref_loss, ref_grads = _grads((1, 1, 1))
  loss, grads = _grads(mesh_shape)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_sharded_train_steps_match_single_device():
  ref_state, ref_losses = _run_steps((1, 1, 1))
  state, losses = _run_steps((2, 2, 2))
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
  # Adam divides by sqrt(v): for near-zero gradients a reduction-order
  # difference of 1e-9 can move a weight by up to ~lr * 1e-3.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
               state.params, ref_state.params)
  # The step keeps every array on its declared sharding.
  assert state.params["blocks"]["mlp"]["down"][...].sharding.spec == P(None, "tensor", "fsdp")
