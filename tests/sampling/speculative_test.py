"""Speculative decoding is exact: greedy equals the target's greedy, and sampled
tokens follow the target's distribution (chi-square on a vocabulary of 8)."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from m2.model import ModelConfig, Transformer
from m2.sampling import (Drafter, EagleDrafter, EagleHead, ModelDrafter, Sampler,
                         SamplingParams, SpeculativeSampler)

CFG = ModelConfig(vocab_size=96, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
PROMPTS = [[5, 9, 3, 4, 17, 2, 8], [7, 8], [4, 40, 41]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
K = 3


def letters(ids):
  """A detokenizer for stop strings: one letter per token."""
  return "".join(chr(ord("a") + i % 26) for i in ids)


def perturbed(params, scale, seed=1):
  """A draft that agrees with the target on some tokens only (NumPy noise: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + scale * np.std(x) * rng.standard_normal(
      x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def target(make_transformer):
  return make_transformer(CFG, 0)


@pytest.fixture(scope="module")
def plain(target):
  return Sampler(target)


def test_greedy_speculative_equals_target_greedy_token_for_token(target, plain):
  params = nnx.state(target)
  ref = plain.generate(params, PROMPTS, GREEDY)
  # The draft has the target's shape, so one compiled loop serves every draft
  # below; all calls use a cache of 64 slots.
  spec = SpeculativeSampler(target, ModelDrafter(target), num_draft_tokens=K,
                            tokenizer=letters, stop_check_every=2)
  same = spec.generate(params, PROMPTS, GREEDY, draft_params=params)
  np.testing.assert_array_equal(same.tokens, ref.tokens)
  assert same.stats["acceptance_rate"] == 1.0
  assert same.stats["rounds"] == 3  # 1 + 3 rounds x (3 drafts + bonus) covers 10 tokens
  # A draft that agrees sometimes: rows accept different counts, the shared
  # cache index leaves holes, and the cache (16 + 44 + 4 = 64 slots: no slack)
  # must be compacted midway.
  long = dataclasses.replace(GREEDY, max_new_tokens=44)
  ref = plain.generate(params, PROMPTS, long)
  mixed = spec.generate(params, PROMPTS, long, draft_params=perturbed(params, 0.2))
  assert mixed.stats["cache_length"] == 64 and mixed.stats["compactions"] >= 1
  np.testing.assert_array_equal(mixed.tokens, ref.tokens)
  np.testing.assert_allclose(mixed.policy_logprobs, ref.policy_logprobs, atol=1e-5)
  np.testing.assert_array_equal(mixed.logprobs, ref.logprobs)  # greedy: point masses, 0
  assert 0 < mixed.stats["acceptance_rate"] < 1
  # Stop tokens end rows inside a round; the conversations then continue.
  stop = int(ref.tokens[0, 4])
  sp = dataclasses.replace(GREEDY, stop_token_ids=(stop,))
  first = spec.generate(params, PROMPTS, sp, draft_params=params)
  plain_first = plain.generate(params, PROMPTS, sp)
  assert first.token_lists() == plain_first.token_lists()
  assert first.finish_reasons[0] == "stop"
  turns = [[11, 12], [13], [14, 15, 16]]
  nxt = spec.generate(params, turns, GREEDY, draft_params=perturbed(params, 0.2),
                      state=first.state)
  assert nxt.token_lists() == plain.generate(params, turns, GREEDY,
                                             state=plain_first.state).token_lists()
  # A stop string cuts row 0 mid-round; its dropped tokens leave both caches.
  text = letters(ref.tokens[0, :10].tolist())
  cut = text.index(text[3:5]) + 2
  sp = [dataclasses.replace(GREEDY, stop_strings=(text[3:5],)), GREEDY, GREEDY]
  first = spec.generate(params, PROMPTS, sp, draft_params=perturbed(params, 0.2))
  assert first.token_lists()[0] == ref.token_lists()[0][:cut]
  assert first.stop_reasons[0] == text[3:5]
  nxt = spec.generate(params, [[9], None, None], GREEDY, draft_params=params,
                      state=first.state)
  history = [PROMPTS[0] + first.token_lists()[0] + [9], PROMPTS[1], PROMPTS[2]]
  assert nxt.token_lists()[0] == plain.generate(params, history, GREEDY).token_lists()[0]
  assert spec.num_compiles == 1
  # Greedy rows beside a sampled one go through the general rejection rule (the
  # all-greedy shortcut is off): still the target's greedy tokens.
  sampled = dataclasses.replace(GREEDY, temperature=1.0, seed=3)
  out = spec.generate(params, PROMPTS, [GREEDY, sampled, GREEDY],
                      draft_params=perturbed(params, 0.2))
  assert out.token_lists()[::2] == plain.generate(params, PROMPTS, GREEDY).token_lists()[::2]
  np.testing.assert_array_equal(out.logprobs[::2], 0.0)


def test_bad_drafts_are_refused_before_compiling(target):
  other = nnx.eval_shape(lambda: Transformer(CFG.replace(vocab_size=97), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"draft vocabulary \(97\) differs from the target's"):
    SpeculativeSampler(target, ModelDrafter(other))
  spec = SpeculativeSampler(target, ModelDrafter(target))
  with pytest.raises(ValueError, match="draft_params do not fit"):
    spec.generate(nnx.state(target), PROMPTS, GREEDY,
                  draft_params=nnx.state(nnx.eval_shape(lambda: Transformer(
                      CFG.replace(num_layers=1), rngs=nnx.Rngs(0)))))
  assert spec.num_compiles == 0


class FeatureDrafter(Drafter):
  """EAGLE-style: drafts from the target's own feature (the final hidden state that
  predicted the pending token) through the target's LM head. Records, per active
  row, whether that feature's greedy token is the pending token."""

  def __init__(self, vocab_size, seen):
    self.vocab_size, self.seen = vocab_size, seen

  def init(self, batch, cache_length):
    return jnp.zeros((batch, CFG.embed_dim), jnp.float32)

  def prefill(self, params, state, tokens, positions, segments, hidden):
    return hidden[:, -1].astype(jnp.float32)   # prompts are left-padded: the last is real

  def propose(self, params, state, token, position, segment, num_tokens, sample):
    logits = state @ params
    jax.debug.callback(lambda p, t, s: self.seen.append((p, t, s)),
                       jnp.argmax(logits, -1), token, segment)
    drafts, logq = zip(*(sample(logits, i) for i in range(num_tokens)))
    return state, jnp.stack(drafts, 1), jnp.stack(logq, 1)

  def commit(self, params, state, segments, index, hidden, kept, tokens, positions):
    feature = jnp.take_along_axis(hidden, jnp.maximum(kept - 1, 0)[:, None, None], 1)[:, 0]
    return jnp.where((kept > 0)[:, None], feature.astype(jnp.float32), state)

  def relayout(self, state, segments, index, order=None):
    return state


def test_a_drafter_gets_the_target_feature_that_predicted_the_pending_token(target, plain):
  """The room left for an EAGLE head: `prefill` / `commit` hand the drafter the
  target's final hidden state behind each pending token, so under greedy decoding
  that feature's own prediction is the pending token, every round, every row."""
  params = nnx.state(target)
  seen = []
  spec = SpeculativeSampler(target, FeatureDrafter(CFG.vocab_size, seen), num_draft_tokens=K)
  out = spec.generate(params, PROMPTS, GREEDY, draft_params=np.asarray(target.lm_head[...]))
  np.testing.assert_array_equal(out.tokens, plain.generate(params, PROMPTS, GREEDY).tokens)
  active = [(p[s != 0], t[s != 0]) for p, t, s in (map(np.asarray, x) for x in seen)]
  assert sum(len(t) for _, t in active) >= 2 * len(PROMPTS)
  for predicted, pending in active:
    np.testing.assert_array_equal(predicted, pending)


# --- exactness in distribution ------------------------------------------------------

TINY = ModelConfig(vocab_size=8, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1,
                   head_dim=8, mlp_dim=32)
ROWS = 4096  # samples per request setting
NEW = 4      # tokens 2..4 come from speculative rounds (token 1 from the prefill)


class UniformDrafter(Drafter):
  """Proposes uniformly random tokens; has no state. Exercises the interface."""

  vocab_size = TINY.vocab_size

  def init(self, batch, cache_length):
    return ()

  def prefill(self, params, state, tokens, positions, segments, hidden):
    return state

  def propose(self, params, state, token, position, segment, num_tokens, sample):
    flat = jnp.zeros((token.shape[0], self.vocab_size))
    drafts, logq = zip(*(sample(flat, i) for i in range(num_tokens)))
    return state, jnp.stack(drafts, 1), jnp.stack(logq, 1)

  def commit(self, params, state, segments, index, hidden, kept, tokens, positions):
    return state

  def relayout(self, state, segments, index, order=None):
    return state


def peaked(model, seed):
  """Scales the LM head so that the tiny model's distributions are far from uniform."""
  # Hidden states have unit RMS after the final norm: logits get a std of about 2.
  shape = model.lm_head[...].shape
  model.lm_head[...] = jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 2 /
                                   np.sqrt(shape[0]), jnp.float32)
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)[0]


def exact_joint(model, prompt, setting):
  """P(t2, t3, t4) under the target's sampling distribution, t1 summed out."""
  seqs = np.array([prompt + list(t) for t in itertools.product(range(8), repeat=NEW - 1)])
  logits = np.asarray(_forward(nnx.graphdef(model), nnx.state(model), seqs), np.float64)
  p = len(prompt)

  def dist(row):
    x = row / setting.temperature
    if setting.top_k:
      x = np.where(x < np.sort(x)[::-1][setting.top_k - 1], -np.inf, x)
    if setting.top_p < 1:
      order = np.argsort(-x, kind="stable")
      probs = np.exp(x - x.max())
      probs /= probs.sum()
      n = int(np.searchsorted(np.cumsum(probs[order]), setting.top_p)) + 1
      x = np.where(x < x[order[n - 1]], -np.inf, x)
    e = np.exp(x - x.max())
    return e / e.sum()

  joint = np.zeros((8,) * NEW)
  for i, (t1, t2, t3) in enumerate(seqs[:, p:]):
    pr = dist(logits[i, p - 1])[t1] * dist(logits[i, p])[t2] * dist(logits[i, p + 1])[t3]
    joint[t1, t2, t3] += pr * dist(logits[i, p + 2])
  return joint.sum(0)  # marginal of (t2, t3, t4)


def chi_square_p(tokens, expected_probs):
  counts = np.zeros(expected_probs.size)
  np.add.at(counts, np.ravel_multi_index(tokens.T, expected_probs.shape), 1)
  expected = expected_probs.ravel() * len(tokens)
  if counts[expected == 0].any():
    return 0.0  # a sample outside the distribution's support
  # Pool rare cells, as the chi-square approximation needs.
  small = (expected < 5) & (expected > 0)
  obs = np.append(counts[expected >= 5], counts[small].sum() if small.any() else [])
  exp = np.append(expected[expected >= 5], expected[small].sum() if small.any() else [])
  exp *= obs.sum() / exp.sum()  # float64 rounding only
  return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("drafter_kind", ["model", "uniform", "eagle_draft_vocab"])
def test_sampled_speculative_output_follows_the_target_distribution(drafter_kind,
                                                                   make_transformer):
  target = peaked(make_transformer(TINY, 0), 10)
  # The draft: the target with a noisy LM head, so that it agrees often but not always.
  draft_model = make_transformer(TINY, 0)
  draft_model.lm_head[...] = perturbed(target.lm_head[...], 1.0, seed=11)
  draft_params = nnx.state(draft_model)
  if drafter_kind == "model":
    drafter = ModelDrafter(draft_model)
  elif drafter_kind == "uniform":
    drafter = UniformDrafter()
  else:  # an EAGLE head that drafts among 4 of the 8 tokens: the others only via residuals
    head = EagleHead(TINY, rngs=nnx.Rngs(5), draft_vocab=4)
    head.draft_vocab[...] = jnp.array([0, 2, 5, 7], jnp.int32)
    drafter, draft_params = EagleDrafter(head), nnx.state(head)
  spec = SpeculativeSampler(target, drafter, num_draft_tokens=2)
  prompt = [1, 2, 3]
  settings = [SamplingParams(temperature=1.0, max_new_tokens=NEW),
              SamplingParams(temperature=0.7, top_k=4, top_p=0.9, max_new_tokens=NEW)]
  requests = [dataclasses.replace(s, seed=i * len(settings) + j)
              for i in range(ROWS) for j, s in enumerate(settings)]
  out = spec.generate(nnx.state(target), [prompt] * len(requests), requests,
                      draft_params=draft_params)
  assert (out.lengths == NEW).all()
  # Both outcomes of the acceptance test happen, and whole rounds are accepted.
  assert 0.1 < out.stats["acceptance_rate"] < 0.9
  # (an untrained EAGLE head agrees less often than the perturbed target)
  assert out.stats["tokens_per_round"] > (1.1 if drafter_kind == "eagle_draft_vocab" else 1.2)
  for j, setting in enumerate(settings):
    samples = out.tokens[j::len(settings), 1:]
    p_target = chi_square_p(samples, exact_joint(target, prompt, setting))
    assert p_target > 1e-3, (setting, p_target)
    # The test has power: the draft's own distribution is rejected.
    if drafter_kind == "model":
      p_draft = chi_square_p(samples, exact_joint(draft_model, prompt, setting))
      assert p_draft < 1e-6, (setting, p_draft)
