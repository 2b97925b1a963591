"""ModelConfig.quant="aqt:...": the symmetric weight-only scheme on aqtp's quantizers.

The hand-written path ("int4", ...) is checked against the export in
tests/export/quantize_test.py; here the AQT path is checked against it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.model.quant import QuantScheme, fake_quant, maybe_quant, parse
from m2.train.state import TrainState, lm_loss, make_train_step

# Every linear input dimension (embed, heads * head_dim, mlp) is 128: one default group.
TINY = dict(vocab_size=97, num_layers=1, embed_dim=128, num_heads=4, num_kv_heads=2,
            head_dim=32, mlp_dim=128)
LINEARS = ("qkv", "out", "gate_up", "down")


def model(quant):
  return Transformer(ModelConfig(quant=quant, **TINY), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def params():
  return nnx.state(model("none"))


def with_quant(quant, params):
  """The same weights, run with ModelConfig.quant=quant."""
  return nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: model(quant))), params)


def batch(b=2, t=12):
  x = jax.random.randint(jax.random.key(7), (b, t + 1), 1, TINY["vocab_size"])
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "positions": pos,
          "segments": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32)}


def test_spec_parses_to_the_aqt_backend():
  assert parse("aqt:int4") == QuantScheme(bits=4, symmetric=True, group_size=128, backend="aqt")
  assert parse("aqt:int8_g64") == QuantScheme(bits=8, group_size=64, backend="aqt")
  assert parse("int4").backend == "m2"
  assert ModelConfig(quant="aqt:int4_g32").quant == "aqt:int4_g32"


@pytest.mark.parametrize("spec, dtype", [("int4", jnp.float32), ("int4_g64", jnp.bfloat16),
                                         ("int8", jnp.bfloat16), ("int8_g32", jnp.float32)])
def test_aqt_dequantized_weights_equal_the_hand_written_scheme(spec, dtype):
  # Both round scales and q * scale to bf16 and map max|w| to qmax; AQT multiplies by
  # 1/scale where m2 divides, which could only flip a value within an ulp of a half step.
  # Measured: 0 of 16.7M values differ (4 x 1024x1024 normal weights per spec).
  k1, k2 = jax.random.split(jax.random.key(0))
  shapes = {1: (256, 2, 4, 16), 3: (2, 4, 16, 64)}   # qkv-like and out-like layouts
  for (in_axes, shape), key in zip(shapes.items(), (k1, k2)):
    w = jax.random.normal(key, shape) * 0.02
    n_in = int(np.prod(shape[:in_axes]))
    w = w.reshape(n_in, -1).at[:, 0].set(0).reshape(shape).astype(dtype)  # all-zero groups
    ours = fake_quant(w, in_axes, parse(spec))
    theirs = jax.jit(lambda w: maybe_quant(w, in_axes, "aqt:" + spec))(w)
    assert theirs.dtype == w.dtype and theirs.shape == w.shape
    np.testing.assert_array_equal(np.asarray(theirs, np.float32), np.asarray(ours, np.float32))
    assert not np.array_equal(np.asarray(theirs), np.asarray(w))
  # At most 2^bits - 1 levels per group (symmetric: -qmax..qmax).
  q = np.asarray(theirs, np.float32).reshape(-1, parse(spec).group_size, 64)
  distinct = 1 + np.sum(np.diff(np.sort(q, axis=1), axis=1) != 0, axis=1)
  assert distinct.max() <= (15 if spec.startswith("int4") else 255)


def test_aqt_gradient_is_straight_through():
  w = jax.random.normal(jax.random.key(0), (256, 2, 8)) * 0.02
  c = jax.random.normal(jax.random.key(1), (256, 2, 8))
  for spec in ("aqt:int4", "aqt:int8_g64"):
    grad = jax.jit(jax.grad(lambda w: jnp.sum(maybe_quant(w, 1, spec) * c)))(w)
    np.testing.assert_array_equal(grad, c)


def test_aqt_int4_forward_equals_int4_and_int8_is_closer_to_dense(params):
  x = batch()["inputs"]
  quants = ("none", "int4", "aqt:int4", "aqt:int8")
  graphdefs = {q: nnx.graphdef(with_quant(q, params)) for q in quants}
  logits = jax.jit(lambda p: {q: nnx.merge(g, p)(x)[0] for q, g in graphdefs.items()})(params)
  logits = {q: np.asarray(v) for q, v in logits.items()}
  # Same dequantized weights, same graph otherwise. Measured max |diff|: 0.0.
  np.testing.assert_allclose(logits["aqt:int4"], logits["int4"], rtol=0, atol=1e-6)
  err4 = np.abs(logits["aqt:int4"] - logits["none"]).max()
  err8 = np.abs(logits["aqt:int8"] - logits["none"]).max()
  assert err4 > 1e-3                        # int4 did change the model ...
  assert err8 < err4 / 4                    # ... and 8 bits are much closer to the dense one


def test_quantization_aware_train_step_runs_with_aqt(params):
  """m2's jitted train step with quant="aqt:int4": finite loss that falls; every
  quantized weight gets a nonzero gradient (Adam moves it)."""
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = optax.adam(1e-2)
  graphdef, p = nnx.split(with_quant("aqt:int4", params))
  state = TrainState.create(p, tx)
  shardings = parallel.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  before = {path: np.asarray(v) for path, v in nnx.to_flat_state(state.params)}
  step = make_train_step(graphdef, tx, lm_loss, mesh, shardings)
  data = batch()
  state, first = step(state, data)
  state, second = step(state, data)
  assert np.isfinite(float(first["loss"])) and np.isfinite(float(first["grad_norm"]))
  assert float(second["loss"]) < float(first["loss"])
  moved = set()
  for path, v in nnx.to_flat_state(state.params):
    assert np.isfinite(np.asarray(v)).all(), path
    if path[-1] in LINEARS and not np.array_equal(np.asarray(v), before[path]):
      moved.add(path[-1])
  assert moved == set(LINEARS)


@pytest.mark.parametrize("spec, match", [
    ("aqt:int4_asym", "symmetric only"),
    ("aqt:int3", "aqt:int"),
    ("qwix:int4", "want 'none'"),
    ("aqt:", "want 'none'"),
    ("AQT:int4", "want 'none'"),
    ("aqt:int4_g0", "group size must be positive"),
])
def test_bad_aqt_spec_raises_a_clear_error(spec, match):
  with pytest.raises(ValueError, match=match):
    parse(spec)
  with pytest.raises(ValueError, match="ModelConfig.quant"):
    ModelConfig(quant=spec, **TINY)


def test_aqt_group_must_divide_the_input_dimension():
  with pytest.raises(ValueError, match="group size 128"):
    fake_quant(jnp.zeros((100, 4)), 1, parse("aqt:int4"))
