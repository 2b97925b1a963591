"""One loader per shipped source, each returning typed records plus a report.

    cases, report = load_agentclinic()            # PatientCase
    print(report.summary())                       # "agentclinic: 214 loaded, 0 skipped"
    dialogues, _ = load_source("aci_bench", policy="skip")

Every loader takes `data_dir` (default `default_data_dir()`: $M2_DATA_DIR or ../shared/data),
`policy` and `splits`. A malformed record is a `RecordError` naming the file
and line (JSONL, CSV) or record id (JSON). Under `policy="skip"` it is counted
in the report, with its location and reason, and logged instead. Nothing is
dropped silently: `report.loaded + report.skipped` is the number of records
read. Whole-file problems (missing file or column, a JSON file that does not
parse, text that is not UTF-8) always raise, since no record can be recovered.

Sources (`SOURCES`): agentclinic, mediq (cases) and mediq_qa, mts_dialog,
aci_bench, pubmedqa, cmtmedqa, and healthbench, which is evaluation-only:
`load_source` refuses it unless `purpose="eval"`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, NamedTuple

from m2.data.records import (Dialogue, Fact, HealthBenchExample, Message, PatientCase, QAItem,
                             RecordValidationError, RubricItem, Turn)

log = logging.getLogger(__name__)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_data_dir() -> str:
  """$M2_DATA_DIR, else the `shared/data` folder beside the repository."""
  return os.environ.get("M2_DATA_DIR") or os.path.join(os.path.dirname(_REPO), "shared", "data")


POLICIES = ("raise", "skip")
MAX_FIELD_CHARS = 1_000_000   # a longer text field is hostile or broken input
_MAX_DEPTH = 16               # nesting depth of AgentClinic-style findings
_LOGGED_SKIPS = 10            # per file; the rest are only counted


class RecordError(ValueError):
  """A malformed record (or file). `location` is "path:line" or "path: record <id>"."""

  def __init__(self, location: str, reason: str):
    super().__init__(f"{location}: {reason}")
    self.location, self.reason = location, reason


class EvalOnlyError(ValueError):
  """Evaluation-only data (HealthBench) was asked for by a training path."""


class _Bad(Exception):
  """Raised by the parsers; the reader adds the location."""


@dataclasses.dataclass(frozen=True)
class Skip:
  location: str
  reason: str


@dataclasses.dataclass
class LoadReport:
  """What a loader read: counts, files and every skipped record with its reason."""
  source: str
  loaded: int = 0
  skipped: int = 0
  files: list[str] = dataclasses.field(default_factory=list)
  skips: list[Skip] = dataclasses.field(default_factory=list)

  @property
  def reasons(self) -> collections.Counter:
    """Skips by kind of reason (the text before the first colon)."""
    return collections.Counter(s.reason.split(":")[0] for s in self.skips)

  def summary(self) -> str:
    line = f"{self.source}: {self.loaded} loaded, {self.skipped} skipped"
    if self.skips:
      line += " (" + "; ".join(f"{n}x {r}" for r, n in self.reasons.most_common()) + ")"
    return line


class Loaded(NamedTuple):
  records: list
  report: LoadReport


def format_reports(reports: Iterable[LoadReport]) -> str:
  """A small table of per-source counts."""
  reports = list(reports)
  rows = [("source", "loaded", "skipped")] + [(r.source, str(r.loaded), str(r.skipped))
                                              for r in reports]
  rows.append(("total", str(sum(r.loaded for r in reports)),
               str(sum(r.skipped for r in reports))))
  w = [max(len(r[i]) for r in rows) for i in range(3)]
  return "\n".join(f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows)


class _Collector:
  """Applies the error policy; keeps records, report and duplicate-id check."""

  def __init__(self, source: str, policy: str):
    if policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    self.policy = policy
    self.report = LoadReport(source)
    self.records: list = []
    self._ids: dict[str, str] = {}
    self._logged = collections.Counter()

  def add(self, record, location: str):
    if record.id in self._ids:
      raise _Bad(f"duplicate id {record.id!r} (first at {self._ids[record.id]})")
    self._ids[record.id] = location
    self.records.append(record)

  def fail(self, location: str, reason: str):
    if self.policy == "raise":
      raise RecordError(location, reason)
    self.report.skipped += 1
    self.report.skips.append(Skip(location, reason))
    path = location.split(":")[0]
    self._logged[path] += 1
    if self._logged[path] <= _LOGGED_SKIPS:
      log.warning("%s: skipped %s: %s", self.report.source, location, reason)
    elif self._logged[path] == _LOGGED_SKIPS + 1:
      log.warning("%s: further skips in %s are counted, not logged", self.report.source, path)

  def parse(self, location: str, fn: Callable[[], Any]):
    """Runs one record's parser; a `_Bad` or schema error becomes a failure."""
    try:
      out = fn()
      for record in (out if isinstance(out, tuple) else (out,)):
        self.add(record, location)
    except (_Bad, RecordValidationError) as e:
      self.fail(location, str(e))

  def done(self) -> Loaded:
    self.report.loaded = len(self.records)
    log.info("%s", self.report.summary())
    return Loaded(self.records, self.report)


# ------------------------------------------------------------------- readers


def _path(data_dir: str | None, rel: str, collector: _Collector) -> str:
  path = os.path.join(data_dir or default_data_dir(), rel)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{collector.report.source}: {path} not found "
                            f"(set M2_DATA_DIR or pass data_dir)")
  collector.report.files.append(path)
  return path


def _jsonl(path: str, collector: _Collector) -> Iterable[tuple[str, Any]]:
  """(location, parsed object) per non-blank line; bad lines go to the collector."""
  lines = 0
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      loc = f"{path}:{n}"
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        lines += 1
        collector.fail(loc, f"not UTF-8: byte {e.start}")
        continue
      if not text.strip():
        continue
      lines += 1
      try:
        yield loc, json.loads(text)
      except json.JSONDecodeError as e:
        collector.fail(loc, f"invalid JSON: {e.msg} at column {e.colno}")
      except RecursionError:
        collector.fail(loc, "invalid JSON: nested too deeply")
  if not lines:
    raise RecordError(path, "empty JSONL file (no records)")


def _json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}:{e.lineno}", f"invalid JSON: {e.msg} at column {e.colno}") from None
  except UnicodeDecodeError as e:
    raise RecordError(path, f"not UTF-8: byte {e.start}") from None
  except RecursionError:
    raise RecordError(path, "invalid JSON: nested too deeply") from None


def _csv(path: str, columns: tuple[str, ...], collector: _Collector
         ) -> Iterable[tuple[str, dict]]:
  """(location, row) per CSV row; the header must have `columns`."""
  # A field may be up to MAX_FIELD_CHARS; longer is caught per field below.
  csv.field_size_limit(max(csv.field_size_limit(), 4 * MAX_FIELD_CHARS))
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise RecordError(path, "empty CSV file (no header)")
      header = [h.strip() for h in header]
      missing = [c for c in columns if c not in header]
      if missing:
        raise RecordError(f"{path}:1", f"missing column(s) {missing}; header is {header}")
      while True:
        start = reader.line_num + 1
        try:
          row = next(reader)
        except StopIteration:
          break
        except csv.Error as e:
          collector.fail(f"{path}:{start}", f"bad CSV row: {e}")
          continue
        if not any(cell.strip() for cell in row):
          continue
        if len(row) != len(header):
          collector.fail(f"{path}:{start}", f"bad CSV row: {len(row)} fields, header has "
                         f"{len(header)}")
          continue
        yield f"{path}:{start}", dict(zip(header, row))
  except UnicodeDecodeError as e:
    raise RecordError(path, f"not UTF-8: byte {e.start}") from None


# ------------------------------------------------------------ field helpers


def _text(value, name: str, *, required: bool = True) -> str:
  """A stripped string field, checked for type, size and valid Unicode."""
  if value is None and not required:
    return ""
  if not isinstance(value, str):
    raise _Bad(f"wrong type: {name} must be a string, got {type(value).__name__}")
  if len(value) > MAX_FIELD_CHARS:
    raise _Bad(f"field too long: {name} has {len(value)} characters (max {MAX_FIELD_CHARS})")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise _Bad(f"invalid unicode: {name} has a lone surrogate") from None
  value = value.replace("\r\n", "\n").replace("\r", "\n").strip()
  if required and not value:
    raise _Bad(f"empty field: {name}")
  return value


def _get(obj, key: str, kind: type | tuple[type, ...] | None = None, *, required: bool = True):
  if not isinstance(obj, dict):
    raise _Bad(f"wrong type: expected an object, got {type(obj).__name__}")
  if key not in obj or obj[key] is None:
    if required:
      raise _Bad(f"missing key: {key!r}")
    return None
  value = obj[key]
  if kind is not None and not isinstance(value, kind):
    want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise _Bad(f"wrong type: {key!r} must be {want}, got {type(value).__name__}")
  return value


def _texts(values, name: str) -> tuple[str, ...]:
  if isinstance(values, str):
    values = [values]
  if not isinstance(values, list):
    raise _Bad(f"wrong type: {name} must be a list of strings, got {type(values).__name__}")
  out = tuple(_text(v, f"{name}[{i}]", required=False) for i, v in enumerate(values))
  return tuple(v for v in out if v)


def _slug(key: str) -> str:
  return re.sub(r"[^0-9a-z]+", "_", key.lower()).strip("_") or "x"


def _flatten(value, path: tuple[str, ...], depth: int = 0) -> list[tuple[tuple[str, ...], str]]:
  """Leaves of a nested findings dict as (key path, text); None leaves are absent findings."""
  if depth > _MAX_DEPTH:
    raise _Bad(f"nested too deeply: {'/'.join(path)}")
  if isinstance(value, dict):
    out = []
    for k, v in value.items():
      out += _flatten(v, path + (str(k),), depth + 1)
    return out
  if isinstance(value, list):
    out = []
    for i, v in enumerate(value, start=1):
      out += _flatten(v, path + (str(i),) if len(value) > 1 else path, depth + 1)
    return out
  if isinstance(value, bool):
    return [(path, "yes" if value else "no")]
  if isinstance(value, (int, float)):
    return [(path, repr(value))]
  if value is None:
    return []
  text = _text(value, "/".join(path) or "value", required=False)
  return [(path, text)] if text else []


def _facts(value, category: str, prefix: str, drop: int = 0) -> list[Fact]:
  """Facts for one section; ids are `prefix` plus the slugged key path."""
  out = []
  for path, text in _flatten(value, ()):
    shown = path[drop:]
    fid = ".".join([prefix] + [_slug(p) for p in path]) if path else prefix
    label = " / ".join(p.replace("_", " ") for p in shown if not p.isdigit())
    out.append(Fact(fid, category, text, label))
  return out


def _dedupe_ids(facts: list[Fact]) -> tuple[Fact, ...]:
  """Keys that slug alike ("Blood Pressure", "Blood_Pressure") get ~2, ~3."""
  seen, out = collections.Counter(), []
  for f in facts:
    seen[f.id] += 1
    out.append(f if seen[f.id] == 1 else dataclasses.replace(f, id=f"{f.id}~{seen[f.id]}"))
  return tuple(out)


_AGE_RE = re.compile(r"(\d{1,3})[\s-]*(?:years?|yrs?|y/?o\b|-?year|岁)", re.I)
_YOUNG_RE = re.compile(r"\b(\d{1,2}[\s-]*(month|week|day)s?|newborn|neonate|infant)\b", re.I)
_FEMALE_RE = re.compile(r"\b(female|woman|women|girl|lady|mother|primigravid\w*|f)\b", re.I)
_MALE_RE = re.compile(r"\b(male|man|men|boy|gentleman|m)\b", re.I)


def _age(text: str) -> int | None:
  m = _AGE_RE.search(text)
  if m and int(m.group(1)) <= 150:
    return int(m.group(1))
  if _YOUNG_RE.search(text):
    return 0
  if text.strip().isdigit() and int(text) <= 150:
    return int(text)
  return None


def _sex(text: str) -> str:
  female, male = _FEMALE_RE.search(text), _MALE_RE.search(text)
  if female and not male:
    return "female"
  if male and not female:
    return "male"
  if female and male:   # "35-year-old woman ... her husband, a man" : first mention wins
    return "female" if female.start() < male.start() else "male"
  return ""


# ----------------------------------------------------------------- AgentClinic

AGENTCLINIC_FILES = {
    "medqa_extended": "agentclinic/agentclinic_medqa_extended.jsonl",
    "medqa": "agentclinic/agentclinic_medqa.jsonl",   # the first 107 of medqa_extended
}
_ACTOR_SECTIONS = {   # Patient_Actor key -> (category, fact id prefix)
    "Demographics": ("demographics", "demographics"),
    "History": ("history", "hpi"),
    "Past_Medical_History": ("past_history", "past_history"),
    "Social_History": ("social_history", "social_history"),
    "Family_History": ("family_history", "family_history"),
    "Review_of_Systems": ("review_of_systems", "ros"),
    "Current_Medications": ("medication", "medications"),
    "Medications": ("medication", "medications"),
    "Drug_History": ("medication", "medications"),
}


def _parse_agentclinic(obj, case_id: str, split: str) -> PatientCase:
  osce = _get(obj, "OSCE_Examination", dict)
  actor = _get(osce, "Patient_Actor", dict)
  facts: list[Fact] = []
  for key, value in actor.items():
    if key == "Symptoms":
      if isinstance(value, dict):
        rest = {k: v for k, v in value.items() if k not in ("Primary_Symptom", "Secondary_Symptoms")}
        facts += _facts(value.get("Primary_Symptom"), "chief_complaint", "chief_complaint")
        facts += _facts(value.get("Secondary_Symptoms"), "symptom", "symptom")
        facts += _facts(rest, "symptom", "symptom")
      else:
        facts += _facts(value, "chief_complaint", "chief_complaint")
      continue
    category, prefix = _ACTOR_SECTIONS.get(key, ("other", "actor." + _slug(key)))
    facts += _facts(value, category, prefix)
  facts += _facts(osce.get("Physical_Examination_Findings"), "physical_exam", "exam")
  facts += _facts(osce.get("Test_Results"), "test_result", "tests")
  diagnosis = _text(_get(osce, "Correct_Diagnosis"), "Correct_Diagnosis")
  facts.append(Fact("diagnosis", "diagnosis", diagnosis))
  known = {"Patient_Actor", "Physical_Examination_Findings", "Test_Results", "Correct_Diagnosis",
           "Objective_for_Doctor"}
  for key, value in osce.items():
    if key not in known:   # e.g. Management_and_Follow_Up: the answer key's plan
      facts += _facts(value, "plan", "plan." + _slug(key))
  demo = " ".join(f.text for f in facts if f.category == "demographics")
  return PatientCase(
      id=case_id, source="agentclinic", facts=_dedupe_ids(facts),
      objective=_text(osce.get("Objective_for_Doctor"), "Objective_for_Doctor", required=False),
      age=_age(demo), sex=_sex(demo), split=split)


def load_agentclinic(data_dir: str | None = None, *, policy: str = "raise",
                     splits: Iterable[str] = ("medqa_extended",)) -> Loaded:
  """AgentClinic OSCE cases (MedQA-derived) as `PatientCase`s.

  Ids are "agentclinic:<split>:<line>". The default split, medqa_extended,
  already holds the 107 cases of "medqa", so loading both would double them.
  """
  c = _Collector("agentclinic", policy)
  for split in splits:
    path = _path(data_dir, AGENTCLINIC_FILES[split], c)
    for loc, obj in _jsonl(path, c):
      line = loc.rsplit(":", 1)[1]
      c.parse(loc, lambda: _parse_agentclinic(obj, f"agentclinic:{split}:{line}", split))
  return c.done()


# ---------------------------------------------------------------------- MediQ

MEDIQ_FILES = {"dev_good": "mediq/all_dev_good.jsonl", "craft_md": "mediq/all_craft_md.jsonl"}

# Keyword rules that sort MediQ's atomic facts into categories. Order matters:
# the first rule that matches wins (a lab "shows" before an exam "shows").
_FACT_RULES = [
    ("test_result", r"\b(laborator\w*|labs?\b|serum|plasma|urinalysis|urine (test|studies|culture)"
                    r"|culture|biopsy|x-?ray|radiograph\w*|ct\b|mri\b|ultraso\w+|sonograph\w*"
                    r"|ecg|ekg|electrocardiogra\w+|echocardiogra\w+|hemoglobin|hematocrit"
                    r"|leukocyte|platelet|titer|smear|stain\w*|panel|concentration|assay|antibod"
                    r"|pcr\b|imaging|scan\b|histolog\w+|patholog\w+|cerebrospinal|aspirat\w+"
                    r"|gas analysis|spirometry|endoscop\w+|colonoscop\w+|mg/dl|mmol/l|meq/l"
                    r"|g/dl|u/l|/mm3|mm3)"),
    ("physical_exam", r"\b(temperature|pulse|blood pressure|respirat\w+ (rate|are|is)"
                      r"|respirations|heart rate|oxygen saturation|bmi|vital|examination|exam\b"
                      r"|auscultation|palpat\w+|tender\w*|murmur|reflex\w*|appears|on inspection"
                      r"|lesions? (are|is|were|was) (identified|noted|seen)|mm hg|°[cf]|/min)"),
    ("medication", r"\b(takes|taking|medications?|prescribed|receiv\w+ (treatment|therapy)"
                   r"|started on|treated with|\d+ ?mg\b)"),
    ("family_history", r"\b(family history|(mother|father|sister|brother|sibling|parent|aunt"
                       r"|uncle|grand\w+)s?('s)? (has|had|have|died|was diagnosed|is diagnosed))"),
    ("social_history", r"\b(smok\w+|cigarettes?|alcohol|drinks?|beers?|pack-?years?|works? as"
                       r"|occupation|employed|lives|married|divorced|sexually active|sexual partner"
                       r"|illicit|drug use|uses? (cocaine|heroin|marijuana)|travel\w*|student)"),
    ("past_history", r"\b(history of|diagnosed|previous\w*|prior|past medical|underwent|surgery"
                     r"|years? ago|immuniz\w+|vaccinat\w+)"),
    ("demographics", r"^(the )?(patient|man|woman|boy|girl|infant|child|he|she)? ?(is )?an? "
                     r"\d+[- ](year|month|week|day)s?[- ]old( \w+)?\.?$"),
]
_FACT_RULES = [(cat, re.compile(rx, re.I)) for cat, rx in _FACT_RULES]
_NUMBERING_RE = re.compile(r"^\s*(\d+[.)]|[-*•])\s*")


def classify_fact(text: str) -> str:
  """A fact category for a free-text clinical sentence (MediQ's atomic facts)."""
  for category, rx in _FACT_RULES:
    if rx.search(text):
      return category
  return "history"


def _parse_mediq(obj, split: str, kind: str) -> PatientCase | QAItem:
  raw_id = _get(obj, "id", (int, str))
  if isinstance(raw_id, bool) or not re.fullmatch(r"[\w.-]+", str(raw_id)):
    raise _Bad(f"bad id {raw_id!r}")
  rid = f"mediq:{split}:{raw_id}"
  question = _text(_get(obj, "question"), "question")
  options = _get(obj, "options", dict)
  if not options:
    raise _Bad("empty field: options")
  opts = tuple((_text(k, "option label"), _text(v, f"option {k}")) for k, v in options.items())
  idx = _text(_get(obj, "answer_idx"), "answer_idx")
  answer = _text(_get(obj, "answer"), "answer")
  labels = dict(opts)
  if idx not in labels:
    raise _Bad(f"answer_idx {idx!r} is not an option label {list(labels)}")
  # The answer text must not name a different option; a synonym (no option
  # matches, e.g. "Henoch-Schonlein" for "IgA vasculitis") defers to answer_idx.
  named = [k for k, v in opts if v.casefold() == answer.casefold()]
  if named and idx not in named:
    raise _Bad(f"answer conflict: answer {answer!r} is option {named[0]}, answer_idx is {idx}")
  patient = _get(obj, "patient", dict, required=False) or {}
  age_text = _get(patient, "age", (str, int), required=False) if patient else None
  sex_text = _get(patient, "gender", str, required=False) if patient else None
  age = _age(str(age_text)) if age_text is not None and not isinstance(age_text, bool) else None
  sex = _sex(sex_text) if sex_text else ""
  specialties = patient.get("specialties") if isinstance(patient, dict) else None
  meta = {"specialties": list(_texts(specialties, "specialties"))} if specialties else {}
  if kind == "qa":
    return QAItem(id=rid, source="mediq", question=question, answer=idx, options=opts,
                  context=_texts(_get(obj, "context", (list, str)), "context"),
                  explanation=_text(obj.get("explanation"), "explanation", required=False),
                  split=split, meta=meta)
  facts_raw = _texts(_get(obj, "facts", (list, str)), "facts")
  if not facts_raw:   # the QA item is still fine; a case needs facts
    raise _Bad("empty field: facts")
  facts = []
  for i, f in enumerate(facts_raw, start=1):
    text = _NUMBERING_RE.sub("", f).strip() or f
    facts.append(Fact(f"fact.{i:02d}", classify_fact(text), text))
  if re.search(r"diagnos", question, re.I):
    facts.append(Fact("diagnosis", "diagnosis", labels[idx]))
  return PatientCase(id=rid, source="mediq", facts=tuple(facts), age=age, sex=sex, split=split,
                     meta=meta)


def _load_mediq(kind: str, name: str, data_dir, policy, splits) -> Loaded:
  c = _Collector(name, policy)
  for split in splits:
    path = _path(data_dir, MEDIQ_FILES[split], c)
    for loc, obj in _jsonl(path, c):
      c.parse(loc, lambda: _parse_mediq(obj, split, kind))
  return c.done()


def load_mediq(data_dir: str | None = None, *, policy: str = "raise",
               splits: Iterable[str] = ("dev_good", "craft_md")) -> Loaded:
  """MediQ cases as `PatientCase`s whose facts are MediQ's atomic `facts`
  ("fact.01", ...; categories from `classify_fact`), plus the diagnosis when
  the question asks for one. Ids are "mediq:<split>:<id>"."""
  return _load_mediq("case", "mediq", data_dir, policy, splits)


def load_mediq_qa(data_dir: str | None = None, *, policy: str = "raise",
                  splits: Iterable[str] = ("dev_good", "craft_md")) -> Loaded:
  """The same MediQ records as 4-option `QAItem`s (answer = the option letter),
  with the same ids as `load_mediq`'s cases."""
  return _load_mediq("qa", "mediq_qa", data_dir, policy, splits)


# ----------------------------------------------------------------- MTS-Dialog

MTS_FILES = {
    "train": "mts_dialog/MTS-Dialog-TrainingSet.csv",
    "valid": "mts_dialog/MTS-Dialog-ValidationSet.csv",
    "test1": "mts_dialog/MTS-Dialog-TestSet-1-MEDIQA-Chat-2023.csv",
    "test2": "mts_dialog/MTS-Dialog-TestSet-2-MEDIQA-Sum-2023.csv",
}
# "Doctor:", "Guest_family_2:", typos such as "Docotr_2:", "Gest_family." too.
_MTS_SPEAKER_RE = re.compile(r'^\s*"?\s*([A-Za-z][A-Za-z_ ]{1,20}?)[_ ]?\d?\s*[:.]\s?(.*)$', re.S)


def _mts_role(label: str) -> str | None:
  key = re.sub(r"[^a-z]", "", label.lower())
  if key in ("doctor", "docotr"):
    return "doctor"
  if key == "patient":
    return "patient"
  if key.startswith(("guest", "gest")) and "famil" in key:
    return "companion"
  if key.startswith(("guest", "gest")) and "clinic" in key:
    return "clinician"
  return None


def parse_speaker_lines(text: str) -> tuple[Turn, ...]:
  """MTS-style "Doctor: ... / Patient: ..." lines as turns. A line without a
  known speaker continues the previous turn."""
  turns: list[Turn] = []
  for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
    if not line.strip():
      continue
    m = _MTS_SPEAKER_RE.match(line)
    role = _mts_role(m.group(1)) if m else None
    if role:
      body = m.group(2).strip()
      turns.append(Turn(role, body, m.group(1).strip()))
    elif turns:
      turns[-1] = dataclasses.replace(turns[-1], text=(turns[-1].text + "\n" + line.strip()))
    else:
      raise _Bad(f"no speaker tag: dialogue starts with {line[:40]!r}")
  turns = [t for t in turns if t.text.strip()]
  if not turns:
    raise _Bad("empty field: dialogue has no turns")
  return tuple(dataclasses.replace(t, text=t.text.strip()) for t in turns)


def load_mts_dialog(data_dir: str | None = None, *, policy: str = "raise",
                    splits: Iterable[str] = tuple(MTS_FILES)) -> Loaded:
  """MTS-Dialog conversations as `Dialogue`s; the note is the section text and
  meta["section"] its header (GENHX, ROS, ...). Ids are "mts:<split>:<ID>"."""
  c = _Collector("mts_dialog", policy)
  for split in splits:
    path = _path(data_dir, MTS_FILES[split], c)
    for loc, row in _csv(path, ("ID", "section_header", "section_text", "dialogue"), c):
      def parse(row=row):
        rid = _text(row["ID"], "ID")
        return Dialogue(
            id=f"mts:{split}:{rid}", source="mts_dialog",
            turns=parse_speaker_lines(_text(row["dialogue"], "dialogue")),
            note=_text(row["section_text"], "section_text", required=False), split=split,
            meta={"section": _text(row["section_header"], "section_header", required=False)})
      c.parse(loc, parse)
  return c.done()


# ------------------------------------------------------------------ ACI-Bench

ACI_FILES = {
    "train": "aci_bench/train",
    "valid": "aci_bench/valid",
    "test1": "aci_bench/clinicalnlp_taskB_test1",
    "test2": "aci_bench/clinicalnlp_taskC_test2",
    "test3": "aci_bench/clef_taskC_test3",
}
_ACI_TAG_RE = re.compile(r"\[(doctor|patient|patient_guest)\]", re.I)
_ACI_ROLES = {"doctor": "doctor", "patient": "patient", "patient_guest": "companion"}
# Metadata columns that name a person: PHI, scrubbed by the de-id gate.
ACI_NAME_FIELDS = ("patient_firstname", "patient_familyname", "doctor_name")


def parse_tagged_turns(text: str) -> tuple[Turn, ...]:
  """ACI-style "[doctor] ... [patient] ..." text as turns."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  tags = list(_ACI_TAG_RE.finditer(text))
  if not tags:
    raise _Bad("no speaker tag: dialogue has no [doctor]/[patient] tags")
  turns = []
  lead = text[:tags[0].start()].strip()
  if lead:
    # ASR sometimes drops the first tag; tags alternate, so the untagged
    # opening belongs to the other side of the first tagged turn.
    first = _ACI_ROLES[tags[0].group(1).lower()]
    if first not in ("doctor", "patient"):
      raise _Bad(f"no speaker tag: dialogue starts with {lead[:40]!r}")
    other = "patient" if first == "doctor" else "doctor"
    turns.append(Turn(other, lead, "untagged"))
  for m, nxt in zip(tags, tags[1:] + [None]):
    body = text[m.end():nxt.start() if nxt else len(text)].strip()
    if body:
      tag = m.group(1).lower()
      turns.append(Turn(_ACI_ROLES[tag], body, tag))
  if not turns:
    raise _Bad("empty field: dialogue has no turns")
  return tuple(turns)


def load_aci_bench(data_dir: str | None = None, *, policy: str = "raise",
                   splits: Iterable[str] = tuple(ACI_FILES)) -> Loaded:
  """ACI-Bench visits as `Dialogue`s with their full clinical note.

  meta carries the split's metadata row (gender, age, chief complaint and the
  names in ACI_NAME_FIELDS, which the de-id gate uses and then removes).
  Ids are "aci:<split>:<encounter_id>".
  """
  c = _Collector("aci_bench", policy)
  for split in splits:
    path = _path(data_dir, ACI_FILES[split] + ".csv", c)
    meta_path = os.path.join(data_dir or default_data_dir(), ACI_FILES[split] + "_metadata.csv")
    metadata = {}
    if os.path.exists(meta_path):
      c.report.files.append(meta_path)
      meta_c = _Collector("aci_bench metadata", policy)
      for loc, row in _csv(meta_path, ("encounter_id",), meta_c):
        metadata[row["encounter_id"].strip()] = {
            k.strip(): v.strip() for k, v in row.items()
            if k.strip() not in ("encounter_id", "dataset") and isinstance(v, str)}
      for s in meta_c.report.skips:   # a bad metadata row is a skip too
        c.fail(s.location, s.reason)
    for loc, row in _csv(path, ("encounter_id", "dialogue", "note"), c):
      def parse(row=row):
        eid = _text(row["encounter_id"], "encounter_id")
        meta = {"dataset": _text(row.get("dataset"), "dataset", required=False),
                **metadata.get(eid, {})}
        return Dialogue(id=f"aci:{split}:{eid}", source="aci_bench",
                        turns=parse_tagged_turns(_text(row["dialogue"], "dialogue")),
                        note=_text(row["note"], "note", required=False), split=split, meta=meta)
      c.parse(loc, parse)
  return c.done()


# ------------------------------------------------------------------- PubMedQA

PUBMEDQA_FILES = {"pqal": "pubmedqa/ori_pqal.json", "test_ids": "pubmedqa/test_ground_truth.json"}
PUBMEDQA_OPTIONS = (("yes", "yes"), ("no", "no"), ("maybe", "maybe"))


def _parse_pubmedqa(pmid: str, obj, test: dict) -> QAItem:
  if not re.fullmatch(r"\d+", pmid):
    raise _Bad(f"bad PMID {pmid!r}")
  decision = _text(_get(obj, "final_decision"), "final_decision").lower()
  if decision not in ("yes", "no", "maybe"):
    raise _Bad(f"bad label: final_decision {decision!r} is not yes/no/maybe")
  if pmid in test and test[pmid] != decision:
    raise _Bad(f"answer conflict: test_ground_truth says {test[pmid]!r}, "
               f"final_decision {decision!r}")
  contexts = _texts(_get(obj, "CONTEXTS", list), "CONTEXTS")
  labels = _texts(_get(obj, "LABELS", list, required=False) or [], "LABELS")
  meshes = _texts(_get(obj, "MESHES", list, required=False) or [], "MESHES")
  year = _get(obj, "YEAR", (str, int), required=False)
  return QAItem(
      id=f"pubmedqa:{pmid}", source="pubmedqa",
      question=_text(_get(obj, "QUESTION"), "QUESTION"), answer=decision,
      options=PUBMEDQA_OPTIONS, context=contexts,
      explanation=_text(obj.get("LONG_ANSWER"), "LONG_ANSWER", required=False),
      split="test" if pmid in test else "train",
      meta={"labels": list(labels), "meshes": list(meshes), "year": str(year or "")})


def load_pubmedqa(data_dir: str | None = None, *, policy: str = "raise") -> Loaded:
  """PubMedQA PQA-L: 1000 expert-labelled yes/no/maybe `QAItem`s. split is
  "test" for the 500 PMIDs of the official test split, else "train"."""
  c = _Collector("pubmedqa", policy)
  path = _path(data_dir, PUBMEDQA_FILES["pqal"], c)
  test_path = _path(data_dir, PUBMEDQA_FILES["test_ids"], c)
  data, test = _json(path), _json(test_path)
  if not isinstance(data, dict):
    raise RecordError(path, f"expected an object of PMID -> record, got {type(data).__name__}")
  if not isinstance(test, dict) or not all(isinstance(v, str) for v in test.values()):
    raise RecordError(test_path, "expected an object of PMID -> label")
  test = {str(k): v.strip().lower() for k, v in test.items()}
  missing = sorted(set(test) - set(data))
  if missing:
    raise RecordError(test_path, f"{len(missing)} test PMIDs are not in {path}: {missing[:5]}")
  for pmid, obj in data.items():
    c.parse(f"{path}: record {pmid}", lambda: _parse_pubmedqa(pmid, obj, test))
  return c.done()


# ------------------------------------------------------------------ CMtMedQA

CMTMEDQA_FILE = "cmtmedqa_test/CMtMedQA_test.json"


def _parse_cmtmedqa(obj, index: int) -> Dialogue:
  if not isinstance(obj, dict):
    raise _Bad(f"wrong type: expected an object, got {type(obj).__name__}")
  turns = []
  if "id" in obj:   # a multi-turn consultation
    rid = str(_get(obj, "id", (str, int)))
    history = _get(obj, "history", list)
    for i, pair in enumerate(history):
      if not (isinstance(pair, list) and len(pair) == 2):
        raise _Bad(f"wrong type: history[{i}] must be a [patient, doctor] pair")
      turns += [Turn("patient", _text(pair[0], f"history[{i}][0]"), "patient"),
                Turn("doctor", _text(pair[1], f"history[{i}][1]"), "doctor")]
    ask = _text(_get(obj, "instruction"), "instruction")
    extra = _text(obj.get("input"), "input", required=False)
    meta = {k: "" if obj.get(k) in (None, "nan") else _text(obj.get(k), k, required=False)
            for k in ("cate1", "cate2")}
  else:   # one of the safety / adversarial single-turn items, which have no id
    rid, ask, extra, meta = f"safety-{index}", _text(_get(obj, "instruct"), "instruct"), "", {
        "subset": "safety"}
  if not re.fullmatch(r"[\w.-]+", rid):
    raise _Bad(f"bad id {rid!r}")
  turns += [Turn("patient", ask + ("\n" + extra if extra else ""), "patient"),
            Turn("doctor", _text(_get(obj, "output"), "output"), "doctor")]
  return Dialogue(id=f"cmtmedqa:{rid}", source="cmtmedqa", turns=tuple(turns), language="zh",
                  split="test", meta=meta)


def load_cmtmedqa(data_dir: str | None = None, *, policy: str = "raise") -> Loaded:
  """CMtMedQA (Chinese multi-turn consultations) as `Dialogue`s. The records
  without an id are the safety/adversarial single-turn items: their ids are
  "cmtmedqa:safety-<index>" and meta["subset"] is "safety"."""
  c = _Collector("cmtmedqa", policy)
  path = _path(data_dir, CMTMEDQA_FILE, c)
  data = _json(path)
  if not isinstance(data, list):
    raise RecordError(path, f"expected a list of records, got {type(data).__name__}")
  for i, obj in enumerate(data):
    rid = obj.get("id", f"safety-{i}") if isinstance(obj, dict) else i
    c.parse(f"{path}: record {rid} (index {i})", lambda: _parse_cmtmedqa(obj, i))
  return c.done()


# ---------------------------------------------------------------- HealthBench

HEALTHBENCH_FILES = {
    "oss_eval": "healthbench_subset/healthbench_oss_eval_format_subset.jsonl",
    "consensus": "healthbench_subset/healthbench_consensus_format_subset.jsonl",
}


def _parse_healthbench(obj, subset: str) -> HealthBenchExample:
  pid = _text(_get(obj, "prompt_id"), "prompt_id")
  prompt = _get(obj, "prompt", list)
  messages = []
  for i, m in enumerate(prompt):
    messages.append(Message(_text(_get(m, "role"), f"prompt[{i}].role"),
                            _text(_get(m, "content"), f"prompt[{i}].content", required=False)))
  rubrics = []
  for i, r in enumerate(_get(obj, "rubrics", list)):
    points = _get(r, "points", (int, float))
    if isinstance(points, bool) or points != int(points):
      raise _Bad(f"wrong type: rubrics[{i}].points must be an integer, got {points!r}")
    rubrics.append(RubricItem(_text(_get(r, "criterion"), f"rubrics[{i}].criterion"),
                              int(points), _texts(_get(r, "tags", list), f"rubrics[{i}].tags")))
  ideal = _get(obj, "ideal_completions_data", dict, required=False) or {}
  return HealthBenchExample(
      id=f"healthbench:{subset}:{pid}", source="healthbench", messages=tuple(messages),
      rubrics=tuple(rubrics), tags=_texts(_get(obj, "example_tags", list), "example_tags"),
      ideal_completion=_text(ideal.get("ideal_completion"), "ideal_completion", required=False),
      canary=_text(obj.get("canary"), "canary", required=False), split="eval",
      meta={"subset": subset, "prompt_id": pid})


def load_healthbench(data_dir: str | None = None, *, policy: str = "raise",
                     splits: Iterable[str] = tuple(HEALTHBENCH_FILES)) -> Loaded:
  """The HealthBench subset as `HealthBenchExample`s (evaluation only).

  "oss_eval" holds full/hard-format records, "consensus" the cluster-only
  ones; a prompt may be in both with different rubrics, so ids are
  "healthbench:<subset>:<prompt_id>".
  """
  c = _Collector("healthbench", policy)
  for split in splits:
    path = _path(data_dir, HEALTHBENCH_FILES[split], c)
    for loc, obj in _jsonl(path, c):
      c.parse(loc, lambda: _parse_healthbench(obj, split))
  return c.done()


# ------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  load: Callable[..., Loaded]
  record_type: type
  eval_only: bool = False


SOURCES = {s.name: s for s in (
    Source("agentclinic", load_agentclinic, PatientCase),
    Source("mediq", load_mediq, PatientCase),
    Source("mediq_qa", load_mediq_qa, QAItem),
    Source("mts_dialog", load_mts_dialog, Dialogue),
    Source("aci_bench", load_aci_bench, Dialogue),
    Source("pubmedqa", load_pubmedqa, QAItem),
    Source("cmtmedqa", load_cmtmedqa, Dialogue),
    Source("healthbench", load_healthbench, HealthBenchExample, eval_only=True),
)}
TRAINING_SOURCES = tuple(n for n, s in SOURCES.items() if not s.eval_only)


def source_files(name: str, data_dir: str | None = None) -> list[str]:
  """The files a source's loader reads by default (existing ones)."""
  files = {"agentclinic": [AGENTCLINIC_FILES["medqa_extended"]],
           "mediq": list(MEDIQ_FILES.values()), "mediq_qa": list(MEDIQ_FILES.values()),
           "mts_dialog": list(MTS_FILES.values()),
           "aci_bench": [f + s for f in ACI_FILES.values() for s in (".csv", "_metadata.csv")],
           "pubmedqa": list(PUBMEDQA_FILES.values()), "cmtmedqa": [CMTMEDQA_FILE],
           "healthbench": list(HEALTHBENCH_FILES.values())}[name]
  root = data_dir or default_data_dir()
  return [os.path.join(root, f) for f in files if os.path.exists(os.path.join(root, f))]


def load_source(name: str, data_dir: str | None = None, *, policy: str = "raise",
                purpose: str = "train", **kwargs) -> Loaded:
  """Loads a named source. `purpose` is "train" (also simulator, tokenizer
  training) or "eval"; evaluation-only sources load only for "eval"."""
  if name not in SOURCES:
    raise ValueError(f"unknown source {name!r}; known: {list(SOURCES)}")
  if purpose not in ("train", "eval"):
    raise ValueError(f"purpose must be 'train' or 'eval', got {purpose!r}")
  if SOURCES[name].eval_only and purpose != "eval":
    raise EvalOnlyError(f"source {name!r} is evaluation-only (HealthBench): it must never be "
                        f"used for training, tuning or tokenizer training")
  return SOURCES[name].load(data_dir, policy=policy, **kwargs)


def load_sources(names: Iterable[str] = TRAINING_SOURCES, data_dir: str | None = None, *,
                 policy: str = "raise", purpose: str = "train") -> dict[str, Loaded]:
  """Several sources at once; logs the per-source count table."""
  out = {n: load_source(n, data_dir, policy=policy, purpose=purpose) for n in names}
  log.info("loaded records:\n%s", format_reports(l.report for l in out.values()))
  return out
