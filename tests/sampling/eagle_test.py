"""The EAGLE-style drafter: exact greedy output, and a cache that matches a prefill."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2.model import ModelConfig
from m2.sampling import Sampler, SamplingParams, SpeculativeSampler
from m2.sampling.eagle import EagleDrafter, EagleHead

CFG = ModelConfig(vocab_size=96, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
PROMPTS = [[5, 9, 3, 4, 17, 2, 8], [7, 8], [4, 40, 41]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
K = 3


@pytest.fixture(scope="module")
def target(make_transformer):
  return make_transformer(CFG, 0)


@pytest.fixture(scope="module", params=[None, 16], ids=["target_width", "width16"])
def eagle(request):
  """A head of the target's width, and a narrower one (fc down to 16, `up` back)."""
  head = EagleHead(CFG, rngs=nnx.Rngs(1), width=request.param)
  return EagleDrafter(head), nnx.state(head)


def test_greedy_with_an_eagle_head_equals_target_greedy(target, eagle):
  drafter, head_params = eagle
  params = nnx.state(target)
  spec = SpeculativeSampler(target, drafter, num_draft_tokens=K)
  plain = Sampler(target)
  ref = plain.generate(params, PROMPTS, GREEDY)
  out = spec.generate(params, PROMPTS, GREEDY, draft_params=head_params)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert out.stats["rounds"] >= 3
  # The next turn of the same conversations goes through the head's prefill.
  turn = [[11, 12], [13], [14, 15, 16]]
  np.testing.assert_array_equal(
      spec.generate(params, turn, GREEDY, state=out.state, draft_params=head_params).tokens,
      plain.generate(params, turn, GREEDY, state=ref.state).tokens)


@pytest.mark.parametrize("kept", [1, 3])
def test_after_a_round_the_head_cache_is_what_a_prefill_of_the_kept_text_gives(target, eagle,
                                                                                kept):
  """`commit` rewrites the drafted slots from the target's real features: keeping
  the keys computed from the head's own predicted features would fail this (a
  round that kept no draft token skips the rewrite)."""
  drafter, head_params = eagle
  ctx = drafter.prepare(head_params, target)
  text = np.array([[5, 9, 3, 4, 17, 2, 8, 30, 31, 32]], np.int32)
  hidden = target(jnp.asarray(text), return_hidden=True)[0]
  positions = jnp.arange(text.shape[1])[None]
  ones = jnp.ones_like(positions)
  p, k = 6, K  # prompt of 6, then cur = text[6] pending; the round keeps `kept` tokens

  state = drafter.prefill(ctx, drafter.init(1, 16), text[:, :p], positions[:, :p], ones[:, :p],
                          hidden[:, :p])

  def greedy(logits, i):
    return jnp.argmax(logits, -1).astype(jnp.int32), jax.nn.log_softmax(logits)

  state, drafts, _ = drafter.propose(ctx, state, text[:, p], positions[0, p:p + 1],
                                     ones[0, :1], k, greedy)
  assert drafts.shape == (1, k)
  fed, fed_positions = text[:, p:p + k + 1], positions[:, p:p + k + 1]
  segments = (jnp.arange(16) < p + kept)[None].astype(jnp.int32)
  state = drafter.commit(ctx, state, segments, p + kept, hidden[:, p:p + k + 1],
                         jnp.array([kept]), fed, fed_positions)

  fresh = drafter.prefill(ctx, drafter.init(1, 16), text[:, :p + kept],
                          positions[:, :p + kept], ones[:, :p + kept], hidden[:, :p + kept])
  n = p + kept  # keys are [B, K, D, slots], values [B, K, slots, D]
  np.testing.assert_allclose(state.cache.k[0][..., :n], fresh.cache.k[0][..., :n], atol=1e-5)
  np.testing.assert_allclose(state.cache.v[0][:, :, :n], fresh.cache.v[0][:, :, :n], atol=1e-5)
  assert int(state.cache.index) == p + kept
  # The next round drafts from the feature that predicted the pending token text[p + kept].
  np.testing.assert_allclose(state.feature, hidden[:, p + kept - 1], atol=1e-6)


def test_an_eagle_head_for_another_shape_is_refused_before_compiling(target):
  spec = SpeculativeSampler(target, EagleDrafter(EagleHead(CFG, rngs=nnx.Rngs(0))),
                            num_draft_tokens=K)
  other = nnx.state(EagleHead(CFG, rngs=nnx.Rngs(0), width=16))
  with pytest.raises(ValueError, match="draft_params do not fit"):
    spec.generate(nnx.state(target), PROMPTS, GREEDY, draft_params=other)
  assert spec.num_compiles == 0
  with pytest.raises(ValueError, match="multiple of head_dim=8"):
    EagleHead(CFG, rngs=nnx.Rngs(0), width=12)
  # A head for a wider target with the same tokenizer.
  wider = EagleDrafter(EagleHead(CFG.replace(embed_dim=48), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="target of width 48; this target's is 32"):
    SpeculativeSampler(target, wider, num_draft_tokens=K)


def test_sharded_on_a_2x2x2_mesh_gives_the_single_device_output(target):
  from m2 import parallel
  head = EagleHead(CFG, rngs=nnx.Rngs(1), width=16)
  drafter, head_params = EagleDrafter(head), nnx.state(head)
  params = nnx.state(target)
  sampled = SamplingParams(temperature=1.0, max_new_tokens=10, seed=3)
  single = SpeculativeSampler(target, drafter, num_draft_tokens=K).generate(
      params, PROMPTS, sampled, draft_params=head_params)
  out = SpeculativeSampler(target, drafter, num_draft_tokens=K,
                           mesh=parallel.make_mesh((2, 2, 2))).generate(
      params, PROMPTS, sampled, draft_params=head_params)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
  assert len(out.state.draft.cache.k[0].sharding.device_set) == 8


def test_a_draft_vocabulary_limits_the_drafts_and_greedy_stays_exact(target):
  """EAGLE-3's reduced draft vocabulary: the head's logits are the target head's on
  those ids and -inf elsewhere; the target's greedy output is unchanged."""
  vocab = jnp.arange(0, CFG.vocab_size, 6, dtype=jnp.int32)
  head = EagleHead(CFG, rngs=nnx.Rngs(1), draft_vocab=vocab.size)
  head.draft_vocab[...] = vocab
  drafter, head_params = EagleDrafter(head), nnx.state(head)
  features = jax.random.normal(jax.random.key(0), (2, CFG.embed_dim))
  logits = np.asarray(drafter.prepare(head_params, target).logits(features))
  np.testing.assert_allclose(logits[:, vocab], np.asarray(target.logits(features))[:, vocab],
                             atol=1e-6)
  assert np.isneginf(np.delete(logits, vocab, axis=1)).all()
  params = nnx.state(target)
  out = SpeculativeSampler(target, drafter, num_draft_tokens=K).generate(
      params, PROMPTS, GREEDY, draft_params=head_params)
  np.testing.assert_array_equal(out.tokens, Sampler(target).generate(params, PROMPTS,
                                                                     GREEDY).tokens)
  with pytest.raises(ValueError, match="draft_vocab must be in"):
    EagleHead(CFG, rngs=nnx.Rngs(0), draft_vocab=CFG.vocab_size + 1)
