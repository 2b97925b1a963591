"""`python -m m2.eval.simulator` on a few shipped cases (reference backend), its independent
checks, the de-identification gate in front of it, and --rubric_quality with a model."""

from m2.data.loaders import LoadReport, Loaded
from m2.data.records import Fact, PatientCase
from m2.eval import simulator
from m2.verifier.patient import PatientSimulator, ReferencePatientBackend


def test_simulator_eval_reference_backend():
  out = simulator.main(["--cases=agentclinic,mediq", "--limit=3"])
  assert out["cases"] == 6 and out["leak_probes"] == 6 * len(simulator.LEAK_PROBES)
  assert out["leakage_rate"] == 0.0 and out["fact_consistency"] == 1.0
  assert out["termination_recall"] == 1.0 and out["termination_precision"] == 1.0
  assert out["mean_turns"] == len(simulator.LEAK_PROBES) + len(simulator.HISTORY_PROBES) + 3
  assert out["fact_consistency_independent"] == 1.0 and out["independent_reasons"] == {}
  p = out["personas"]
  assert p["personas"] == 6 and sum(p["mbti"].values()) == 6
  assert all(sum(p[k].values()) == 6 for k in ("EI", "SN", "TF", "JP", "emotion", "verbosity"))
  assert out["sources"]["agentclinic"]["used"] == 3 and out["sources"]["mediq"]["skipped"] > 0


def test_independent_leak_check(agentclinic_cases):
  case = agentclinic_cases[0]
  assert simulator.independent_leak(case, "Is it myasthenia gravis?", set())
  assert simulator.independent_leak(case, "My pressure was 125 over 80.", set())
  assert not simulator.independent_leak(case, "I've had double vision for a month.", set())
  unlocked = {f.id for f in case.hidden_facts if f.category == "physical_exam"}
  assert not simulator.independent_leak(case, "My pressure was 125 over 80.", unlocked)
  assert ReferencePatientBackend().name == "reference"


def test_independent_consistency_catches_inventions(agentclinic_cases):
  case = agentclinic_cases[0]   # myasthenia gravis, 35; denies chest pain; no fever anywhere
  check = lambda reply, heard="": simulator.independent_consistency(case, reply, heard)
  faithful = ("Honestly, I'm really worried. I've had double vision for a month, and it gets "
              "better after a few hours of rest. No fever, no cough. I'm 35.")
  assert check(faithful) == []
  assert check("I have no chest pain and I don't smoke.") == []
  assert check("I also have a bad cough.") == ["symptom:cough"]            # invented symptom
  assert check("It started 6 weeks ago.") == ["number:6"]                  # invented number
  assert check("It started 6 weeks ago.", heard="Did it start 6 weeks ago?") == []
  assert check("It happened 2 or 3 times.") == []                           # small counts
  assert check("I get chest pain every day.") == ["contradicts:chest_pain"]
  assert check("I have no double vision.") == ["contradicts:not-diplopia"]
  # A measurement label names what was measured, not a finding: "Temperature: 36.6" is no fever.
  assert check("I have a fever of 39.") == ["number:39", "symptom:fever"]


def test_independent_check_is_not_the_fact_unit(agentclinic_cases):
  """A reply the Fact Unit accepts can still fail the independent check (and vice versa),
  so `fact_consistency_independent` is a second opinion, not the first one repeated."""
  case = agentclinic_cases[0]
  sim = PatientSimulator(case)
  sim.facts.measurement("Let me examine you.")   # unlocks the exam, whose label says Temperature
  reply = "I have a fever too."
  assert sim.check(reply).ok
  assert simulator.independent_consistency(case, reply) == ["symptom:fever"]


def test_load_cases_goes_through_the_deid_gate(monkeypatch):
  case = PatientCase("agentclinic:medqa:0", "agentclinic", (
      Fact("cc", "chief_complaint", "Double vision for 3 weeks"),
      Fact("soc", "social_history", "Call (555) 123-4567 or diane.baker@gmail.com about her "
                                    "appointment."),
      Fact("dx", "diagnosis", "Myasthenia gravis")), age=45, sex="female")
  monkeypatch.setattr(simulator, "load_agentclinic",
                      lambda **kw: Loaded([case], LoadReport("agentclinic", loaded=1)))
  cases, counts = simulator.load_cases(["agentclinic"], limit=5)
  said = " ".join(f.text for f in cases[0].facts)
  assert "555" not in said and "diane.baker" not in said and "3 weeks" in said
  assert counts["agentclinic"]["used"] == 1 and counts["agentclinic"]["deid_changed"] == 1
  assert sum(counts["agentclinic"]["deid_replaced"].values()) >= 2


def test_rubric_quality_with_a_model_generator_counts_fallbacks(monkeypatch, tiny_role):
  # The session's tiny random model stands in for the one main would build (compiled once).
  monkeypatch.setattr(simulator, "_model_role", lambda args, name, max_new_tokens: tiny_role)
  out = simulator.main(["--rubric_quality", "--rubric_generator=model", "--examples=2"])
  assert out["generator"] == "model"
  for split in ("oss_eval", "consensus"):   # random bytes are no rubric: every one falls back
    assert out[split]["examples"] == 2 and out[split]["fallbacks"] == 2
    assert out[split]["fallback_rate"] == 1.0 and out[split]["generated_items"] > 0
  assert out["parse"]["accepted"] == 0
