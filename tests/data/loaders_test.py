"""Loaders on the shipped data, and on broken and hostile input (hypothesis)."""

import csv
import io
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2.data import loaders
from m2.data.loaders import EvalOnlyError, RecordError


# Measured on ../shared/data; a change here means the data or a parser changed.
EXPECTED = {   # source: (loaded, skipped)
    "agentclinic": (214, 0), "mediq": (1408, 4), "mediq_qa": (1411, 1), "mts_dialog": (1701, 0),
    "aci_bench": (207, 0), "pubmedqa": (1000, 0), "cmtmedqa": (1144, 0), "healthbench": (451, 0),
}


def test_every_source_loads_with_counted_skips(real):
  got = {n: (l.report.loaded, l.report.skipped) for n, l in real.items()}
  assert got == EXPECTED
  for loaded in real.values():
    assert len(loaded.records) == loaded.report.loaded
    assert all(s.location and s.reason for s in loaded.report.skips)
  # The skips are real defects of the source, each named with file and line.
  mediq = real["mediq"].report
  assert mediq.reasons == {"empty field": 3, "answer conflict": 1}
  assert any(s.location.endswith("all_craft_md.jsonl:130") for s in mediq.skips)
  table = loaders.format_reports(l.report for l in real.values())
  assert table.splitlines()[-1].split() == ["total", "7536", "5"]


def test_raise_policy_names_file_and_line():
  with pytest.raises(RecordError, match=r"all_dev_good\.jsonl:225: empty field: facts"):
    loaders.load_mediq()


def test_healthbench_is_refused_for_training():
  with pytest.raises(EvalOnlyError, match="evaluation-only"):
    loaders.load_source("healthbench")
  assert "healthbench" not in loaders.TRAINING_SOURCES


def test_source_specific_fields(real):
  case = real["agentclinic"].records[0]
  assert case.id == "agentclinic:medqa_extended:1" and case.age == 35 and case.sex == "female"
  assert case.fact("exam.vital_signs.blood_pressure").text == "125/80 mmHg"
  assert case.diagnosis == "Myasthenia gravis"
  assert {f.category for f in case.hidden_facts} == {"physical_exam", "test_result", "diagnosis"}
  m = real["mediq"].records[0]
  assert m.facts[0] == loaders.Fact("fact.01", "demographics", "Patient is a 21-year-old male.")
  qa = {r.id: r for r in real["mediq_qa"].records}[m.id]
  assert qa.answer == "C" and qa.answer_text == "Ceftriaxone"
  pub = real["pubmedqa"].records
  assert sum(r.split == "test" for r in pub) == 500
  assert {r.answer for r in pub} == {"yes", "no", "maybe"}
  cmt = real["cmtmedqa"].records
  assert sum(r.meta.get("subset") == "safety" for r in cmt) == 144
  assert all(r.language == "zh" and r.turns[-1].role == "doctor" for r in cmt)
  hb = real["healthbench"].records
  assert all(r.EVAL_ONLY and r.max_points > 0 for r in hb)


def test_speaker_tags_are_parsed():
  turns = loaders.parse_speaker_lines(
      "Doctor: Hi.\nPatient: Hello.\ncontinued line\nGuest_family2: He is fussy.\r\n"
      "Docotr_2: A scan.\nGuest_clinican: Okay.\n")
  assert [(t.role, t.text) for t in turns] == [
      ("doctor", "Hi."), ("patient", "Hello.\ncontinued line"), ("companion", "He is fussy."),
      ("doctor", "A scan."), ("clinician", "Okay.")]
  aci = loaders.parse_tagged_turns("hi , susan .\n[patient] good .\n[doctor] ok .\n"
                                   "[patient_guest] she fell .")
  assert [(t.role, t.speaker) for t in aci] == [("doctor", "untagged"), ("patient", "patient"),
                                                ("doctor", "doctor"), ("companion", "patient_guest")]


# --------------------------------------------------------- hostile input

_AGENTCLINIC = {"OSCE_Examination": {
    "Objective_for_Doctor": "Diagnose.",
    "Patient_Actor": {"Demographics": "40-year-old man", "History": "Cough for 2 weeks.",
                      "Symptoms": {"Primary_Symptom": "Cough", "Secondary_Symptoms": ["Fever"]}},
    "Physical_Examination_Findings": {"Vital_Signs": {"Temperature": "38.5°C"}},
    "Test_Results": {"Chest_X-Ray": {"Findings": "Consolidation"}},
    "Correct_Diagnosis": "Pneumonia"}}
_MEDIQ = {"id": 7, "question": "Most likely diagnosis?", "context": ["A man has a cough."],
          "options": {"A": "Pneumonia", "B": "Asthma"}, "answer": "Pneumonia", "answer_idx": "A",
          "facts": ["1. A man has a cough."], "patient": {"age": "40", "gender": "male"}}
_HEALTHBENCH = {"prompt_id": "p-1", "prompt": [{"role": "user", "content": "Is it safe?"}],
                "rubrics": [{"criterion": "Advises care", "points": 5, "tags": ["axis:accuracy"]}],
                "example_tags": ["theme:hedging"], "ideal_completions_data": None,
                "canary": "c"}
_JSONL = {  # loader, file key, valid record
    "agentclinic": (loaders.load_agentclinic, loaders.AGENTCLINIC_FILES["medqa_extended"],
                    _AGENTCLINIC),
    "mediq": (lambda d, **kw: loaders.load_mediq(d, splits=("dev_good",), **kw),
              loaders.MEDIQ_FILES["dev_good"], _MEDIQ),
    "healthbench": (lambda d, **kw: loaders.load_healthbench(d, splits=("oss_eval",), **kw),
                    loaders.HEALTHBENCH_FILES["oss_eval"], _HEALTHBENCH),
}

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=3),
    max_leaves=8)


def _paths(obj, prefix=()):
  """Every key path of a nested dict (for targeted mutations)."""
  out = []
  if isinstance(obj, dict):
    for k, v in obj.items():
      out.append(prefix + (k,))
      out += _paths(v, prefix + (k,))
  return out


@st.composite
def _mutated_line(draw, valid):
  """A JSONL line: valid, or broken in one of the ways real files break."""
  kind = draw(st.sampled_from(["valid", "drop", "retype", "truncate", "garbage", "unicode",
                               "surrogate", "blank"]))
  obj = json.loads(json.dumps(valid))
  if kind in ("drop", "retype", "unicode", "surrogate"):
    path = draw(st.sampled_from(_paths(obj)))
    parent = obj
    for k in path[:-1]:
      parent = parent[k]
    if kind == "drop":
      del parent[path[-1]]
    elif kind == "retype":
      parent[path[-1]] = draw(_json_values)
    elif kind == "unicode":
      parent[path[-1]] = draw(st.text(min_size=1, max_size=40))
    else:
      parent[path[-1]] = "\ud800 lone surrogate"
  line = json.dumps(obj, ensure_ascii=draw(st.booleans()))
  if kind == "truncate":
    line = line[:draw(st.integers(0, len(line) - 1))]
  elif kind == "garbage":
    line = draw(st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s and "\r" not in s))
  elif kind == "blank":
    line = "   "
  return line


def _write(root, rel, data: bytes):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


@pytest.mark.parametrize("source", sorted(_JSONL))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_jsonl_loaders_never_drop_silently(source, data):
  load, rel, valid = _JSONL[source]
  lines = data.draw(st.lists(_mutated_line(valid), min_size=1, max_size=6))
  if source != "agentclinic":   # ids must be unique per file: give each line its own
    lines = [l.replace('"p-1"', f'"p-{i}"').replace('"id": 7', f'"id": {i}')
             for i, l in enumerate(lines)]
  raw = "\n".join(lines).encode("utf-8", "surrogatepass")
  with tempfile.TemporaryDirectory() as root:
    path = _write(root, rel, raw)
    # Blank lines (whitespace only, as str.strip sees it) hold no record.
    records = sum(1 for l in raw.split(b"\n") if l.decode("utf-8", "replace").strip())
    if not records:   # a file with no record is an error, not an empty source
      with pytest.raises(RecordError, match=f"{path}: empty JSONL file"):
        load(root, policy="skip")
      return
    got = load(root, policy="skip")
    # Every non-blank line is either a record or a counted, located skip.
    assert got.report.loaded + got.report.skipped == records
    assert all(s.location.startswith(path + ":") for s in got.report.skips)
    if got.report.skipped:
      first_bad = int(got.report.skips[0].location.rsplit(":", 1)[1])
      with pytest.raises(RecordError, match=f"{path}:{first_bad}: "):
        load(root, policy="raise")
    else:
      assert len(load(root, policy="raise").records) == records


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.text(max_size=6), st.text(max_size=30), st.text(max_size=60)),
                     min_size=1, max_size=5),
       tail=st.sampled_from(["", '"unclosed quote', "\x00", "a,b"]))
def test_csv_loader_never_drops_silently(rows, tail):
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["ID", "section_header", "section_text", "dialogue"])
  for rid, note, dialogue in rows:
    w.writerow([rid, "GENHX", note, dialogue])
  raw = (buf.getvalue() + tail).encode("utf-8", "surrogatepass")
  with tempfile.TemporaryDirectory() as root:
    _write(root, loaders.MTS_FILES["train"], raw)
    try:
      got = loaders.load_mts_dialog(root, policy="skip", splits=("train",))
    except RecordError as e:   # a file-level problem (e.g. not UTF-8) is never skipped
      assert e.location.startswith(root)
      return
    with open(os.path.join(root, loaders.MTS_FILES["train"]), newline="",
              encoding="utf-8") as f:
      n = sum(1 for row in list(csv.reader(f))[1:] if any(c.strip() for c in row))
    assert got.report.loaded + got.report.skipped >= n - 1   # a broken tail may merge rows
    for r in got.records:
      assert r.turns and all(t.text for t in r.turns)


@settings(max_examples=40, deadline=None)
@given(doc=_json_values)
def test_json_loaders_reject_wrong_structures_cleanly(doc):
  with tempfile.TemporaryDirectory() as root:
    _write(root, loaders.CMTMEDQA_FILE, json.dumps(doc).encode())
    try:
      got = loaders.load_cmtmedqa(root, policy="skip")
      assert got.report.loaded + got.report.skipped == len(doc)
    except RecordError as e:
      assert loaders.CMTMEDQA_FILE in str(e)
    _write(root, loaders.PUBMEDQA_FILES["pqal"], json.dumps(doc).encode())
    _write(root, loaders.PUBMEDQA_FILES["test_ids"], b"{}")
    try:
      got = loaders.load_pubmedqa(root, policy="skip")
      assert got.report.loaded + got.report.skipped == len(doc)
    except RecordError as e:
      assert "ori_pqal.json" in str(e)


def test_truncated_json_file_and_huge_field_are_reported(tmp_path):
  good = json.dumps([{"instruct": "头痛怎么办", "output": "建议就医。"}])
  _write(str(tmp_path), loaders.CMTMEDQA_FILE, good[:-5].encode())
  with pytest.raises(RecordError, match=r"CMtMedQA_test\.json:1: invalid JSON"):
    loaders.load_cmtmedqa(str(tmp_path), policy="skip")
  huge = [{"instruct": "x" * (loaders.MAX_FIELD_CHARS + 1), "output": "y"},
          {"instruct": "头痛怎么办", "output": "建议就医。"}]
  _write(str(tmp_path), loaders.CMTMEDQA_FILE, json.dumps(huge).encode())
  got = loaders.load_cmtmedqa(str(tmp_path), policy="skip")
  assert got.report.loaded == 1 and got.report.reasons == {"field too long": 1}
  assert got.records[0].id == "cmtmedqa:safety-1"


def test_missing_file_and_unknown_policy(tmp_path):
  with pytest.raises(FileNotFoundError, match="M2_DATA_DIR"):
    loaders.load_agentclinic(str(tmp_path))
  with pytest.raises(ValueError, match="policy"):
    loaders.load_pubmedqa(policy="ignore")
