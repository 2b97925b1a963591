"""experiments/sweep.py: a 2-point grid over a tiny, very short midtrain."""

import csv
import importlib.util
import json
import os
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/tiny.py")

_spec = importlib.util.spec_from_file_location("sweep", os.path.join(ROOT, "experiments/sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep"] = sweep   # dataclasses look their module up
_spec.loader.exec_module(sweep)


def tiny_overrides(cache):
  """A 1-layer model on bytes, 4 steps of midtrain on one small source."""
  return {
      "model.preset": "", "model.vocab_size": "320", "model.num_layers": "1",
      "model.embed_dim": "32", "model.num_heads": "2", "model.num_kv_heads": "1",
      "model.head_dim": "16", "model.mlp_dim": "64", "data.tokenizer": "byte",
      "data.cache_dir": cache, "data.math_items": "300",
      "midtrain.domains.medical": "('mts_dialog',)", "midtrain.mix_batches": "2",
      "midtrain.train.steps": "4", "midtrain.train.seq_len": "32",
      "midtrain.train.log_every": "2", "midtrain.train.save_every": "4",
      "midtrain.train.eval_every": "0"}


def test_grid_parsing_and_bad_input():
  grid = sweep.parse_grid(["midtrain.train.optimizer.learning_rate=1e-3, 3e-3",
                           "config.mesh.shape=[(1,8,1), (2,2,2)]"])
  assert grid == {"midtrain.train.optimizer.learning_rate": ["1e-3", "3e-3"],
                  "mesh.shape": ["(1, 8, 1)", "(2, 2, 2)"]}
  with pytest.raises(ValueError, match="expected key=value"):
    sweep.parse_grid(["learning_rate"])
  with pytest.raises(ValueError, match="repeated value"):
    sweep.parse_grid(["a=1,1"])
  config = sweep.load_config(CONFIG)
  sweep.apply_overrides(config, {"mesh.shape": "(2, 2, 2)", "midtrain.train.steps": "7",
                                 "sft.pack": "false"})
  assert config.mesh.shape == (2, 2, 2) and config.midtrain.train.steps == 7
  assert config.sft.pack is False
  with pytest.raises(ValueError, match=r"'midtrain\.train\.stepz' does not exist"):
    sweep.apply_overrides(config, {"midtrain.train.stepz": "3"})
  with pytest.raises(ValueError, match=r"--config\.midtrain\.train\.steps='x': not a int"):
    sweep.apply_overrides(config, {"midtrain.train.steps": "x"})


def test_print_mode_checks_keys_and_writes_one_command_per_point(tmp_path, capsys):
  with pytest.raises(ValueError, match="does not exist"):
    sweep.main([f"--config={CONFIG}", f"--workdir={tmp_path}", "--grid=model.nope=1,2"])
  with pytest.raises(ValueError, match="not in config.stages"):
    sweep.main([f"--config={CONFIG}", f"--workdir={tmp_path}", "--grid=sft.pack=true,false",
                "--stages=no_such_stage"])
  with pytest.raises(ValueError, match="None in the config, which a command line cannot"):
    sweep.main([f"--config={CONFIG}", f"--workdir={tmp_path}", "--grid=mesh.rollout_rules=1,2"])
  capsys.readouterr()
  assert sweep.main([f"--config={CONFIG}", f"--workdir={tmp_path}", "--mode=print",
                     "--stages=midtrain", "--set=midtrain.train.steps=5",
                     "--grid=midtrain.train.optimizer.learning_rate=1e-3,3e-3",
                     "--grid=midtrain.train.seed=0,1"]) == 0
  commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
  assert len(commands) == 4
  assert commands[0][:3] == [sys.executable, "-m", "m2.main"]
  assert "--config.midtrain.train.steps=5" in commands[3]
  assert "--config.midtrain.train.optimizer.learning_rate=3e-3" in commands[3]
  assert "--config.midtrain.train.seed=1" in commands[3]
  assert f"--workdir={tmp_path}/003_learning_rate=3e-3_seed=1" in commands[3]
  saved = json.loads((tmp_path / "sweep.json").read_text())
  assert saved["stages"] == ["midtrain"] and len(saved["points"]) == 4


def test_local_grid_runs_each_point_and_collects_a_csv(tmp_path, tmp_path_factory):
  # The session's data cache (shared with tests/eval): each dataset is prepared once.
  cache = str(tmp_path_factory.getbasetemp() / "m2_data_cache")
  out = sweep.run_sweep(CONFIG, str(tmp_path / "sweep"),
                        {"midtrain.train.optimizer.learning_rate": ["1e-4", "3e-3"]},
                        fixed=tiny_overrides(cache), stages=["midtrain"], mode="inprocess")
  assert out["metric"] == "midtrain/loss"   # the headline: no held-out eval here
  with open(tmp_path / "sweep" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == ["000_learning_rate=1e-4", "001_learning_rate=3e-3"]
  assert [r["status"] for r in rows] == ["done", "done"]
  assert [r["midtrain/step"] for r in rows] == ["4", "4"]
  losses = [float(r["midtrain/loss"]) for r in rows]
  # Same batches (same seed): 30x the learning rate moves the byte model further from
  # uniform (ln 320 = 5.77) in 4 steps.
  assert losses[1] < losses[0] < 6.0, losses
  assert all(float(r["midtrain/wall_s"]) > 0 and float(r["midtrain/learning_rate"]) > 0
             for r in rows)
  assert os.path.getsize(out["plot"]) > 1000
  # A rerun finds every stage done: nothing is retrained, the same numbers come back.
  again = sweep.run_sweep(CONFIG, str(tmp_path / "sweep"),
                          {"midtrain.train.optimizer.learning_rate": ["1e-4", "3e-3"]},
                          fixed=tiny_overrides(cache), stages=["midtrain"], mode="collect")
  assert [r["midtrain/loss"] for r in again["rows"]] == losses


def test_launch_mode_submits_one_job_per_point(tmp_path):
  jobs = tmp_path / "jobs.txt"
  with pytest.raises(ValueError, match="placeholder"):
    sweep.run_sweep(CONFIG, str(tmp_path / "s"), {"sft.pack": ["true", "false"]},
                    mode="launch", launcher="sbatch")
  out = sweep.run_sweep(CONFIG, str(tmp_path / "s"), {"sft.pack": ["true", "false"]},
                        stages=["sft"], mode="launch", launcher=f"echo {{name}} {{cmd}} >> {jobs}")
  lines = jobs.read_text().splitlines()
  assert out["returncodes"] == {"000_pack=true": 0, "001_pack=false": 0}
  assert [l.split()[0] for l in lines] == ["000_pack=true", "001_pack=false"]
  assert "--config.sft.pack=false" in lines[1] and "--stages=sft" in lines[1]
  # Nothing has run yet: collecting reports every point as not done.
  rows = sweep.run_sweep(CONFIG, str(tmp_path / "s"), {"sft.pack": ["true", "false"]},
                         stages=["sft"], mode="collect")["rows"]
  assert [r["status"] for r in rows] == ["not done", "not done"]
