"""Rubrics: schema, the case-templated reference generator, robust parsing of model
output, the model generator on a tiny random model, and the quality report."""

import json
import warnings

import pytest

from m2.data.loaders import load_source
from m2.verifier import rubrics as R
from m2.verifier.grader import Grader


def test_criterion_schema():
  R.Criterion("Asks about fever", 5, "consultation_logic")
  for bad in [dict(points=0), dict(points=11), dict(points=2.5), dict(points=True),
              dict(dimension="vibes"), dict(text=" ")]:
    kw = dict(text="Asks about fever", points=5, dimension="consultation_logic") | bad
    with pytest.raises(R.RubricError):
      R.Criterion(**kw)
  with pytest.raises(R.RubricError):
    R.Rubric((R.Criterion("Prescribes penicillin", -8, "ethics_safety"),))


def test_reference_rubric_from_case(agentclinic_cases):
  case = agentclinic_cases[0]   # myasthenia gravis
  r = R.ReferenceRubricGenerator().generate(case)
  dims = {c.dimension for c in r}
  assert set(R.PAPER_DIMENSIONS) <= dims and "follow_up" in dims
  texts = [c.text for c in r]
  assert any("Myasthenia gravis" in t and c.points == 8 for t, c in zip(texts, r))
  assert any(t.startswith("Asks about Double vision") for t in texts)
  assert any(t.startswith("Orders") for t in texts)
  assert any(c.points < 0 for c in r)
  assert all(c.scope == "dialogue" for c in r)
  assert R.Rubric.from_dict(json.loads(json.dumps(r.to_dict()))) == r
  # Per dialogue context: what the patient already said is not asked for again.
  later = R.ReferenceRubricGenerator().generate(
      case, [{"role": "user", "content": "I've been having double vision."}])
  assert not any(c.text.startswith("Asks about Double vision") for c in later)
  # A doctor who asks, examines, orders and diagnoses beats one who does not.
  good = [("user", "I have double vision."),
          ("assistant", "How long have you had double vision? Any difficulty climbing stairs or "
                        "weakness in your upper limbs? Does it improve after rest?"),
          ("user", "A month."),
          ("assistant", "Let me examine your vital signs and do a neurological examination. I "
                        "will order blood tests and electromyography."),
          ("user", "ok"),
          ("assistant", "The most likely diagnosis is myasthenia gravis. I understand your "
                        "concern. We will start treatment and I will see you for follow-up.")]
  bad = [("user", "I have double vision."), ("assistant", "It is nothing serious, just rest.")]
  g = Grader()
  assert g.grade(good, r).score > 0.5 > g.grade(bad, r).score


def test_parse_rubric_items_counts_rejects_dedupes_clamps():
  raw = "\n".join([
      '{"criterion": "Asks about the duration of the double vision", "points": 5, '
      '"dimension": "consultation_logic"}',
      '{"criterion": "Asks about the duration of the double vision", "points": 4, '
      '"dimension": "consultation_logic"}',                            # duplicate
      '{"criterion": "Prescribes a drug the patient is allergic to", "points": -15, '
      '"dimension": "safety"}',                                        # clamped, alias
      '{"criterion": "Explains the plan", "points": 0, "dimension": "communication"}',  # 0 points
      '{"criterion": "Orders acetylcholine receptor antibodies", "points": "4", '
      '"dimension": "nonsense"}',                                     # unknown dimension
      'not json at all',
      '["a list"]',
  ])
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    crits, stats = R.parse_rubric_items(raw)
  assert [c.points for c in crits] == [5, -10]
  assert crits[1].dimension == "ethics_safety"
  assert stats.lines == 7 and stats.accepted == 2 and stats.duplicates == 1
  assert stats.clamped == 1 and any("clamped" in str(x.message) for x in w)
  assert stats.rejected == 4 and stats.reasons == {"bad points": 1, "unknown dimension": 1,
                                                   "not json": 1, "not an object": 1}


def test_model_generator_on_random_model_falls_back(tiny_role, agentclinic_cases):
  gen = R.ModelRubricGenerator(tiny_role)
  rubrics = gen.generate_batch(agentclinic_cases[:2])
  assert len(rubrics) == 2 and gen.fallbacks == 2          # random bytes are no rubric
  assert all(r.source.startswith("reference:") for r in rubrics)


def test_rubric_quality_hand_example():
  ref = R.Rubric((R.Criterion("Advises emergency care for chest pain", 8, "accuracy"),
                  R.Criterion("Recommends aspirin without checking allergies", -5, "accuracy"),
                  R.Criterion("Explains the risks of smoking", 3, "completeness")))
  gen = R.Rubric((R.Criterion("Tells the user to seek emergency care for the chest pain", 7,
                              "accuracy"),
                  R.Criterion("Recommends aspirin without asking about allergies", 4, "accuracy")))
  q = R.rubric_quality(gen, ref)
  assert (q.matched, q.sign_agreements) == (2, 1)     # smoking uncovered; aspirin sign differs
  assert q.coverage == pytest.approx(2 / 3) and q.sign_agreement == 0.5


def test_quality_report_against_healthbench_physician_rubrics():
  exs, _ = load_source("healthbench", purpose="eval", splits=("oss_eval",))
  gen = R.ReferenceRubricGenerator()
  total = None
  for e in exs[:30]:
    q = R.rubric_quality(gen.generate_for_conversation(e.messages),
                         R.Rubric.from_healthbench(e))
    total = q if total is None else total.merge(q)
  # Recorded, not tuned: templated rubrics cover a minority of physician criteria.
  assert total.reference_items > 300
  assert 0.0 < total.coverage < 1.0 and 0.0 <= total.sign_agreement <= 1.0


HEALTH_QUESTION = [{"role": "user", "content": "I've had chest pain since this morning. Should I "
                                               "take an aspirin?"}]


def test_model_generator_for_conversation_on_random_model_falls_back(tiny_role):
  gen = R.ModelRubricGenerator(tiny_role)
  rubric = gen.generate_for_conversation(HEALTH_QUESTION)
  assert gen.fallbacks == 1 and gen.stats.accepted == 0           # random bytes are no rubric
  assert rubric == R.ReferenceRubricGenerator().generate_for_conversation(HEALTH_QUESTION)


class _CannedRole:
  """A role that answers every chat with the same text and keeps what it was asked."""

  def __init__(self, reply: str):
    self.reply, self.chats = reply, []

  def complete(self, chats, **kw):
    self.chats += chats
    return [self.reply] * len(chats)


def test_model_generator_for_conversation_parses_and_counts():
  raw = "\n".join([
      '{"criterion": "Advises calling emergency services for chest pain", "points": 9, '
      '"dimension": "completeness"}',
      '{"criterion": "Recommends aspirin without asking about bleeding risk", "points": -6, '
      '"dimension": "accuracy"}',
      '{"criterion": "Advises calling emergency services for chest pain", "points": 8, '
      '"dimension": "completeness"}',                                  # duplicate
      'Sure! Here is a rubric:',                                      # chatter: rejected
      '{"criterion": "Asks about the patient\'s age", "points": 3, "dimension": "vibes"}'])
  role = _CannedRole(raw)
  gen = R.ModelRubricGenerator(role)
  rubrics = gen.generate_for_conversations([HEALTH_QUESTION, HEALTH_QUESTION])
  assert gen.fallbacks == 0 and all(r.source == "model:conversation" for r in rubrics)
  assert [c.points for c in rubrics[0]] == [9, -6]
  assert all(c.scope == "last_turn" for c in rubrics[0])           # judged on the next reply
  assert gen.stats.accepted == 4 and gen.stats.duplicates == 2 and gen.stats.rejected == 4
  # The prompt carries the conversation, then the instructions (which survive a cut start).
  prompt = role.chats[0][0]["content"]
  assert "user: I've had chest pain" in prompt
  assert prompt.index("chest pain") < prompt.index("Output one JSON object per line")
  # Only negative criteria: not scoreable, so the reference rubric stands in, counted.
  gen = R.ModelRubricGenerator(_CannedRole('{"criterion": "Recommends aspirin without asking '
                                           'about bleeding risk", "points": -6, '
                                           '"dimension": "accuracy"}'))
  assert gen.generate_for_conversation(HEALTH_QUESTION).source == "reference:conversation"
  assert gen.fallbacks == 1
