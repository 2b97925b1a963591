"""HealthBench harness: generation from a checkpoint, grading, simple-evals report, regrade."""

import json

import numpy as np
import pytest

from m2.eval import healthbench as hb


@pytest.fixture(scope="module")
def examples():
  return [e for e in hb.load_examples(limit=40) if e.ideal_completion][:6]


def test_scores_follow_the_rubric_and_the_report_is_simple_evals(examples):
  assert len(examples) == 6
  grader = hb.make_grader("reference")
  ideal = hb.grade(grader, examples, [e.ideal_completion for e in examples], progress=False)
  empty = hb.grade(grader, examples, ["I am not sure."] * len(examples), progress=False)
  for rec, e in zip(ideal, examples):
    # Every criterion judged and saved; the score is Σ met points / Σ positive points.
    assert [j["criterion"] for j in rec["judgements"]] == [r.criterion for r in e.rubrics]
    met = sum(j["points"] for j in rec["judgements"] if j["criteria_met"])
    assert rec["score"] == pytest.approx(met / e.max_points)
    assert rec["metrics"]["theme:" + e.theme] == rec["score"]
  better = sum(a["score"] > b["score"] for a, b in zip(ideal, empty))
  assert better >= 4, [(a["score"], b["score"]) for a, b in zip(ideal, empty)]
  result = hb.report(ideal)
  m = result["metrics"]
  assert result["score"] == m["overall_score"] == pytest.approx(
      float(np.clip(np.mean([r["score"] for r in ideal]), 0, 1)))
  assert m["overall_score:n_samples"] == 6 and m["overall_score:bootstrap_std"] > 0
  assert any(k.startswith("axis:") for k in m) and any(k.startswith("theme:") for k in m)
  text = hb.format_report(result)
  assert text.splitlines()[1].startswith("overall_score")


def test_a_shared_grader_reports_each_runs_own_counts(examples):
  grader = hb.make_grader("reference")
  ideal = [e.ideal_completion for e in examples[:3]]
  hb.grade(grader, examples[:3], ideal, progress=False)
  before = hb.grader_stats(grader)
  hb.grade(grader, examples[:3], ideal, progress=False)   # the same judgements: all cached
  since = hb.grader_stats(grader, since=before)
  assert since["gradings"] == 3 and since["cache_misses"] == 0 and since["cache_hit_rate"] == 1
  assert hb.grader_stats(grader)["gradings"] == 6


def test_bad_records_are_counted_skips(tmp_path):
  good = (hb.load_examples(limit=1)[0])
  line = {"prompt_id": "p1", "prompt": [{"role": m.role, "content": m.content}
                                         for m in good.messages],
          "rubrics": [{"criterion": r.criterion, "points": r.points, "tags": list(r.tags)}
                      for r in good.rubrics], "example_tags": list(good.tags)}
  path = tmp_path / "hb.jsonl"
  path.write_text(json.dumps(line) + "\n" + json.dumps({"prompt_id": "p2"}) + "\n")
  assert [e.meta["prompt_id"] for e in hb.load_examples(str(path))] == ["p1"]
  with pytest.raises(ValueError, match="hb.jsonl:2"):
    hb.load_examples(str(path), policy="raise")
  path.write_text(json.dumps({"prompt_id": "p2"}) + "\n")
  with pytest.raises(ValueError, match="no HealthBench examples"):
    hb.load_examples(str(path))
  with pytest.raises(ValueError, match="choose from"):
    hb.load_examples("", ["hard"])


def test_command_line_generates_from_a_stage_dir_then_regrades(tiny_run, tmp_path):
  workdir, config, _ = tiny_run
  out = tmp_path / "hb"
  result = hb.main([f"--checkpoint={workdir / 'sft'}", "--limit=2", "--max_new_tokens=8",
                    "--max_prompt_tokens=192", f"--out={out}"])
  records = hb.load_judgements(str(out))
  assert [r["id"] for r in records] == [e.id for e in hb.load_examples(limit=2)]
  assert all(len(r["judgements"]) > 0 and isinstance(r["response"], str) for r in records)
  saved = json.loads((out / "report.json").read_text())
  assert saved["score"] == result["score"] and saved["grader"]["judge"] == "reference"
  # Regrading the saved responses with the same grader gives the same report.
  again = hb.main([f"--regrade={out}", f"--out={tmp_path / 'regraded'}"])
  assert again["changed_judgements"] == 0 and again["metrics"] == result["metrics"]
  # A tampered response is graded as written: the saved file is what gets regraded.
  records[1]["response"] = hb.load_examples(limit=2)[1].ideal_completion
  (out / "judgements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  changed = hb.main([f"--regrade={out}", f"--out={tmp_path / 'regraded2'}"])
  assert changed["changed_judgements"] > 0 and changed["score"] != result["score"]


def test_http_grader_against_a_local_openai_compatible_server(examples, monkeypatch):
  import http.server
  import threading

  seen, attempts = [], {}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      seen.append((self.path, self.headers.get("Authorization"), body["model"]))
      prompt = body["messages"][-1]["content"]
      # The first ask of an even-length prompt is malformed (so retried); the verdict marks
      # criteria that mention fever.
      attempts[prompt] = attempts.get(prompt, 0) + 1
      reply = ("not json" if attempts[prompt] == 1 and len(prompt) % 2 == 0 else json.dumps(
          {"explanation": "checked", "criteria_met": "fever" in prompt.split("rubric")[-1]}))
      data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv("OPENAI_API_KEY", "test-key")
  try:
    grader = hb.make_grader("http", url=f"http://127.0.0.1:{server.server_port}/v1",
                            model="judge-1")
    records = hb.grade(grader, examples[:2], ["A short answer."] * 2, progress=False)
  finally:
    server.shutdown()
  n = sum(len(e.rubrics) for e in examples[:2])
  assert all(p == "/v1/chat/completions" and a == "Bearer test-key" and m == "judge-1"
             for p, a, m in seen)
  stats = grader.judge.stats
  assert stats.judgements == n and stats.malformed > 0 and stats.fallbacks == 0
  assert len(seen) == n + stats.malformed
  assert stats.malformed == sum(len(p) % 2 == 0 for p in attempts)
  assert all(j["source"] == "http:judge-1" for r in records for j in r["judgements"])
  with pytest.raises(ValueError, match="--grader_url"):
    hb.make_grader("http")
