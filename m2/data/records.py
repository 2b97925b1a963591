"""Typed, validated records: the one shape every data source is turned into.

Four record types cover the shipped sources (see `m2.data.loaders`):

- `PatientCase`: a clinical case as a list of atomic `Fact`s with stable ids and
  categories. A patient simulator reveals facts one at a time; `hidden` facts
  (exam findings, test results, diagnosis, plan) are what the doctor must ask
  or order for and the simulator must never volunteer.
- `Dialogue`: doctor-patient turns with an optional clinical note.
- `QAItem`: a question with options, a gold answer and context.
- `HealthBenchExample`: prompt messages plus signed rubric items. Evaluation
  only: `EVAL_ONLY` is true and the de-identification gate refuses it for
  training or simulator use.

Records are frozen dataclasses that validate themselves in `__post_init__`
(a bad record fails where it is built, with its id). Each type also knows how
to become what a pipeline needs: `to_document()` for LM text,
`Dialogue.to_messages()` for SFT chats, `QAItem.prompt()` / `.answer` for RL.
`to_dict` / `from_dict` round-trip any record through JSON-able dicts.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping, Sequence

# Fact categories, in the order a case is usually told.
FACT_CATEGORIES = (
    "demographics", "chief_complaint", "history", "symptom", "past_history",
    "medication", "family_history", "social_history", "review_of_systems",
    "physical_exam", "test_result", "diagnosis", "plan", "other")
# What the patient does not know or must not volunteer: the doctor has to
# examine, order tests or reason to get these.
HIDDEN_CATEGORIES = frozenset({"physical_exam", "test_result", "diagnosis", "plan"})

# Dialogue speaker roles. `companion` is a family member or friend speaking for
# or with the patient; `clinician` is another clinician in the room.
DIALOGUE_ROLES = ("doctor", "patient", "companion", "clinician")
# Message roles for chats; other lower-case roles (e.g. "measurement", "tool")
# are allowed and are never trained on.
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ID_RE = re.compile(r"^[\w.:\-/+]+$")


class RecordValidationError(ValueError):
  """A record violates its schema; the message names the record id."""


def _check(cond: bool, record_id: str, msg: str):
  if not cond:
    raise RecordValidationError(f"record {record_id!r}: {msg}")


def _check_id(record_id):
  if not isinstance(record_id, str) or not _ID_RE.match(record_id):
    raise RecordValidationError(f"record id must be a non-empty string of "
                                f"[A-Za-z0-9_.:-/+], got {record_id!r}")


def _check_str(value, record_id: str, name: str, *, empty: bool = True):
  _check(isinstance(value, str), record_id, f"{name} must be a string, got {type(value).__name__}")
  if not empty:
    _check(bool(value.strip()), record_id, f"{name} is empty")


def _check_strs(values, record_id: str, name: str):
  _check(isinstance(values, tuple), record_id, f"{name} must be a tuple")
  for i, v in enumerate(values):
    _check_str(v, record_id, f"{name}[{i}]")


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat message. `role` is "system", "user", "assistant" or any other
  lower-case name (e.g. "measurement" for exam/test results a simulator returns)."""
  role: str
  content: str

  def __post_init__(self):
    if not isinstance(self.role, str) or not _ROLE_RE.match(self.role):
      raise RecordValidationError(f"message role must be a lower-case name, got {self.role!r}")
    if not isinstance(self.content, str):
      raise RecordValidationError(f"message content must be a string, got "
                                  f"{type(self.content).__name__}")

  def to_dict(self) -> dict:
    return {"role": self.role, "content": self.content}


# ---------------------------------------------------------------- PatientCase


@dataclasses.dataclass(frozen=True)
class Fact:
  """One atomic, addressable fact of a case.

  Attributes:
    id: stable within its case (e.g. "exam.vital_signs.blood_pressure", "fact.07").
    category: one of FACT_CATEGORIES.
    text: the fact itself ("125/80 mmHg", "Patient complains of fever.").
    label: what the text is about, when the text alone does not say
      ("Vital signs / Blood pressure"); empty when the text is a sentence.
  """
  id: str
  category: str
  text: str
  label: str = ""

  @property
  def hidden(self) -> bool:
    return self.category in HIDDEN_CATEGORIES

  @property
  def statement(self) -> str:
    """The fact as one line a simulator can say or a document can show."""
    return f"{self.label}: {self.text}" if self.label else self.text


@dataclasses.dataclass(frozen=True)
class PatientCase:
  """A clinical case for the patient simulator and rubric generator.

  `facts` is the single source of truth; the section properties
  (`chief_complaint`, `hpi`, `symptoms`, ...) are views over it.
  `age` is in whole years (0 for infants); after the de-identification gate,
  90 stands for "90 or older" (HIPAA safe harbor).
  """
  EVAL_ONLY: ClassVar[bool] = False
  id: str
  source: str
  facts: tuple[Fact, ...]
  objective: str = ""        # what the doctor is asked to do, if the source says
  age: int | None = None
  sex: str = ""              # "female", "male" or "" when unknown
  split: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    _check_id(self.id)
    _check_str(self.source, self.id, "source", empty=False)
    _check(isinstance(self.facts, tuple) and self.facts, self.id, "facts must be a non-empty tuple")
    seen = set()
    for f in self.facts:
      _check(isinstance(f, Fact), self.id, f"facts must be Fact, got {type(f).__name__}")
      _check_str(f.id, self.id, "fact id", empty=False)
      _check(f.id not in seen, self.id, f"duplicate fact id {f.id!r}")
      seen.add(f.id)
      _check(f.category in FACT_CATEGORIES, self.id,
             f"fact {f.id!r}: unknown category {f.category!r}")
      _check_str(f.text, self.id, f"fact {f.id!r} text", empty=False)
      _check_str(f.label, self.id, f"fact {f.id!r} label")
    _check_str(self.objective, self.id, "objective")
    _check(self.age is None or (isinstance(self.age, int) and not isinstance(self.age, bool)
                                and 0 <= self.age <= 150), self.id, f"bad age {self.age!r}")
    _check(self.sex in ("", "female", "male"), self.id, f"bad sex {self.sex!r}")
    _check_str(self.split, self.id, "split")

  def fact(self, fact_id: str) -> Fact:
    for f in self.facts:
      if f.id == fact_id:
        return f
    raise KeyError(f"case {self.id!r} has no fact {fact_id!r}")

  def facts_in(self, *categories: str) -> tuple[Fact, ...]:
    unknown = set(categories) - set(FACT_CATEGORIES)
    if unknown:
      raise ValueError(f"unknown fact categories {sorted(unknown)}")
    return tuple(f for f in self.facts if f.category in categories)

  @property
  def visible_facts(self) -> tuple[Fact, ...]:
    """What the patient knows and may tell when asked."""
    return tuple(f for f in self.facts if not f.hidden)

  @property
  def hidden_facts(self) -> tuple[Fact, ...]:
    return tuple(f for f in self.facts if f.hidden)

  def _join(self, *categories) -> str:
    return " ".join(f.statement for f in self.facts_in(*categories))

  demographics = property(lambda self: self._join("demographics"))
  chief_complaint = property(lambda self: self._join("chief_complaint"))
  hpi = property(lambda self: self._join("history"), doc="History of present illness.")
  symptoms = property(lambda self: tuple(f.text for f in self.facts_in("chief_complaint", "symptom")))
  past_history = property(lambda self: self._join("past_history", "medication", "family_history"))
  social_history = property(lambda self: self._join("social_history"))
  review_of_systems = property(lambda self: self._join("review_of_systems"))
  physical_exam = property(lambda self: self.facts_in("physical_exam"))
  test_results = property(lambda self: self.facts_in("test_result"))
  diagnosis = property(lambda self: self._join("diagnosis"))

  def to_document(self) -> str:
    """The case as plain text, section by section (for LM mid-training)."""
    titles = {"demographics": "Patient", "chief_complaint": "Chief complaint",
              "history": "History of present illness", "symptom": "Symptoms",
              "past_history": "Past history", "medication": "Medications",
              "family_history": "Family history", "social_history": "Social history",
              "review_of_systems": "Review of systems", "physical_exam": "Physical examination",
              "test_result": "Test results", "diagnosis": "Diagnosis", "plan": "Plan",
              "other": "Other"}
    parts = [f"Task: {self.objective}"] if self.objective else []
    for cat in FACT_CATEGORIES:
      facts = self.facts_in(cat)
      if facts:
        parts.append(f"{titles[cat]}:\n" + "\n".join(f"- {f.statement}" for f in facts))
    return "\n\n".join(parts)


# ------------------------------------------------------------------- Dialogue


@dataclasses.dataclass(frozen=True)
class Turn:
  """One speaker turn. `role` is one of DIALOGUE_ROLES; `speaker` keeps the
  source's own label (e.g. "Guest_family_2", "patient_guest")."""
  role: str
  text: str
  speaker: str = ""


@dataclasses.dataclass(frozen=True)
class Dialogue:
  """A doctor-patient conversation, with the clinical note written from it if any."""
  EVAL_ONLY: ClassVar[bool] = False
  id: str
  source: str
  turns: tuple[Turn, ...]
  note: str = ""
  language: str = "en"
  split: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    _check_id(self.id)
    _check_str(self.source, self.id, "source", empty=False)
    _check(isinstance(self.turns, tuple) and self.turns, self.id, "turns must be a non-empty tuple")
    for i, t in enumerate(self.turns):
      _check(isinstance(t, Turn), self.id, f"turn {i} must be Turn, got {type(t).__name__}")
      _check(t.role in DIALOGUE_ROLES, self.id, f"turn {i}: unknown role {t.role!r}")
      _check_str(t.text, self.id, f"turn {i} text", empty=False)
      _check_str(t.speaker, self.id, f"turn {i} speaker")
    _check_str(self.note, self.id, "note")
    _check(self.language in ("en", "zh"), self.id, f"bad language {self.language!r}")
    _check_str(self.split, self.id, "split")

  def to_messages(self, system: str | None = None, doctor_role: str = "assistant"
                  ) -> list[Message]:
    """Chat messages with the doctor as `doctor_role` and everyone else as user.

    Consecutive turns on the same side are merged (chat templates expect
    alternation); a companion or second clinician is named in the text so the
    model can tell who spoke.
    """
    other = "user" if doctor_role == "assistant" else "assistant"
    prefix = {"companion": "Companion: ", "clinician": "Clinician: "}
    msgs: list[Message] = [Message("system", system)] if system else []
    for t in self.turns:
      role = doctor_role if t.role == "doctor" else other
      text = prefix.get(t.role, "") + t.text
      if msgs and msgs[-1].role == role:
        msgs[-1] = Message(role, msgs[-1].content + "\n" + text)
      else:
        msgs.append(Message(role, text))
    return msgs

  def to_document(self) -> str:
    names = {"doctor": "Doctor", "patient": "Patient", "companion": "Companion",
             "clinician": "Clinician"}
    if self.language == "zh":
      names = {"doctor": "医生", "patient": "患者", "companion": "家属", "clinician": "医护"}
    text = "\n".join(f"{names[t.role]}: {t.text}" for t in self.turns)
    return f"{text}\n\n{'病历' if self.language == 'zh' else 'Note'}:\n{self.note}" if self.note else text


# --------------------------------------------------------------------- QAItem


@dataclasses.dataclass(frozen=True)
class QAItem:
  """A question with a rule-verifiable gold answer.

  Attributes:
    options: (label, text) pairs, e.g. (("A", "Gentamicin"), ...) or
      (("yes", "yes"), ("no", "no"), ("maybe", "maybe")); empty for open questions.
    answer: the gold option label (or the free-text answer when there are no options).
    context: passages the question is asked about (vignette sentences, abstract sections).
  """
  EVAL_ONLY: ClassVar[bool] = False
  id: str
  source: str
  question: str
  answer: str
  options: tuple[tuple[str, str], ...] = ()
  context: tuple[str, ...] = ()
  explanation: str = ""
  split: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    _check_id(self.id)
    _check_str(self.source, self.id, "source", empty=False)
    _check_str(self.question, self.id, "question", empty=False)
    _check_str(self.answer, self.id, "answer", empty=False)
    _check(isinstance(self.options, tuple), self.id, "options must be a tuple")
    labels = []
    for o in self.options:
      _check(isinstance(o, tuple) and len(o) == 2, self.id, f"option {o!r} is not a (label, text) pair")
      _check_str(o[0], self.id, "option label", empty=False)
      _check_str(o[1], self.id, f"option {o[0]!r} text", empty=False)
      labels.append(o[0])
    _check(len(set(labels)) == len(labels), self.id, f"duplicate option labels {labels}")
    _check(not labels or self.answer in labels, self.id,
           f"answer {self.answer!r} is not an option label {labels}")
    _check_strs(self.context, self.id, "context")
    _check_str(self.explanation, self.id, "explanation")
    _check_str(self.split, self.id, "split")

  @property
  def answer_text(self) -> str:
    return dict(self.options).get(self.answer, self.answer)

  def prompt(self) -> str:
    """The question as a user prompt: context, question, then the options."""
    parts = ["\n".join(self.context)] if self.context else []
    parts.append(self.question)
    labels = [label for label, _ in self.options]
    if self.options and all(label == text for label, text in self.options):
      parts.append("Answer with one of: " + ", ".join(labels) + ".")
    elif self.options:
      parts.append("\n".join(f"{label}. {text}" for label, text in self.options))
      parts.append("Answer with the letter of the correct option.")
    return "\n\n".join(parts)

  def to_document(self) -> str:
    text = f"{self.prompt()}\n\nAnswer: {self.answer}"
    if self.answer_text != self.answer:
      text += f". {self.answer_text}"
    return text + (f"\n\n{self.explanation}" if self.explanation else "")


# -------------------------------------------------------------- HealthBench


@dataclasses.dataclass(frozen=True)
class RubricItem:
  """One HealthBench criterion: signed points, tags like "axis:accuracy",
  "level:example" / "level:cluster", "cluster:..."."""
  criterion: str
  points: int
  tags: tuple[str, ...] = ()

  def tag(self, prefix: str) -> str:
    """The value of the first "prefix:value" tag, or ""."""
    for t in self.tags:
      if t.startswith(prefix + ":"):
        return t[len(prefix) + 1:]
    return ""

  axis = property(lambda self: self.tag("axis"))
  level = property(lambda self: self.tag("level"))


@dataclasses.dataclass(frozen=True)
class HealthBenchExample:
  """A HealthBench conversation with its rubric. Evaluation only."""
  EVAL_ONLY: ClassVar[bool] = True
  id: str
  source: str
  messages: tuple[Message, ...]
  rubrics: tuple[RubricItem, ...]
  tags: tuple[str, ...] = ()
  ideal_completion: str = ""
  canary: str = ""
  split: str = "eval"
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    _check_id(self.id)
    _check_str(self.source, self.id, "source", empty=False)
    _check(isinstance(self.messages, tuple) and self.messages, self.id, "no prompt messages")
    for m in self.messages:
      _check(isinstance(m, Message), self.id, "messages must be Message")
    _check(self.messages[-1].role == "user", self.id, "the last prompt message must be the user's")
    _check(isinstance(self.rubrics, tuple) and self.rubrics, self.id, "no rubric items")
    for r in self.rubrics:
      _check(isinstance(r, RubricItem), self.id, "rubrics must be RubricItem")
      _check_str(r.criterion, self.id, "criterion", empty=False)
      _check(isinstance(r.points, int) and not isinstance(r.points, bool), self.id,
             f"rubric points must be an int, got {r.points!r}")
      _check_strs(r.tags, self.id, "rubric tags")
    _check(any(r.points > 0 for r in self.rubrics), self.id, "no rubric item has positive points")
    _check_strs(self.tags, self.id, "tags")
    _check_str(self.ideal_completion, self.id, "ideal_completion")

  @property
  def theme(self) -> str:
    return next((t[len("theme:"):] for t in self.tags if t.startswith("theme:")), "")

  @property
  def max_points(self) -> int:
    """The score's denominator: the sum of positive points."""
    return sum(r.points for r in self.rubrics if r.points > 0)


RECORD_TYPES = {c.__name__: c for c in (PatientCase, Dialogue, QAItem, HealthBenchExample)}
_NESTED = {"facts": Fact, "turns": Turn, "messages": Message, "rubrics": RubricItem}


def to_dict(record) -> dict:
  """A JSON-able dict with a "kind" key; `from_dict` inverts it."""
  d = dataclasses.asdict(record)
  d["meta"] = dict(record.meta)
  return {"kind": type(record).__name__, **d}


def from_dict(d: Mapping[str, Any]):
  d = dict(d)
  cls = RECORD_TYPES[d.pop("kind")]
  for name, sub in _NESTED.items():
    if name in d:
      d[name] = tuple(sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in x.items()})
                      for x in d[name])
  for name in ("context", "tags"):
    if name in d:
      d[name] = tuple(d[name])
  if "options" in d:
    d["options"] = tuple(tuple(o) for o in d["options"])
  return cls(**d)


def to_document(record) -> str:
  """LM text for a trainable record; refuses evaluation-only records."""
  if record.EVAL_ONLY:
    raise ValueError(f"{type(record).__name__} {record.id!r} is evaluation-only; "
                     f"it must not become training text")
  return record.to_document()


def documents(records: Sequence) -> list[str]:
  return [to_document(r) for r in records]
