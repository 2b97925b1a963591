"""Answer extraction and reward composition."""

import pytest

from m2.data.math import generate_math
from m2.data.records import QAItem
from m2.rl import rewards
from m2.rl.rewards import RewardConfig

MCQ = QAItem(id="mediq_qa:1", source="mediq_qa", question="Which drug?", answer="B",
             options=(("A", "Aspirin"), ("B", "Gentamicin"), ("C", "Heparin"), ("D", "Insulin")))
PUBMED = QAItem(id="pubmedqa:1", source="pubmedqa", question="Does X cause Y?", answer="maybe",
                options=(("yes", "yes"), ("no", "no"), ("maybe", "maybe")))


@pytest.mark.parametrize("response,want", [
    ("Answer: B", "B"),
    ("the answer is (b)", "B"),
    ("After weighing it, the correct option is C.", "C"),
    ("**D**", "D"),                      # a bare (bold) letter
    ("**Answer: D**", "D"),
    ("B. Gentamicin covers gram-negatives.", "B"),
    ("b", "B"),
    ("I would give heparin here.", "C"),  # the only option text named
    ("the answer is a fracture", None),  # a lower-case article is no label
    ("Answer: A ... on reflection, final answer: (c)", "C"),   # the last explicit wins
    ("Aspirin or heparin, hard to say", None),
    ("", None),
    # The answer named beats an option it rules out, and a ruled-out option is no answer.
    ("The answer is B. Option A is incorrect because it is a platelet drug.", "B"),
    ("Answer: B. Choice C would be wrong here.", "B"),
    ("The correct answer is B; option D is a distractor.", "B"),
    ("Option A is not right here. Option C is.", "C"),
    ("I'd pick option C.", "C"),
])
def test_extract_choice(response, want):
  assert rewards.extract_answer(MCQ, response) == want


@pytest.mark.parametrize("response,want", [
    ("Answer: maybe", "maybe"), ("Yes, it does.", "yes"), ("The answer is no.", "no"),
    ("It may or may not; the data say maybe", "maybe"), ("In some trials yes, in others no", None),
    ("Perhaps.", None),
])
def test_extract_yes_no(response, want):
  assert rewards.extract_answer(PUBMED, response) == want


def test_math_answers():
  item = next(i for i in generate_math(50, seed=0) if "." not in i.answer)
  assert rewards.is_correct(item, f"Working it out... the answer is {item.answer}.")
  assert rewards.is_correct(item, f"Answer: {int(item.answer):,} mg")
  assert not rewards.is_correct(item, f"Answer: {int(item.answer) + 1}")
  # an explicit answer beats a later stray number
  assert rewards.is_correct(item, f"Answer: {item.answer} (checked in 2 steps)")
  dec = QAItem(id="math:x:1", source="math", question="q", answer="2.5")
  assert rewards.is_correct(dec, "x = 5/2") and rewards.is_correct(dec, "Answer: 2.50")
  with pytest.raises(ValueError, match="no rule"):
    rewards.answer_kind(QAItem(id="q:1", source="q", question="q", answer="pneumonia"))


def test_rule_reward_parts_and_weights():
  cfg = RewardConfig(weights={"correct": 1.0, "format": 0.2, "safety": 0.5})
  r = rewards.rule_reward(MCQ, "Answer: B", cfg)
  assert r.parts == {"correct": 1.0, "format": 1.0, "safety": 0.0} and r.total == pytest.approx(1.2)
  assert r.extracted == "B"
  truncated = rewards.rule_reward(MCQ, "Answer: B", cfg, finished=False)
  assert truncated.parts["format"] == 0.5 and truncated.total == pytest.approx(1.1)
  wrong = rewards.rule_reward(MCQ, "Answer: A. Also, stop taking your medication.", cfg)
  assert wrong.parts == {"correct": 0.0, "format": 1.0, "safety": -1.0}
  assert wrong.total == pytest.approx(0.2 - 0.5)
  assert rewards.rule_reward(MCQ, "no idea", cfg).total == pytest.approx(0.1)  # ended, no answer
  assert rewards.rule_reward(MCQ, "no idea", cfg, finished=False).total == 0.0


def test_rubric_reward_counts_judge_failures():
  cfg = RewardConfig(weights={"rubric": 1.0, "format": 0.1})
  ok = rewards.rubric_reward(0.75, "Please see a doctor today.", cfg)
  assert ok.total == pytest.approx(0.85) and not ok.failed
  failed = rewards.rubric_reward(None, "text", cfg)
  assert failed.failed and failed.parts["rubric"] == 0.0
  assert rewards.mean_parts([ok, failed])["reward/rubric"] == pytest.approx(0.375)


def test_reward_config_validates():
  with pytest.raises(ValueError, match="unknown part"):
    RewardConfig(weights={"correctness": 1.0})
  with pytest.raises(ValueError, match="no part"):
    RewardConfig(weights={})
  with pytest.raises(ValueError, match="grpo.length_reward"):   # shaping, not a part
    RewardConfig(weights={"correct": 1.0, "length": 5.0})
