"""HF safetensors I/O: parity with transformers, bit-exact round trips, sharding, errors.

Every checkpoint here is a tiny random transformers model built in the test and
saved with `save_pretrained`; nothing is downloaded.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from m2 import parallel
from m2.model import hf
from m2.model.config import HF_ARCHITECTURES, ModelConfig
from m2.model.transformer import Transformer

VOCAB, EMBED, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP = 128, 64, 2, 4, 2, 16, 128
ATOL = 1e-4

CASES = [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)]


def _hf_model(family, tie, seed=0):
  """A tiny random HF model whose norms and biases are not at their init values."""
  config_cls, model_cls = {
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
      "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
  }[family]
  config = config_cls(vocab_size=VOCAB, hidden_size=EMBED, intermediate_size=MLP,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      tie_word_embeddings=tie, initializer_range=0.1,
                      attn_implementation="eager")
  torch.manual_seed(seed)
  model = model_cls(config).float().eval()
  with torch.no_grad():
    # Random norms and biases so that a transposed or misplaced one shows up.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "bias" in name:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _batch(left_pad):
  """Two rows of 8 tokens; row 1 has 3 pads (right or left). Returns numpy arrays."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, size=(2, 8)).astype(np.int32)
  real = np.ones((2, 8), np.int32)
  if left_pad:
    real[1, :3] = 0
  else:
    real[1, 5:] = 0
  tokens = np.where(real == 1, tokens, 0)
  # Positions start at 0 on each row's first real token (pads get 0).
  positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
  return tokens, real, positions


def _hf_logits(model, tokens, real, positions):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                attention_mask=torch.from_numpy(real).long(),
                position_ids=torch.from_numpy(positions).long())
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segments):
  # Jitted on the graphdef so tests of one config share a compilation.
  logits, _ = nnx.merge(graphdef, state)(tokens, positions, segments)
  return logits


def _m2_logits(model, tokens, real, positions):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions),
                             jnp.asarray(real)))


def _max_diff_on_real(a, b, real):
  return float(np.max(np.abs(a - b)[real == 1]))


def _read_all(folder):
  """{name: array} of every tensor in an HF folder (single file or shards)."""
  out = {}
  for file in sorted(folder.glob("*.safetensors")):
    with safe_open(str(file), framework="np") as f:
      for name in f.keys():
        out[name] = f.get_tensor(name)
  return out


def _flat(state):
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}"
                                                  for f, t in CASES])
def checkpoint(request, tmp_path_factory):
  family, tie = request.param
  model = _hf_model(family, tie)
  folder = tmp_path_factory.mktemp(f"{family}_{tie}")
  model.save_pretrained(folder)
  return model, folder


# --- parity with transformers -----------------------------------------------------

@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_transformers(checkpoint, left_pad):
  hf_model, folder = checkpoint
  model = hf.load_model(folder)
  assert model.cfg.tie_embeddings == hf_model.config.tie_word_embeddings
  tokens, real, positions = _batch(left_pad)
  want = _hf_logits(hf_model, tokens, real, positions)
  got = _m2_logits(model, tokens, real, positions)
  assert got.shape == want.shape == (2, 8, VOCAB)
  assert np.abs(want).max() > 0.1  # the check is not vacuous
  assert _max_diff_on_real(got, want, real) < ATOL


def test_load_hf_checkpoint_merges_into_abstract_graphdef(checkpoint):
  _, folder = checkpoint
  cfg, state = hf.load_hf_checkpoint(folder)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, state)
  assert isinstance(model, Transformer)
  assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(state))


# --- round trips --------------------------------------------------------------------

@pytest.mark.parametrize("max_shard_bytes", [hf.DEFAULT_MAX_SHARD_BYTES, 70_000],
                         ids=["single_file", "sharded"])
def test_import_export_import_is_bit_exact(checkpoint, tmp_path, max_shard_bytes):
  _, folder = checkpoint
  cfg, state = hf.load_hf_checkpoint(folder)
  files = hf.save_hf_checkpoint(cfg, state, tmp_path, max_shard_bytes=max_shard_bytes)

  index = tmp_path / hf.INDEX_FILE
  if max_shard_bytes == hf.DEFAULT_MAX_SHARD_BYTES:
    assert files == [hf.WEIGHTS_FILE] and not index.exists()
  else:
    assert len(files) > 2 and not (tmp_path / hf.WEIGHTS_FILE).exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == files
    for name in files:
      assert (tmp_path / name).stat().st_size <= max_shard_bytes + 10_000  # + header
  assert (tmp_path / hf.CONFIG_FILE).exists()
  assert (tmp_path / hf.GENERATION_CONFIG_FILE).exists()

  # The exported tensors are exactly transformers' own.
  original, exported = _read_all(folder), _read_all(tmp_path)
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype, name
    assert np.array_equal(exported[name], value), name

  cfg2, state2 = hf.load_hf_checkpoint(tmp_path)
  assert cfg2 == cfg
  a, b = _flat(state), _flat(state2)
  assert sorted(a) == sorted(b)
  for path in a:
    assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path


def test_export_loads_in_transformers(checkpoint, tmp_path):
  _, folder = checkpoint
  model = hf.load_model(folder)
  # Export from a model (not a state), sharded, to cover both entry points.
  hf.save_hf_checkpoint(model.cfg, model, tmp_path, max_shard_bytes=100_000)
  arch = json.loads((tmp_path / hf.CONFIG_FILE).read_text())["architectures"][0]
  assert arch in HF_ARCHITECTURES
  reloaded = getattr(transformers, arch).from_pretrained(tmp_path, attn_implementation="eager")
  reloaded = reloaded.float().eval()
  tokens, real, positions = _batch(left_pad=False)
  want = _m2_logits(model, tokens, real, positions)
  got = _hf_logits(reloaded, tokens, real, positions)
  assert _max_diff_on_real(got, want, real) < ATOL


def test_bfloat16_checkpoint(tmp_path):
  model = _hf_model("qwen2", tie=False).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "src")
  cfg, state = hf.load_hf_checkpoint(tmp_path / "src")
  assert cfg.param_dtype == "float32"  # fp32 master weights by default
  cfg_bf, state_bf = hf.load_hf_checkpoint(tmp_path / "src", param_dtype="bfloat16")
  assert cfg_bf.param_dtype == "bfloat16"
  for (path, v), (_, w) in zip(nnx.to_flat_state(state), nnx.to_flat_state(state_bf)):
    assert w.get_value().dtype == jnp.bfloat16, path
    assert np.array_equal(np.asarray(v.get_value()),
                          np.asarray(w.get_value()).astype(np.float32)), path
  # fp32 weights written back as bf16 reproduce the bf16 files exactly.
  hf.save_hf_checkpoint(cfg, state, tmp_path / "out", dtype="bfloat16")
  original, exported = _read_all(tmp_path / "src"), _read_all(tmp_path / "out")
  assert sorted(original) == sorted(exported)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  written = json.loads((tmp_path / "out" / hf.CONFIG_FILE).read_text())
  assert written["dtype"] == written["torch_dtype"] == "bfloat16"
  assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
  # bf16 weights written as they are reproduce them too.
  hf.save_hf_checkpoint(cfg_bf, state_bf, tmp_path / "out_bf")
  exported = _read_all(tmp_path / "out_bf")
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name


# --- folders as transformers reads them ---------------------------------------------

def _transformers_reads(config: dict, tmp_path):
  (tmp_path / hf.CONFIG_FILE).write_text(json.dumps(config))
  c = transformers.AutoConfig.from_pretrained(tmp_path)
  theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or c.rope_theta
  # As the attention layers read it.
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  return head_dim, float(theta)


@pytest.mark.parametrize("family,edits", [
    ("qwen3", {"head_dim": None}),                       # Qwen3Config's default head_dim
    ("qwen2", {"head_dim": None}),                       # hidden_size / heads
    ("qwen2", {"rope_theta": 10000.0,                    # both; rope_parameters wins
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    ("qwen3", {"rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
    ("qwen2", {"dtype": None, "torch_dtype": "bfloat16", "rope_parameters": None,
               "rope_scaling": None, "rope_theta": 2e5}),   # transformers 4's names
], ids=["qwen3-no-head_dim", "qwen2-no-head_dim", "theta-twice", "theta-in-parameters", "v4"])
def test_config_json_is_read_as_transformers_reads_it(family, edits, tmp_path):
  config = _hf_model(family, tie=False).config.to_dict()
  for key, value in edits.items():
    config.pop(key, None) if value is None else config.update({key: value})
  cfg = ModelConfig.from_hf_config(config)
  assert (cfg.head_dim, cfg.rope_theta) == _transformers_reads(config, tmp_path)


def test_one_weights_file_wins_over_a_stale_index(tmp_path):
  # Re-saving a sharded folder unsharded, or copying over one, leaves the index behind.
  old, new = _hf_model("qwen2", tie=False, seed=0), _hf_model("qwen2", tie=False, seed=1)
  old.save_pretrained(tmp_path / "old", max_shard_size="50KB")
  new.save_pretrained(tmp_path / "new")
  for f in (tmp_path / "old").glob("model*.safetensors*"):
    shutil.copy(f, tmp_path / "new")
  assert (tmp_path / "new" / hf.INDEX_FILE).is_file()
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "new",
                                                           attn_implementation="eager")
  tokens, real, positions = _batch(left_pad=False)
  want = _hf_logits(reloaded.float().eval(), tokens, real, positions)
  assert _max_diff_on_real(_hf_logits(new, tokens, real, positions), want, real) == 0
  got = _m2_logits(hf.load_model(tmp_path / "new"), tokens, real, positions)
  assert _max_diff_on_real(got, want, real) < ATOL


def test_rotary_buffers_of_older_exports_are_ignored(qwen3_folder):
  cfg, state = hf.load_hf_checkpoint(qwen3_folder)
  inv_freq = np.ones(HEAD_DIM // 2, np.float32)
  _edit_weights(qwen3_folder, add={"model.rotary_emb.inv_freq": inv_freq,
                                   "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})
  cfg2, state2 = hf.load_hf_checkpoint(qwen3_folder)
  assert cfg2 == cfg
  for path, value in _flat(state).items():
    assert np.array_equal(value, _flat(state2)[path]), path


def test_a_tied_folder_may_carry_its_head_only_as_a_copy(tmp_path):
  _hf_model("qwen3", tie=True).save_pretrained(tmp_path)
  embed = _read_all(tmp_path)["model.embed_tokens.weight"]
  _edit_weights(tmp_path, add={"lm_head.weight": embed.copy()})
  hf.load_hf_checkpoint(tmp_path)
  _edit_weights(tmp_path, add={"lm_head.weight": embed + 1})   # transformers would untie
  with pytest.raises(ValueError, match="lm_head.weight is not a copy"):
    hf.load_hf_checkpoint(tmp_path)


# --- loading onto a mesh ------------------------------------------------------------

@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake CPU) devices")
def test_load_onto_mesh(checkpoint):
  _, folder = checkpoint
  mesh = parallel.make_mesh((2, 2, 2))
  cfg, state = hf.load_hf_checkpoint(folder, mesh=mesh)
  want = dict(nnx.to_flat_state(parallel.state_shardings(state, mesh)))
  for path, var in nnx.to_flat_state(state):
    assert var.get_value().sharding == want[path], path
  # Something is actually split (embed over fsdp, kv heads / mlp / vocab over tensor).
  qkv = state["blocks"]["attn"]["qkv"].get_value()
  assert qkv.addressable_shards[0].data.shape != qkv.shape

  single = hf.load_model(folder)
  sharded = nnx.merge(hf.abstract_model(cfg)[0], state)
  tokens, real, positions = _batch(left_pad=True)
  # Batch 4 so that it divides the (data, fsdp) = 4 batch sharding.
  tokens, real, positions = (np.concatenate([x, x]) for x in (tokens, real, positions))
  with parallel.sharding_context(mesh):
    got = _m2_logits(sharded, tokens, real, positions)
  want_logits = _m2_logits(single, tokens, real, positions)
  np.testing.assert_allclose(got, want_logits, atol=1e-5, rtol=0)


# --- errors -------------------------------------------------------------------------

@pytest.fixture
def qwen3_folder(tmp_path):
  _hf_model("qwen3", tie=False).save_pretrained(tmp_path / "ckpt")
  return tmp_path / "ckpt"


def _edit_config(folder, **changes):
  file = folder / hf.CONFIG_FILE
  config = json.loads(file.read_text())
  config.update(changes)
  file.write_text(json.dumps(config))


def _edit_weights(folder, drop=(), add=None):
  tensors = _read_all(folder)
  for name in drop:
    del tensors[name]
  tensors.update(add or {})
  save_file(tensors, str(folder / hf.WEIGHTS_FILE), metadata={"format": "pt"})


def test_error_unsupported_architecture(qwen3_folder):
  _edit_config(qwen3_folder, architectures=["LlamaForCausalLM"], model_type="llama")
  with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
    hf.load_hf_checkpoint(qwen3_folder)


@pytest.mark.parametrize("changes,message", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"\['sliding_attention'\]"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints"),
])
def test_error_config_features_m2_does_not_run(qwen3_folder, changes, message):
  _edit_config(qwen3_folder, **changes)
  with pytest.raises(ValueError, match=message):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_shape_mismatch(qwen3_folder):
  _edit_config(qwen3_folder, intermediate_size=96)
  with pytest.raises(ValueError) as err:
    hf.load_hf_checkpoint(qwen3_folder)
  msg = str(err.value)
  assert "model.layers.0.mlp.gate_proj.weight" in msg
  assert "[96, 64]" in msg and "[128, 64]" in msg


def test_error_missing_tensor(qwen3_folder):
  _edit_weights(qwen3_folder, drop=["model.layers.1.self_attn.k_proj.weight"])
  with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj"):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_missing_lm_head_when_untied(qwen3_folder):
  _edit_weights(qwen3_folder, drop=["lm_head.weight"])
  with pytest.raises(ValueError, match=r"missing tensors: lm_head\.weight"):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_unexpected_tensor(qwen3_folder):
  _edit_weights(qwen3_folder, add={"model.layers.0.self_attn.extra": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra"):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_fewer_layers_in_config(qwen3_folder):
  _edit_config(qwen3_folder, num_hidden_layers=1)
  with pytest.raises(ValueError, match=r"unexpected tensors: .*model\.layers\.1\."):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_missing_files(qwen3_folder, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    hf.load_hf_checkpoint(tmp_path / "nowhere")
  no_config = tmp_path / "no_config"
  shutil.copytree(qwen3_folder, no_config)
  (no_config / hf.CONFIG_FILE).unlink()
  with pytest.raises(ValueError, match=r"no config\.json"):
    hf.load_hf_checkpoint(no_config)
  (qwen3_folder / hf.WEIGHTS_FILE).unlink()
  with pytest.raises(ValueError, match=r"no weights.*model\.safetensors"):
    hf.load_hf_checkpoint(qwen3_folder)


def test_error_index_names_missing_shard(checkpoint, tmp_path):
  _, folder = checkpoint
  cfg, state = hf.load_hf_checkpoint(folder)
  files = hf.save_hf_checkpoint(cfg, state, tmp_path, max_shard_bytes=70_000)
  (tmp_path / files[-1]).unlink()
  with pytest.raises(ValueError, match=files[-1]):
    hf.load_hf_checkpoint(tmp_path)


def test_save_rejects_state_of_another_shape(checkpoint, tmp_path):
  _, folder = checkpoint
  cfg, state = hf.load_hf_checkpoint(folder)
  with pytest.raises(ValueError, match="blocks.mlp.gate_up"):
    hf.save_hf_checkpoint(cfg.replace(mlp_dim=96), state, tmp_path)
