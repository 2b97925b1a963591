"""Simulated-consultation evaluation: the held-out split and the metrics, with scripted doctors."""

import pytest

from m2.data.records import Message
from m2.data.tfds_builders import is_heldout
from m2.eval import consult


@pytest.fixture(scope="module")
def cases():
  return consult.heldout_cases(("agentclinic",), 0.1, limit=3)[0]


def test_heldout_split_is_explicit_and_deterministic():
  cases, counts = consult.heldout_cases(("agentclinic",), 0.05)
  assert [c.id for c in cases] == sorted(c.id for c in cases)
  assert all(is_heldout(c.id, 0.05) and consult.diagnosis(c) for c in cases)
  assert counts["agentclinic"]["heldout"] == len(cases) < counts["agentclinic"]["cases"] / 10
  again, _ = consult.heldout_cases(("agentclinic",), 0.05)
  assert [c.id for c in again] == [c.id for c in cases]
  wider, _ = consult.heldout_cases(("agentclinic",), 0.1)
  assert {c.id for c in cases} < {c.id for c in wider}   # a larger fraction only adds cases
  with pytest.raises(ValueError, match="heldout_fraction"):
    consult.heldout_cases(("agentclinic",), 0.0)


def _scripted(cases, final):
  questions = ["How long has this been going on?", "Do you have any other symptoms?",
               "Any past medical history or medications?"]
  by_opening = {}

  def doctor(chats):
    out = []
    for chat in chats:
      n = sum(m["role"] == "assistant" for m in chat)
      case = by_opening[chat[0]["content"]]
      out.append(questions[n] if n < len(questions) else final(case))
    return out

  return doctor, by_opening


def test_metrics_with_scripted_doctors(cases):
  results = {}
  for name, final in (("right", lambda c: "DIAGNOSIS READY: " + consult.diagnosis(c)),
                      ("wrong", lambda c: "DIAGNOSIS READY: tension headache"),
                      ("silent", lambda c: "")):
    doctor, by_opening = _scripted(cases, final)
    records = []
    for case in cases:   # one at a time so the opening identifies the case
      from m2.verifier.patient import BatchConsultation
      opening = BatchConsultation().reset([case])[0].content
      by_opening[opening] = case
      records += consult.run_consultations(doctor, [case], max_turns=5, progress=False)
    results[name] = (consult.score(records, cases), records)
  right, records = results["right"]
  assert right["diagnostic_accuracy"] == 1.0 and right["diagnosis_given_rate"] == 1.0
  assert right["turns_mean"] == 4.0 and right["done_reasons"] == {"diagnosis_and_plan": 3}
  assert right["questions"] == 9 and right["revealed_facts"] > 0
  assert right["questions_per_revealed_fact"] == pytest.approx(9 / right["revealed_facts"])
  assert right["leakage_per_reply"] == 0.0
  assert set(right["rubric"]) >= {"rubric_score", "dimension:diagnostic_accuracy"}
  wrong = results["wrong"][0]
  assert wrong["diagnostic_accuracy"] == 0.0 and wrong["diagnosis_given_rate"] == 1.0
  assert (wrong["rubric"]["dimension:diagnostic_accuracy"]["mean"]
          < right["rubric"]["dimension:diagnostic_accuracy"]["mean"])
  silent = results["silent"][0]
  # Empty doctor turns are replaced and counted; the turn budget ends the consultation.
  assert silent["empty_doctor_turns"] == 6 and silent["done_reasons"] == {"turn_budget": 3}
  assert silent["diagnostic_accuracy"] == 0.0 and silent["diagnosis_given_rate"] == 0.0
  assert all(r["transcript"][0]["role"] == "user" for r in records)


def test_diagnosis_parsing_and_leak_detector(cases):
  assert consult.stated_diagnosis(["Any fever?", "DIAGNOSIS READY: Myasthenia gravis\nPlan: x"],
                                  "diagnosis_and_plan") == "Myasthenia gravis"
  assert consult.stated_diagnosis(["Any fever?"], "turn_budget") == ""
  assert consult.diagnosis_correct("ocular myasthenia gravis", "Myasthenia gravis")
  assert not consult.diagnosis_correct("myositis", "Myasthenia gravis")
  case = cases[0]
  dx = consult.diagnosis(case)
  leaky = [Message("user", "I feel unwell."), Message("assistant", "What brings you in?"),
           Message("user", f"I read online that I have {dx}.")]
  assert [l["kind"] for l in consult.leaked(case, leaky)] == ["diagnosis"]
  said_first = [Message("user", "I feel unwell."), Message("assistant", f"Could it be {dx}?"),
                Message("user", f"You think it is {dx}?")]
  assert consult.leaked(case, said_first) == []


def test_command_line_on_a_stage_dir(tiny_run, tmp_path):
  import json
  workdir, _, _ = tiny_run
  result = consult.main([f"--checkpoint={workdir / 'sft'}", "--sources=agentclinic",
                         "--heldout_fraction=0.05", "--limit=1", "--max_turns=2",
                         "--max_new_tokens=8", f"--out={tmp_path}"])
  assert result["consultations"] == 1 and 1 <= result["turns_mean"] <= 2
  record = json.loads((tmp_path / "consultations.jsonl").read_text())
  assert record["case_id"].startswith("agentclinic:") and record["transcript"][1]["role"] == \
      "assistant"
  assert json.loads((tmp_path / "report.json").read_text())["cases"]["agentclinic"]["heldout"] > 0
