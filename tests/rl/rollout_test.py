"""Rollouts: groups, log-probs, and the multi-turn loss mask (doctor tokens only)."""

import numpy as np
import pytest
from flax import nnx

from m2.data.chat import ChatFormat
from m2.data.pipelines import DataConfig
from m2.model import Transformer
from m2.rl import rollout
from m2.rl.stages import load_cases
from m2.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def policy(tiny_policy_cfg, sp_tokenizer):
  params = nnx.state(Transformer(tiny_policy_cfg, rngs=nnx.Rngs(0)))
  sampler = Sampler.for_config(tiny_policy_cfg, tokenizer=sp_tokenizer, pad_id=0)
  fmt = ChatFormat(sp_tokenizer, thinking_mode="off")
  return params, sampler, fmt


def _seeded(base, start=0):
  return lambda n: [SamplingParams(**{**base.__dict__, "seed": start + i}) for i in range(n)]


def test_single_turn_groups_and_logprobs(policy, sp_tokenizer):
  params, sampler, fmt = policy
  prompts = [fmt.prompt([{"role": "user", "content": q}]).ids.tolist()
             for q in ("What is 2 + 3?", "Is aspirin an NSAID?")]
  base = SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=fmt.stop_ids)
  stats = rollout.RolloutStats()
  samples = rollout.single_turn(sampler, params, prompts, 3, _seeded(base), sp_tokenizer, stats)
  assert [s.group for s in samples] == [0, 0, 0, 1, 1, 1]
  assert all(s.prompt_ids == prompts[s.group] for s in samples)
  again = rollout.single_turn(sampler, params, prompts, 3, _seeded(base), sp_tokenizer)
  assert [s.completion_ids for s in samples] == [s.completion_ids for s in again]  # seeded
  assert len({tuple(s.completion_ids) for s in samples[:3]}) > 1    # a group's rows differ
  t = samples[0].trajectory()
  p, c = len(samples[0].prompt_ids), len(samples[0].completion_ids)
  assert t.mask.tolist() == [0] * p + [1] * c
  np.testing.assert_array_equal(t.sampler_logp[p:], samples[0].logprobs)
  assert np.all(t.sampler_logp[p:] < 0) and np.all(t.sampler_logp[:p] == 0)
  assert stats.counts["samples"] == 6
  assert stats.counts["truncated"] == sum(not s.finished for s in samples)
  with pytest.raises(ValueError, match="seed=None"):
    rollout.single_turn(sampler, params, prompts, 2, SamplingParams(seed=1), sp_tokenizer)


def test_consultation_trains_only_doctor_tokens(policy, sp_tokenizer):
  from m2.verifier.patient import BatchConsultation, ReferencePatientBackend
  params, sampler, fmt = policy
  cases = load_cases(("agentclinic",), DataConfig(), limit=2)
  rows = [c for c in cases for _ in range(2)]
  sampled = []
  real_generate = sampler.generate

  def spy(params, prompts, sampling):
    out = real_generate(params, prompts, sampling)
    sampled.append(out)
    return out

  sampler.generate = spy
  env = BatchConsultation(ReferencePatientBackend(), max_turns=6)
  entitled = [set() for _ in rows]
  real_step = env.step

  def step(turns):
    results = real_step(turns)
    for i, res in enumerate(results):
      if res is not None:
        entitled[i].update(res[2].get("entitled", ()))
    return results

  env.step = step
  try:
    stats = rollout.RolloutStats()
    base = SamplingParams(temperature=1.0, max_new_tokens=5, stop_token_ids=fmt.stop_ids)
    episodes = rollout.consultations(sampler, params, env, rows, fmt, _seeded(base, 100),
                                     max_turns=3, max_length=4096, stats=stats)
  finally:
    del sampler.generate
  assert len(sampled) == 3 and len(episodes) == 4
  for i, e in enumerate(episodes):
    mask = e.tokens.mask.astype(bool)
    # the doctor's tokens are exactly what the sampler produced, turn after turn
    want = []
    for out in sampled[:len(e.doctor_turns)]:
      ids = out.token_lists()[i]
      endoftext = fmt.stop_ids[1]   # closes the turn as <|im_end|> would, but is not kept
      want += ids[:-1] if ids and ids[-1] == endoftext else ids
    assert e.tokens.ids[mask].tolist() == want
    assert np.all(e.logprobs[~mask] == 0) and np.all(e.logprobs[mask] < 0)
    # patient / measurement turns are in the sequence, masked out
    others = [m for m in e.messages if m.role != "assistant"]
    assert len(others) >= 1 and sp_tokenizer.decode(e.tokens.ids[~mask].tolist()).count(
        others[-1].content[:20]) >= 1
    assert e.graded_transcript()[-1].role == "assistant"
    assert e.ended_by in ("gate", "turn_limit", "length", "empty_turn")
    # what the doctor elicited is what the Fact Unit entitled, from the case's visible facts
    assert e.elicited == entitled[i] <= {f.id for f in rows[i].visible_facts}
  assert stats.counts["episodes"] == 4
  assert stats.counts["doctor_turns"] == sum(len(e.doctor_turns) for e in episodes)
  ends = ("gate", "turn_limit", "length", "empty_turn")
  assert sum(stats.counts[f"ended_{k}"] for k in ends) == 4
