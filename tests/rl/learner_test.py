"""The jitted, sharded GRPO learner: sharded == single device, beta=0 has no reference."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import Transformer
from m2.model.config import preset
from m2.rl.grpo import GRPOConfig
from m2.rl.learner import GRPOLearner, Trajectory, learner_batch
from m2.train.optimizer import OptimizerConfig

CFG = dataclasses.replace(preset("tiny"), vocab_size=64, num_layers=2, embed_dim=32, num_heads=2,
                          num_kv_heads=1, head_dim=16, mlp_dim=64)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0)


@pytest.fixture(scope="module")
def init_params():
  return nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  trajs, adv = [], []
  for i in range(12):   # both halves of the 16 rows (two minibatches) hold sequences
    p, c = rng.integers(3, 9), rng.integers(2, 12)
    trajs.append(Trajectory.single_turn(rng.integers(1, 64, p), rng.integers(1, 64, c),
                                        -rng.uniform(0.5, 4.0, c)))
    adv.append(rng.normal())
  return learner_batch(trajs, adv, rows=16, multiple=16)


def test_learner_batch_layout():
  t = Trajectory.single_turn([5, 6, 7], [8, 9], [-1.0, -2.0])
  b = learner_batch([t], [0.5], rows=2, multiple=4)
  np.testing.assert_array_equal(b["inputs"][0], [5, 6, 7, 8])
  np.testing.assert_array_equal(b["targets"][0], [6, 7, 8, 9])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1])
  np.testing.assert_array_equal(b["sampler_logp"][0], [0, 0, -1, -2])
  np.testing.assert_array_equal(b["advantages"][0], [0, 0, 0.5, 0.5])
  np.testing.assert_array_equal(b["segments"], [[1, 1, 1, 1], [0, 0, 0, 0]])
  with pytest.raises(ValueError, match="do not fit"):
    learner_batch([t, t, t], [0, 0, 0], rows=2)
  with pytest.raises(ValueError, match="first token"):
    Trajectory([1, 2], [1, 1], [0, 0])


def _learner(mesh, params, **knobs):
  return GRPOLearner(CFG, GRPOConfig(**knobs), OPT, mesh, init_params=params)


def _one_device():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def single(init_params):
  """One single-device learner shared by the tests below (compiles are the cost)."""
  return _learner(_one_device(), init_params)


def test_sharded_equals_single_device_and_beta_zero_has_no_reference(init_params, batch, single):
  assert len(jax.devices()) == 8
  sharded = _learner(parallel.make_mesh((2, 4, 1)), init_params)
  m_sharded = jax.device_get(sharded.update(batch))
  m_single = jax.device_get(single.update(batch))
  for k in m_single:
    np.testing.assert_allclose(m_sharded[k], m_single[k], rtol=2e-5, atol=1e-6, err_msg=k)
  a = jax.tree.leaves(jax.device_get(sharded.params))
  b = jax.tree.leaves(jax.device_get(single.params))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)   # Adam magnifies fp noise
  # beta = 0: no reference params exist and no reference pass ran
  assert single.ref_params is None and single.ref_forwards == 0 and "kl_ref" not in m_single
  # the caller's params survive the learner's donation
  assert not any(x.is_deleted() for x in jax.tree.leaves(init_params))


def test_kl_reference_and_minibatches(init_params, batch):
  learner = _learner(_one_device(), init_params, beta=0.1, num_minibatches=2)
  first = jax.device_get(learner.update(batch))
  assert learner.ref_forwards == 1 and first["kl_ref"] > 0   # 2nd minibatch: moved
  # the second minibatch is off-policy: its ratio to the batch's old log-probs is not 1
  assert abs(first["ratio_mean"] - 1.0) > 1e-6 and first["kl_old"] > 0


def test_update_moves_logprobs_along_advantages(batch, single):
  placed = single._place(batch)
  before = np.asarray(single._logp(single.params, placed))
  for _ in range(2):
    single.update(batch)
  after = np.asarray(single._logp(single.params, placed))
  mask = batch["loss_mask"] > 0
  change = ((after - before) * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
  adv = batch["advantages"].sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
  rows = mask.any(axis=1)
  # sequences with positive advantage become likelier, negative ones less likely
  assert np.corrcoef(change[rows], adv[rows])[0, 1] > 0.5


def test_all_padding_minibatches_do_not_update(init_params):
  # Weight decay on, so a step on no data would still shrink the weights.
  opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
  learner = GRPOLearner(CFG, GRPOConfig(num_minibatches=2), opt, _one_device(),
                        init_params=init_params)
  rng = np.random.default_rng(2)
  trajs = [Trajectory.single_turn(rng.integers(1, 64, 5), rng.integers(1, 64, 6),
                                  -rng.uniform(0.5, 3.0, 6)) for _ in range(3)]
  # 3 sequences in 8 rows: the second minibatch (rows 4-7) is all padding
  batch = learner_batch(trajs, [1.0, -0.5, -0.5], rows=8, multiple=16)
  metrics = learner.update(batch)
  assert learner.step == 1 and metrics["empty_minibatches"] == 1
  before = jax.device_get(learner.params)
  padding = {k: np.zeros_like(v) for k, v in batch.items()}
  assert learner.update(padding) == {"empty_minibatches": 2.0}
  assert learner.step == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(learner.params))):
    np.testing.assert_array_equal(x, y)
