"""The eval stage inside m2.main: before/after comparison, outputs, skip when done."""

import json

from m2 import main
from m2.eval import stage


def test_before_stage_is_the_last_one_before_rl():
  assert stage.before_stage(("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric", "eval",
                             "export")) == "sft_rs"
  assert stage.before_stage(("midtrain", "sft", "eval")) == "sft"
  assert stage.before_stage(("rl_rule", "eval")) == ""


def test_eval_stage_compares_before_and_after(tiny_run):
  workdir, config, results = tiny_run
  assert [(r.name, r.status) for r in results] == [("midtrain", "ran"), ("sft", "ran"),
                                                   ("eval", "ran")]
  ev = results[-1]
  assert ev.metric == "healthbench_after" and 0.0 <= ev.value <= 1.0
  assert ev.params is results[-2].params          # the weights pass through unchanged
  saved = json.loads((workdir / "eval" / "comparison.json").read_text())
  assert saved["before_stage"] == "midtrain" and saved["healthbench_examples"] == 3
  rows = {r["metric"]: r for r in saved["rows"]}
  hb = rows["HealthBench overall"]
  assert hb["after"] == ev.value and hb["delta"] == hb["after"] - hb["before"]
  assert 0 <= rows["consult diagnostic accuracy"]["before"] <= 1
  assert 1 <= rows["consult turns"]["after"] <= config.eval.max_turns
  for side in ("before", "after"):
    report = json.loads((workdir / "eval" / side / "healthbench" / "report.json").read_text())
    assert report["metrics"]["overall_score:n_samples"] == 3
    lines = (workdir / "eval" / side / "healthbench" / "judgements.jsonl").read_text().splitlines()
    assert len(lines) == 3
    consults = (workdir / "eval" / side / "consult" / "consultations.jsonl").read_text()
    assert len(consults.splitlines()) == 2
  metrics = [json.loads(l) for l in (workdir / "eval" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [0, 1] and "healthbench_score" in metrics[0]
  table = stage.comparison_table(str(workdir))
  assert "before (midtrain)" in table and "HealthBench overall" in table and "delta" in table


def test_finished_eval_is_skipped(tiny_run):
  workdir, config, results = tiny_run
  again = main.run(config, str(workdir), stages=["sft", "eval"])
  assert [(r.name, r.status, r.value) for r in again] == [
      ("sft", "skipped", results[1].value), ("eval", "skipped", results[2].value)]


def test_bad_eval_config_is_named(tiny_run):
  import pytest
  _, config, _ = tiny_run
  c = config.copy_and_resolve_references()
  c.eval.before = "export"
  with pytest.raises(ValueError, match="config.eval.before='export' must be a stage listed"):
    stage.run_eval(c, "/nonexistent/eval", None, None, object())
  c.eval.grader = "gpt"
  with pytest.raises(ValueError, match="grader must be 'reference' or 'model'"):
    stage.run_eval(c, "/nonexistent/eval", None, None, object())
