"""The main job: stages from one config, skip when done, clear config errors."""

import importlib.util
import os

import pytest

from m2 import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
  train = {"batch_size": 8, **train}
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(preset="", vocab_size=320, num_layers=1, embed_dim=32, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.midtrain.train.update(steps=6, seq_len=32, log_every=2, save_every=3,
                          **train)
  return c


def test_tiny_pipeline_trains_then_skips_when_done(tmp_path):
  results = main.run(tiny_config(), str(tmp_path))
  assert [(r.name, r.status) for r in results] == [("midtrain", "ran")]
  first_loss = results[0].value
  assert 0 < first_loss < 6.0  # below uniform over the byte vocab (ln 259 = 5.56) plus slack
  stage = tmp_path / "midtrain"
  assert (stage / "metrics.jsonl").exists() and (stage / "tb").is_dir()
  assert sorted(os.listdir(stage / "checkpoints")) == ["3", "6"]
  again = main.run(tiny_config(), str(tmp_path))
  assert [(r.name, r.status, r.value) for r in again] == [("midtrain", "skipped", first_loss)]
  table = main.summary_table(again)
  assert "midtrain" in table and "skipped" in table


def test_loss_goes_down_on_the_medical_corpus(tmp_path):
  c = tiny_config()
  c.midtrain.train.update(steps=30, log_every=5, save_every=30)
  c.midtrain.train.optimizer.update(learning_rate=3e-3, warmup_steps=5, decay_steps=25)
  main.run(c, str(tmp_path))
  from m2.train.metrics import read_metrics
  losses = [r["loss"] for r in read_metrics(str(tmp_path / "midtrain"))]
  assert losses[-1] < losses[0] - 1.0, losses


def test_unknown_config_field_is_named(tmp_path):
  c = tiny_config()
  c.midtrain.train.unlock()
  c.midtrain.train.stepz = 3
  with pytest.raises(ValueError, match=r"config\.midtrain\.train\.stepz"):
    main.run(c, str(tmp_path))


def test_bad_model_field_is_named(tmp_path):
  c = tiny_config()
  c.model.num_kv_heads = 3
  with pytest.raises(ValueError, match=r"config\.model.*num_kv_heads"):
    main.run(c, str(tmp_path))


def test_unknown_stage_is_refused(tmp_path):
  with pytest.raises(ValueError, match="not in config.stages"):
    main.run(tiny_config(), str(tmp_path), stages=["midtrian"])


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
  with pytest.raises(ValueError, match="batch_size=4 is not divisible by the data-parallel size 8"):
    main.run(tiny_config(batch_size=4), str(tmp_path))


def _tiny_hf_checkpoint(folder):
  """A random Qwen2 checkpoint plus a byte-level BPE tokenizer.json, all made here."""
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from m2.data.text import read_texts

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(read_texts(["mts_dialog"])[:200], trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(folder, "tokenizer.json"))
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, tie_word_embeddings=True)
  transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(folder)


def test_pipeline_starts_from_a_local_hf_checkpoint_on_a_mesh(tmp_path):
  from m2.model import hf

  ckpt = tmp_path / "hf"
  ckpt.mkdir()
  _tiny_hf_checkpoint(str(ckpt))
  c = tiny_config()
  c.model.hf_checkpoint = str(ckpt)
  c.midtrain.tokenizer = ""                      # use the checkpoint's tokenizer.json
  c.mesh.shape = (2, 2, 2)
  results = main.run(c, str(tmp_path / "run"))
  assert results[0].status == "ran"
  start = hf.load_model(str(ckpt))
  trained = results[0].params
  assert trained["embed"][...].shape == (512, 32)  # the checkpoint's shape, not the config's
  delta = abs(trained["embed"][...] - start.embed[...]).max()
  assert 0 < delta < 0.01                          # a few small steps from the imported weights
