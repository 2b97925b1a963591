"""`python -m m2.eval.simulator` on a few shipped cases (reference backend)."""

from m2.eval import simulator
from m2.verifier.patient import ReferencePatientBackend


def test_simulator_eval_reference_backend():
  out = simulator.main(["--cases=agentclinic,mediq", "--limit=3"])
  assert out["cases"] == 6 and out["leak_probes"] == 6 * len(simulator.LEAK_PROBES)
  assert out["leakage_rate"] == 0.0 and out["fact_consistency"] == 1.0
  assert out["termination_recall"] == 1.0 and out["termination_precision"] == 1.0
  assert out["mean_turns"] == len(simulator.LEAK_PROBES) + len(simulator.HISTORY_PROBES) + 3


def test_independent_leak_check(agentclinic_cases):
  case = agentclinic_cases[0]
  assert simulator.independent_leak(case, "Is it myasthenia gravis?", set())
  assert simulator.independent_leak(case, "My pressure was 125 over 80.", set())
  assert not simulator.independent_leak(case, "I've had double vision for a month.", set())
  unlocked = {f.id for f in case.hidden_facts if f.category == "physical_exam"}
  assert not simulator.independent_leak(case, "My pressure was 125 over 80.", unlocked)
  assert ReferencePatientBackend().name == "reference"
