"""The sampler against recomputation without a cache, reference sampling maths,
multi-turn continuation, bad input, bucketing and sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.sampling import Sampler, SamplingParams

CFG = ModelConfig(vocab_size=96, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
PROMPTS = [[5, 9, 3, 4, 17, 2, 8], [7, 8], [4, 40, 41]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
# Three requests that switch on every sampling transform: tests that sample use
# them (or requests with the same transforms) to share one compiled loop.
SAMPLED = [SamplingParams(temperature=0.7, top_k=5, max_new_tokens=10, seed=1),
           SamplingParams(temperature=1.3, top_p=0.6, max_new_tokens=10, seed=2),
           SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10, seed=3)]
_REF_LEN = 64


def letters(ids):
  """A detokenizer for stop strings: one letter per token."""
  return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model(make_transformer):
  return make_transformer(CFG, 0)


@pytest.fixture(scope="module")
def sampler(model):
  return Sampler(model, tokenizer=letters, stop_check_every=3)


@pytest.fixture(scope="module")
def full_logits(model):
  """Jitted full forward over one row right-padded to _REF_LEN (padding is inert)."""
  graphdef = nnx.graphdef(model)

  @jax.jit
  def forward(params, tokens, length):
    segments = (jnp.arange(_REF_LEN) < length).astype(jnp.int32)[None]
    return nnx.merge(graphdef, params)(tokens[None], segments=segments)[0][0]

  def run(params, seq):
    tokens = np.zeros(_REF_LEN, np.int32)
    tokens[:len(seq)] = seq
    return np.asarray(forward(params, tokens, len(seq)))[:len(seq)]

  return run


def greedy_reference(full_logits, params, prompt, steps):
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(np.argmax(full_logits(params, seq)[-1])))
  return seq[len(prompt):]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_sampling_logprobs(logits, temperature, top_k, top_p):
  """NumPy: temperature, then top-k, then the smallest nucleus with mass >= top_p."""
  x = logits / temperature
  if top_k:
    x = np.where(x < np.sort(x)[::-1][top_k - 1], -np.inf, x)
  if top_p < 1:
    order = np.argsort(-x, kind="stable")
    cum = np.cumsum(np.exp(log_softmax(x))[order])
    n = int(np.searchsorted(cum, top_p)) + 1
    x = np.where(x < x[order[n - 1]], -np.inf, x)
  return log_softmax(x)


def test_greedy_with_cache_equals_recompute_and_logprobs_match(model, sampler, full_logits):
  params = nnx.state(model)
  out = sampler.generate(params, PROMPTS, GREEDY)
  assert out.tokens.shape == (3, 10) and out.finish_reasons == ["length"] * 3
  for i, prompt in enumerate(PROMPTS):
    assert out.tokens[i].tolist() == greedy_reference(full_logits, params, prompt, 10)
    logits = full_logits(params, prompt + out.tokens[i].tolist())[len(prompt) - 1:-1]
    want = np.take_along_axis(log_softmax(logits), out.tokens[i][:, None], 1)[:, 0]
    np.testing.assert_allclose(out.policy_logprobs[i], want, atol=1e-5)
  np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass
  assert out.stats["prefill_tokens"] == sum(map(len, PROMPTS))


def test_a_single_row_decodes_and_continues_exactly(model, sampler, full_logits):
  # Batch 1 has its own attention path (the cache as it was plus the new keys,
  # written after the read).
  params = nnx.state(model)
  first = sampler.generate(params, [PROMPTS[0]], GREEDY)
  assert first.state.cache.batch == 1
  assert first.token_lists()[0] == greedy_reference(full_logits, params, PROMPTS[0], 10)
  second = sampler.generate(params, [[11, 12]], GREEDY, state=first.state)
  history = PROMPTS[0] + first.token_lists()[0] + [11, 12]
  assert second.token_lists()[0] == greedy_reference(full_logits, params, history, 10)


def test_sampled_logprobs_follow_temperature_top_k_top_p(model, sampler, full_logits):
  params = nnx.state(model)
  out = sampler.generate(params, PROMPTS, SAMPLED)
  for i, (prompt, r) in enumerate(zip(PROMPTS, SAMPLED)):
    tokens = out.tokens[i]
    logits = full_logits(params, prompt + tokens.tolist())[len(prompt) - 1:-1]
    for t, row in enumerate(logits):
      ref = reference_sampling_logprobs(row, r.temperature, r.top_k, r.top_p)
      assert np.isfinite(ref[tokens[t]]), (i, t)  # sampled inside the kept set
      np.testing.assert_allclose(out.logprobs[i, t], ref[tokens[t]], atol=1e-5)
      np.testing.assert_allclose(out.policy_logprobs[i, t], log_softmax(row)[tokens[t]],
                                 atol=1e-5)
  # Truncation made the sampled distribution sharper than the model's.
  assert (out.logprobs[0] > out.policy_logprobs[0]).all()


def test_a_near_zero_temperature_samples_the_greedy_tokens(model, sampler):
  params = nnx.state(model)
  greedy = sampler.generate(params, PROMPTS, GREEDY)
  for t in (1e-10, 1e-30):   # logit gaps / t far beyond float32's integers
    out = sampler.generate(params, PROMPTS, dataclasses.replace(GREEDY, temperature=t, seed=0))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.logprobs, 0.0)


def test_a_seeded_row_does_not_depend_on_its_batch(model, sampler):
  params = nnx.state(model)
  r = SAMPLED[2]
  a = sampler.generate(params, PROMPTS, [r, dataclasses.replace(r, seed=8), r])
  b = sampler.generate(params, [PROMPTS[0], [1, 2, 3, 4], PROMPTS[2]],
                       [r, dataclasses.replace(r, seed=9), r])
  np.testing.assert_array_equal(a.tokens[[0, 2]], b.tokens[[0, 2]])
  assert a.tokens[1].tolist() != b.tokens[1].tolist()
  unseeded = [dataclasses.replace(x, seed=None) for x in SAMPLED]
  c = sampler.generate(params, PROMPTS, unseeded)
  d = sampler.generate(params, PROMPTS, unseeded)
  assert c.tokens.tolist() != d.tokens.tolist()  # seed=None: fresh randomness per call


def test_a_batch_over_max_rows_runs_in_parts_with_the_same_output(model, sampler):
  params = nnx.state(model)
  prompts = PROMPTS + [[1, 2, 3, 4], [30, 31]]
  requests = SAMPLED + [dataclasses.replace(SAMPLED[0], seed=7), GREEDY]
  whole = sampler.generate(params, prompts, requests)
  parts = Sampler(model, tokenizer=letters, stop_check_every=3, max_rows=2).generate(
      params, prompts, requests)
  for name in ("tokens", "logprobs", "policy_logprobs", "lengths"):
    np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), atol=1e-5,
                               err_msg=name)
  assert parts.finish_reasons == whole.finish_reasons
  assert parts.stats["parts"] == 3 and parts.stats["rows"] == 5 and parts.state is None
  assert parts.stats["prefill_tokens"] == whole.stats["prefill_tokens"]
  with pytest.raises(ValueError, match="max_rows"):
    Sampler(model, max_rows=-1)


def test_stop_tokens_end_rows_and_the_rest_keep_going(model, sampler, full_logits):
  params = nnx.state(model)
  ref = sampler.generate(params, PROMPTS, GREEDY)
  stop = int(ref.tokens[0, 2])
  out = sampler.generate(params, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10,
                                                         stop_token_ids=(stop,)))
  for i in range(3):
    row = ref.tokens[i].tolist()
    n = row.index(stop) + 1 if stop in row else 10
    assert out.lengths[i] == n
    assert out.tokens[i, :n].tolist() == row[:n]
    assert (out.tokens[i, n:] == sampler.pad_id).all()
    assert out.finish_reasons[i] == ("stop" if stop in row else "length")
  assert out.stop_reasons[0] == stop


def test_the_models_scan_and_unrolled_layers_agree(model, sampler):
  assert sampler.forward.name == "unrolled"  # the default on CPU
  params = nnx.state(model)
  scan = Sampler(model, layers="scan")
  a, b = sampler.generate(params, PROMPTS, GREEDY), scan.generate(params, PROMPTS, GREEDY)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.policy_logprobs, b.policy_logprobs, atol=1e-5)
  assert b.state.cache.k.shape == (CFG.num_layers, 4, CFG.num_kv_heads, CFG.head_dim, 64)
  assert b.state.cache.v.shape == (CFG.num_layers, 4, CFG.num_kv_heads, 64, CFG.head_dim)


def test_a_state_from_another_models_sampler_is_refused(model, sampler, make_transformer):
  params = nnx.state(model)
  out = sampler.generate(params, [[1, 2, 3]], GREEDY)
  deeper = make_transformer(CFG.replace(num_layers=3), 1)
  for other, m in ((Sampler(deeper), deeper), (Sampler(deeper, layers="scan"), deeper),
                   (Sampler(model, layers="scan"), model)):   # the same model, other layout
    with pytest.raises(ValueError, match="made by a Sampler for another model"):
      other.generate(nnx.state(m), [[4]], GREEDY, state=out.state)
  assert sampler.generate(params, [[4]], GREEDY, state=out.state).tokens.shape == (1, 10)


def test_params_are_swapped_without_recompiling(model, sampler, full_logits, make_transformer):
  # Compile with the first weights here, so the test does not depend on which
  # tests ran before it (pytest -n splits the module across workers).
  first = sampler.generate(nnx.state(model), PROMPTS, GREEDY)
  before = sampler.num_compiles
  assert before >= 1
  other = nnx.state(make_transformer(CFG, 3))
  out = sampler.generate(other, PROMPTS, GREEDY)
  assert sampler.num_compiles == before
  assert out.tokens[1].tolist() == greedy_reference(full_logits, other, PROMPTS[1], 10)
  assert out.tokens.tolist() != first.tokens.tolist()  # the new weights were used
  # The per-layer split (CPU) is kept for the last weights and redone when any leaf changes.
  params = nnx.state(model)
  assert sampler._check_params(params).layers is sampler._check_params(params).layers
  changed = jax.tree.map(lambda x: x, params)  # one leaf swapped, the others shared
  changed["blocks"]["mlp"]["down"][...] = other["blocks"]["mlp"]["down"][...]
  out = sampler.generate(changed, PROMPTS, GREEDY)  # right after a call with `params`
  np.testing.assert_array_equal(out.tokens, Sampler(model).generate(changed, PROMPTS,
                                                                    GREEDY).tokens)
  assert out.tokens.tolist() != first.tokens.tolist()


def test_prompt_and_length_buckets_share_one_compile(model, sampler):
  params = nnx.state(model)
  before = sampler.num_compiles
  sampler.generate(params, [[1, 2, 3, 4, 5], [6], [7]], dataclasses.replace(
      GREEDY, max_new_tokens=4))
  compiled = sampler.num_compiles
  assert compiled <= before + 1
  # Another prompt length in the same bucket, other max_new_tokens, a batch of 4:
  out = sampler.generate(params, [list(range(1, 14)), [1], [2], [3]], dataclasses.replace(
      GREEDY, max_new_tokens=20))
  assert sampler.num_compiles == compiled and out.lengths.tolist() == [20] * 4


def test_continuing_a_conversation_equals_recomputing_it(model, sampler, full_logits):
  params = nnx.state(model)
  ref = sampler.generate(params, PROMPTS, GREEDY)
  stop = int(ref.tokens[1, 3])  # row 1 stops early: its later slots become holes
  sp = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,))
  first = sampler.generate(params, PROMPTS, sp)
  turns = [[11, 12, 13], [20, 21], None]
  second = sampler.generate(params, turns, SamplingParams(temperature=0.0, max_new_tokens=6),
                            state=first.state)
  # Only the new turns (after each row's pending token) were prefilled.
  assert second.stats["prefill_tokens"] == 4 + 3
  assert second.lengths.tolist() == [6, 6, 0]
  for i in (0, 1):
    history = PROMPTS[i] + first.token_lists()[i] + turns[i]
    assert second.token_lists()[i] == greedy_reference(full_logits, params, history, 6)
  # Row 2 sat the turn out and continues where it was.
  third = sampler.generate(params, [None, None, [30]], SamplingParams(temperature=0.0,
                                                                      max_new_tokens=3),
                           state=second.state)
  history = PROMPTS[2] + first.token_lists()[2] + [30]
  assert third.token_lists()[2] == greedy_reference(full_logits, params, history, 3)
  with pytest.raises(ValueError, match="already used"):
    sampler.generate(params, turns, GREEDY, state=second.state)


def test_a_full_conversation_cache_is_compacted_then_refused(model, sampler, full_logits):
  params = nnx.state(model)
  sp = SamplingParams(temperature=0.0, max_new_tokens=10)
  first = sampler.generate(params, PROMPTS, [sp, dataclasses.replace(sp, max_new_tokens=2), sp])
  # 25 of 64 slots used (row 1 left 8 empty); the next turn needs 16 + 24: it fits
  # only once the holes are squeezed out (to 16 slots).
  assert first.stats["cache_index"] == 16 + 9
  second = sampler.generate(params, [[1], [2], [3]], dataclasses.replace(sp, max_new_tokens=24),
                            state=first.state)
  assert second.stats["compactions"] == 1
  history = PROMPTS[1] + first.token_lists()[1] + [2]
  assert second.token_lists()[1] == greedy_reference(full_logits, params, history, 24)
  with pytest.raises(ValueError, match="cache is full"):
    sampler.generate(params, [[1], [2], [3]], dataclasses.replace(sp, max_new_tokens=40),
                     state=second.state)


def test_stop_strings_cut_on_the_host_and_the_cut_is_not_cached(model, sampler, full_logits):
  s = sampler
  params = nnx.state(model)
  ref = s.generate(params, PROMPTS, GREEDY)
  target = letters(ref.tokens[0, 4:6].tolist())  # completes at token 6 of row 0
  out = s.generate(params, PROMPTS, dataclasses.replace(GREEDY, stop_strings=(target, "zzzz")))
  cut = letters(ref.tokens[0].tolist()).index(target) + len(target)
  assert out.lengths[0] == cut and out.finish_reasons[0] == "stop"
  assert out.stop_reasons[0] == target
  assert out.token_lists()[0] == ref.token_lists()[0][:cut]
  # The tokens generated past the cut were dropped from the cache.
  nxt = s.generate(params, [[3], None, None], SamplingParams(temperature=0.0, max_new_tokens=4),
                   state=out.state)
  history = PROMPTS[0] + out.token_lists()[0] + [3]
  assert nxt.token_lists()[0] == greedy_reference(full_logits, params, history, 4)


@pytest.mark.parametrize("prompts,kw,match", [
    ([list(range(1, 41))], dict(cache_length=32), "cache_length=32 is too short"),
    ([[1, 2, 96]], {}, "token id 96, outside the model's vocabulary"),
    ([[1, -1]], {}, "token id -1"),
    ([[]], {}, "prompt 0 is empty"),
    (["hello"], {}, "tokenize it first"),
    ([[1, 2]], dict(sampling=SamplingParams(stop_strings=("x",))), "no tokenizer"),
    ([[1, 2]], dict(sampling=SamplingParams(stop_token_ids=(500,))), "stop_token_ids"),
])
def test_bad_input_fails_clearly_before_compiling(model, prompts, kw, match):
  s = Sampler(model)
  with pytest.raises((ValueError, TypeError), match=match):
    s.generate(nnx.state(model), prompts, **kw)
  assert s.num_compiles == 0


def test_bad_sampling_params_and_params_fail_clearly(model):
  with pytest.raises(ValueError, match="SamplingParams.top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="SamplingParams.temperature"):
    SamplingParams(temperature=-1.0)
  assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)
  other = nnx.eval_shape(lambda: Transformer(CFG.replace(num_layers=3), rngs=nnx.Rngs(0)))
  s = Sampler(model)
  with pytest.raises(ValueError, match="params do not fit"):
    s.generate(nnx.state(other), [[1, 2]])
  assert s.num_compiles == 0


def test_sharded_on_a_2x2x2_mesh_gives_the_single_device_output(model, sampler):
  mesh = parallel.make_mesh((2, 2, 2))
  requests = [GREEDY, *SAMPLED[1:]]  # greedy and sampled rows in one batch
  single = sampler.generate(nnx.state(model), PROMPTS, requests)
  s = Sampler(model, mesh=mesh)
  # The sampler places the parameters by their logical axes ...
  placed = s._check_params(nnx.state(model))  # with the layers split out on CPU
  assert len(placed.params["blocks"]["mlp"]["gate_up"][...].sharding.device_set) == 8
  assert len(placed.layers[0]["mlp"]["gate_up"][...].sharding.device_set) == 8
  out = s.generate(nnx.state(model), PROMPTS, requests)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
  np.testing.assert_allclose(out.policy_logprobs, single.policy_logprobs, atol=1e-5)
  # ... and the batch (bucket 4: one row per data shard) and the cache by theirs.
  k = out.state.cache.k[0]  # layer 0: [batch, kv_heads, head_dim, length]
  assert k.shape[0] == 4 and k.sharding.shard_shape(k.shape)[:2] == (1, 1)



def generate_and_compile(sampler, params, prompts, sampling):
  """The output of `sampler.generate` and the compiled HLO text of its generation call."""
  start, seen = sampler._start_jit, {}

  def spy(*args, **kw):
    seen["args"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                                if isinstance(x, jax.Array) else x, (args, kw))
    return start(*args, **kw)
  sampler._start_jit = spy
  out = sampler.generate(params, prompts, sampling)
  args, kw = seen["args"]
  with parallel.sharding_context(sampler.mesh, sampler.rules):
    return out, start.lower(*args, **kw).compile().as_text()


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_decode_rules_reshard_the_fsdp_weights_and_never_gather_them(model, sampler, layers):
  """Training shards weights over `fsdp` (gathered layer by layer); under DECODE_RULES the
  sampler takes them once, split over heads / MLP / vocab, with the same output."""
  mesh = parallel.make_mesh((1, 8, 1))
  trained = jax.device_put(nnx.state(model), parallel.state_shardings(nnx.state(model), mesh))
  single = sampler.generate(nnx.state(model), PROMPTS, GREEDY)
  out, hlo = generate_and_compile(Sampler(model, mesh=mesh, rules=parallel.DECODE_RULES,
                                          layers=layers), trained, PROMPTS, GREEDY)
  np.testing.assert_array_equal(out.tokens, single.tokens)
  np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
  assert "all-gather" not in hlo and "all-reduce" in hlo
  # Under the training rules the same call gathers the weights.
  _, hlo = generate_and_compile(Sampler(model, mesh=mesh, layers=layers), trained, PROMPTS,
                                GREEDY)
  assert "all-gather" in hlo
