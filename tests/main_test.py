"""The main job: stages from one config, skip when done, clear config errors."""

import importlib.util
import json
import os
import shutil

import pytest

from m2 import main
from m2.train.checkpoint import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One data cache for the module: each prepared dataset is written once."""
  return str(tmp_path_factory.mktemp("cache"))


def tiny_config(cache, **train):
  train = {"batch_size": 8, **train}
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = ("midtrain",)
  c.model.update(preset="", vocab_size=320, num_layers=1, embed_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64)
  # Bytes and two quick sources keep the data preparation to seconds.
  c.data.update(tokenizer="byte", cache_dir=cache, math_items=300)
  c.midtrain.domains.medical = ("mts_dialog",)
  c.midtrain.mix_batches = 6
  c.midtrain.train.update(steps=6, seq_len=32, log_every=2, save_every=3, eval_every=3,
                          eval_batches=2, **train)
  c.sft.train.update(steps=4, batch_size=8, seq_len=64, log_every=2, save_every=4,
                     eval_every=2, eval_batches=2)
  return c


def test_tiny_pipeline_trains_then_skips_when_done(tmp_path, cache):
  results = main.run(tiny_config(cache), str(tmp_path))
  assert [(r.name, r.status, r.metric) for r in results] == [("midtrain", "ran", "eval_loss")]
  first_loss = results[0].value
  assert 0 < first_loss < 6.0  # below uniform over the byte vocab (ln 259 = 5.56) plus slack
  stage = tmp_path / "midtrain"
  assert (stage / "metrics.jsonl").exists() and (stage / "tb").is_dir()
  assert sorted(os.listdir(stage / "checkpoints")) == ["3", "6"]
  mix = json.loads((stage / "mix.json").read_text())
  assert set(mix["domains"]) == {"medical", "math"} and mix["dropped"] == {
      "general": "no sources listed"}
  data = json.loads((stage / "data.json").read_text())
  assert data["documents"]["sources"]["mts_dialog"]["excluded"] == 400   # MTS test sets
  again = main.run(tiny_config(cache), str(tmp_path))
  assert [(r.name, r.status, r.value) for r in again] == [("midtrain", "skipped", first_loss)]
  table = main.summary_table(again)
  assert "midtrain" in table and "skipped" in table
  # A DONE or a metrics line torn by a kill does not block the run: it resumes at its end.
  (stage / "DONE").write_text('{"metric": "eval_lo')
  with open(stage / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')
  again = main.run(tiny_config(cache), str(tmp_path))
  assert [(r.name, r.status) for r in again] == [("midtrain", "resumed")]
  assert json.loads((stage / "DONE").read_text())["metric"] == "eval_loss"


def test_loss_goes_down_on_the_medical_corpus(tmp_path, cache):
  c = tiny_config(cache)
  c.midtrain.train.update(steps=30, log_every=5, save_every=30, eval_every=15)
  c.midtrain.train.optimizer.update(learning_rate=3e-3, warmup_steps=5, decay_steps=25)
  main.run(c, str(tmp_path))
  from m2.train.metrics import read_metrics
  rows = read_metrics(str(tmp_path / "midtrain"))
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 1.0, losses
  evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
  assert [s for s, _ in evals] == [0, 15, 30] and evals[-1][1] < evals[0][1] - 1.0, evals


def test_sft_starts_from_midtrain_weights_and_trains_on_doctor_turns(tmp_path, cache,
                                                                     monkeypatch):
  from m2.train import loop
  starts = []
  real = loop.train

  def spy(*args, **kwargs):
    starts.append(kwargs.get("init_params"))
    return real(*args, **kwargs)

  monkeypatch.setattr(loop, "train", spy)
  c = tiny_config(cache)
  c.stages = ("midtrain", "sft")
  c.midtrain.train.update(steps=2, save_every=2, eval_every=0)
  c.sft.sources = ("aci_bench",)
  c.sft.qa_sources = ("pubmedqa",)
  results = main.run(c, str(tmp_path))
  assert [(r.name, r.status, r.metric) for r in results] == [
      ("midtrain", "ran", "loss"), ("sft", "ran", "eval_loss")]
  assert starts[0] is None and starts[1] is results[0].params
  from m2.train.metrics import read_metrics
  rows = read_metrics(str(tmp_path / "sft"))
  assert [r["step"] for r in rows] == [0, 2, 4] and all("eval_loss" in r for r in rows)
  data = json.loads((tmp_path / "sft" / "data.json").read_text())
  windows, qa = data["windows"], data["qa"]["sources"]["pubmedqa"]
  # the dialogues' chats plus one per PubMedQA training item (its test split stays out)
  assert qa["excluded"] == 500 and windows["chats"] == 84 + qa["train"]
  assert 0 < windows["assistant_tokens"] < windows["tokens"]
  again = main.run(c, str(tmp_path), stages=["sft"])
  assert [(r.name, r.status) for r in again] == [("sft", "skipped")]
  # The finished midtrain hands its weights on only to a run with its tokenizer.
  shutil.rmtree(tmp_path / "sft")
  c.data.tokenizer = "sp:8192"
  with pytest.raises(CheckpointError, match="tokenizer: checkpoint has 'byte', run expects"):
    main.run(c, str(tmp_path), stages=["sft"])


def test_a_stage_that_logs_nothing_gets_metrics_and_the_summary_shows_its_times(
    tmp_path, cache, monkeypatch):
  """Every stage directory ends with metrics.jsonl + TensorBoard events (export logs
  none itself); DONE keeps wall and CPU time, which a later skip reports."""
  import types

  def quiet_stage(config, workdir, model_cfg, mesh_cfg, params):
    os.makedirs(workdir, exist_ok=True)
    result = types.SimpleNamespace(state=types.SimpleNamespace(params=params),
                                   resumed_from=None,
                                   final_metrics={"weight_bytes": 3 * 2**20, "ppl": 12.5,
                                                  "note": "text is not a scalar"})
    return result, "weight_bytes", 3 * 2**20

  monkeypatch.setitem(main.STAGES, "quiet", quiet_stage)
  c = tiny_config(cache)
  c.stages = ("quiet",)
  results = main.run(c, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "quiet" / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "weight_bytes": 3 * 2**20, "ppl": 12.5}]
  assert os.listdir(tmp_path / "quiet" / "tb")
  done = json.loads((tmp_path / "quiet" / "DONE").read_text())
  assert done["wall_s"] >= done["cpu_s"] >= 0 and done["wall_s"] == results[0].wall_s
  table = main.summary_table(results)
  assert "3.0 MiB" in table and "total" in table and "cpu time" in table
  again = main.run(c, str(tmp_path))
  assert [(r.status, r.wall_s, r.cpu_s) for r in again] == [
      ("skipped", done["wall_s"], done["cpu_s"])]
  assert "total" not in main.summary_table(again)   # nothing ran this time


def test_summary_table_lines_up_times_and_values():
  results = [main.StageResult("midtrain", "skipped", 457.1, "eval_loss", 4.2309, cpu_s=414.0),
             main.StageResult("rl_rule", "resumed", 61.0, "reward_last10", 0.3336, cpu_s=40.5),
             main.StageResult("eval", "ran", 104.5, "healthbench_after", None, cpu_s=57.0)]
  lines = main.summary_table(results).splitlines()
  assert lines[0].split() == ["stage", "status", "wall", "time", "cpu", "time", "metric",
                              "value"]
  assert "7 min 37.1 s" in lines[2] and "6 min 54.0 s" in lines[2] and "4.2309" in lines[2]
  assert lines[4].endswith("-")                      # no value: a dash, not "None"
  # The total counts this run's stages only (the skipped one ran earlier).
  assert lines[-1].split()[:3] == ["total", "2", "run"] and "2 min 45.5 s" in lines[-1]
  assert lines[-1].rstrip().endswith("1 min 37.5 s")
  assert len({len(l) for l in lines[:2]}) == 1       # header and rule have one width


def test_unknown_config_field_is_named(tmp_path, cache):
  c = tiny_config(cache)
  c.midtrain.train.unlock()
  c.midtrain.train.stepz = 3
  with pytest.raises(ValueError, match=r"config\.midtrain\.train\.stepz"):
    main.run(c, str(tmp_path))


def test_bad_data_and_sft_fields_are_named(tmp_path, cache):
  c = tiny_config(cache)
  c.stages = ("midtrain", "sft")
  c.sft.thinking_mode = "maybe"
  with pytest.raises(ValueError, match=r"config\.sft: thinking_mode must be one of"):
    main.run(c, str(tmp_path), stages=["sft"])
  c = tiny_config(cache)
  c.midtrain.domains.medical = ("healthbench",)
  from m2.data.loaders import EvalOnlyError
  with pytest.raises(EvalOnlyError, match="evaluation-only"):
    main.run(c, str(tmp_path))
  c = tiny_config(cache)
  c.midtrain.mix.math = -1.0
  with pytest.raises(ValueError, match=r"config\.midtrain: mix ratio of 'math'"):
    main.run(c, str(tmp_path))


def test_bad_model_field_is_named(tmp_path, cache):
  c = tiny_config(cache)
  c.model.num_kv_heads = 3
  with pytest.raises(ValueError, match=r"config\.model.*num_kv_heads"):
    main.run(c, str(tmp_path))


def _load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


@pytest.mark.parametrize("path,arg", [("configs/tiny.py", None),
                                      ("configs/qwen2_5_1_5b.py", None),
                                      ("configs/qwen2_5_32b.py", "h100x8"),
                                      ("configs/qwen2_5_32b.py", "v5p64")])
def test_every_shipped_config_runs_every_stage_and_checks(path, arg):
  c = _load_config(path, arg)
  assert tuple(c.stages) == ("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric",
                             "rl_multiturn", "eval", "export")
  main.check_config(c)


def test_a_typo_in_a_late_stage_fails_before_the_first_stage_runs(tmp_path, cache):
  c = tiny_config(cache)
  c.stages = tuple(_load_config("configs/tiny.py").stages)
  c.rl_multiturn.grpo.unlock()
  c.rl_multiturn.grpo.group_sise = 4
  with pytest.raises(ValueError, match=r"config\.rl_multiturn\.grpo\.group_sise"):
    main.run(c, str(tmp_path))
  c = tiny_config(cache)
  c.unlock()
  c.rl_multitrun = {}
  with pytest.raises(ValueError, match=r"unknown config block\(s\) config\.rl_multitrun"):
    main.run(c, str(tmp_path))
  c = tiny_config(cache)
  c.verifier.grader = "model"
  with pytest.raises(ValueError, match="grader='model' needs grader_checkpoint"):
    main.run(c, str(tmp_path))
  assert not os.listdir(tmp_path)   # nothing ran


def test_unknown_stage_is_refused(tmp_path, cache):
  with pytest.raises(ValueError, match="not in config.stages"):
    main.run(tiny_config(cache), str(tmp_path), stages=["midtrian"])
  (tmp_path / "file").write_text("")
  with pytest.raises(NotADirectoryError, match="is a file"):
    main.run(tiny_config(cache), str(tmp_path / "file"))
  c = tiny_config(cache)
  c.stages = ("midtrain", "sft", "eval")
  del c["sft"]
  with pytest.raises(ValueError, match="lists 'sft' but the config has no config.sft block"):
    main.run(c, str(tmp_path))


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path, cache):
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the data-parallel size 8"):
    main.run(tiny_config(cache, batch_size=4), str(tmp_path))


def _tiny_hf_checkpoint(folder):
  """A random Qwen2 checkpoint plus a byte-level BPE tokenizer.json, all made here."""
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from m2.data import deid, loaders, records

  dialogues = loaders.load_source("mts_dialog", policy="skip")[0][:200]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(records.documents(deid.gate(dialogues).records), trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(folder, "tokenizer.json"))
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, tie_word_embeddings=True)
  transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(folder)


def test_pipeline_starts_from_a_local_hf_checkpoint_on_a_mesh(tmp_path, cache):
  from m2.model import hf

  ckpt = tmp_path / "hf"
  ckpt.mkdir()
  _tiny_hf_checkpoint(str(ckpt))
  c = tiny_config(cache)
  c.model.hf_checkpoint = str(ckpt)
  c.data.tokenizer = ""                          # use the checkpoint's tokenizer.json
  c.mesh.shape = (2, 2, 2)
  results = main.run(c, str(tmp_path / "run"))
  assert results[0].status == "ran"
  start = hf.load_model(str(ckpt))
  trained = results[0].params
  assert trained["embed"][...].shape == (512, 32)  # the checkpoint's shape, not the config's
  delta = abs(trained["embed"][...] - start.embed[...]).max()
  assert 0 < delta < 0.01                          # a few small steps from the imported weights
  # The stage names the tokenizer it used, so its weights reload with it.
  from m2.train import policy
  assert policy.stage_tokenizer(str(tmp_path / "run" / "midtrain")) == str(ckpt)
  assert type(policy.load_policy(str(tmp_path / "run" / "midtrain")).tokenizer).__name__ == (
      "HFTokenizer")


def test_command_line_prints_the_summary_and_logs_skips(tmp_path):
  """`python -m m2.main` on a workdir whose stages are done: m2.main's own log lines
  (under `-m` its module is __main__) and the summary reach the user."""
  import subprocess
  import sys
  for name, metric, value in (("midtrain", "eval_loss", 4.25), ("sft", "eval_loss", 5.5)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "DONE").write_text(json.dumps(
        {"metric": metric, "value": value, "wall_s": 75.0, "cpu_s": 60.0}))
  proc = subprocess.run(
      [sys.executable, "-m", "m2.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.stages=('midtrain', 'sft')"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "stage midtrain already complete; skipping" in proc.stderr
  lines = proc.stdout.splitlines()
  row = next(l for l in lines if l.startswith("midtrain"))
  assert row.split()[1] == "skipped" and "1 min 15.0 s" in row and row.endswith("4.2500")
  assert any(l.startswith("sft ") for l in lines) and "earlier run" in proc.stdout
  # A misspelled override and a URL workdir fail in one line that names them.
  for args, message in (
      ([f"--workdir={tmp_path}", "--config.midtrain.train.stepz=3"],
       '--config.midtrain.train.stepz: no such config field (\'stepz\'; Did you mean "steps"'),
      (["--workdir=gs://bucket/run"], "--workdir=gs://bucket/run: m2 writes its workdir with")):
    proc = subprocess.run([sys.executable, "-m", "m2.main", "--config=configs/tiny.py", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
