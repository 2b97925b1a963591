"""De-identification gate: every record passes through `gate` before training
or simulator use.

The scrubber is rule-based and deterministic (regular expressions plus the
name lexicons of `m2.data.deid_lexicon`). It replaces protected health
information with bracketed placeholders and reports what it replaced, by
category:

  NAME     person names: lexicon names, words after titles ("Dr. Helm"),
           greetings ("hi , martha"), "<name> is a 45-year-old", names the
           record's metadata lists, and Chinese "<surname>医生/先生/女士".
  PHONE    US and international numbers, Chinese mobiles and landlines.
  EMAIL, URL
  ADDRESS  street addresses, PO boxes, "City, ST 12345", Chinese 路/街 ... 号.
  DATE     exact dates and date elements finer than a year: 03/14/2019,
           2019-03-14, "March 3rd, 2019", "3 March", "march third", "March 2019".
           A year alone, a month alone and relative times ("3 days ago") stay.
  ID       labelled identifiers (MRN, account, SSN, insurance ...), SSNs and
           runs of 7+ digits that carry no unit.
  AGE      ages of 90 and over become "90+" (HIPAA safe harbor); younger ages stay.

Clinical content stays: ages under 90, durations, doses, lab values, vitals
(120/80 mmHg, 36.8°C, 99/min), ratios and ranges (2/6 murmur, 3.5-5.0).

    clean, report = gate(records)            # refuses HealthBench (eval-only)
    print(report.summary())                  # "1701 records, 55 changed: NAME 60, ..."
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, NamedTuple, Sequence

from m2.data import deid_lexicon as lex

CATEGORIES = ("NAME", "PHONE", "EMAIL", "URL", "ADDRESS", "DATE", "ID", "AGE")
PLACEHOLDER = {c: f"[{c}]" for c in CATEGORIES}
AGE_CAP = "90+"

# ------------------------------------------------------------------ patterns

_URL = re.compile(
    r"\b(?:https?://|www\.)[^\s<>\"')\]]+[^\s<>\"')\].,;:!?]"
    r"|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|org|net|edu|gov|io|info|health|us|uk|cn)"
    r"\b(?:/[^\s<>\"')\]]*[^\s<>\"')\].,;:!?])?", re.I)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_UNIT_FOR_PHONE = r"(?:mg|mcg|g|ml|units?|cells|copies|/)"
_PHONE = re.compile(
    r"(?<![A-Za-z0-9_/.-])(?:"
    r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s*|\d{3}[\s.-])\d{3}[\s.-]\d{4}"     # (555) 123-4567
    r"|\+\d{1,3}(?:[\s-]\d{1,4}){2,4}"                                # +44 20 7946 0958
    r"|(?<![\d])1[3-9]\d{9}(?!\d)"                                    # 13812345678
    r"|0\d{2,3}-\d{7,8}"                                              # 010-12345678
    rf")(?![A-Za-z0-9_/-])(?!\s*-?\s*{_UNIT_FOR_PHONE})", re.I)
_LABELLED_PHONE = re.compile(r"\b(?:phone|tel|telephone|cell|mobile|call|fax|pager)"
                             r"(?:\s*(?:number|no\.?|#))?[\s:.]*(?:is\s+|at\s+)?(\d{3}[\s.-]\d{4})\b", re.I)
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_LABELLED_ID = re.compile(
    r"\b(?:mrn|medical record(?: number| no\.?| #)?|record (?:number|no\.?|#)|chart (?:number|no\.?|#)"
    r"|patient (?:id|number|no\.?|#)|account(?: number| no\.?| #)?|acct\.?|ssn"
    r"|social security(?: number| no\.?)?|insurance(?: id| number| no\.?)|member (?:id|number)"
    r"|policy (?:number|no\.?)|id(?: number)?|病历号|住院号|身份证号?)"
    r"(\s*(?:[:#]|is|was)?\s*)([a-z]{0,3}[-\s]?\d[\d-]{3,}[a-z]?)\b", re.I)
_LONG_NUMBER = re.compile(
    r"(?<![A-Za-z\d.,])\d{7,}(?![\d.,])(?!\s*(?:/|per\b|copies|cells|iu\b|units?\b|mg|mcg|ml|"
    r"x\s*10|×))", re.I)
_ALNUM_ID = re.compile(r"\b[A-Z]{1,3}\d{6,}\b")

_MONTHS = (r"(?:january|february|march|april|june|july|august|september|october|november"
           r"|december|jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)")   # "may": see below
_ORD_WORDS = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh"
              r"|twelfth|thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth"
              r"|nineteenth|twentieth|twenty-?(?:first|second|third|fourth|fifth|sixth|seventh"
              r"|eighth|ninth)|thirtieth|thirty-?first)")
_NUM_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_DAY = rf"(?:{_NUM_DAY}|{_ORD_WORDS})"
_YEAR = r"(?:19|20)\d{2}"
_UNIT = (r"(?:mg|mcg|g|kg|ml|l|mm|cm|%|units?|tablets?|pills?|puffs?|times?|minutes?|hours?|days?"
         r"|weeks?|months?|years?|doses?|percent|blocks?|miles?|steps?|pounds?|lbs?)\b")
_NOT_UNIT = rf"(?!\s*{_UNIT})"
_DATES = [
    re.compile(r"\b(?:[12]\d{3})([/.-])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])\b"),
    re.compile(r"(?<![\d./])(?:0?[1-9]|[12]\d|3[01])([/.-])(?:0?[1-9]|[12]\d|3[01])\1(?:\d{4}|\d{2})"
               rf"(?![\d.]|/\d){_NOT_UNIT}"),
    re.compile(rf"\b{_MONTHS}\.?\s+{_DAY}\b(?:,?\s+{_YEAR}\b)?{_NOT_UNIT}", re.I),
    re.compile(rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTHS}\b\.?(?:,?\s+{_YEAR}\b)?", re.I),
    re.compile(rf"\b{_MONTHS}\.?,?\s+{_YEAR}\b", re.I),
    # "may" is a verb too: only "May 3", "may 3rd", "3rd of may", "May 2019" forms.
    re.compile(rf"\bMay\s+{_DAY}\b(?:,?\s+{_YEAR}\b)?{_NOT_UNIT}"
               rf"|\bmay\s+(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)\b(?:,?\s+{_YEAR}\b)?"
               rf"|\b(?:the\s+)?{_DAY}\s+of\s+(?i:may)\b(?:,?\s+{_YEAR}\b)?|\b{_NUM_DAY}\s+May\b"
               rf"|\bMay,?\s+{_YEAR}\b"),
    re.compile(r"(?:\d{4}年)?\d{1,2}月\d{1,2}[日号]|\d{4}年\d{1,2}月"),
]
# A dictated date of birth: "date of birth , 5 , 7 , 1961", "DOB: 5-7-61".
_LABELLED_DOB = re.compile(r"\b(?:date of birth|birth ?date|dob|d\.o\.b\.?|born(?: on)?)\s*[,:]?\s*"
                           r"(?:is\s+)?((?:\d{1,4}\s*[,/.-]\s*){2}\d{2,4})\b", re.I)
_AGE_NUM = r"(?:9\d|1[0-4]\d)(?!\+)"   # not an age already capped ("90+")
_AGE_90 = re.compile(
    rf"\b{_AGE_NUM}(?=(?:\s*|-)(?:years?|yrs?)(?:\s*|-)(?:old|of age)\b|\s*(?:y/o|yo|y\.o\.)(?!\w))"
    rf"|(?<=\bage )(?:of )?{_AGE_NUM}\b|(?<=\baged ){_AGE_NUM}\b|(?<=\bage: ){_AGE_NUM}\b"
    rf"|{_AGE_NUM}(?=\s*岁)", re.I)
_STREET_WORDS = (r"street|avenue|road|boulevard|lane|drive|court|way|place|terrace|circle|highway"
                 r"|parkway|square")
_STREET_ABBR = r"St|Ave|Rd|Blvd|Ln|Dr|Ct|Pl|Ter|Cir|Hwy|Pkwy|Sq"
_ADDRESS = [
    # "221 Baker Street", "1600 Pennsylvania Ave NW", "12 elm street apt 4"
    re.compile(rf"\b\d{{1,6}}\s+((?:[A-Za-z][A-Za-z.'-]*\s+){{1,3}}?)"
               rf"(?:(?i:{_STREET_WORDS})\b|(?:{_STREET_ABBR})\b\.?)"
               r"(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b)?"
               r"(?:,?\s*(?i:apt|apartment|suite|ste|unit|#)\.?\s*#?\w+)?"),
    re.compile(r"\bp\.?\s?o\.?\s?box\s+\d+\b", re.I),
    re.compile(r"\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)*,\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b"),
    re.compile(r"[\u4e00-\u9fff]{1,12}(?:路|街|大道|巷)\d{1,5}号(?:\d{1,5}(?:室|楼))?"),
]
_CHINESE_NAME = re.compile(
    rf"(?:(?<![\u4e00-\u9fff])|(?<=[问找请是和跟给让叫对者位见与及]))([{lex.CHINESE_SURNAMES}])"
    rf"(?=(?:{'|'.join(lex.CHINESE_TITLES)}))")
_MAX_PASSES = 4
_DIGIT = re.compile(r"\d")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_MONTH_ANY = re.compile(r"\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)", re.I)
_PO_BOX_WORDS = re.compile(r"\bbox\b", re.I)
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")
_NAME_AGE = re.compile(r"\s*(?:,\s*)?(?:is|was)\s+(?:a|an)\s+\d{1,3}[\s-]*(?:years?|yrs?|y/?o|month)")
_COMMON_AFTER_NUMBER = frozenset("""weeks days months years hours minutes times tablets pills puffs
doses units steps blocks miles pounds more less of or and to the a in on at with for per""".split())


def _is_phone(text: str) -> bool:
  return len(re.sub(r"\D", "", text)) >= 7


def _is_address(m: re.Match) -> bool:
  """A street needs proper-noun-like words, not "2 weeks with the" (road)."""
  words = m.group(1).split()
  return bool(words) and not any(w.lower().strip(".") in lex.STOPWORDS
                                 or w.lower() in _COMMON_AFTER_NUMBER for w in words)


@dataclasses.dataclass
class DeidReport:
  """What the gate replaced: counts by category, over how many records."""
  records: int = 0
  changed: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, counts: collections.Counter):
    self.records += 1
    self.changed += bool(counts)
    self.counts.update(counts)

  def summary(self) -> str:
    parts = ", ".join(f"{c} {self.counts[c]}" for c in CATEGORIES if self.counts[c])
    return f"{self.records} records, {self.changed} changed" + (f": {parts}" if parts else "")


class Scrubber:
  """Finds and replaces PHI in text. Stateless after construction; thread-safe."""

  def __init__(self, first_names: Iterable[str] = lex.FIRST_NAMES,
               last_names: Iterable[str] = lex.LAST_NAMES,
               ambiguous_names: Iterable[str] = lex.AMBIGUOUS_NAMES):
    self.names = frozenset(n.lower() for n in (*first_names, *last_names))
    self.ambiguous = frozenset(n.lower() for n in ambiguous_names) - self.names

  def scrub(self, text: str, names: Sequence[str] = ()) -> tuple[str, collections.Counter]:
    """Returns (scrubbed text, counts by category). `names` are people known
    to be in this record (e.g. from its metadata): scrubbed wherever they
    occur, except those that are also everyday words ("Good", "White"), which
    get the naming-context rules of ambiguous names.

    A placeholder can open a word boundary that exposes another match ("March
    1Smith" -> "March 1[NAME]" -> "[DATE][NAME]"), so passes repeat until the
    text stops changing: scrubbing the result again changes nothing.
    """
    total = collections.Counter()
    for _ in range(_MAX_PASSES):
      scrubbed, counts = self._scrub_once(text, names)
      total += counts
      if scrubbed == text:
        break
      text = scrubbed
    return text, total

  def _scrub_once(self, text: str, names: Sequence[str]) -> tuple[str, collections.Counter]:
    counts = collections.Counter()
    if not text:
      return text, counts

    def sub(rx, category, s, group=0, check=None):
      def repl(m):
        if check is not None and not check(m):
          return m.group(0)
        counts[category] += 1
        if group:   # replace only that group, keep the label ("MRN: [ID]")
          return (m.group(0)[:m.start(group) - m.start()] + PLACEHOLDER[category]
                  + m.group(0)[m.end(group) - m.start():])
        return PLACEHOLDER[category]
      return rx.sub(repl, s)

    # Most specific first, so an email is not read as a URL, nor a phone as an
    # ID. Cheap triggers skip the patterns that cannot match.
    digits, cjk = _DIGIT.search(text), _CJK.search(text)
    if "@" in text:
      text = sub(_EMAIL, "EMAIL", text)
    if "." in text:
      text = sub(_URL, "URL", text)
    if digits:
      text = sub(_SSN, "ID", text)
      text = sub(_LABELLED_ID, "ID", text, group=2)
      for rx in _DATES[:2]:
        text = sub(rx, "DATE", text)
      text = sub(_LABELLED_DOB, "DATE", text, group=1)
    if _MONTH_ANY.search(text):
      for rx in _DATES[2:-1]:
        text = sub(rx, "DATE", text)
    if digits:
      if cjk:
        text = sub(_DATES[-1], "DATE", text)
      text = sub(_PHONE, "PHONE", text, check=lambda m: _is_phone(m.group(0)))
      text = sub(_LABELLED_PHONE, "PHONE", text, group=1)
      text = sub(_LONG_NUMBER, "ID", text)
      text = sub(_ALNUM_ID, "ID", text)
      text = sub(_ADDRESS[0], "ADDRESS", text, check=_is_address)
      for rx in _ADDRESS[1:]:
        text = sub(rx, "ADDRESS", text)
    elif _PO_BOX_WORDS.search(text):
      text = sub(_ADDRESS[1], "ADDRESS", text)

    def age(m):
      counts["AGE"] += 1
      return AGE_CAP
    if digits:
      text = _AGE_90.sub(age, text)
    text = self._scrub_names(text, names, counts)
    if cjk:
      text = sub(_CHINESE_NAME, "NAME", text)
    return text, counts

  def _scrub_names(self, text: str, hints: Sequence[str], counts: collections.Counter) -> str:
    words = list(_WORD.finditer(text))
    if not words:
      return text
    keys = [_key(m.group()) for m in words]
    hinted = {w.lower() for h in hints for w in re.findall(r"[A-Za-z][A-Za-z'’-]+", h)}
    hinted -= lex.TITLES | lex.SOFT_TITLES
    # A hinted name that is also a word ("Brian White", "Dr. Scott Good") is
    # treated as ambiguous: "white blood cells" must survive.
    weak = hinted & (self.ambiguous | lex.STOPWORDS | lex.EPONYM_NEXT)
    strong, ambiguous = (hinted - weak) | self.names, self.ambiguous | weak
    # ASR transcripts are all lower case (placeholders put in so far aside).
    lower_text = not re.search(r"[A-Z]", re.sub(r"\[[A-Z]+\]", "", text))
    n = len(words)

    def gap(i, j):   # the text between words i and j (i < j)
      return text[words[i].end():words[j].start()].strip()

    def capitalised(i):
      w = words[i].group()
      return w[:1].isupper() and not w.isupper()

    def plausible(i):   # could be a name written here
      return lower_text or capitalised(i) or keys[i] in hinted

    def eponym(i):   # "Murphy's sign", "Allen test", "pouch of Douglas"
      return (i + 1 < n and keys[i + 1] in lex.EPONYM_NEXT and gap(i, i + 1) == ""
              or i > 1 and keys[i - 1] == "of" and keys[i - 2] in lex.EPONYM_OF
              and gap(i - 2, i - 1) == gap(i - 1, i) == "")

    def placeholder(i):   # "[NAME]" put in by an earlier rule
      a, b = words[i].span()
      return text[a - 1:a] == "[" and text[b:b + 1] == "]" and words[i].group() in PLACEHOLDER

    is_name = [False] * n
    for i, k in enumerate(keys):
      if eponym(i) or placeholder(i):
        continue
      if k in strong and k not in lex.STOPWORDS and plausible(i):
        is_name[i] = True
        continue
      if k in lex.STOPWORDS and k not in weak:
        continue
      prev, sep = (keys[i - 1], gap(i - 1, i)) if i else ("", "")
      if prev in lex.TITLES and _is_title(words[i - 1].group(), sep, lower_text):
        is_name[i] = True                                  # "dr. helm", "Mrs. Hills"
      elif prev in lex.SOFT_TITLES and sep == "" and (
          k in ambiguous or capitalised(i)
          or lower_text and prev != "miss" and k not in lex.STOPWORDS):
        is_name[i] = True                                  # "Doctor Kumar", "nurse grace"
      elif k in ambiguous and plausible(i) and (
          _vocative(keys, i) and sep in ("", ",")         # "hi , grace", "see you jack"
          or _NAME_AGE.match(text, words[i].end())):       # "grace is a 45-year-old"
        is_name[i] = True
    # A surname or given name next to a name ("brian white", "dr. scott good").
    changed = True
    while changed:
      changed = False
      for i in range(n):
        if is_name[i] or keys[i] not in ambiguous or not plausible(i) or eponym(i) or \
           placeholder(i):
          continue
        if (i > 0 and is_name[i - 1] and gap(i - 1, i) == "") or (
            i + 1 < n and is_name[i + 1] and gap(i, i + 1) == ""):
          is_name[i] = changed = True
    if not any(is_name):
      return text
    out, last = [], 0
    for m, flag in zip(words, is_name):
      if flag:
        counts["NAME"] += 1
        w = m.group()
        suffix = w[-2:] if w.lower().endswith(("'s", "’s")) else ""
        out.append(text[last:m.start()] + PLACEHOLDER["NAME"] + suffix)
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def _is_title(word: str, sep: str, lower_text: bool) -> bool:
  """"Dr", "Ms", "dr.", "mr ." are titles; "MR imaging", "MS flare", "i miss work" are not."""
  if sep not in ("", "."):
    return False
  if word[:1].isupper() and not word.isupper() or len(word) == 1:
    return True
  return word.islower() and (sep == "." or lower_text and word in ("dr", "mr", "mrs"))


def _vocative(keys: list[str], i: int) -> bool:
  """Word i is addressed: "hi X", "hey there X", "thank you X", "nice to see you X"."""
  prev = keys[i - 1] if i > 0 else ""
  prev2 = keys[i - 2] if i > 1 else ""
  return (prev in lex.GREETINGS or prev == "there" and prev2 in lex.GREETINGS
          or prev == "you" and prev2 in ("see", "thank", "meet"))


def _key(word: str) -> str:
  w = word.lower()
  for s in ("'s", "’s", "'", "’"):
    if w.endswith(s):
      return w[:-len(s)]
  return w


_DEFAULT = None


def default_scrubber() -> Scrubber:
  global _DEFAULT
  if _DEFAULT is None:
    _DEFAULT = Scrubber()
  return _DEFAULT


def scrub_text(text: str, names: Sequence[str] = ()) -> tuple[str, collections.Counter]:
  """`Scrubber().scrub` with the default lexicons."""
  return default_scrubber().scrub(text, names)


# --------------------------------------------------------------- on records

# Metadata keys that name people: passed to the scrubber as hints, then dropped.
NAME_META_KEYS = ("patient_firstname", "patient_familyname", "doctor_name", "patient_name", "name")
AGE_META_KEYS = ("patient_age", "age")


def _names_in(record) -> list[str]:
  meta = getattr(record, "meta", {}) or {}
  return [str(meta[k]) for k in NAME_META_KEYS if meta.get(k)]


def deidentify(record, scrubber: Scrubber | None = None):
  """A copy of `record` with PHI replaced in every text field, and the counts."""
  scrubber = scrubber or default_scrubber()
  hints = _names_in(record)
  counts = collections.Counter()

  def clean(value):
    if isinstance(value, str):
      out, c = scrubber.scrub(value, hints)
      counts.update(c)
      return out
    if isinstance(value, tuple):
      return tuple(clean(v) for v in value)
    if isinstance(value, list):
      return [clean(v) for v in value]
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      return dataclasses.replace(value, **{
          f.name: clean(getattr(value, f.name)) for f in dataclasses.fields(value)
          if f.name not in ("id", "role", "speaker", "category", "source", "split", "language")})
    return value

  meta = {k: v for k, v in dict(getattr(record, "meta", {}) or {}).items()
          if k not in NAME_META_KEYS}
  for k in AGE_META_KEYS:
    if str(meta.get(k, "")).replace(".0", "").isdigit() and float(meta[k]) >= 90:
      meta[k] = AGE_CAP
      counts["AGE"] += 1
  counts["NAME"] += sum(1 for k in NAME_META_KEYS if (getattr(record, "meta", {}) or {}).get(k))
  # Other meta values are structured labels (section names, MeSH terms,
  # complaints), not free text; they pass as they are.
  changes = {"meta": meta} if hasattr(record, "meta") else {}
  if getattr(record, "age", None) is not None and record.age >= 90:
    changes["age"] = 90   # 90 now reads "90 or older"
    counts["AGE"] += 1
  for f in dataclasses.fields(record):
    if f.name not in changes and f.name not in ("id", "source", "split", "language", "age", "sex"):
      changes[f.name] = clean(getattr(record, f.name))
  return dataclasses.replace(record, **changes), +counts


class Gated(NamedTuple):
  records: list
  report: DeidReport


def gate(records: Iterable, *, purpose: str = "train", scrubber: Scrubber | None = None) -> Gated:
  """The de-identification gate in front of training and the patient simulator.

  Args:
    records: any record types of `m2.data.records`.
    purpose: "train" or "simulator"; both refuse evaluation-only records.
  Raises:
    EvalOnlyError: a record is evaluation-only (HealthBench).
  """
  from m2.data.loaders import EvalOnlyError   # loaders imports records only; no cycle at import
  if purpose not in ("train", "simulator"):
    raise ValueError(f"purpose must be 'train' or 'simulator', got {purpose!r}")
  scrubber = scrubber or default_scrubber()
  report, out = DeidReport(), []
  for r in records:
    if getattr(r, "EVAL_ONLY", False):
      raise EvalOnlyError(f"{type(r).__name__} {r.id!r} is evaluation-only: it must not be used "
                          f"for {purpose}")
    clean, counts = deidentify(r, scrubber)
    report.add(counts)
    out.append(clean)
  return Gated(out, report)
