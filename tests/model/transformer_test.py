"""Behaviour of the Transformer that the sampler, trainer and HF interop rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import KVCache, ModelConfig, Transformer, modules, preset

SMALL = dict(vocab_size=97, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
             head_dim=8, mlp_dim=64)


def model(family="qwen2", **kw):
  cfg = ModelConfig(family=family, **{**SMALL, **kw})
  return Transformer(cfg, rngs=nnx.Rngs(0))


def tokens(b, t, seed=0, vocab=97):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 1, vocab)


@pytest.mark.parametrize("family,batch", [("qwen2", 2), ("qwen3", 2), ("qwen2", 1)])
def test_prefill_then_decode_matches_full_forward(family, batch):
  """Batch 1 takes its own cached-attention order (`modules.cached_attention`)."""
  m = model(family)
  x = tokens(batch, 13)
  full, _ = m(x)
  cache = KVCache.init(m.cfg, batch=batch, max_length=16)
  logits, cache = m(x[:, :6], cache=cache)
  np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
  for t in range(6, 10):
    pos = jnp.full((batch, 1), t, jnp.int32)
    step_logits, cache = m(x[:, t:t + 1], positions=pos, cache=cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t], atol=1e-5)
  # A later chunk of several tokens (the next turn) over the cache.
  pos = jnp.broadcast_to(jnp.arange(10, 13), (batch, 3))
  chunk_logits, cache = m(x[:, 10:], positions=pos, cache=cache)
  np.testing.assert_allclose(chunk_logits, full[:, 10:], atol=1e-5)
  assert int(cache.index) == 13


@pytest.mark.parametrize("batch", [1, 2])
def test_a_long_cache_is_read_only_as_far_as_it_is_written(batch):
  """A 1088-slot cache is read 256, 512, 1024 or all 1088 slots deep (`cache_reads`): each
  chunk and step below reads a different length, and all equal the full forward."""
  m = model()
  x = tokens(batch, 1031)
  full = jax.jit(lambda x: m(x)[0])(x)
  step = jax.jit(lambda x, pos, cache: m(x, positions=pos, cache=cache))
  cache = KVCache.init(m.cfg, batch=batch, max_length=1088)
  assert modules.cache_reads(1088) == [256, 512, 1024, 1088]
  for lo, hi in [(0, 250), (250, 510), (510, 511), (511, 512), (512, 513), (513, 1030),
                 (1030, 1031)]:
    pos = jnp.broadcast_to(jnp.arange(lo, hi), (batch, hi - lo))
    logits, cache = step(x[:, lo:hi], pos, cache)
    np.testing.assert_allclose(logits, full[:, lo:hi], atol=1e-5, err_msg=f"{lo}:{hi}")


@pytest.mark.parametrize("batch", [1, 4])
def test_a_decode_step_updates_the_stacked_cache_in_place(batch):
  """The scan carries the cache: a donated step holds a layer's slice or two of it, not a
  second whole cache (which scanning over it as inputs and outputs would)."""
  m = model(num_layers=8)
  graphdef, state = nnx.split(m)
  cache = KVCache.init(m.cfg, batch=batch, max_length=4096)

  def step(state, cache, token, position):
    return nnx.merge(graphdef, state)(token, positions=position, cache=cache)

  token = jnp.ones((batch, 1), jnp.int32)
  stats = jax.jit(step, donate_argnums=1).lower(state, cache, token, token).compile() \
      .memory_analysis()
  cache_bytes = sum(x.nbytes for x in (cache.k, cache.v))
  assert stats.temp_size_in_bytes < cache_bytes / 2, (stats.temp_size_in_bytes, cache_bytes)


def test_a_long_prefill_attends_one_query_block_at_a_time():
  """A 2048-token prompt never holds its [B, K, G, T, S] scores at once."""
  m = model()
  graphdef, state = nnx.split(m)
  t = 2048
  cache = KVCache.init(m.cfg, batch=1, max_length=t)

  def prefill(state, cache, tokens):
    return nnx.merge(graphdef, state)(tokens, cache=cache, return_hidden=True)

  stats = jax.jit(prefill, donate_argnums=1).lower(state, cache, tokens(1, t)).compile() \
      .memory_analysis()
  scores_bytes = m.cfg.num_heads * t * t * 4
  assert stats.temp_size_in_bytes < scores_bytes, (stats.temp_size_in_bytes, scores_bytes)


def test_left_padded_batch_decodes_like_unpadded_rows():
  m = model()
  a, b = tokens(1, 7, seed=1), tokens(1, 4, seed=2)
  pad = 3
  batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (pad, 0)))], axis=0)
  segments = jnp.array([[1] * 7, [0] * pad + [1] * 4])
  positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
  cache = KVCache.init(m.cfg, batch=2, max_length=10)
  logits, cache = m(batch, positions, segments, cache=cache)
  ref_b, _ = m(b)
  np.testing.assert_allclose(logits[1, pad:], ref_b[0], atol=1e-5)
  # One decode step: row b continues at its own position 4.
  nxt = tokens(2, 1, seed=3)
  step, _ = m(nxt, positions=jnp.array([[7], [4]]), cache=cache)
  ref, _ = m(jnp.concatenate([b, nxt[1:]], axis=1))
  np.testing.assert_allclose(step[1, 0], ref[0, -1], atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  m = model()
  a, b = tokens(1, 5, seed=4), tokens(1, 3, seed=5)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 3 + [0] * 2])
  positions = jnp.array([list(range(5)) + list(range(3)) + [0, 0]])
  logits, _ = m(packed, positions, segments)
  np.testing.assert_allclose(logits[0, :5], m(a)[0][0], atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:8], m(b)[0][0], atol=1e-5)


def test_right_padding_does_not_change_real_tokens():
  m = model()
  x = tokens(1, 6)
  padded = jnp.pad(x, ((0, 0), (0, 4)))
  segments = jnp.array([[1] * 6 + [0] * 4])
  logits, _ = m(padded, segments=segments)
  np.testing.assert_allclose(logits[0, :6], m(x)[0][0], atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "qkv_proj"])
def test_scan_and_remat_give_the_same_gradients(policy):
  x = tokens(2, 8)

  def grads(**kw):
    m = model(**kw)
    graphdef, params = nnx.split(m)
    loss = lambda p: nnx.merge(graphdef, p)(x)[0].mean()  # noqa: E731
    return jax.jit(jax.grad(loss))(params)

  ref = grads(scan_layers=False)
  for kw in ({}, {"remat_policy": policy}):
    got = grads(**kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, ref)


def test_tied_embeddings_have_no_lm_head_and_use_the_embedding():
  m = model(tie_embeddings=True)
  assert not hasattr(m, "lm_head")
  h, _ = m(tokens(1, 3), return_hidden=True)
  np.testing.assert_allclose(m(tokens(1, 3))[0], h @ m.embed[...].T, atol=1e-5)


def test_qwen3_has_qk_norm_and_no_qkv_bias():
  m = model("qwen3")
  assert m.blocks.attn.qkv_bias is None
  assert m.blocks.attn.q_norm.scale.shape == (2, 8)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32_logits():
  m32 = model()
  m16 = model(dtype="bfloat16")
  assert m16.blocks.mlp.down[...].dtype == jnp.float32
  x = tokens(2, 8)
  l32, l16 = m32(x)[0], m16(x)[0]
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.05)


def test_every_parameter_has_known_logical_axes():
  m = model()
  axes = parallel.logical_axes_of(nnx.state(m))
  flat = jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  for path, names in flat:
    assert names is not None, path
    assert names[0] == "layers" or "blocks" not in jax.tree_util.keystr(path)
    assert set(n for n in names if n) <= parallel.LOGICAL_AXES, (path, names)
  assert len(flat) == len(jax.tree.leaves(nnx.state(m)))


@pytest.mark.parametrize("field,value", [
    ("family", "llama"), ("num_kv_heads", 3), ("head_dim", 7), ("remat_policy", "some"),
    ("dtype", "float8"), ("num_layers", 0), ("attention", "flash")])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    ModelConfig(**{**SMALL, field: value})


def test_num_params_matches_the_built_model():
  for kw in ({}, {"tie_embeddings": True}, {"family": "qwen3"}):
    m = model(**kw)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m)))
    assert n == m.cfg.num_params()


# Parameter counts of the released checkpoints (tied embeddings counted once); their
# model cards round them and the non-embedding counts, which these also match.
PUBLISHED_PARAMS = {
    "qwen2_5_0_5b": 494_032_768, "qwen2_5_1_5b": 1_543_714_304, "qwen2_5_7b": 7_615_616_512,
    "qwen2_5_32b": 32_763_876_352, "qwen3_0_6b": 596_049_920, "qwen3_1_7b": 1_720_574_976,
    "qwen3_4b": 4_022_468_096, "qwen3_8b": 8_190_735_360, "qwen3_14b": 14_768_307_200,
    "qwen3_32b": 32_762_123_264,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_are_the_released_shapes(name):
  cfg = preset(name)
  assert cfg.num_params() == PUBLISHED_PARAMS[name]
  assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("tied", [True, False])
def test_target_logprobs_match_log_softmax_in_value_and_gradient(tied):
  """The fused head (custom VJP) is what every loss trains through."""
  m = model(tie_embeddings=tied)
  graphdef, params = nnx.split(m)
  x, targets = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
  weights = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 6))  # arbitrary cotangents

  def objective(fused):
    def f(p):
      mod = nnx.merge(graphdef, p)
      hidden, _ = mod(x, return_hidden=True)
      if fused:
        logp, entropy = mod.target_logprobs(hidden, targets)
      else:
        logp_all = jax.nn.log_softmax(mod.logits(hidden), axis=-1)
        logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
      return jnp.sum(weights[0] * logp + weights[1] * entropy), (logp, entropy)
    return jax.value_and_grad(f, has_aux=True)(params)

  (_, got), got_grads = objective(True)
  (_, want), want_grads = objective(False)
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)


def test_swiglu_mlp_vjp_matches_autodiff():
  """The MLP's custom VJP (every train step goes through it) against plain autodiff."""
  from m2.model.modules import swiglu_mlp
  kx, kw, kd, kc = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (2, 5, 8))
  w_gate_up = jax.random.normal(kw, (8, 2, 16)) / 3
  w_down = jax.random.normal(kd, (16, 8)) / 4
  cot = jax.random.normal(kc, (2, 5, 8))

  def plain(x, w_gate_up, w_down):
    h = jnp.einsum("bte,eim->btim", x, w_gate_up)
    return jnp.einsum("btm,me->bte", jax.nn.silu(h[..., 0, :]) * h[..., 1, :], w_down)

  args = (x, w_gate_up, w_down)
  got, got_vjp = jax.vjp(swiglu_mlp, *args)
  want, want_vjp = jax.vjp(plain, *args)
  np.testing.assert_allclose(got, want, atol=1e-5)
  for g, w in zip(got_vjp(cot), want_vjp(cot)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_blocked_causal_attention_matches_softmax_attention():
  """The blocked attention of training (custom VJP) against a plain masked softmax.

  T = 200 gives query blocks of 64, 64, 64 and 8 rows; row 1 packs two segments,
  row 2 ends in padding. Padding rows' outputs are unused (their loss is
  masked), so their cotangent is zero, as in a train step.
  """
  from m2.model.modules import causal_attention
  b, k, g, t, d = 3, 2, 2, 200, 8
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(kq, (b, k, g, t, d)) * d ** -0.5
  keys, values = jax.random.normal(kk, (b, k, t, d)), jax.random.normal(kv, (b, k, t, d))
  segments = np.ones((b, t), np.int32)
  segments[1, 90:] = 2
  segments[2, 150:] = 0
  real = jnp.asarray(segments != 0)[:, None, None, :, None]
  cot = jnp.where(real, jax.random.normal(kc, q.shape), 0.0)

  def plain(q, keys, values):
    slots = jnp.arange(t)
    visible = ((slots[:, None] >= slots[None, :])[None]
               & (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0))
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, keys)
    scores = jnp.where(visible[:, None, None], scores, -1e30)
    return jnp.einsum("bkgts,bksd->bkgtd", jax.nn.softmax(scores, axis=-1), values)

  @jax.jit
  def value_and_vjp(q, keys, values):  # jitted: op by op, the blocks' einsums are slow
    blocked = lambda *a: causal_attention(*a, jnp.asarray(segments))  # noqa: E731
    return [(out, vjp(cot)) for out, vjp in (jax.vjp(f, q, keys, values)
                                             for f in (blocked, plain))]

  (got, got_grads), (want, want_grads) = value_and_vjp(q, keys, values)
  np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1e-5)
  for name, a, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(a, w, atol=1e-4, err_msg=f"d{name}")
