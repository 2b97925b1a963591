"""export.to_hf: orbax run -> transformers folder; logits parity on a padded batch."""

import json
import math
import os

import numpy as np
import pytest

from export import to_hf
from export_helpers import TEXTS, m2_model, padded_batch, tiny_export_config


def test_folder_loads_offline_with_tokenizer_and_chat_template(exported):
  from transformers import AutoTokenizer

  from m2.data.chat import ChatFormat
  from m2.data.tokenizers import ByteTokenizer

  names = sorted(os.listdir(exported))
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json", to_hf.TOKENIZER_CODE} <= set(names)
  assert not [n for n in os.listdir(exported.parent) if n.startswith(".model.tmp")]
  config = json.loads((exported / "config.json").read_text())
  assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_hidden_layers"] == 2
  generation = json.loads((exported / "generation_config.json").read_text())
  assert generation["eos_token_id"] == [2] and generation["pad_token_id"] == 0
  tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
  ours = ByteTokenizer()
  # Decomposed accents and the angstrom sign: Qwen2Tokenizer's NFC would change their bytes.
  for text in TEXTS + ["ünïcode 肺炎 ✓", "cafe\u0301 1 \u212b"]:
    assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert tok.decode(ours.encode(text)) == text
  chat = [{"role": "user", "content": "I have a cough."}]
  rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
  assert rendered == ChatFormat(ours).render(chat, add_generation_prompt=True)


def _transformers_logits(folder, tokens, positions, segments):
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                 attention_mask=torch.as_tensor(segments),
                 position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()


def test_logits_match_m2_on_a_padded_batch(trained_run, exported):
  from m2.data.tokenizers import ByteTokenizer

  cfg, params, meta, step = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  assert step == 60 and meta["stage"] == "midtrain"
  tokens, positions, segments = padded_batch(ByteTokenizer(), TEXTS)
  ours, _ = m2_model(cfg, params)(tokens, positions, segments)
  theirs = _transformers_logits(exported, tokens, positions, segments)
  real = segments.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4, rtol=0)
  # The model was trained: a random init would not predict these bytes this well.
  assert np.mean(np.argmax(theirs[real][:-1], -1) == tokens[real][1:]) > 0.1


def test_a_quantization_aware_model_exports_the_weights_it_computes_with(trained_run, tmp_path):
  from m2.data.tokenizers import ByteTokenizer

  cfg, params, _, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  qat = cfg.replace(quant="int4_asym_g64")
  out = tmp_path / "qat"
  out.mkdir()
  to_hf.write_hf_folder(qat, params, out, ByteTokenizer())
  tokens, positions, segments = padded_batch(ByteTokenizer(), TEXTS)
  ours, _ = m2_model(qat, params)(tokens, positions, segments)
  dense, _ = m2_model(cfg, params)(tokens, positions, segments)
  theirs = _transformers_logits(out, tokens, positions, segments)
  real = segments.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4, rtol=0)
  assert np.abs(np.asarray(dense)[real] - theirs[real]).max() > 1e-2  # not the master weights


def test_an_hf_tokenizer_folder_ships_the_chat_template_m2_trained_with(exported, tmp_path):
  import shutil

  from m2.data.chat import CHAT_TEMPLATE
  from m2.data.tokenizers import HFTokenizer

  source = tmp_path / "qwen_like"
  shutil.copytree(exported, source)
  config_file = source / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config["chat_template"] = "{{ 'You are Qwen, created by Alibaba Cloud.' }}"
  config_file.write_text(json.dumps(config))
  out = tmp_path / "out"
  out.mkdir()
  to_hf.write_tokenizer(HFTokenizer(str(source)), out)
  assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_sharded_export_roundtrips_through_m2(trained_run, tmp_path):
  from m2.model import hf
  out = tmp_path / "sharded"
  to_hf.export(trained_run, str(out), max_shard_bytes=200_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0].startswith("model-00001-of-")
  cfg, params, _, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  _, state = hf.load_hf_checkpoint(out)
  from flax import nnx
  loaded = nnx.to_pure_dict(state)
  np.testing.assert_array_equal(np.asarray(loaded["blocks"]["attn"]["qkv"]),
                                params["blocks"]["attn"]["qkv"])


def test_bad_inputs_get_clear_errors_and_leave_nothing(trained_run, tmp_path, monkeypatch):
  out = tmp_path / "busy"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="--overwrite"):
    to_hf.export(trained_run, str(out))
  assert os.listdir(out) == ["keep.txt"]
  with pytest.raises(FileNotFoundError, match="no stage with checkpoints"):
    to_hf.export(str(tmp_path), str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    to_hf.export(trained_run, str(tmp_path / "y"), tokenizer=str(tmp_path))
  assert not (tmp_path / "y").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  # An unknown family in the checkpoint is named.
  stage = to_hf.find_stage_dir(trained_run)
  meta_file = next(stage.glob("checkpoints/*/meta/metadata"))
  saved = meta_file.read_text()
  try:
    meta_file.write_text(saved.replace('"family": "qwen2"', '"family": "llama"'))
    with pytest.raises(ValueError, match="unknown model family 'llama'"):
      to_hf.export(trained_run, str(tmp_path / "z"))
  finally:
    meta_file.write_text(saved)
  assert not (tmp_path / "z").exists()
  # A failure half-way through writing leaves no folder and no temp dir.
  from m2.model import hf
  real = hf.save_hf_checkpoint

  def fail_after_writing(cfg, params, folder, **kw):
    real(cfg, params, folder, **kw)
    raise OSError("disk full")

  monkeypatch.setattr(hf, "save_hf_checkpoint", fail_after_writing)
  with pytest.raises(OSError, match="disk full"):
    to_hf.export(trained_run, str(tmp_path / "w"))
  monkeypatch.undo()
  assert not (tmp_path / "w").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  # --overwrite replaces the folder's files.
  to_hf.export(trained_run, str(out), overwrite=True)
  assert "keep.txt" not in os.listdir(out) and (out / "config.json").is_file()


def test_sentencepiece_export_loads_with_autotokenizer_as_m2_tokenises(tmp_path):
  """AutoTokenizer on an exported SentencePiece folder (as vLLM and SGLang call it)
  gives m2's ids and chat prompt, next to a Qwen2 or Qwen3 config.json or none."""
  from transformers import AutoTokenizer

  from export.quantize import medical_texts
  from m2.data import tokenizers
  from m2.data.chat import ChatFormat
  from m2.model.config import ModelConfig
  sp = tokenizers.train_sentencepiece(medical_texts("train", limit=300),
                                      str(tmp_path / "sp.model"), vocab_size=600)
  folder = tmp_path / "tok"
  to_hf.write_tokenizer(sp, folder)
  held = medical_texts("test1", limit=40) + ["  two  spaces, digits 12345 and <|im_end|> ✓",
                                             "cafe\u0301 \u212b"]
  chat = [{"role": "system", "content": "You are a careful clinician."},
          {"role": "user", "content": held[0]}]
  m2_prompt = ChatFormat(sp).prompt(chat).ids.tolist()
  engines = {"plain": {}, "vllm": dict(trust_remote_code=False, revision=None, cache_dir=None,
                                       truncation_side="left"),
             "sglang": dict(trust_remote_code=False, tokenizer_revision=None,
                            clean_up_tokenization_spaces=False),
             "remote_code": dict(trust_remote_code=True)}
  model = dict(vocab_size=600, num_layers=1, embed_dim=64, num_heads=1, num_kv_heads=1,
               head_dim=64, mlp_dim=128)
  # transformers 5 maps model_type qwen2 to Qwen2Tokenizer (byte-level rules, wrong on
  # every one of these texts) unless the export's auto_map stops it.
  for family in (None, "qwen2", "qwen3"):
    if family:
      (folder / "config.json").write_text(json.dumps(
          ModelConfig(**model, family=family).to_hf_config()))
    for engine, kw in engines.items():
      tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
      where = (family, engine, type(tok).__name__)
      wrong = [t for t in held if tok(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
      assert not wrong, (where, wrong[:1])
      assert all(tok.decode(sp.encode(t)) == t for t in held), where
      ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
      assert list(ids) == m2_prompt, where
      assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id, sp.pad_id), where


def test_export_stage_of_m2_main(trained_run, tmp_path):
  import shutil

  import ml_collections

  from export import bundle
  from m2 import main
  c = tiny_export_config(os.path.join(os.path.dirname(trained_run), "cache"))
  c.stages = ("midtrain", "export")
  c.export = ml_collections.ConfigDict(dict(dtype="", quantize="rtn", calib_samples=16,
                                            calib_seq_len=128, quality_windows=4,
                                            quality_eval_limit=2, quality_eval_max_new_tokens=8,
                                            draft_layers=1, draft_steps=10, draft_prompts=16,
                                            draft_new_tokens=32, draft_eval_prompts=2))
  results = main.run(c, trained_run)
  assert [(r.name, r.status) for r in results] == [("midtrain", "skipped"), ("export", "ran")]
  stage = os.path.join(trained_run, "export")
  # The stage dir is the bundle: int4 target, draft, tokenizer, serve.sh, budget, README.
  assert {"DONE", "hf", "int4", "draft", "quality.json", "quality.txt", "serve.sh",
          "budget.json", "README.md", "tokenizer.json", "tokenizer_config.json",
          to_hf.TOKENIZER_CODE} <= set(os.listdir(stage))
  assert not [n for n in os.listdir(stage) if n.startswith(".")]   # no draft train dir left
  assert main.export_line(trained_run) == f"exported bundle: {os.path.abspath(stage)}"
  draft = json.loads(open(os.path.join(stage, "draft", "config.json")).read())
  assert draft["num_hidden_layers"] == 1
  script = open(os.path.join(stage, "serve.sh")).read()
  assert os.access(os.path.join(stage, "serve.sh"), os.X_OK)
  assert '"$DIR/int4"' in script and '--speculative-draft-model-path "$DIR/draft"' in script
  budget = json.load(open(os.path.join(stage, "budget.json")))
  assert budget["file_check"]["relative_error"] < 0.02 and budget["target"] == "int4"
  spec = budget["draft_report"]["m2_speculative"]
  assert spec["k"] == 4 and spec["identical_to_plain_greedy"]
  readme = open(os.path.join(stage, "README.md")).read()
  assert "Largest context" in readme and "`draft/`: distilled 1-layer draft" in readme
  # The quality table: dense reference, bf16 and RTN, with the eval score before and after.
  rows = {r["method"]: r for r in json.load(open(os.path.join(stage, "quality.json")))["rows"]}
  assert list(rows) == ["fp32", "bf16", "rtn"]
  assert rows["fp32"]["kl"] == 0 and rows["rtn"]["kl"] > rows["bf16"]["kl"] >= 0
  # The NLL shift is paired per window; its mean is the log perplexity ratio (the
  # reference log-probs are kept in fp32, hence rel=1e-4).
  assert rows["fp32"]["dnll"] == 0 and rows["rtn"]["dnll_se"] > 0
  assert rows["rtn"]["dnll"] == pytest.approx(
      math.log(rows["rtn"]["ppl"] / rows["fp32"]["ppl"]), rel=1e-4)
  assert all(0 <= r["healthbench"] <= 1 and 0 <= r["same_response"] <= 1 for r in rows.values())
  assert "HealthBench" in open(os.path.join(stage, "quality.txt")).read()
  with open(os.path.join(stage, "metrics.jsonl")) as f:
    final = json.loads(f.readlines()[-1])
  assert final["ppl_int4"] == rows["rtn"]["ppl"] and final["kl_int4"] == rows["rtn"]["kl"]
  # The draft's acceptance length reaches metrics.jsonl (1: nothing accepted, k + 1: all).
  assert final["tokens_per_round"] == spec["tokens_per_round"]
  assert 1.0 <= final["tokens_per_round"] <= 5.0 and 0 <= final["draft_acceptance_rate"] <= 1
  int4 = json.loads(open(os.path.join(stage, "int4", "config.json")).read())
  assert int4["quantization_config"]["format"] == "pack-quantized"
  assert results[1].metric == "weight_bytes" and results[1].value == os.path.getsize(
      os.path.join(stage, "int4", "model.safetensors"))
  # draft_layers=0: the same bundle files without the speculative lines.
  plain = tmp_path / "plain"
  plain.mkdir()
  shutil.copytree(os.path.join(stage, "int4"), plain / "int4")
  bundle.write_bundle_files(plain, bundle.ServePlan(), target="int4", draft=None)
  script = (plain / "serve.sh").read_text()
  assert "vllm serve" in script and "speculative" not in script and "--draft" not in script
  assert "draft_report" not in json.loads((plain / "budget.json").read_text())
  assert "no draft model" in (plain / "README.md").read_text()


def test_export_stage_rejects_bad_draft_fields(trained_run):
  from export.stage import run_export_stage
  from m2 import main
  from m2.model.config import model_config_from
  c = tiny_export_config(os.path.join(os.path.dirname(trained_run), "cache"))
  c.stages = ("midtrain", "export")
  c.export = dict(quantize="rtn", draft_steps=0)
  with pytest.raises(ValueError, match=r"config.export.draft_steps: a positive int \(got 0\)"):
    main.check_config(c)
  c.export = dict(quantize="rtn", draft_layers=-1)
  with pytest.raises(ValueError, match="config.export.draft_layers: an int >= 0"):
    main.check_config(c)
  c.export = dict(quantize="rtn", draft_k=True)
  with pytest.raises(ValueError, match="config.export.draft_k"):
    main.check_config(c)
  # More layers than the target has: refused before anything is written.
  c.export = dict(quantize="rtn", draft_layers=3)
  with pytest.raises(ValueError, match=r"draft_layers=3: at most the target's 2 layers"):
    run_export_stage(c, os.path.join(trained_run, "export_bad"), model_config_from(c.model),
                     init_params={})
  assert not os.path.exists(os.path.join(trained_run, "export_bad"))
