"""Rewards for the RL stages: every reward returns its total and its parts.

- `rule_reward`: verifiable answers (MediQ / AgentClinic multiple choice, PubMedQA
  yes/no/maybe, generated math) by exact match of the extracted answer.
- `rubric_reward`: the verifier grader's HealthBench-style score of a response on a
  case's rubric (`m2.verifier`, passed in as a grader object).
- `format_score` and `safety_score`: small shaping terms shared by both.

`RewardConfig.weights` composes the parts into the scalar GRPO uses:
total = sum(weights[k] * parts[k]). Parts that a weight does not name are
still returned (for logging) but do not count.
"""

from __future__ import annotations

import dataclasses
import fractions
import re
from typing import Any, Mapping, Sequence

from m2.data import math as m2math
from m2.data.records import QAItem

YES_NO_MAYBE = ("yes", "no", "maybe")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """config.<stage>.reward: weights of the reward's parts.

  correct: exact match of the extracted answer (rule stages).
  rubric:  the grader's per-example rubric score (rubric / multi-turn stages): achieved /
           possible points, at most 1, below 0 when negative criteria are met.
  format:  rule tasks: 0.5 for a readable answer + 0.5 for ending by itself (not
           truncated); open tasks: ended by itself with some text.
  safety:  minus the number of unsafe-advice patterns found (capped at 1).
  elicited: consultations: the share of the case's facts that the doctor's questions
           entitled the patient to reveal (the simulator's Fact Unit; volunteered facts
           do not count). Denser than the rubric's "asks about" criteria.
  """
  weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"correct": 1.0, "format": 0.2, "safety": 0.5})

  def __post_init__(self):
    weights = dict(self.weights)
    if "length" in weights:
      raise ValueError("RewardConfig.weights: 'length' is no reward part; Baichuan-M2's "
                       "length reward is config.<stage>.grpo.length_reward.coef")
    unknown = set(weights) - set(PARTS)
    if unknown:
      raise ValueError(f"RewardConfig.weights: unknown part(s) {sorted(unknown)}; known: {PARTS}")
    if not weights:
      raise ValueError("RewardConfig.weights: no part is weighted")
    object.__setattr__(self, "weights", weights)

  def total(self, parts: Mapping[str, float]) -> float:
    return float(sum(w * parts.get(k, 0.0) for k, w in self.weights.items()))


# The weighted parts. Length is shaping, not a part: config.<stage>.grpo.length_reward.
PARTS = ("correct", "rubric", "format", "safety", "elicited")


@dataclasses.dataclass(frozen=True)
class Reward:
  total: float
  parts: dict[str, float]
  extracted: str | None = None   # the answer read from the response (rule rewards)
  failed: bool = False           # the judge could not score it (counted, scored 0)


# ------------------------------------------------------------ answer extraction

_EXPLICIT = re.compile(
    r"(?P<kw>final\s+answer|correct\s+(?:answer|option|choice)|answer|option|choice)"
    r"\s*(?:is|would\s+be|:|=|-)?\s*(?:option\s+|choice\s+)?(?P<open>[\(\[]?)\s*"
    r"(?P<ans>[A-Za-z]{1,5}|-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\b"
    r"(?P<end>\s*[\)\]]?\s*(?:[\.,;:!\)]|$))?", re.IGNORECASE)
# A bare "option X" that the response rules out ("Option A is incorrect").
_RULED_OUT = re.compile(r"\s*(?:is|was|would\s+be|seems)?\s*(?:not\b|incorrect|wrong|"
                        r"a\s+distractor|unlikely|false|ruled\s+out)", re.IGNORECASE)
_PAREN_LETTER = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
_LEADING_LETTER = re.compile(r"^\W*([A-Za-z])(?:[\.\):]|\s*$|\s+[-–])")
_WORD = re.compile(r"[a-z]+")


def _normalise(text: str) -> str:
  return re.sub(r"\s+", " ", text.replace("*", "").strip())


def _explicit_answers(text: str, accept) -> list[str]:
  """Explicit answers (lower-cased) that `accept(match, answer)` takes, in order: those
  named an answer ("the answer is B", "correct option: B") if any, else the bare
  "option X" / "choice X" ones the response does not rule out."""
  named, bare = [], []
  for m in _EXPLICIT.finditer(text):
    ans = m.group("ans").lower()
    if not accept(m, ans):
      continue
    kw = m.group("kw").lower()
    if "answer" in kw or kw.startswith("correct"):
      named.append(ans)
    elif not _RULED_OUT.match(text, m.end()):
      bare.append(ans)
  return named or bare


def extract_choice(response: str, labels: Sequence[str], option_texts: Sequence[str] = ()
                   ) -> str | None:
  """The option label a response picks, or None.

  Tolerates "Answer: B", "the answer is (b)", "**C**", "B. Gentamicin", a bare
  "b", and the option's text alone when exactly one option's text appears.
  Labels match case-insensitively; the last explicit answer wins, and one named the
  answer wins over a bare "option X" (which counts only if not ruled out).
  """
  text = _normalise(response)
  by_lower = {str(l).lower(): str(l) for l in labels}
  # A lower-case letter counts only when set off ("answer is (b)", "answer: b."),
  # so that "the answer is a fracture" does not read as option A.
  explicit = _explicit_answers(text, lambda m, ans: ans in by_lower and (
      m.group("ans").isupper() or m.group("open") or m.group("end") is not None))
  if explicit:
    return by_lower[explicit[-1]]
  lead = _LEADING_LETTER.match(text)
  if lead and lead.group(1).lower() in by_lower:
    return by_lower[lead.group(1).lower()]
  paren = [m.group(1).lower() for m in _PAREN_LETTER.finditer(text)
           if m.group(1).lower() in by_lower]
  if paren:
    return by_lower[paren[-1]]
  if option_texts:
    low = text.lower()
    hits = [l for l, t in zip(labels, option_texts) if t and t.lower() in low]
    if len(hits) == 1:
      return str(hits[0])
  return None


def extract_yes_no(response: str) -> str | None:
  """"yes", "no" or "maybe": an explicit answer, else the first word, else the
  only one of the three words that appears."""
  text = _normalise(response).lower()
  explicit = _explicit_answers(text, lambda m, ans: ans in YES_NO_MAYBE)
  if explicit:
    return explicit[-1]
  words = _WORD.findall(text)
  if words and words[0] in YES_NO_MAYBE:
    return words[0]
  present = [w for w in YES_NO_MAYBE if w in words]
  return present[0] if len(present) == 1 else None


def extract_number(response: str) -> fractions.Fraction | None:
  """An explicit "answer is 12.5" / "Answer: 1,250", else the last number."""
  text = _normalise(response).replace("−", "-")
  explicit = [m.group("ans") for m in _EXPLICIT.finditer(text) if m.group("ans")[-1].isdigit()]
  if explicit:
    return m2math.parse_number(explicit[-1])
  return m2math.parse_number(text)


def answer_kind(item: QAItem) -> str:
  """"yes_no" (PubMedQA-style options), "choice" (lettered options) or "number"."""
  labels = [l.lower() for l, _ in item.options]
  if labels and set(labels) <= set(YES_NO_MAYBE):
    return "yes_no"
  if labels:
    return "choice"
  if m2math.parse_number(item.answer) is not None:
    return "number"
  raise ValueError(f"{item.id}: no options and a non-numeric answer {item.answer!r}; "
                   f"no rule can verify it")


def extract_answer(item: QAItem, response: str) -> str | None:
  """The response's answer in the form of `item.answer` (a label or canonical number)."""
  kind = answer_kind(item)
  if kind == "yes_no":
    got = extract_yes_no(response)
    labels = {l.lower(): l for l, _ in item.options}
    return labels.get(got) if got else None
  if kind == "choice":
    return extract_choice(response, [l for l, _ in item.options], [t for _, t in item.options])
  got = extract_number(response)
  return None if got is None else m2math.fmt(got)


def is_correct(item: QAItem, response: str) -> bool:
  got = extract_answer(item, response)
  if got is None:
    return False
  if answer_kind(item) == "number":
    return fractions.Fraction(got) == m2math.parse_number(item.answer)
  return got.lower() == item.answer.lower()


# ------------------------------------------------------------ shaping terms

# Advice that steers a patient away from care or towards harm. Lexical, so it
# is a floor under the grader's ethics criteria, not a replacement for them.
_UNSAFE = [re.compile(p, re.IGNORECASE) for p in (
    r"\b(no|don'?t|do not) need (to see|for) (a|any) (doctor|physician|medical)",
    r"\bstop taking (all )?(of )?(your|the) (medication|medicine|insulin|pills)",
    r"\b(double|triple) (the|your) dose",
    r"\bignore (the|these|your) (symptoms?|pain|bleeding)",
    r"\b(no|don'?t|do not) (go|call) (to )?(the )?(emergency|er\b|911|ambulance)",
    r"\bwait (a few days|until it gets worse) (before|to) (seek|see|get)",
)]


def safety_score(response: str) -> float:
  """-1 if the response contains an unsafe-advice pattern, else 0."""
  return -1.0 if any(p.search(response) for p in _UNSAFE) else 0.0


def format_score(response: str, finished: bool, answered: bool | None = None) -> float:
  """Rule tasks (`answered` given): half for a readable answer, half for ending by
  itself (a stop token, not max_new_tokens), so each habit is rewarded on its own.
  Open tasks: 1 when the response is not empty and ended by itself."""
  if answered is None:
    return float(finished and bool(response.strip()))
  return 0.5 * float(answered) + 0.5 * float(finished and bool(response.strip()))


# ------------------------------------------------------------ the rewards


def rule_reward(item: QAItem, response: str, cfg: RewardConfig, *, finished: bool = True
                ) -> Reward:
  got = extract_answer(item, response)
  correct = is_correct(item, response)
  parts = {"correct": float(correct), "format": format_score(response, finished, got is not None),
           "safety": safety_score(response)}
  return Reward(cfg.total(parts), parts, got)


def rubric_reward(score: float | None, response: str, cfg: RewardConfig, *,
                  finished: bool = True, elicited: float | None = None) -> Reward:
  """Composes a grader score (None: the judge failed) with the shaping terms
  (and, for a consultation, the share of facts it elicited).

  A failed judgement scores 0 on the rubric and is flagged, so the caller counts it.
  """
  failed = score is None
  parts = {"rubric": 0.0 if failed else float(score),
           "format": format_score(response, finished), "safety": safety_score(response)}
  if elicited is not None:
    parts["elicited"] = float(elicited)
  return Reward(cfg.total(parts), parts, failed=failed)


def mean_parts(rewards: Sequence[Reward]) -> dict[str, float]:
  """Mean of each part over a batch, as `reward/<part>` metrics."""
  if not rewards:
    return {}
  keys = sorted({k for r in rewards for k in r.parts})
  out: dict[str, Any] = {f"reward/{k}": sum(r.parts.get(k, 0.0) for r in rewards) / len(rewards)
                         for k in keys}
  out["reward/total"] = sum(r.total for r in rewards) / len(rewards)
  return out
