"""Gradient accumulation: a step over k micro-batches is the full batch's step."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.rl.grpo import GRPOConfig, grpo_loss
from m2.rl.learner import GRPOLearner
from m2.train.optimizer import OptimizerConfig, make_optimizer
from m2.train.state import (accumulate, init_train_state, lm_loss, make_train_step,
                            split_microbatches)

CFG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1,
                  head_dim=16, mlp_dim=64)
# eps 1: the update is ~ lr * grad, so the parameters show any gradient error. (With a
# tiny eps AdamW's first step is lr * sign(grad), which turns float rounding in
# near-zero gradients into visible differences and hides scale errors.)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0,
                      eps=1.0)


def make_model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def batch(rows=8, t=24, seed=0):
  """Rows with very different token counts (one with none), so that a plain
  average of micro-batch means would differ from the batch's mean."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, t + 1, rows)
  lengths[3] = 0
  on = np.arange(t)[None, :] < lengths[:, None]
  return {"inputs": rng.integers(0, 128, (rows, t), dtype=np.int32),
          "targets": rng.integers(0, 128, (rows, t), dtype=np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
          "segments": on.astype(np.int32) | (np.arange(t) == 0)[None, :],
          "loss_mask": on.astype(np.int32),
          "advantages": rng.normal(size=(rows, t)).astype(np.float32) * on,
          "sampler_logp": -rng.uniform(1, 6, (rows, t)).astype(np.float32) * on}


def one_step(mesh, loss_fn, k, data):
  tx = make_optimizer(OPT)
  graphdef, state, shardings = init_train_state(make_model, tx, mesh)
  step = make_train_step(graphdef, tx, loss_fn, mesh, shardings, microbatches=k)
  placed = {n: jax.device_put(v, parallel.data_sharding(mesh)) for n, v in data.items()}
  state, metrics = step(state, placed)
  return jax.device_get(state.params), jax.device_get(metrics)


def assert_same_step(a, b):
  (params_a, metrics_a), (params_b, metrics_b) = a, b
  assert metrics_a.keys() == metrics_b.keys()
  for name in metrics_a:   # incl. the loss and the gradient's norm
    np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=2e-5, atol=1e-6,
                               err_msg=name)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-9),
               params_a, params_b)


def test_accumulated_gradients_equal_the_full_batch_gradients():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  graphdef, params = nnx.split(make_model())
  data = {n: v for n, v in batch().items() if n not in ("advantages", "sampler_logp")}

  def grads_of(b):
    return jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), b), has_aux=True)(params)
  (loss, _), grads = jax.jit(grads_of)(data)
  (micro_loss, aux), micro_grads = jax.jit(
      lambda b: accumulate(grads_of, split_microbatches(b, 4, mesh)))(data)
  np.testing.assert_allclose(micro_loss, loss, rtol=1e-6)
  assert aux["tokens"] == data["loss_mask"].sum()
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-8),
               grads, micro_grads)


@pytest.mark.parametrize("mesh_shape,k", [((1, 1, 1), 4), ((2, 2, 2), 2)])
def test_lm_step_over_micro_batches_equals_the_full_batch(mesh_shape, k):
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  mesh = parallel.make_mesh(mesh_shape, devices=devices)
  data = {n: v for n, v in batch().items() if n not in ("advantages", "sampler_logp")}
  full, micro = one_step(mesh, lm_loss, 1, data), one_step(mesh, lm_loss, k, data)
  assert_same_step(full, micro)
  assert "weight" not in full[1]


# Weighted by tokens, and by sequences (both sequence modes use that weight).
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_grpo_step_over_micro_batches_equals_the_full_batch(mode):
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  loss_fn = functools.partial(grpo_loss, cfg=GRPOConfig(loss_agg_mode=mode, tis_cap=2.0))
  full, micro = one_step(mesh, loss_fn, 1, batch()), one_step(mesh, loss_fn, 4, batch())
  assert_same_step(full, micro)   # incl. ratio_max / ratio_min and the token count


def test_micro_batches_are_strided_rows():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  rows = np.arange(6)[:, None] * np.ones((1, 3), np.int32)
  micro = split_microbatches({"x": rows}, 3, mesh)["x"]
  np.testing.assert_array_equal(micro[:, :, 0], [[0, 3], [1, 4], [2, 5]])


def test_bad_micro_batching_is_refused_clearly():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  data = {n: v for n, v in batch(rows=6).items() if n not in ("advantages", "sampler_logp")}
  with pytest.raises(ValueError, match="does not split into 4 micro-batches"):
    one_step(mesh, lm_loss, 4, data)

  def unweighted(model, b):
    loss, aux = lm_loss(model, b)
    return loss, {"tokens": aux["tokens"]}
  with pytest.raises(ValueError, match=r"aux\['weight'\]"):
    one_step(mesh, unweighted, 2, data)


def test_learner_log_probs_over_micro_batches_keep_row_order():
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  params = nnx.state(make_model())
  data = batch()
  logp = {}
  for k in (1, 4):
    learner = GRPOLearner(CFG, GRPOConfig(), OPT, mesh, init_params=params, microbatches=k)
    with parallel.sharding_context(mesh):
      logp[k] = np.asarray(learner._logp(learner.params, learner._place(data)))
  np.testing.assert_allclose(logp[4], logp[1], atol=1e-6)
