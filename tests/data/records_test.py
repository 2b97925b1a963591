"""Record schemas: validation, views over facts, conversions for the pipelines."""

import pytest

from m2.data import records
from m2.data.records import (Dialogue, Fact, HealthBenchExample, Message, PatientCase, QAItem,
                             RecordValidationError, RubricItem, Turn)


def _case(**kw):
  facts = (Fact("demographics", "demographics", "35-year-old female"),
           Fact("chief_complaint", "chief_complaint", "Double vision"),
           Fact("symptom.1", "symptom", "Weakness in upper limbs"),
           Fact("exam.vital_signs.pulse", "physical_exam", "72 bpm", "Vital signs / Pulse"),
           Fact("tests.achr", "test_result", "Present", "AChR antibodies"),
           Fact("diagnosis", "diagnosis", "Myasthenia gravis"))
  return PatientCase(**{"id": "c:1", "source": "test", "facts": facts, **kw})


def test_patient_case_views_and_hidden_facts():
  case = _case()
  assert case.chief_complaint == "Double vision"
  assert case.symptoms == ("Double vision", "Weakness in upper limbs")
  assert case.diagnosis == "Myasthenia gravis"
  assert [f.id for f in case.hidden_facts] == ["exam.vital_signs.pulse", "tests.achr", "diagnosis"]
  assert all(not f.hidden for f in case.visible_facts)
  assert case.fact("tests.achr").statement == "AChR antibodies: Present"
  doc = case.to_document()
  assert "Chief complaint:\n- Double vision" in doc and "Diagnosis:\n- Myasthenia gravis" in doc
  with pytest.raises(KeyError, match="no fact"):
    case.fact("nope")


@pytest.mark.parametrize("bad, match", [
    (dict(facts=(Fact("a", "symptom", "x"), Fact("a", "symptom", "y"))), "duplicate fact id"),
    (dict(facts=(Fact("a", "gossip", "x"),)), "unknown category"),
    (dict(facts=(Fact("a", "symptom", "  "),)), "empty"),
    (dict(facts=()), "non-empty"),
    (dict(age=-1), "bad age"),
    (dict(age=True), "bad age"),
    (dict(id="has space"), "record id"),
    (dict(sex="f"), "bad sex"),
])
def test_patient_case_rejects_bad_fields(bad, match):
  with pytest.raises(RecordValidationError, match=match):
    _case(**bad)


def test_qa_item_checks_answer_and_renders_prompt():
  qa = QAItem("q:1", "test", "Which drug?", "C", (("A", "Gentamicin"), ("B", "Cipro"),
                                                    ("C", "Ceftriaxone")), ("A man has fever.",))
  assert qa.answer_text == "Ceftriaxone"
  assert qa.prompt() == ("A man has fever.\n\nWhich drug?\n\nA. Gentamicin\nB. Cipro\nC. Ceftriaxone"
                         "\n\nAnswer with the letter of the correct option.")
  assert qa.to_document().endswith("Answer: C. Ceftriaxone")
  yn = QAItem("q:2", "test", "Does it?", "maybe", (("yes", "yes"), ("no", "no"), ("maybe", "maybe")))
  assert yn.prompt().endswith("Answer with one of: yes, no, maybe.")
  with pytest.raises(RecordValidationError, match="not an option label"):
    QAItem("q:3", "test", "Q?", "D", (("A", "a"),))


def test_dialogue_to_messages_alternates_with_doctor_as_assistant():
  d = Dialogue("d:1", "test", (Turn("doctor", "Hi."), Turn("patient", "My knee hurts."),
                               Turn("companion", "Since Monday."), Turn("doctor", "Let me look.")),
               note="Knee pain.")
  msgs = d.to_messages(system="You are a doctor.")
  assert [m.role for m in msgs] == ["system", "assistant", "user", "assistant"]
  assert msgs[2].content == "My knee hurts.\nCompanion: Since Monday."
  assert d.to_document() == ("Doctor: Hi.\nPatient: My knee hurts.\nCompanion: Since Monday.\n"
                             "Doctor: Let me look.\n\nNote:\nKnee pain.")
  with pytest.raises(RecordValidationError, match="unknown role"):
    Dialogue("d:2", "test", (Turn("nurse", "x"),))


def test_healthbench_is_eval_only_and_never_a_document():
  ex = HealthBenchExample("hb:1", "healthbench", (Message("user", "Is this safe?"),),
                          (RubricItem("Says see a doctor", 5, ("axis:accuracy", "level:example")),
                           RubricItem("Is rude", -3, ())), tags=("theme:hedging",))
  assert ex.EVAL_ONLY and ex.theme == "hedging" and ex.max_points == 5
  assert ex.rubrics[0].axis == "accuracy" and ex.rubrics[0].level == "example"
  with pytest.raises(ValueError, match="evaluation-only"):
    records.to_document(ex)
  with pytest.raises(RecordValidationError, match="points must be an int"):
    HealthBenchExample("hb:2", "healthbench", (Message("user", "q"),),
                       (RubricItem("c", True, ()),))


def test_every_real_record_round_trips_through_dicts(real):
  for name, loaded in real.items():
    for r in loaded.records[:25]:
      assert records.from_dict(records.to_dict(r)) == r, name
