"""Text matching shared by the reference backends: terms, synonyms, negation, BM25.

The reference simulator retrieves facts for a doctor's question, the reference
grader decides whether a response meets a criterion, and the Fact Unit checks
replies against a profile. All three reduce text to *terms*: lower-cased word
tokens, stop words dropped, a light suffix stemmer, and medical synonyms
mapped to one canonical term (so "high blood pressure" matches "hypertension"
and "short of breath" matches "dyspnea"). On top of terms:

- `BM25`: Okapi BM25 over a small document set (Robertson & Zaragoza 2009).
- `coverage`: the IDF-weighted share of a query's terms found in a text, with
  partial credit for morphological neighbours (character-trigram similarity).
- `polar_terms`: terms with their polarity ("no fever" -> fever negated).

Everything is deterministic and pure Python/NumPy.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being
below between both but by can could did didn't do does doesn't doing don't down during each few for
from further had has have having he her here hers herself him himself his how i i'd i'm i've if in
into is isn't it it's its itself just let's me more most my myself nor of off on once only or other
ought our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what
when where which while who whom why will with would you your yours yourself yourselves also any
may might must shall us really well yes yeah okay ok oh um uh hmm sure please thank thanks
""".split())

# Negation cues and what ends their scope (NegEx-style, Chapman et al. 2001).
_NEGATORS = frozenset("no not never without denies deny denied none negative nor neither "
                      "absent free don't doesn't didn't isn't aren't wasn't weren't haven't "
                      "hasn't can't cannot won't".split())
_SCOPE_BREAKERS = frozenset("but however although though except yet which who".split())

# Lay / technical synonym groups; the first entry is the canonical form.
SYNONYM_GROUPS: tuple[tuple[str, ...], ...] = (
    ("hypertension", "high blood pressure", "elevated blood pressure", "hypertensive"),
    ("hypotension", "low blood pressure"),
    ("myocardial infarction", "heart attack", "mi"),
    ("dyspnea", "shortness of breath", "short of breath", "breathlessness", "breathless",
     "trouble breathing", "difficulty breathing", "hard to breathe", "sob"),
    ("fever", "febrile", "pyrexia", "high temperature", "temperature"),
    ("diplopia", "double vision", "seeing double"),
    ("emesis", "vomiting", "vomit", "throwing up", "threw up", "vomited"),
    ("nausea", "nauseous", "nauseated", "queasy", "sick to my stomach"),
    ("diarrhea", "diarrhoea", "loose stools", "loose stool", "watery stools"),
    ("syncope", "fainting", "fainted", "passed out", "pass out", "blacked out"),
    ("dizziness", "dizzy", "lightheaded", "light-headed", "vertigo"),
    ("fatigue", "tired", "tiredness", "exhausted", "exhaustion", "lethargy", "lethargic"),
    ("headache", "cephalgia", "head pain", "head hurts", "migraine"),
    ("abdominal pain", "stomach pain", "belly pain", "tummy ache", "stomach ache",
     "stomachache", "abdominal discomfort"),
    ("chest pain", "chest discomfort", "chest tightness", "angina"),
    ("pruritus", "itching", "itchy", "itch"),
    ("rash", "skin eruption", "spots on my skin"),
    ("dysuria", "painful urination", "pain during urination", "burning when i pee",
     "burning urination", "pain when urinating"),
    ("hematuria", "blood in urine", "blood in my urine", "bloody urine"),
    ("hematochezia", "blood in stool", "bloody stool", "blood in my stool", "rectal bleeding"),
    ("hemoptysis", "coughing up blood", "coughed up blood"),
    ("palpitations", "heart racing", "racing heart", "pounding heart", "heart pounding",
     "fluttering"),
    ("edema", "oedema", "swelling", "swollen"),
    ("weakness", "weak", "feebleness"),
    ("dyspepsia", "indigestion", "heartburn"),
    ("dysphagia", "difficulty swallowing", "trouble swallowing", "hard to swallow"),
    ("insomnia", "trouble sleeping", "can't sleep", "cannot sleep", "sleeplessness"),
    ("anxiety", "anxious", "worried", "nervous"),
    ("depression", "depressed", "feeling down", "low mood"),
    ("weight loss", "lost weight", "losing weight"),
    ("weight gain", "gained weight", "gaining weight"),
    ("constipation", "constipated", "can't poop"),
    ("arthralgia", "joint pain", "joints hurt", "aching joints"),
    ("myalgia", "muscle pain", "muscle aches", "sore muscles", "body aches"),
    ("cough", "coughing"),
    ("duration", "how long", "since when", "how many days", "how many weeks", "lasted", "lasting"),
    ("onset", "when did it start", "when did this start", "when it started", "began"),
    ("seizure", "seizures", "convulsion", "convulsions", "fit", "fits"),
    ("jaundice", "yellow skin", "yellowing", "icterus"),
    ("diabetes", "diabetes mellitus", "high blood sugar", "diabetic"),
    ("hyperlipidemia", "high cholesterol", "dyslipidemia"),
    ("tachycardia", "fast heart rate", "rapid heartbeat", "rapid heart rate"),
    ("bradycardia", "slow heart rate", "slow heartbeat"),
    ("physician", "doctor", "clinician", "healthcare provider", "health care provider",
     "healthcare professional", "health care professional", "medical professional", "gp",
     "primary care provider", "provider", "pcp"),
    ("emergency", "er", "emergency room", "emergency department", "ed", "911",
     "urgent care", "a&e", "ambulance"),
    ("medication", "medicine", "medicines", "drug", "drugs", "meds", "pills", "tablets"),
    ("smoking", "smoke", "smoker", "cigarettes", "cigarette", "tobacco"),
    ("alcohol", "drinking", "drinks", "drink", "beer", "wine", "liquor"),
    ("pregnancy", "pregnant", "expecting"),
    ("infant", "baby", "newborn"),
    ("child", "kid", "kids", "children", "toddler"),
    ("hydration", "fluids", "hydrate", "hydrated", "drink water", "water intake"),
    ("ecg", "ekg", "electrocardiogram", "electrocardiography"),
    ("cbc", "complete blood count", "blood count"),
    ("ct", "ct scan", "computed tomography", "cat scan"),
    ("mri", "magnetic resonance imaging", "mri scan"),
    ("xray", "x-ray", "x ray", "radiograph", "radiography"),
    ("ultrasound", "sonography", "sonogram", "ultrasonography"),
)

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


def _build_synonyms():
  phrases: dict[tuple[str, ...], str] = {}
  for group in SYNONYM_GROUPS:
    canon = "_".join(_WORD_RE.findall(group[0].lower()))
    for member in group:
      words = tuple(_WORD_RE.findall(member.lower()))
      if not words:
        continue
      phrases[words] = canon
      if "my" in words:   # "blood in my urine" also as "... her / his / the / your urine"
        for pron in ("her", "his", "the", "your", "their"):
          phrases[tuple(pron if w == "my" else w for w in words)] = canon
  return phrases, max(len(w) for w in phrases)


_PHRASES, _MAX_PHRASE = _build_synonyms()


def words(text: str) -> list[str]:
  """Lower-cased word tokens ("don't" stays one token)."""
  return _WORD_RE.findall(text.lower())


def sentences(text: str) -> list[str]:
  return [s.strip() for s in _SENT_RE.split(text) if s and s.strip()]


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
  """A light suffix stripper (a subset of Porter step 1 + common endings).

  Coarser than Porter on purpose: "vomiting", "vomits" and "vomited" meet,
  and short words are left alone so "gas" and "us" are not mangled."""
  w = word
  if len(w) <= 3 or w.isdigit():
    return w
  for suffix, repl in (("ational", "ate"), ("ization", "ize"), ("fulness", "ful"),
                       ("ousness", "ous"), ("iveness", "ive"), ("ically", "ic"), ("ations", "ate"),
                       ("ation", "ate"), ("ingly", ""), ("ities", "ity"), ("ness", ""),
                       ("ments", ""), ("ment", ""), ("ies", "y"), ("ied", "y"), ("ing", ""),
                       ("edly", ""),
                       ("ed", ""), ("ly", ""), ("es", ""), ("s", "")):
    if w.endswith(suffix) and len(w) - len(suffix) >= 3:
      w = w[:-len(suffix)] + repl
      break
  if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":   # "stopp" -> "stop"
    w = w[:-1]
  if w.endswith("e") and len(w) > 4:   # "cause"/"caus" and "ache"/"ach" meet
    w = w[:-1]
  return w


def canonical_tokens(text: str) -> list[str]:
  """Word tokens with synonym phrases replaced by their canonical term (longest match)."""
  toks = words(text)
  out, i = [], 0
  while i < len(toks):
    for n in range(min(_MAX_PHRASE, len(toks) - i), 0, -1):
      canon = _PHRASES.get(tuple(toks[i:i + n]))
      if canon is not None:
        out.append(canon)
        i += n
        break
    else:
      out.append(toks[i])
      i += 1
  return out


def terms(text: str, extra_stopwords: Iterable[str] = ()) -> list[str]:
  """Content terms: canonical, stop words dropped, stemmed (in order, with repeats)."""
  extra = frozenset(extra_stopwords)
  out = []
  for t in canonical_tokens(text):
    if t in STOPWORDS or t in extra or t in _NEGATORS:
      continue
    out.append(t if "_" in t else stem(t))
  return out


def term_set(text: str, extra_stopwords: Iterable[str] = ()) -> frozenset[str]:
  return frozenset(terms(text, extra_stopwords))


def polar_terms(text: str) -> dict[str, bool]:
  """Content terms of `text` -> True if asserted, False if negated.

  A negation cue ("no", "denies", "without", "n't") negates the content terms
  that follow it up to punctuation or a scope breaker ("but"). A term both
  asserted and negated counts as asserted (the conservative reading for a checker).
  """
  out: dict[str, bool] = {}
  for t, negated in _polar_mentions(text):
    out[t] = out.get(t, False) or not negated
  return out


def negated_terms(text: str) -> set[str]:
  """Terms negated at least once in `text`."""
  return {t for t, negated in _polar_mentions(text) if negated}


def _polar_mentions(text: str) -> list[tuple[str, bool]]:
  out = []
  for clause in re.split(r"[.;:!?,()\n]", text.lower()):
    negated = False
    for tok in canonical_tokens(clause):
      if tok in _NEGATORS:
        negated = True
        continue
      if tok in _SCOPE_BREAKERS:
        negated = False
        continue
      if tok in STOPWORDS:
        continue
      out.append((tok if "_" in tok else stem(tok), negated))
  return out


def trigrams(term: str) -> frozenset[str]:
  padded = f"#{term}#"
  return frozenset(padded[i:i + 3] for i in range(len(padded) - 2))


def term_similarity(a: str, b: str) -> float:
  """1 for equal terms, else the Jaccard similarity of character trigrams."""
  if a == b:
    return 1.0
  if len(a) < 5 or len(b) < 5:   # short words: only exact matches mean anything
    return 0.0
  ta, tb = trigrams(a), trigrams(b)
  return len(ta & tb) / len(ta | tb)


def coverage(query: Sequence[str], text_terms: frozenset[str],
             idf: Mapping[str, float] | None = None, *, fuzzy: float = 0.6
             ) -> tuple[float, list[str], list[str]]:
  """How much of `query` (terms) is in `text_terms`: IDF-weighted share in [0, 1].

  A query term absent from the text earns `similarity` credit from its closest
  text term when that similarity is at least `fuzzy` (morphological
  neighbours such as "hydrat" / "dehydrat"). Returns (share, found, missing).
  """
  uniq = list(dict.fromkeys(query))
  if not uniq:
    return 0.0, [], []
  total = got = 0.0
  found, missing = [], []
  for q in uniq:
    w = (idf or {}).get(q, 1.0)
    total += w
    if q in text_terms:
      credit = 1.0
    else:
      credit = max((term_similarity(q, t) for t in text_terms), default=0.0)
      credit = credit if credit >= fuzzy else 0.0
    got += w * credit
    (found if credit > 0 else missing).append(q)
  return got / total, found, missing


class BM25:
  """Okapi BM25 over pre-tokenised documents (lists of terms)."""

  def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75):
    self.k1, self.b = k1, b
    self.n = len(docs)
    self.lengths = np.array([len(d) for d in docs], np.float64)
    self.avg_len = float(self.lengths.mean()) if self.n else 0.0
    self.tf: list[dict[str, int]] = []
    df: dict[str, int] = {}
    for d in docs:
      counts: dict[str, int] = {}
      for t in d:
        counts[t] = counts.get(t, 0) + 1
      self.tf.append(counts)
      for t in counts:
        df[t] = df.get(t, 0) + 1
    # The "+1" form of IDF keeps weights positive for terms in most documents.
    self.idf = {t: math.log(1 + (self.n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

  def scores(self, query: Iterable[str]) -> np.ndarray:
    out = np.zeros(self.n)
    if not self.n or self.avg_len == 0:
      return out
    norm = self.k1 * (1 - self.b + self.b * self.lengths / self.avg_len)
    for q in dict.fromkeys(query):
      idf = self.idf.get(q)
      if idf is None:
        continue
      tf = np.array([d.get(q, 0) for d in self.tf], np.float64)
      out += idf * tf * (self.k1 + 1) / (tf + norm)
    return out


def idf_table(docs: Sequence[Iterable[str]]) -> dict[str, float]:
  """Smoothed IDF of each term over a document set (each doc an iterable of terms)."""
  n = len(docs)
  df: dict[str, int] = {}
  for d in docs:
    for t in set(d):
      df[t] = df.get(t, 0) + 1
  return {t: math.log(1 + (n + 1) / (c + 0.5)) for t, c in df.items()}


def numbers(text: str) -> set[str]:
  """Numeric tokens ("125", "80", "36.6") in text."""
  return set(re.findall(r"\d+(?:\.\d+)?", text))
