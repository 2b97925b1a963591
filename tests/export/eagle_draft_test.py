"""export.draft --kind=eagle: an EAGLE head distilled from the target's samples and features."""

import json

import numpy as np
import pytest

from export import draft as D


@pytest.fixture(scope="module")
def eagle_folder(trained_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("eagle")
  cfg = D.DraftConfig(kind="eagle", prompts=32, prompt_len=32, new_tokens=48, steps=60,
                      batch_size=16)
  report = D.build_draft(trained_run, str(root / "eagle"), cfg, train_dir=str(root / "train"),
                         eval_prompts=2, eval_tokens=32)
  return root / "eagle", report


def test_the_distilled_head_is_exact_and_accepted(eagle_folder):
  folder, report = eagle_folder
  spec = report["m2_speculative"]
  assert spec["identical_to_plain_greedy"]
  assert spec["k"] == 4 and spec["tokens_per_round"] >= 2.5     # the goal
  assert json.loads((folder / "draft_report.json").read_text())["m2_speculative"] == spec
  # It learnt the target's tokens through the target's LM head: far below ln(259) nats.
  assert report["final"]["token_nll"] < 2.0

def test_the_folder_reads_back_bit_for_bit_and_drives_the_sampler(eagle_folder, trained_run,
                                                                   tmp_path):
  import jax

  from export import to_hf
  folder, report = eagle_folder
  cfg, params = D.read_eagle_folder(folder)
  target_cfg, target_params, _, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  assert cfg == target_cfg
  assert "embed" not in params and "lm_head" not in params  # it reads the target's
  D.write_eagle_folder(cfg, params, tmp_path)
  again_cfg, again = D.read_eagle_folder(tmp_path)
  assert again_cfg == cfg
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                                   params, again))
  prompts = [[int(t) for t in np.arange(40, 72) % 200]]
  again = D.speculative_stats(target_cfg, target_params, *D.eagle_drafter(cfg, params), prompts,
                              new_tokens=16)
  assert again["identical_to_plain_greedy"]


def test_a_folder_without_the_head_or_with_another_head_is_refused(eagle_folder, tmp_path):
  import shutil

  with pytest.raises(FileNotFoundError, match="not an EAGLE head folder"):
    D.read_eagle_folder(tmp_path)
  other = tmp_path / "other"
  shutil.copytree(eagle_folder[0], other)
  meta = json.loads((other / "eagle_config.json").read_text())
  (other / "eagle_config.json").write_text(json.dumps({**meta, "width": 64}))
  with pytest.raises(ValueError, match=r"width-64 EAGLE head.*missing \['up.weight'\]"):
    D.read_eagle_folder(other)


def test_the_vllm_layout_rebuilt_in_transformers_gives_the_heads_features(eagle_folder):
  """config.json + model.safetensors as vLLM's EAGLE-1 drafter reads them: fc over
  concat(embedding, feature), one Llama layer with qkv biases (a Qwen2 layer) without
  its input norm, no norm after it. Rebuilt in transformers from the files alone, it
  computes m2's predicted features."""
  import torch
  from flax import nnx
  from safetensors.torch import load_file
  from transformers import Qwen2Config, Qwen2Model

  folder, _ = eagle_folder
  config = json.loads((folder / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
  assert config["qkv_bias"] and not config["attention_bias"]
  tensors = load_file(str(folder / "model.safetensors"))
  assert not any(n.endswith("input_layernorm.weight") for n in tensors)
  layer = Qwen2Model(Qwen2Config(**{k: v for k, v in config.items() if k not in (
      "architectures", "model_type", "qkv_bias", "attention_bias", "mlp_bias")})).eval()
  layer.layers[0].input_layernorm = torch.nn.Identity()
  layer.norm = torch.nn.Identity()
  result = layer.load_state_dict({k: v for k, v in tensors.items() if k != "fc.weight"},
                                 strict=False)
  assert result.missing_keys == ["embed_tokens.weight"] and not result.unexpected_keys

  cfg, params = D.read_eagle_folder(folder)
  drafter, state = D.eagle_drafter(cfg, params)
  rng = np.random.default_rng(0)
  embeds, features = rng.normal(size=(2, 2, 9, cfg.embed_dim)).astype(np.float32)
  ours, _ = nnx.merge(drafter.graphdef, state)(
      embeds, features, np.broadcast_to(np.arange(9), (2, 9)), np.ones((2, 9), np.int32))
  with torch.no_grad():
    x = torch.cat([torch.from_numpy(embeds), torch.from_numpy(features)], -1)
    theirs = layer(inputs_embeds=x @ tensors["fc.weight"].T).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_a_draft_vocabulary_and_sampled_decoding(eagle_folder, trained_run, tmp_path):
  """--eagle_draft_vocab keeps the samples' most frequent tokens; --eval_temperature
  samples the held-out rounds (the rerun resumes the finished distillation)."""
  assert D.frequent_tokens(np.array([[3, 3, 5, 7, 7, 7]]), 2, 10).tolist() == [3, 7]
  folder, _ = eagle_folder
  cfg = D.DraftConfig(kind="eagle", prompts=32, prompt_len=32, new_tokens=48, steps=60,
                      batch_size=16, eagle_draft_vocab=64)
  again = D.build_draft(trained_run, str(tmp_path / "eagle"), cfg,
                        train_dir=str(folder.parent / "train"), eval_prompts=2, eval_tokens=32,
                        eval_temperature=1.0)
  spec = again["m2_speculative"]
  assert spec["temperature"] == 1.0 and spec["identical_to_plain_greedy"] is None
  assert 1.0 <= spec["tokens_per_round"] <= 5.0
  _, params = D.read_eagle_folder(tmp_path / "eagle")
  vocab = params["draft_vocab"]
  assert vocab.dtype == np.int32 and vocab.size == 64 and (np.diff(vocab) > 0).all()
