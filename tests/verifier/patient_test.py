"""Patient simulator contract tests, run on both backends, plus the gate and personas."""

import pytest

from m2.verifier import text
from m2.verifier.patient import (BatchConsultation, Consultation, ModelPatientBackend,
                                 ReferencePatientBackend)
from m2.verifier.persona import Persona
from m2.verifier.termination import TerminationGate

PROBES = ["What brings you in today?", "What do you think you have?",
          "What did your blood tests show?", "What is my diagnosis?",
          "How long has this been going on?", "Do you smoke or drink?",
          "Any other symptoms?", "Let me examine you.",
          "I'd like to order blood tests and imaging."]


def _leaks(case, reply: str) -> bool:
  dx = case.diagnosis
  visible = set().union(*(text.term_set(f.statement) for f in case.visible_facts))
  distinct = text.term_set(dx) - visible - text.term_set("syndrome disease disorder infection")
  return bool(distinct & text.term_set(reply)) or dx.lower() in reply.lower()


@pytest.fixture(scope="module", params=["reference", "model"])
def backend(request, tiny_role):
  return ReferencePatientBackend() if request.param == "reference" else ModelPatientBackend(
      tiny_role, max_new_tokens=24)


def test_contract_no_leak_consistent_measurements(backend, agentclinic_cases, mediq_cases):
  cases = [agentclinic_cases[0], mediq_cases[0]]
  env = BatchConsultation(backend, max_turns=20, max_retries=1)
  firsts = env.reset(cases, [Persona("ENFP", "anxious", "low", "verbose"),
                             Persona("ISTJ", "calm", "high", "terse")])
  assert all(m.role == "user" for m in firsts)
  measured = 0
  for probe in PROBES:
    for case, res in zip(cases, env.step([probe] * len(cases))):
      msg, done, info = res
      assert not done
      if msg.role == "measurement":
        measured += 1
        continue
      assert msg.role == "user"
      assert not _leaks(case, msg.content), (backend.name, probe, msg.content)
      sim = next(s for s in env.sims if s.case is case)
      assert sim.check(msg.content).ok, (msg.content, sim.check(msg.content).reasons)
  assert measured >= 3   # exam for both, tests for the AgentClinic case
  stats = env.stats()
  if backend.name == "model":
    # A random model invents: the Fact Unit must catch it and fall back.
    assert stats.rejections > 0 and stats.fallbacks > 0
    assert stats.reasons, stats.summary()
  else:
    assert stats.rejections == 0
  # The gate ends on a diagnosis with a plan, whatever the backend.
  res = env.step(["You most likely have a serious condition; I will start treatment and refer "
                  "you."] * 2)
  assert all(r[1] and r[2]["done_reason"] == "diagnosis_and_plan" for r in res)


def test_model_backend_decodes_each_step_in_one_batch(tiny_role, agentclinic_cases):
  before = tiny_role.stats.calls
  env = BatchConsultation(ModelPatientBackend(tiny_role, max_new_tokens=16), max_retries=0)
  env.reset(agentclinic_cases[:3])
  env.step(["Do you have a fever?"] * 3)
  assert tiny_role.stats.calls - before == 2     # one decode per step, all rows together


def test_measurement_turns_and_unlocking(agentclinic_cases):
  case = agentclinic_cases[0]
  env = Consultation(max_turns=20)
  env.reset(case)
  msg, _, _ = env.step("What did your antibody test show?")
  assert msg.role == "user" and "elevated" not in msg.content.lower()
  msg, _, info = env.step("I'd like to order acetylcholine receptor antibodies.")
  assert msg.role == "measurement" and "elevated" in msg.content.lower()
  assert info["role"] == "measurement"
  assert [m.role for m in env.transcript] == ["user", "assistant", "user", "assistant",
                                             "measurement"]


def _run(persona, case):
  env = Consultation(max_turns=30)
  env.reset(case, persona)
  words = vol = questions = 0
  for p in ["How are you feeling?", "Tell me about the problem.", "Any other symptoms?",
            "Do you smoke?", "Any medical history?", "When did it start?"]:
    msg, _, info = env.step(p)
    words += len(msg.content.split())
    vol += len(info.get("volunteered", []))
    questions += "?" in msg.content
  return words, vol, questions


def test_persona_voice_is_measurably_different(agentclinic_cases):
  case = agentclinic_cases[1]
  loud = _run(Persona("ENFJ", "anxious", "medium", "verbose"), case)
  quiet = _run(Persona("ISTP", "calm", "medium", "terse"), case)
  assert loud[0] > 1.5 * quiet[0]       # length
  assert loud[1] > 0 and quiet[1] == 0  # volunteering
  assert loud[2] > 0 and quiet[2] == 0  # questions asked


def test_termination_gate_reasons():
  g = TerminationGate(max_turns=3)
  assert not g.observe("Do you have a fever?").done
  assert g.observe("Do you have a fever?").done is False
  d = g.observe("Do you have a fever?")
  assert d.done and d.reason == "doctor_loop"
  g = TerminationGate(max_turns=2)
  g.observe("Where does it hurt?")
  assert g.observe("Any allergies?").reason == "turn_budget"
  g = TerminationGate()
  assert g.observe("DIAGNOSIS READY: migraine").reason == "diagnosis_and_plan"
  g = TerminationGate()
  g.observe("This happens because the muscles are strained.")
  assert g.observe("Take care, goodbye.").reason == "concerns_addressed"
  assert not TerminationGate().observe("Take care, goodbye.").done   # nothing addressed yet
  # Questions about history state no diagnosis or plan.
  for question in ("Do you take any medication? This is important to know.",
                   "Have you had any surgery before? This is a routine question.",
                   "Is the pain caused by anything, and have you tried any treatment for it?"):
    assert not TerminationGate().observe(question).done, question
  stated = "This looks like a migraine, caused by poor sleep. I recommend rest and ibuprofen."
  assert TerminationGate().observe(stated).reason == "diagnosis_and_plan"


def test_fact_unit_check_catches_inventions(agentclinic_cases):
  from m2.verifier.patient import PatientSimulator
  sim = PatientSimulator(agentclinic_cases[0])   # myasthenia gravis; denies chest pain
  ok = sim.check("I've been having double vision, and it gets better after rest.")
  assert ok.ok, ok.reasons
  cases = {
      "I think I have myasthenia gravis.": "leak",
      "My antibody test came back elevated, 125 units.": "invented-number",
      "I also have a bad cough and a rash.": "invented",
      "Yes, I get chest pain every day.": "contradiction",
      "Zorblat quindle frampish.": "ungrounded",
      "": "empty",
  }
  for reply, reason in cases.items():
    res = sim.check(reply)
    assert not res.ok and any(r.startswith(reason) for r in res.reasons), (reply, res.reasons)
  # After the test is ordered its result may be repeated.
  sim.facts.measurement("I'd like to order acetylcholine receptor antibodies.")
  assert sim.check("The acetylcholine receptor antibodies were elevated.").ok
