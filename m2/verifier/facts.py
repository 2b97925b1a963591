"""The patient's Profile and the Fact Unit.

`Profile`: the case's facts, each with an *effective* category (record
categories are refined: a MediQ sentence about a culture is a test result the
patient cannot know, "physician orders ..." is the plan), split into what the
patient knows (`visible`) and what only an examination or test reveals
(`exam`, `test`) or nobody tells (`diagnosis`, `plan`).

`FactUnit`:
- `entitled(question)`: which facts a doctor's question entitles the patient
  to reveal (BM25 over fact text plus category cue words);
- `measurement(question)`: exam / test requests, answered from the findings
  (as AgentClinic's measurement agent) and unlocked from then on;
- `check(reply)`: every reply is checked against the profile: no hidden item
  (diagnosis, un-ordered tests, un-performed exams), no invented symptom, no
  contradiction of a fact, no number the profile does not have, and not mostly
  words without any support.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from m2.data.records import Fact, PatientCase
from m2.verifier import lexicon, text

_LAB_LIKE_RE = re.compile(r"\b(bacteri\w*|organism|gram[- ](positive|negative|stain)|ferment\w*"
                          r"|capsule|cultur\w*|biops\w*|levels?\b|count\b|titer|assay)", re.I)
_PLAN_LIKE_RE = re.compile(r"\b(physician|doctor)s? (orders?|prescribes?|starts?|recommends?)"
                           r"|\b(is|was) (started|treated|scheduled) (on|with|for)\b", re.I)
_CUES = {   # words that point a question at a category (a question names the topic, not the fact)
    "chief_complaint": "bring today problem wrong trouble concern come visit help feel",
    "history": "start begin long when how often worse better describe happen since duration",
    "symptom": "symptom other else notice feel pain",
    "past_history": "past history before previous condition illness surgery operation diagnosed "
                    "hospital medical",
    "medication": "medication medicine take taking drug pill prescription supplement allergy "
                  "allergies",
    "family_history": "family mother father parent sibling brother sister run relative",
    "social_history": "smoke smoking alcohol drink illicit recreational work job occupation live "
                      "home sexual "
                      "partner travel exercise diet",
    "review_of_systems": "other symptom else chest breath fever weight appetite sleep urine "
                         "bowel",
    "demographics": "age old year",
}
_EXAM_RE = re.compile(
    r"\b(examine|examination|exam|physical|auscultat\w*|listen to (your|the)|palpat\w*|"
    r"inspect\w*|look at (your|the)|check (your|the) (blood pressure|pulse|heart|lungs|reflexes|"
    r"vitals?|temperature|eyes|skin|abdomen|belly)|vital signs?|vitals|take your (blood "
    r"pressure|temperature|pulse)|request exam)\b", re.I)
_TEST_RE = re.compile(
    r"(request test\s*:|\b(order|run|get|send|draw|perform|do|obtain|check|schedule|need)\b[^.?!]*"
    r"\b(tests?|labs?|laboratory|blood ?work|panel|scan|x-?ray|ct|mri|ultrasound|ecg|ekg|"
    r"culture|biopsy|imaging|count|levels?|urinalysis|serology|swab|smear|electromyography|"
    r"emg|eeg|echo\w*|antibod\w*|titer|screen\w*)\b)", re.I)
_DX_PROBE_RE = re.compile(r"\b(what do (i|you) have|what do you think (you have|it is|is wrong)|"
                          r"what('s| is) (my|the|your) diagnosis|do you know what (you have|it is)|"
                          r"what is wrong with (me|you)|diagnos\w*)\b", re.I)
_OPEN_RE = re.compile(r"\b(what brings you|how can i help|what seems to be|what's (the|going on)|"
                      r"what is the (problem|matter)|tell me (about|what)|why are you here|"
                      r"how are you)\b", re.I)
_TIME_Q_RE = re.compile(r"\b(how long|when did|since when|start\w*|began|begin|onset|how often)\b",
                        re.I)
_TIME_FACT_RE = re.compile(r"\b(\d+|one|two|three|several|few)[- ](hours?|days?|weeks?|months?|"
                           r"years?)\b|\bago\b|\bsince\b|\bfor the past\b|\bhistory of\b", re.I)
_ORDER_RE = re.compile(r"\b(let me|let's|i('ll| will)|i'd like|i would like|we('ll| will| need)|"
                       r"going to|order\w*|perform|request|please)\b", re.I)
_MORE_Q_RE = re.compile(r"\b(anything else|any other|other symptoms?|something else|else)\b", re.I)
_RESULT_PROBE_RE = re.compile(r"\b(what did (the|your) \w+( \w+)? show|results?|findings?|"
                              r"what were your)\b", re.I)
_GENERIC_HIDDEN = frozenset(text.terms(
    "syndrome disease disorder infection acute chronic primary secondary type left right "
    "normal abnormal mild moderate severe elevated decreased increased present absent findings "
    "result results test tests level count exam examination show shows"))
_EVERYDAY_NUMBERS = frozenset({"1", "2", "3", "one"})


@dataclasses.dataclass(frozen=True)
class ProfileFact:
  fact: Fact
  category: str                 # effective category
  terms: frozenset[str]
  polar: dict

  id = property(lambda self: self.fact.id)
  text = property(lambda self: self.fact.text)
  statement = property(lambda self: self.fact.statement)


def effective_category(f: Fact) -> str:
  if f.category in ("history", "symptom", "other", "past_history") and _LAB_LIKE_RE.search(f.text):
    return "test_result"
  if _PLAN_LIKE_RE.search(f.text):
    return "plan"
  return f.category


class Profile:
  """The medical layer of the patient (record facts), split by who may know what."""

  def __init__(self, case: PatientCase):
    self.case = case
    self.facts = [ProfileFact(f, effective_category(f), text.term_set(f.statement),
                              text.polar_terms(f.text)) for f in case.facts]
    by = lambda *cats: [p for p in self.facts if p.category in cats]
    self.visible = by("demographics", "chief_complaint", "history", "symptom", "past_history",
                      "medication", "family_history", "social_history", "review_of_systems",
                      "other")
    self.exam = by("physical_exam")
    self.test = by("test_result")
    self.diagnosis = by("diagnosis")
    self.plan = by("plan")
    self.hidden = self.exam + self.test + self.diagnosis + self.plan

  def get(self, fact_id: str) -> ProfileFact:
    return next(p for p in self.facts if p.id == fact_id)

  def chief(self) -> list[ProfileFact]:
    cc = [p for p in self.visible if p.category == "chief_complaint"]
    if cc:
      return cc
    # MediQ has no chief complaint field: the first symptom-bearing history sentence.
    hist = [p for p in self.visible if p.category in ("history", "symptom")]
    with_symptom = [p for p in hist if p.terms & lexicon.SYMPTOM_TERMS]
    return (with_symptom or hist or self.visible)[:1]


@dataclasses.dataclass
class CheckResult:
  ok: bool
  reasons: list[str]


class FactUnit:
  """What the patient may say, and whether a reply said only that."""

  def __init__(self, profile: Profile, *, max_facts: int = 4, min_score: float = 1.0,
               relative: float = 0.5):
    self.profile = profile
    self.max_facts, self.min_score, self.relative = max_facts, min_score, relative
    docs = [list(p.terms) + text.terms(_CUES.get(p.category, "")) for p in profile.visible]
    self._visible_index = text.BM25(docs)
    self._exam_index = text.BM25([list(p.terms) for p in profile.exam])
    self._test_index = text.BM25([list(p.terms) for p in profile.test])
    self.revealed: set[str] = set()       # visible facts the patient has said
    self.unlocked: set[str] = set()       # exams performed, tests ordered
    self.dialogue_terms: set[str] = set()   # what the doctor said (may be echoed)
    self.dialogue_numbers: set[str] = set()
    self._refresh_support()

  # ---------------------------------------------------------------- retrieval

  def observe_doctor(self, doctor_turn: str):
    self.dialogue_terms |= text.term_set(doctor_turn)
    self.dialogue_numbers |= text.numbers(doctor_turn)

  def entitled(self, question: str) -> list[ProfileFact]:
    """Visible facts the question asks about, best first (revealed ones last).

    BM25 retrieval, then three question shapes that name no fact: an opening
    ("what brings you in?") gets the chief complaint, a time question ("how
    long?") the facts with a time course, "anything else?" unrevealed symptoms."""
    scores = self._visible_index.scores(text.terms(question))
    facts: list[ProfileFact] = []
    if len(scores) and scores.max() >= self.min_score:
      cut = max(self.min_score, self.relative * scores.max())
      idx = [i for i in scores.argsort(kind="stable")[::-1] if scores[i] >= cut]
      facts = [self.profile.visible[i] for i in idx]
    if _OPEN_RE.search(question):
      facts = self.profile.chief() + facts
    if _TIME_Q_RE.search(question):
      facts = [p for p in self.profile.visible
               if p.category != "demographics" and _TIME_FACT_RE.search(p.text)] + facts
    if _MORE_Q_RE.search(question):
      facts = facts + self.volunteerable()
    facts = list({p.id: p for p in facts}.values())
    facts = sorted(facts, key=lambda p: p.id in self.revealed)   # stable: new facts first
    return facts[:self.max_facts]

  def volunteerable(self, exclude: Sequence[str] = ()) -> list[ProfileFact]:
    """Unrevealed symptoms/history an outgoing patient may add, in record order."""
    return [p for p in self.profile.visible if p.id not in self.revealed and p.id not in exclude
            and p.category in ("chief_complaint", "symptom", "history", "review_of_systems")]

  def probe(self, question: str) -> str:
    """"diagnosis" / "result" when the doctor asks the patient for a hidden item."""
    if _DX_PROBE_RE.search(question):
      return "diagnosis"
    if _RESULT_PROBE_RE.search(question):
      return "result"
    return ""

  def measurement(self, request: str) -> tuple[str, list[ProfileFact]] | None:
    """("exam" | "test", findings) when the turn requests an examination or test."""
    if self.probe(request) and not _ORDER_RE.search(request):
      return None   # "what did the exam show?" asks the patient; it orders nothing
    if _TEST_RE.search(request) and not _DX_PROBE_RE.search(request):
      kind, facts, index = "test", self.profile.test, self._test_index
    elif _EXAM_RE.search(request):
      kind, facts, index = "exam", self.profile.exam, self._exam_index
    else:
      return None
    if not facts:
      return kind, []
    scores = index.scores(text.terms(request))
    if scores.max() <= 0:
      # A generic request ("let me examine you") gets every finding of that kind;
      # an unnamed test gets none (the doctor must say which).
      hits = list(facts) if kind == "exam" else []
    else:
      cut = 0.5 * scores.max()
      hits = [facts[i] for i in range(len(facts)) if scores[i] >= cut]
    for h in hits:
      self.unlocked.add(h.id)
    self._refresh_support()
    return kind, hits

  def mark_revealed(self, fact_ids: Sequence[str]):
    self.revealed.update(i for i in fact_ids if any(p.id == i for p in self.profile.visible))

  # ---------------------------------------------------------------- checking

  def _refresh_support(self):
    allowed = self.profile.visible + [p for p in self.profile.hidden if p.id in self.unlocked]
    self.support_terms = set().union(*(p.terms for p in allowed)) if allowed else set()
    # Terms the profile asserts / denies somewhere (a case may do both: "yellow
    # discharge" in one fact, "no discharge" from the other eye in another).
    self.support_pos = {t for p in allowed for t, pos in p.polar.items() if pos}
    self.support_neg = set().union(*(text.negated_terms(p.text) for p in allowed)) \
        if allowed else set()
    self.support_numbers = set().union(*(text.numbers(p.statement) for p in allowed)) \
        if allowed else set()
    if self.profile.case.age is not None:
      self.support_numbers.add(str(self.profile.case.age))
    locked = [p for p in self.profile.hidden if p.id not in self.unlocked]
    self.locked_distinctive = []
    for p in locked:
      terms = p.terms - self.support_terms - _GENERIC_HIDDEN - lexicon.EVERYDAY_WORDS
      nums = {n for n in text.numbers(p.statement) - self.support_numbers
              if len(n) >= 2 or "." in n}
      self.locked_distinctive.append((p, terms, nums))

  def check(self, reply: str, template_terms: frozenset[str] = frozenset()) -> CheckResult:
    """Whether a reply states only what the profile supports and reveals nothing locked."""
    reasons = []
    rterms = text.term_set(reply)
    rnums = text.numbers(reply)
    for p, distinct, nums in self.locked_distinctive:
      if p.category == "diagnosis":
        hit = distinct & rterms
        if hit or (p.text.lower() in reply.lower()):
          reasons.append(f"leak:diagnosis:{','.join(sorted(hit))}")
        continue
      hit_nums = nums & rnums
      hit_terms = distinct & rterms - self.dialogue_terms
      if hit_nums or (distinct and len(hit_terms) >= max(2, 0.5 * len(distinct))):
        reasons.append(f"leak:{p.category}:{p.id}")
    polar = text.polar_terms(reply)
    for t, asserted in polar.items():
      # Persona feelings ("I'm worried") are not symptoms.
      if t not in lexicon.SYMPTOM_TERMS or t in template_terms:
        continue
      if asserted and t not in self.support_terms:
        reasons.append(f"invented:{t}")
      elif asserted and t in self.support_neg and t not in self.support_pos:
        reasons.append(f"contradiction:{t}")
      elif not asserted and t in self.support_pos and t not in self.support_neg:
        reasons.append(f"contradiction:not-{t}")
    extra_nums = rnums - self.support_numbers - self.dialogue_numbers - _EVERYDAY_NUMBERS
    if extra_nums:
      reasons.append(f"invented-number:{','.join(sorted(extra_nums)[:3])}")
    content = [t for t in rterms if not t.isdigit()]
    known = self.support_terms | self.dialogue_terms | lexicon.EVERYDAY_WORDS | template_terms
    unsupported = [t for t in content if t not in known]
    if not text.words(reply):
      reasons.append("empty")
    elif content and len(unsupported) / len(content) > 0.5 and (
        len(content) >= 3 or len(unsupported) == len(content)):
      reasons.append(f"ungrounded:{len(unsupported)}/{len(content)}")
    return CheckResult(not reasons, reasons)
