"""AdamW: weight decay on matrices only; the warmup + cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2.model import ModelConfig, Transformer
from m2.train.optimizer import OptimizerConfig, make_optimizer, schedule


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])   # qkv biases; q/k norm scales
def test_weight_decay_moves_matrices_and_leaves_norms_and_biases(family):
  cfg = ModelConfig(family=family, vocab_size=64, num_layers=1, embed_dim=16, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_dim=32)
  params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tx = make_optimizer(OptimizerConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.5,
                                      grad_clip_norm=0.0))
  # Zero gradients: AdamW's only update is the decay, -lr * wd * w.
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {}
  for (path, u), w in zip(nnx.to_flat_state(updates), jax.tree.leaves(params)):
    name = path[-1]
    moved[name] = bool(np.any(np.asarray(u.get_value()) != 0))
    if moved[name]:
      np.testing.assert_allclose(u.get_value(), -0.5 * np.asarray(w), rtol=1e-6)
  assert {n for n, m in moved.items() if m} == {"embed", "lm_head", "qkv", "out", "gate_up",
                                                "down"}
  assert not moved["scale"] and (family == "qwen3" or not moved["qkv_bias"])


def test_schedule_warms_up_then_decays_to_its_floor():
  lr = schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=100,
                                end_lr_ratio=0.1))
  assert float(lr(0)) == 0 and float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(60)) == pytest.approx(1e-4 + 0.9e-3 * 0.5, rel=1e-5)   # half way
  assert float(lr(110)) == pytest.approx(1e-4) and float(lr(500)) == pytest.approx(1e-4)
