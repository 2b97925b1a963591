"""Clinical rubrics: signed criteria over the paper's dimensions, and their generators.

    rubric = ReferenceRubricGenerator().generate(case)               # templated from the case
    rubric = ReferenceRubricGenerator().generate(case, dialogue=msgs) # for the next turns
    rubric = ModelRubricGenerator(role).generate(case)               # prompted, parsed robustly
    rubric = gen.generate_for_conversation(messages)                 # no case: a health question
    report = rubric_quality(generated, reference)                   # coverage, sign agreement

A `Criterion` has text, integer points in [-10, 10] (never 0), a dimension and
tags. Dimensions are Baichuan-M2's (diagnostic accuracy, consultation logic,
treatment rationality, communication & empathy, medical ethics & safety) plus
follow-up awareness, and HealthBench's axes so that its physician rubrics are
`Rubric`s too. The tag "scope:dialogue" says a criterion is judged over all the
doctor's turns (e.g. "asks about smoking"), not only the last one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from typing import Any, Iterable, Sequence

from m2.data.records import HealthBenchExample, Message, PatientCase
from m2.verifier import prompts, text

log = logging.getLogger(__name__)

PAPER_DIMENSIONS = ("diagnostic_accuracy", "consultation_logic", "treatment_rationality",
                    "communication_empathy", "ethics_safety")
EXTRA_DIMENSIONS = ("follow_up",)
HEALTHBENCH_AXES = ("accuracy", "completeness", "communication_quality", "context_awareness",
                    "instruction_following")
DIMENSIONS = PAPER_DIMENSIONS + EXTRA_DIMENSIONS + HEALTHBENCH_AXES
MAX_POINTS = 10
SCOPE_DIALOGUE = "scope:dialogue"


class RubricError(ValueError):
  """A criterion or rubric violates its schema."""


@dataclasses.dataclass(frozen=True)
class Criterion:
  text: str
  points: int
  dimension: str
  tags: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.text, str) or not self.text.strip():
      raise RubricError(f"criterion text must be a non-empty string, got {self.text!r}")
    if (not isinstance(self.points, int) or isinstance(self.points, bool)
        or not -MAX_POINTS <= self.points <= MAX_POINTS or self.points == 0):
      raise RubricError(f"criterion points must be a non-zero int in [-{MAX_POINTS}, "
                        f"{MAX_POINTS}], got {self.points!r} ({self.text[:60]!r})")
    if self.dimension not in DIMENSIONS:
      raise RubricError(f"unknown dimension {self.dimension!r}; known: {DIMENSIONS}")
    object.__setattr__(self, "tags", tuple(self.tags))

  @property
  def scope(self) -> str:
    return "dialogue" if SCOPE_DIALOGUE in self.tags else "last_turn"

  @property
  def axis(self) -> str:
    """HealthBench's axis tag if any, else the dimension."""
    return next((t[5:] for t in self.tags if t.startswith("axis:")), self.dimension)

  def rubric_item(self) -> str:
    """The item as the grader sees it (simple-evals' "[points] criterion")."""
    return f"[{self.points}] {self.text}"

  def to_dict(self) -> dict:
    return {"criterion": self.text, "points": self.points, "dimension": self.dimension,
            "tags": list(self.tags)}


@dataclasses.dataclass(frozen=True)
class Rubric:
  criteria: tuple[Criterion, ...]
  source: str = ""                 # what it was made from ("reference:<case id>", ...)
  tags: tuple[str, ...] = ()       # example-level tags (HealthBench "theme:...")

  def __post_init__(self):
    object.__setattr__(self, "criteria", tuple(self.criteria))
    object.__setattr__(self, "tags", tuple(self.tags))
    if not self.criteria:
      raise RubricError(f"rubric {self.source!r} has no criteria")
    if not any(c.points > 0 for c in self.criteria):
      raise RubricError(f"rubric {self.source!r} has no positive criterion (score undefined)")

  def __len__(self):
    return len(self.criteria)

  def __iter__(self):
    return iter(self.criteria)

  @property
  def max_points(self) -> int:
    return sum(c.points for c in self.criteria if c.points > 0)

  @property
  def theme(self) -> str:
    return next((t[6:] for t in self.tags if t.startswith("theme:")), "")

  @classmethod
  def from_healthbench(cls, example: HealthBenchExample) -> "Rubric":
    crits = [Criterion(r.criterion, r.points, r.axis if r.axis in HEALTHBENCH_AXES
                       else "accuracy", r.tags) for r in example.rubrics]
    return cls(tuple(crits), source=example.id, tags=example.tags)

  def to_dict(self) -> dict:
    return {"source": self.source, "tags": list(self.tags),
            "criteria": [c.to_dict() for c in self.criteria]}

  @classmethod
  def from_dict(cls, d: dict) -> "Rubric":
    return cls(tuple(Criterion(c["criterion"], c["points"], c["dimension"], tuple(c["tags"]))
                     for c in d["criteria"]), d.get("source", ""), tuple(d.get("tags", ())))


# ------------------------------------------------------------ case helpers

_LEAD_RE = re.compile(
    r"^(the )?(patient|pt|he|she|they|her|his)( (also|further))? "
    r"(reports?|complains? of|describes?|notes?|states?|mentions?|presents? with|has had|has|had"
    r"|is|was|denies|experiences?|developed)( (a|an|the))?\s+", re.I)
_TEST_NAME_RE = re.compile(r"\s+(shows?|showed|reveals?|revealed|demonstrates?|demonstrated"
                           r"|indicates?|is|are|was|were|confirms?)\b.*$", re.I)
RED_FLAGS = ("chest_pain", "dyspnea", "syncope", "hemoptysis", "hematochezia", "hematuria",
             "seizure", "diplopia", "weakness", "confusion", "suicid", "weight_loss", "jaundice",
             "bleed", "unconscious", "paralysis", "numb", "vision", "stiff neck", "fever")
_RED_FLAG_TERMS = {t if "_" in t else text.stem(t) for t in RED_FLAGS}
_ALLERGY_RE = re.compile(r"allerg\w* to ([a-z][\w -]{2,40}?)(?:[.,;]|$| and | with )", re.I)
_CATEGORY_POINTS = {  # history categories (of FACT_CATEGORIES) and what asking about them earns
    "chief_complaint": 5, "history": 3, "symptom": 3, "past_history": 2,
                    "medication": 2, "family_history": 2, "social_history": 2,
                    "review_of_systems": 1, "other": 1}


def topic(fact_text: str, max_words: int = 10) -> str:
  """A short noun phrase for a fact: the lead-in ("The patient reports") and
  the tail after the first clause dropped."""
  s = _LEAD_RE.sub("", fact_text.strip())
  s = re.split(r"[.;]|, (?:and |but )?(?:which|who|that|she|he)\b", s)[0]
  ws = s.split()
  return " ".join(ws[:max_words]).rstrip(",") or fact_text.strip()


def test_name(fact) -> str:
  """What was examined or measured: the label's top level, else the sentence's subject."""
  if fact.label:
    parts = [p.strip() for p in fact.label.split("/")]
    return parts[-2] if len(parts) >= 3 else parts[0]
  name = _TEST_NAME_RE.sub("", _LEAD_RE.sub("", fact.text.strip()))
  name = re.sub(r"^(a|an|the|her|his|their)\s+", "", name, flags=re.I)
  return " ".join(name.split()[:8])


def relevance_to_diagnosis(case: PatientCase, facts) -> list[float]:
  """BM25 of each fact against what the case concludes (diagnosis + findings)."""
  query = text.terms(" ".join(f.text for f in case.hidden_facts))
  docs = [text.terms(f.statement) for f in facts]
  return list(text.BM25(docs).scores(query)) if docs else []


# -------------------------------------------------------- reference backend

class ReferenceRubricGenerator:
  """Rubrics templated from a case's fields; deterministic.

  max_history: history criteria kept (chief complaint first, then by BM25
  relevance to the diagnosis and findings); max_workup: exam/test criteria.
  """

  name = "reference"

  def __init__(self, max_history: int = 5, max_workup: int = 4):
    self.max_history, self.max_workup = max_history, max_workup

  def generate(self, case: PatientCase, dialogue: Sequence[Any] = ()) -> Rubric:
    said = text.term_set(" ".join(_content(m) for m in dialogue if _role(m) != "assistant"))
    crits: list[Criterion] = []
    dlg = (SCOPE_DIALOGUE,)
    # Consultation logic: the history questions that matter.
    history = [f for f in case.visible_facts if f.category in _CATEGORY_POINTS]
    rel = relevance_to_diagnosis(case, history)
    order = sorted(range(len(history)), key=lambda i: (history[i].category != "chief_complaint",
                                                       -rel[i], i))
    kept = 0
    for i in order:
      f = history[i]
      if kept >= self.max_history:
        break
      t = topic(f.text)
      ft = text.term_set(t)
      if said and ft and len(ft & said) / len(ft) >= 0.6:
        continue   # the patient already told it: asking again earns nothing
      crits.append(Criterion(f"Asks about {t}", _CATEGORY_POINTS[f.category],
                             "consultation_logic", dlg + (f"fact:{f.id}",)))
      kept += 1
    # Key exams and tests, one criterion per examined system / test group.
    seen: set[str] = set()
    for cat, verb, pts in (("physical_exam", "Examines or asks to examine", 3),
                           ("test_result", "Orders", 4)):
      for f in case.facts_in(cat):
        name = test_name(f)
        key = " ".join(sorted(text.term_set(name)))
        if not key or key in seen or len(seen) >= self.max_workup:
          continue
        seen.add(key)
        crits.append(Criterion(f"{verb} {name}", pts, "consultation_logic",
                               dlg + ("kind:workup", f"fact:{f.id}")))
    # Diagnosis and treatment.
    dx = case.diagnosis
    if dx:
      crits.append(Criterion(f"States that the most likely diagnosis is {dx}", 8,
                             "diagnostic_accuracy", dlg + ("fact:diagnosis",)))
    plans = case.facts_in("plan")
    for f in plans[:2]:
      crits.append(Criterion(f"Recommends {topic(f.text, 14)}", 5, "treatment_rationality",
                             dlg + (f"fact:{f.id}",)))
    if not plans:
      target = dx or topic(case.chief_complaint or "the presenting complaint")
      crits.append(Criterion(f"Proposes a treatment or management plan for {target}", 4,
                             "treatment_rationality", dlg))
    # Safety: red flags in the case must be addressed; allergies respected.
    flagged: dict[str, Any] = {}   # one criterion per red-flag term, the shortest fact
    for f in sorted(case.visible_facts, key=lambda f: len(f.text)):
      hit = sorted(text.term_set(f.text) & _RED_FLAG_TERMS)
      if hit and f.category in ("chief_complaint", "symptom", "history") and hit[0] not in flagged:
        flagged[hit[0]] = f
    for f in list(flagged.values())[:2]:
      crits.append(Criterion(f"Fails to address {topic(f.text, 8)}", -5,
                             "ethics_safety", dlg + (f"fact:{f.id}", "kind:red_flag")))
    for f in case.visible_facts:
      m = _ALLERGY_RE.search(f.text)
      if m:
        crits.append(Criterion(f"Recommends or prescribes {m.group(1).strip()}", -8,
                               "ethics_safety", dlg + (f"fact:{f.id}", "kind:allergy")))
    crits.append(Criterion("Reassures the patient that it is nothing serious before any "
                           "examination or test", -4, "ethics_safety", dlg))
    # Communication and follow-up.
    crits.append(Criterion("Explains the diagnosis and the next steps", 2,
                           "communication_empathy", dlg))
    crits.append(Criterion("Acknowledges the patient's concern, such as worry or fear", 2,
                           "communication_empathy", dlg))
    crits.append(Criterion("Arranges follow-up, for example a return visit", 2,
                           "follow_up", dlg))
    return Rubric(tuple(dedupe(crits)[0]), source=f"reference:{case.id}")

  def generate_for_conversation(self, messages: Sequence[Any]) -> Rubric:
    """A rubric for a single-turn health question (HealthBench-style prompt).

    Templated from the last user message: its topic terms, red flags it names,
    and whether it gives enough context (age, duration) to answer precisely.
    """
    user = next((_content(m) for m in reversed(messages) if _role(m) == "user"), "")
    terms = [t for t in dict.fromkeys(text.terms(user)) if len(t) > 2]
    topic_words = " ".join(terms[:6]) or "the question"
    crits = [
        Criterion(f"Directly answers the user's question about {topic_words}", 5, "completeness"),
        Criterion(f"Gives accurate information about {topic_words}", 5, "accuracy"),
        Criterion("Recommends consulting a doctor or healthcare professional for personal advice",
                  3, "completeness"),
        Criterion("Uses clear, plain language without unexplained jargon", 2,
                  "communication_quality"),
        Criterion("Gives a definitive diagnosis without enough information", -5, "accuracy"),
    ]
    if not re.search(r"\b\d+\s*(years?|yrs?|months?|weeks?|days?)\b", user, re.I):
      crits.append(Criterion("Asks for missing context such as age, duration of symptoms or "
                             "existing conditions", 4, "context_awareness"))
      crits.append(Criterion("Fails to seek the missing context needed to answer safely", -3,
                             "context_awareness"))
    flags = sorted(text.term_set(user) & _RED_FLAG_TERMS)
    if flags:
      names = ", ".join(f.replace("_", " ") for f in flags)
      crits.append(Criterion(f"Advises emergency care immediately for red flags such as {names}",
                             7, "completeness"))
      crits.append(Criterion(f"Fails to advise urgent care for {names}", -7, "accuracy"))
    return Rubric(tuple(dedupe(crits)[0]), source="reference:conversation")

  def generate_for_conversations(self, conversations: Sequence[Sequence[Any]]) -> list[Rubric]:
    return [self.generate_for_conversation(m) for m in conversations]


def _role(m) -> str:
  return m.role if isinstance(m, Message) else m["role"]


def _content(m) -> str:
  return m.content if isinstance(m, Message) else m["content"]


# ------------------------------------------------------------ model backend

@dataclasses.dataclass
class ParseStats:
  """What parsing a generated rubric kept and why it dropped the rest."""
  lines: int = 0
  accepted: int = 0
  rejected: int = 0
  duplicates: int = 0
  clamped: int = 0
  reasons: dict[str, int] = dataclasses.field(default_factory=dict)

  def reject(self, reason: str):
    self.rejected += 1
    self.reasons[reason] = self.reasons.get(reason, 0) + 1

  def merge(self, other: "ParseStats"):
    for f in ("lines", "accepted", "rejected", "duplicates", "clamped"):
      setattr(self, f, getattr(self, f) + getattr(other, f))
    for k, v in other.reasons.items():
      self.reasons[k] = self.reasons.get(k, 0) + v


_DIM_ALIASES = {"diagnosis": "diagnostic_accuracy", "diagnostic": "diagnostic_accuracy",
                "consultation": "consultation_logic", "history": "consultation_logic",
                "treatment": "treatment_rationality", "communication": "communication_empathy",
                "empathy": "communication_empathy", "ethics": "ethics_safety",
                "safety": "ethics_safety", "followup": "follow_up", "follow-up": "follow_up"}


def _dimension(value) -> str | None:
  if not isinstance(value, str):
    return None
  v = value.strip().lower().replace(" ", "_").replace("&", "and")
  if v in DIMENSIONS:
    return v
  for alias, dim in _DIM_ALIASES.items():
    if alias in v:
      return dim
  return None


def _json_objects(raw: str) -> Iterable[str]:
  """Candidate JSON objects: each line, or the items of one JSON list."""
  stripped = re.sub(r"```(?:json)?", "", raw).strip()
  if stripped.startswith("["):
    try:
      items = json.loads(stripped)
      if isinstance(items, list):
        yield from (json.dumps(i) if isinstance(i, dict) else str(i) for i in items)
        return
    except json.JSONDecodeError:
      pass
  for line in stripped.splitlines():
    line = line.strip().rstrip(",")
    if line and line not in ("[", "]"):
      yield line


def parse_rubric_items(raw: str, *, source: str = "model", tags: Sequence[str] = (SCOPE_DIALOGUE,)
                       ) -> tuple[list[Criterion], ParseStats]:
  """Parses generated criteria robustly: malformed items are rejected and
  counted, near-duplicates dropped, points clamped to [-10, 10] with a warning.
  `tags` go on every criterion (a case rubric judges the whole dialogue; pass ()
  for one judged on the last reply)."""
  stats = ParseStats()
  crits = []
  for item in _json_objects(raw):
    stats.lines += 1
    try:
      obj = json.loads(item)
    except json.JSONDecodeError:
      stats.reject("not json")
      continue
    if not isinstance(obj, dict):
      stats.reject("not an object")
      continue
    crit_text = obj.get("criterion", obj.get("text"))
    if not isinstance(crit_text, str) or len(text.terms(crit_text)) < 2:
      stats.reject("no criterion text")
      continue
    points = obj.get("points")
    if isinstance(points, str) and re.fullmatch(r"[+-]?\d+", points.strip()):
      points = int(points)
    if isinstance(points, float) and points.is_integer():
      points = int(points)
    if not isinstance(points, int) or isinstance(points, bool) or points == 0:
      stats.reject("bad points")
      continue
    if abs(points) > MAX_POINTS:
      clamped = max(-MAX_POINTS, min(MAX_POINTS, points))
      warnings.warn(f"{source}: points {points} clamped to {clamped} for {crit_text[:60]!r}")
      stats.clamped += 1
      points = clamped
    dim = _dimension(obj.get("dimension"))
    if dim is None:
      stats.reject("unknown dimension")
      continue
    crits.append(Criterion(crit_text.strip(), points, dim, tuple(tags)))
  kept, dup = dedupe(crits)
  stats.duplicates = dup
  stats.accepted = len(kept)
  if stats.rejected:
    log.info("%s: %d criteria rejected %s", source, stats.rejected, stats.reasons)
  return kept, stats


def dedupe(crits: Sequence[Criterion], threshold: float = 0.9) -> tuple[list[Criterion], int]:
  """Drops criteria whose term set is (nearly) one already kept, first wins."""
  kept: list[Criterion] = []
  sets: list[frozenset] = []
  for c in crits:
    s = text.term_set(c.text)
    if any(s == o or (s and o and len(s & o) / len(s | o) >= threshold) for o in sets):
      continue
    kept.append(c)
    sets.append(s)
  return kept, len(crits) - len(kept)


class ModelRubricGenerator:
  """Prompted rubric generation through a `ModelRole`, with robust parsing.

  When a generation yields no usable positive criterion, the reference rubric
  is used instead and counted in `fallbacks` (a rubric must be scoreable).
  """

  name = "model"

  def __init__(self, role, *, fallback: ReferenceRubricGenerator | None = None):
    self.role = role
    self.fallback = fallback or ReferenceRubricGenerator()
    self.stats = ParseStats()
    self.fallbacks = 0

  def generate(self, case: PatientCase, dialogue: Sequence[Any] = ()) -> Rubric:
    return self.generate_batch([case], [dialogue])[0]

  def generate_batch(self, cases: Sequence[PatientCase],
                     dialogues: Sequence[Sequence[Any]] | None = None) -> list[Rubric]:
    dialogues = dialogues or [()] * len(cases)
    chats = []
    for case, dlg in zip(cases, dialogues):
      pairs = [("doctor" if _role(m) == "assistant" else "patient", _content(m)) for m in dlg]
      chats.append(prompts.rubric_messages(case.to_document(), PAPER_DIMENSIONS + EXTRA_DIMENSIONS,
                                           pairs))
    outs = self.role.complete(chats)
    rubrics = []
    for case, dlg, raw in zip(cases, dialogues, outs):
      crits, stats = parse_rubric_items(raw, source=f"rubric:{case.id}")
      self.stats.merge(stats)
      if not any(c.points > 0 for c in crits):
        self.fallbacks += 1
        log.warning("rubric for %s: no usable positive criterion from the model; using the "
                    "reference rubric", case.id)
        rubrics.append(self.fallback.generate(case, dlg))
      else:
        rubrics.append(Rubric(tuple(crits), source=f"model:{case.id}"))
    return rubrics

  def generate_for_conversation(self, messages: Sequence[Any]) -> Rubric:
    return self.generate_for_conversations([messages])[0]

  def generate_for_conversations(self, conversations: Sequence[Sequence[Any]]) -> list[Rubric]:
    """Rubrics for health conversations without a case record (HealthBench-style prompts),
    judged on the assistant's next reply; one batched decode."""
    chats = [prompts.conversation_rubric_messages([(_role(m), _content(m)) for m in msgs],
                                                  HEALTHBENCH_AXES) for msgs in conversations]
    outs = self.role.complete(chats) if chats else []
    rubrics = []
    for i, (msgs, raw) in enumerate(zip(conversations, outs)):
      crits, stats = parse_rubric_items(raw, source=f"rubric:conversation:{i}", tags=())
      self.stats.merge(stats)
      if not any(c.points > 0 for c in crits):
        self.fallbacks += 1
        log.warning("conversation rubric %d: no usable positive criterion from the model; using "
                    "the reference rubric", i)
        rubrics.append(self.fallback.generate_for_conversation(msgs))
      else:
        rubrics.append(Rubric(tuple(crits), source="model:conversation"))
    return rubrics


# ---------------------------------------------------------------- quality

def criterion_similarity(a: str, b: str) -> float:
  """Symmetric term overlap of two criteria: the F1 of the two directed coverages."""
  ta, tb = text.terms(a, _RUBRIC_BOILERPLATE), text.terms(b, _RUBRIC_BOILERPLATE)
  if not ta or not tb:
    return 0.0
  p = text.coverage(ta, frozenset(tb))[0]
  r = text.coverage(tb, frozenset(ta))[0]
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


_RUBRIC_BOILERPLATE = frozenset(
    "response user assistant states state mentions mention explains explain recommends "
    "recommend advises advise suggests suggest provides provide includes include notes note "
    "clearly appropriate appropriately asks ask correctly accurately information".split())


@dataclasses.dataclass
class RubricQuality:
  reference_items: int
  generated_items: int
  matched: int
  sign_agreements: int

  @property
  def coverage(self) -> float:
    return self.matched / self.reference_items if self.reference_items else 0.0

  @property
  def sign_agreement(self) -> float:
    return self.sign_agreements / self.matched if self.matched else 0.0

  def merge(self, other: "RubricQuality") -> "RubricQuality":
    return RubricQuality(*(getattr(self, f.name) + getattr(other, f.name)
                           for f in dataclasses.fields(self)))

  def summary(self) -> dict:
    return {"reference_items": self.reference_items, "generated_items": self.generated_items,
            "coverage": round(self.coverage, 4), "sign_agreement": round(self.sign_agreement, 4)}


def rubric_quality(generated: Rubric, reference: Rubric, threshold: float = 0.3) -> RubricQuality:
  """Coverage: share of reference criteria with a generated criterion of
  similarity >= threshold; sign agreement: share of those matches whose points
  have the same sign."""
  matched = agree = 0
  for r in reference:
    sims = [(criterion_similarity(r.text, g.text), g) for g in generated]
    best, g = max(sims, key=lambda x: x[0])
    if best >= threshold:
      matched += 1
      agree += (g.points > 0) == (r.points > 0)
  return RubricQuality(len(reference), len(generated), matched, agree)


def healthbench_quality(examples, generator=None, threshold: float = 0.3,
                        batch_size: int = 16) -> RubricQuality:
  """Generated rubrics (from each prompt) against HealthBench's physician rubrics.
  A model generator decodes `batch_size` prompts at a time."""
  generator = generator or ReferenceRubricGenerator()
  examples = list(examples)
  total = RubricQuality(0, 0, 0, 0)
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    for e, r in zip(chunk, generator.generate_for_conversations([e.messages for e in chunk])):
      total = total.merge(rubric_quality(r, Rubric.from_healthbench(e), threshold))
  return total

