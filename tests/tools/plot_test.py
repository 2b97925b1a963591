"""m2.tools.plot on a fixture workdir: a train stage and an RL-like stage."""

import json
import os
import subprocess
import sys

import pytest

from m2.tools import plot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(directory, rows):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def workdir(tmp_path):
  _write(tmp_path / "sft", [{"step": 0, "eval_loss": 5.0}] + [
      {"step": s, "loss": 5.0 - 0.1 * s, "learning_rate": 1e-3, "tokens_per_s": 900.0}
      for s in range(2, 12, 2)])
  _write(tmp_path / "midtrain", [{"step": s, "loss": 6.0 - 0.1 * s} for s in range(1, 4)])
  _write(tmp_path / "rl_rubric", [
      {"step": s, "loss": 0.1, "reward": 0.1 * s, "reward/rubric": 0.2 * s,
       "reward/length": -0.01 * s, "reward_std": 0.3, "response_length": 40.0 + s,
       "entropy": 2.0 - 0.05 * s, "actor/pg_clipfrac": 0.02, "note": "text" if s == 1 else None}
      for s in range(1, 6)])
  (tmp_path / "rl_rubric" / "tb").mkdir()   # TensorBoard dirs are not stages
  (tmp_path / "export").mkdir()             # a stage without metrics is not listed
  return tmp_path


def test_families_are_found_by_key_name():
  panels, missing = plot.group(["loss", "eval_loss", "reward", "reward/rubric", "reward_std",
                                "response_length", "entropy", "actor/pg_clipfrac",
                                "grad_clip_norm", "learning_rate"])
  assert panels["loss"] == ["eval_loss", "loss"]
  assert panels["reward"] == ["reward"]
  assert panels["reward parts"] == ["reward/rubric"]
  assert panels["response length"] == ["response_length"]
  assert panels["entropy"] == ["entropy"]
  assert panels["clip fraction"] == ["actor/pg_clipfrac"]
  # The rest each get their own panel; nothing is dropped.
  assert {"grad_clip_norm", "learning_rate", "reward_std"} <= set(panels)
  assert missing == []
  _, missing = plot.group(["loss"])
  assert missing == ["reward", "reward parts", "response length", "entropy", "clip fraction"]
  # The names m2's GRPO stages log: a sequence-length limit counter is no response length.
  panels, missing = plot.group(["reward_mean", "reward/length", "response_tokens",
                                "rollout/clipped_to_seq_len", "clip_frac_high", "clip_frac_low",
                                "entropy", "pg_loss"])
  assert panels["response length"] == ["response_tokens"] and missing == []
  assert panels["reward parts"] == ["reward/length"]
  assert panels["rollout/clipped_to_seq_len"] == ["rollout/clipped_to_seq_len"]


def test_plot_run_draws_every_stage_in_pipeline_order(workdir):
  import matplotlib.image

  results = plot.plot_run(str(workdir))
  assert [r.stage for r in results] == ["midtrain", "sft", "rl_rubric"]
  sft = results[1]
  assert sft.panels["loss"] == ["eval_loss", "loss"] and "learning_rate" in sft.panels
  assert "reward" in sft.missing and "not logged: reward" in sft.note
  rl = results[2]
  assert rl.missing == [] and rl.skipped_values == 5   # one string, four nulls
  for r in results:
    image = matplotlib.image.imread(r.path)
    assert r.path == str(workdir / "plots" / f"{r.stage}.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
  # Different data gives a different picture.
  assert (workdir / "plots" / "sft.png").read_bytes() != (
      workdir / "plots" / "midtrain.png").read_bytes()


def test_stage_filter_and_bad_workdir(workdir, tmp_path):
  assert [r.stage for r in plot.plot_run(str(workdir), stages=["sft"])] == ["sft"]
  with pytest.raises(ValueError, match="no metrics.jsonl there"):
    plot.plot_run(str(workdir), stages=["rl_rule"])
  with pytest.raises(FileNotFoundError, match="not a directory"):
    plot.plot_run(str(tmp_path / "nope"))


def test_command_line(workdir, tmp_path):
  out = tmp_path / "pngs"
  proc = subprocess.run([sys.executable, "-m", "m2.tools.plot", f"--workdir={workdir}",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["midtrain.png", "rl_rubric.png", "sft.png"]
  assert "midtrain: " in proc.stdout and "not logged: reward" in proc.stdout
