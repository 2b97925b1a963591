"""De-identification gate: planted PHI is gone, clinical content survives."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m2.data import deid_lexicon, loaders
from m2.data.deid import gate, scrub_text
from m2.data.loaders import EvalOnlyError
from m2.data.records import (Dialogue, Fact, HealthBenchExample, Message, PatientCase, QAItem,
                             RubricItem, Turn)

PHI = ["Diane", "Baker", "Helm", "(555) 123-4567", "diane.baker@gmail.com", "12345678",
       "221 Baker Street", "Springfield, IL 62704", "mychart.example.org", "03/14/2021",
       "March 3, 2021", "123-45-6789", "13812345678", "建国路88号"]
CLINICAL = ["45-year-old", "120/80 mmHg", "99/min", "36.8°C", "500 mg", "3 days", "2/6",
            "3.5-5.0 mmol/L", "12,000", "89-year-old", "HbA1c 7.2%", "in 2019", "2 weeks"]
NOTE = ("Mrs. Diane Baker, a 45-year-old woman (MRN: 12345678), seen 03/14/2021 by Dr. Helm. "
        "BP 120/80 mmHg, pulse 99/min, temp 36.8°C, grade 2/6 murmur, potassium 3.5-5.0 mmol/L, "
        "WBC 12,000, HbA1c 7.2%. Start metformin 500 mg twice daily for 3 days, review in 2 weeks. "
        "Diagnosed with diabetes in 2019. Her mother, an 89-year-old, lives with her. "
        "Call (555) 123-4567 or diane.baker@gmail.com; home 221 Baker Street, Springfield, IL 62704. "
        "Portal: https://mychart.example.org/p/1. SSN 123-45-6789. Surgery on March 3, 2021. "
        "电话13812345678，住在北京市朝阳区建国路88号。")


def _assert_clean(text):
  for phi in PHI:
    assert phi not in text, (phi, text)
  for keep in CLINICAL:
    assert keep in text, (keep, text)


def test_scrub_replaces_every_category_and_reports_it():
  out, counts = scrub_text(NOTE)
  _assert_clean(out)
  assert "Mrs. [NAME] [NAME]" in out and "Dr. [NAME]" in out and "MRN: [ID]" in out
  assert set(counts) == {"NAME", "PHONE", "EMAIL", "URL", "ADDRESS", "DATE", "ID"}
  assert counts["DATE"] == 2 and counts["PHONE"] == 2 and counts["ADDRESS"] == 3


def test_dictated_dates_of_birth():
  assert scrub_text("judy , date of birth , 5 , 7 , 1961 . dob: 5-7-61")[0] == \
      "[NAME] , date of birth , [DATE] . dob: [DATE]"


@pytest.mark.parametrize("text, want", [
    ("a 91-year-old man", "a 90+-year-old man"),
    ("aged 95, lives alone", "aged 90+, lives alone"),
    ("95 y/o female", "90+ y/o female"),
    ("患者95岁", "患者90+岁"),
    ("an 89-year-old man", "an 89-year-old man"),
    ("smoked 1 pack a day for 90 years", "smoked 1 pack a day for 90 years"),
])
def test_ages_90_and_over_are_capped(text, want):
  assert scrub_text(text)[0] == want


@pytest.mark.parametrize("text", [
    "Murphy's sign negative, Crohn disease, Allen test normal, Wilson disease ruled out.",
    "MR imaging and MS flare; i miss work; the doctor said to take 1-2 tablets.",
    "white blood cells 11.2, young adult, will follow up in may, you may rest.",
    "Cox regression and Fisher's exact test; BP 150/95; 100-1200 mg.",
    "Amber colored urine; free fluid in the pouch of Douglas; circle of Willis intact.",
])
def test_clinical_text_without_phi_is_untouched(text):
  assert scrub_text(text) == (text, {})


def test_names_in_naming_contexts():
  assert scrub_text("hi , grace . grace is a 45-year-old female .")[0] == \
      "hi , [NAME] . [NAME] is a 45-year-old female ."
  assert scrub_text("brian white , 58 , with white blood cells low")[0] == \
      "[NAME] [NAME] , 58 , with white blood cells low"
  assert scrub_text("Amber Smith, 34, and Mr. Douglas came in.")[0] == \
      "[NAME] [NAME], 34, and Mr. [NAME] came in."
  assert scrub_text("Doctor Kumar saw you; thank you Mark. Mark the spot.")[0] == \
      "Doctor [NAME] saw you; thank you [NAME]. Mark the spot."
  # A record's own names (metadata hints) are scrubbed even when not in the lexicon.
  assert scrub_text("zorblat came in, zorblat's knee", names=["Zorblat"])[0] == \
      "[NAME] came in, [NAME]'s knee"


def test_gate_scrubs_every_record_type_and_keeps_ids():
  case = PatientCase("c:1", "test", (Fact("hpi", "history", NOTE),
                                     Fact("diagnosis", "diagnosis", "Diabetes")), age=95)
  dlg = Dialogue("d:1", "test", (Turn("doctor", "hi , diane baker ."), Turn("patient", NOTE)),
                 note=NOTE, meta={"patient_firstname": "Diane", "patient_age": "93.0", "cc": "x"})
  qa = QAItem("q:1", "test", "What now?", "A", (("A", "Call Dr. Helm"), ("B", "Wait")), (NOTE,))
  (c, d, q), report = gate([case, dlg, qa])
  _assert_clean(c.facts[0].text)
  assert c.age == 90 and c.id == "c:1" and c.facts[1].text == "Diabetes"
  assert [t.text for t in d.turns][0] == "hi , [NAME] [NAME] ."
  _assert_clean(d.turns[1].text)
  _assert_clean(d.note)
  assert d.meta == {"patient_age": "90+", "cc": "x"}   # names gone from the metadata too
  assert q.options[0] == ("A", "Call Dr. [NAME]")
  _assert_clean(q.context[0])
  assert report.records == 3 and report.changed == 3
  assert report.counts["AGE"] == 2 and report.counts["NAME"] >= 10
  again = gate([case, dlg, qa])   # deterministic
  assert again.records == [c, d, q] and again.report == report


def test_gate_refuses_evaluation_only_records():
  ex = HealthBenchExample("hb:1", "healthbench", (Message("user", "q"),),
                          (RubricItem("c", 1, ()),))
  with pytest.raises(EvalOnlyError, match="evaluation-only"):
    gate([ex])
  with pytest.raises(ValueError, match="purpose"):
    gate([], purpose="eval")


def test_aci_bench_metadata_names_are_scrubbed_from_dialogues(real):
  """ACI-Bench's metadata names (patient first/family name, doctor) appear in
  the transcripts; none survives the gate except everyday words used as words
  ("it's good", and ambiguous first names used mid-sentence)."""
  dialogues = real["aci_bench"].records
  clean, report = gate(dialogues)
  mentions = left = 0
  for before, after in zip(dialogues, clean):
    names = {w.lower() for k in loaders.ACI_NAME_FIELDS
             for w in re.findall(r"[A-Za-z]{2,}", before.meta.get(k, "")) if w.lower() != "dr"}
    assert not set(after.meta) & set(loaders.ACI_NAME_FIELDS)
    for b, a in zip([t.text for t in before.turns] + [before.note],
                    [t.text for t in after.turns] + [after.note]):
      for name in names:
        n_before = len(re.findall(rf"\b{name}\b", b, re.I))
        n_after = len(re.findall(rf"\b{name}\b", a, re.I))
        mentions += n_before
        left += n_after
        if n_after:   # only words that are also everyday words may remain
          assert name in deid_lexicon.AMBIGUOUS_NAMES | deid_lexicon.STOPWORDS, (name, a)
  assert mentions > 900 and left / mentions < 0.01
  assert report.records == 207 and report.counts["NAME"] > 1500
  assert report.counts["DATE"] > 50 and report.counts["ID"] > 0   # dictated DOBs and MRNs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("abcMDW 0123456789-/.,:'()@[]年月岁") +
                                ["Dr. ", "hi ", "Smith", "may ", "March ", " street", "mrn ",
                                 "95", " year old", "王医生", "grace ", "\n", "é"]),
                max_size=40).map("".join))
def test_scrub_is_total_and_idempotent(text):
  out, counts = scrub_text(text)
  assert isinstance(out, str) and all(v > 0 for v in counts.values())
  assert scrub_text(out)[0] == out
