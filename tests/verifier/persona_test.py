"""Persona sampling: reproducible per (case, seed), varied across seeds and cases; the summary."""

import dataclasses

from m2.verifier.persona import Persona, persona_summary, sample_persona


def test_persona_sampling_reproducible_and_varied(agentclinic_cases, mediq_cases):
  case = agentclinic_cases[0]
  # Same case and seed: the same persona, also for an equal case built anew (no hidden state).
  assert sample_persona(case, 3) == sample_persona(case, 3)
  assert sample_persona(dataclasses.replace(case), 3) == sample_persona(case, 3)
  # Other seeds for one case, other cases for one seed: varied.
  by_seed = {sample_persona(case, s) for s in range(20)}
  assert len(by_seed) >= 10
  cases = agentclinic_cases[:40] + mediq_cases[:40]
  by_case = [sample_persona(c, 0) for c in cases]
  assert len({p.mbti for p in by_case}) >= 10
  summary = persona_summary(by_case)
  for axis in ("EI", "SN", "TF", "JP", "emotion", "literacy", "verbosity"):
    assert len(summary[axis]) >= 2, (axis, summary[axis])   # every axis takes several values
  # A different seed redraws most cases' personas.
  assert sum(a != sample_persona(c, 1) for a, c in zip(by_case, cases)) > len(cases) // 2
  # The background comes from the case, not the draw.
  assert {sample_persona(case, s).background for s in range(5)} == {"a 35-year-old woman who "
                                                                   "works as a graphic designer"}


def test_persona_summary_counts():
  ps = [Persona("ENFP", "anxious", "low", "verbose"), Persona("ENTJ", "calm", "low", "terse"),
        Persona("ISTJ", "calm", "high", "terse")]
  assert persona_summary(ps) == {
      "personas": 3, "mbti": {"ENFP": 1, "ENTJ": 1, "ISTJ": 1},
      "EI": {"E": 2, "I": 1}, "SN": {"S": 1, "N": 2}, "TF": {"T": 2, "F": 1},
      "JP": {"J": 2, "P": 1}, "emotion": {"calm": 2, "anxious": 1},
      "literacy": {"low": 2, "high": 1}, "verbosity": {"terse": 2, "verbose": 1}}
  assert persona_summary([]) == {"personas": 0, "mbti": {}, "EI": {}, "SN": {}, "TF": {},
                                 "JP": {}, "emotion": {}, "literacy": {}, "verbosity": {}}
