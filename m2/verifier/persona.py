"""Patient personas and the Affective Unit that speaks in their voice.

A `Persona` has an MBTI-like type whose letters change behaviour (E volunteers
facts and asks about treatment, I answers briefly and passively; F voices
feelings, T sticks to facts; J asks about the plan), an emotional state, health
literacy and verbosity. Social background comes from the case's demographics
and social history. `sample_persona(case, seed)` draws one reproducibly (a hash
of case id and seed), so a consultation can be replayed and reported;
`persona_summary` counts a sample by type and axis.

`AffectiveUnit.render` turns the facts the Fact Unit allowed into a reply in
that voice: third-person record sentences become first person, jargon becomes
lay words for low literacy, verbosity caps how much is said, extraverts
volunteer one more fact and ask questions. Everything is deterministic.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from typing import Sequence

import numpy as np

from m2.data.records import PatientCase
from m2.verifier import text

EMOTIONS = ("calm", "anxious", "irritable")
LITERACY = ("low", "medium", "high")
VERBOSITY = ("terse", "normal", "verbose")


@dataclasses.dataclass(frozen=True)
class Persona:
  mbti: str = "ISTJ"
  emotion: str = "calm"
  literacy: str = "medium"
  verbosity: str = "normal"
  background: str = ""

  def __post_init__(self):
    ok = (len(self.mbti) == 4 and self.mbti[0] in "EI" and self.mbti[1] in "SN"
          and self.mbti[2] in "TF" and self.mbti[3] in "JP")
    if not ok:
      raise ValueError(f"Persona.mbti must be like 'ENFP', got {self.mbti!r}")
    for name, allowed in (("emotion", EMOTIONS), ("literacy", LITERACY),
                          ("verbosity", VERBOSITY)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"Persona.{name} must be one of {allowed}, got {getattr(self, name)!r}")

  extravert = property(lambda self: self.mbti[0] == "E")
  feeling = property(lambda self: self.mbti[2] == "F")
  judging = property(lambda self: self.mbti[3] == "J")

  @property
  def max_facts(self) -> int:
    return {"terse": 1, "normal": 2, "verbose": 4}[self.verbosity]

  def describe(self) -> str:
    social = "outgoing and talkative" if self.extravert else "reserved and brief"
    feel = "talks about feelings" if self.feeling else "sticks to facts"
    return (f"{self.mbti}: {social}, {feel}, {self.emotion}, {self.literacy} health literacy, "
            f"{self.verbosity} speech")

  def voice(self) -> str:
    parts = [{"terse": "very short answers, one fact at a time",
              "normal": "short answers", "verbose": "long, detailed answers"}[self.verbosity]]
    if self.extravert:
      parts.append("offer extra details and ask what the treatment will be")
    else:
      parts.append("only answer what is asked")
    parts.append({"low": "everyday words, no medical terms", "medium": "plain words",
                  "high": "correct medical terms"}[self.literacy])
    if self.emotion != "calm":
      parts.append(f"sound {self.emotion}")
    return "; ".join(parts)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _rng(*keys) -> np.random.Generator:
  h = hashlib.sha256("|".join(map(str, keys)).encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], "little"))


_OCCUPATION_RE = re.compile(r"\bworks? as (an? [\w -]+?)(?:[.,;]|$| and )", re.I)


def social_background(case: PatientCase) -> str:
  who = []
  if case.age is not None:
    who.append(f"{case.age}-year-old")
  who.append({"female": "woman", "male": "man"}.get(case.sex, "person"))
  s = "a " + " ".join(who)
  m = _OCCUPATION_RE.search(case.social_history)
  if m:
    s += f" who works as {m.group(1).strip()}"
  return s


def sample_persona(case: PatientCase, seed: int = 0) -> Persona:
  """A reproducible persona for (case, seed)."""
  r = _rng("persona", case.id, seed)
  mbti = "".join(r.choice(list(pair)) for pair in ("EI", "SN", "TF", "JP"))
  return Persona(mbti=mbti, emotion=str(r.choice(EMOTIONS, p=[0.5, 0.35, 0.15])),
                 literacy=str(r.choice(LITERACY, p=[0.3, 0.45, 0.25])),
                 verbosity=str(r.choice(VERBOSITY, p=[0.3, 0.45, 0.25])),
                 background=social_background(case))


def persona_summary(personas: Sequence[Persona]) -> dict:
  """How sampled personas are distributed: counts by MBTI type, by each MBTI axis, and by
  emotion, literacy and verbosity (so a report shows what the voices were measured on)."""
  ps = list(personas)
  count = lambda values, order: {k: n for k in order if (n := sum(v == k for v in values))}
  out = {"personas": len(ps),
         "mbti": dict(sorted(collections.Counter(p.mbti for p in ps).items()))}
  for i, axis in enumerate(("EI", "SN", "TF", "JP")):
    out[axis] = count([p.mbti[i] for p in ps], axis)
  for field, order in (("emotion", EMOTIONS), ("literacy", LITERACY), ("verbosity", VERBOSITY)):
    out[field] = count([getattr(p, field) for p in ps], order)
  return out


# ----------------------------------------------------------------- first person

_SUBJECT = (r"(?:the patient|patient|the (?:wo)?man|the (?:boy|girl|child|infant)|she|he"
            r"|an? \d+[- ](?:year|month|week|day)[- ]old (?:\w+ )?(?:woman|man|boy|girl|female|male"
            r"|child|infant|baby))")
_FIRST_PERSON_RULES = [
    (rf"^{_SUBJECT} is an? (\d+)[- ]year[- ]old (female|woman|girl)\b", r"I'm a \1-year-old woman"),
    (rf"^{_SUBJECT} is an? (\d+)[- ]year[- ]old (male|man|boy)\b", r"I'm a \1-year-old man"),
    (rf"^{_SUBJECT} (?:reports|complains of|describes|notes|mentions|presents with|"
     rf"presents for) ", "I have "),
    (rf"^{_SUBJECT} denies (?:experiencing |having )?(?:any )?", "I haven't had any "),
    (rf"^{_SUBJECT} (?:is|was) (?:brought|taken) to (the [\w ]+?) by (?:her|his) (\w+)",
     r"My \2 brought me to \1"),
    (rf"^{_SUBJECT} cannot ", "I can't "),
    (rf"^{_SUBJECT} can't ", "I can't "),
    (rf"^{_SUBJECT} has ", "I have "),
    (rf"^{_SUBJECT} had ", "I had "),
    (rf"^{_SUBJECT} is ", "I'm "),
    (rf"^{_SUBJECT} was ", "I was "),
    (rf"^{_SUBJECT} (\w+)s\b", r"I \1"),
    (r"\b(?:her|his|the patient's|patient's)\b", "my"),
    (r"\b(?:she|he)\b(?! is\b)", "I"),
    (r"\b(?:she|he) is\b", "I'm"),
    (r"\bherself\b|\bhimself\b", "myself"),
    (r"\bI (note|report|say|feel|describe|complain|mention|state|notice)s\b", r"I \1"),
    (r"\bI denies\b", "I don't have"),
    (r"\bI has\b", "I have"),
    (r"\bI is\b", "I'm"),
    (r"\bI does\b", "I do"),
]
_FIRST_PERSON_RULES = [(re.compile(p, re.I), r) for p, r in _FIRST_PERSON_RULES]
_VERBLESS_RE = re.compile(r"\b(is|are|was|were|has|have|had|am|do|does|did|\w+ed|\w+s)\b", re.I)


def first_person(fact_text: str, category: str = "") -> str:
  """A record sentence as the patient would say it."""
  s = fact_text.strip().rstrip(".")
  if re.match(r"^no\b", s, re.I):
    return "There's " + s[0].lower() + s[1:] + "."
  if category in ("chief_complaint", "symptom") and not _VERBLESS_RE.search(s):
    return f"I've been having {s[0].lower() + s[1:]}."
  if category == "social_history" and not _VERBLESS_RE.search(s):
    return f"About my lifestyle: {s[0].lower() + s[1:]}."
  for rx, repl in _FIRST_PERSON_RULES:
    s = rx.sub(repl, s)
  s = s[0].upper() + s[1:] if s else s
  return s + "."


LAY_TERMS = {
    "diplopia": "double vision", "dyspnea": "shortness of breath", "emesis": "vomiting",
    "syncope": "fainting", "pruritus": "itching", "dysuria": "pain when peeing",
    "hematuria": "blood in my urine", "hematochezia": "blood in my stool",
    "hemoptysis": "coughing up blood", "edema": "swelling", "arthralgia": "joint pain",
    "myalgia": "muscle aches", "dysphagia": "trouble swallowing", "hypertension":
    "high blood pressure", "myocardial infarction": "heart attack", "palpitations":
    "my heart racing", "tachycardia": "a fast heartbeat", "pyrexia": "fever",
    "emergency department": "ER", "hyperlipidemia": "high cholesterol", "ptosis": "drooping eyelid",
    "bilious": "greenish", "paresthesia": "tingling", "erythema": "redness", "febrile": "feverish",
    "diaphoresis": "sweating", "lethargy": "tiredness", "malaise": "feeling unwell",
}
_LAY_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, LAY_TERMS), key=len, reverse=True))
                     + r")\b", re.I)


def lay_words(sentence: str) -> str:
  """Jargon replaced by everyday words (low health literacy); "(diplopia)" asides dropped."""
  out = re.sub(r"\s*\((?:[^()]*)\)", "", sentence)
  return _LAY_RE.sub(lambda m: LAY_TERMS[m.group(1).lower()], out)


# ----------------------------------------------------------------- the voice

_OPENERS = {
    "anxious": ("Honestly, I'm really worried.", "I'm scared it's something bad.",
                "This has me quite nervous."),
    "irritable": ("Look,", "Like I said,", "Okay, fine."),
    "calm": ("", "", ""),
}
_FEELINGS = ("It's been really upsetting.", "It's been getting me down.",
             "I just want to feel like myself again.")
_QUESTIONS = ("What do you think is causing this?", "Is it something serious?",
              "What can I do to make it better?", "Will I need any treatment?")
_PLAN_QUESTIONS = ("What's the next step?", "How long until this gets better?")
_DONT_KNOW = {
    "diagnosis": ("I don't know, that's why I came to see you.",
                  "No one has told me what it is yet."),
    "result": ("I haven't had that done, as far as I know.",
               "I don't know any results, nobody has told me."),
    "none": ("I'm not sure.", "No, I don't think so.", "Not that I know of."),
}


# Every fixed phrase the voice can add: the Fact Unit accepts these words without a fact.
TEMPLATE_TEXTS = ([t for v in _OPENERS.values() for t in v] + list(_FEELINGS) + list(_QUESTIONS)
                  + list(_PLAN_QUESTIONS) + [t for v in _DONT_KNOW.values() for t in v]
                  + ["Hi doctor.", "Thank you, doctor.", "Also,", "There's", "I've been having",
                     "About my lifestyle:", "I haven't been feeling well.",
                     "I'm really worried about something.", "My mother brought me to"])


@dataclasses.dataclass(frozen=True)
class Rendered:
  text: str
  said_fact_ids: tuple[str, ...]   # facts the reply states (asked for or volunteered)
  volunteered: tuple[str, ...]     # of which volunteered
  asked_question: bool


class AffectiveUnit:
  """Renders allowed facts in a persona's voice (the reference backend's speech)."""

  def __init__(self, persona: Persona):
    self.persona = persona

  def _pick(self, options: Sequence[str], turn: int, salt: str) -> str:
    return options[int(_rng(salt, self.persona.mbti, turn).integers(len(options)))]

  def say_fact(self, f) -> str:
    s = first_person(f.text, f.category)
    if self.persona.literacy == "low":
      s = lay_words(s)
    return s

  def render(self, facts: Sequence, volunteer: Sequence, *, turn: int,
             probe: str = "") -> Rendered:
    """facts: entitled facts (most relevant first); volunteer: unrevealed facts
    an extravert may add; probe: "diagnosis" / "result" when asked for hidden items."""
    p = self.persona
    said = list(facts[:p.max_facts])
    vol = [v for v in volunteer if v not in said][:1] if p.extravert else []
    parts = []
    opener = self._pick(_OPENERS[p.emotion], turn, "open")
    if opener and turn % 2 == 0:
      parts.append(opener)
    if said:
      parts += [self.say_fact(f) for f in said]
    else:
      parts.append(self._pick(_DONT_KNOW[probe or "none"], turn, "dk"))
    if vol:
      parts.append("Also, " + self.say_fact(vol[0])[0].lower() + self.say_fact(vol[0])[1:])
    if p.feeling and p.verbosity != "terse" and turn % 3 == 1:
      parts.append(self._pick(_FEELINGS, turn, "feel"))
    asked = False
    if p.extravert and turn % 2 == 1:
      parts.append(self._pick(_QUESTIONS, turn, "q"))
      asked = True
    elif p.judging and p.extravert and turn % 3 == 2:
      parts.append(self._pick(_PLAN_QUESTIONS, turn, "plan"))
      asked = True
    reply = " ".join(x for x in parts if x)
    if p.verbosity == "terse":   # at most ~25 words
      reply = " ".join(reply.split()[:25])
    return Rendered(reply, tuple(f.id for f in said + vol), tuple(f.id for f in vol), asked)

  def opening(self, chief: Sequence, extra: Sequence) -> Rendered:
    """The patient's first words: the chief complaint (extraverts add one more)."""
    p = self.persona
    said = list(chief[:1])
    vol = list(extra[:1]) if p.extravert or p.verbosity == "verbose" else []
    parts = ["Hi doctor."]
    if p.emotion == "anxious":
      parts.append("I'm really worried about something.")
    parts += [self.say_fact(f) for f in said + vol]
    if not said and not vol:
      parts.append("I haven't been feeling well.")
    return Rendered(" ".join(parts), tuple(f.id for f in said + vol), tuple(f.id for f in vol),
                    False)
