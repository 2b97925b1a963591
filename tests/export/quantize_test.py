"""export.quantize: int4 GPTQ/RTN, compressed-tensors layout checked by the library itself."""

import json
import os

import numpy as np
import pytest

from export import quantize as Q
from export import to_hf

CALIB = dict(calib_samples=16, calib_seq_len=128)   # 2048 tokens >= 256 inputs of down_proj


@pytest.fixture(scope="module")
def dense(exported):
  return exported


@pytest.fixture(scope="module")
def texts():
  return {"calib": Q.medical_texts("train", limit=400), "held": Q.medical_texts("test1")}


@pytest.fixture(scope="module")
def gptq_asym(dense, texts, tmp_path_factory):
  cfg = Q.QuantConfig(method="gptq", symmetric=False, act_order=True, dtype="float32", **CALIB)
  out = tmp_path_factory.mktemp("q") / "gptq"
  quantized, model = Q.quantize_folder(dense, out, cfg, calib_texts=texts["calib"])
  return out, quantized, model


def ct_decompress(folder):
  """{module: dequantized weight} by compressed-tensors' own pack-quantized compressor."""
  import torch
  from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
  from compressed_tensors.quantization import QuantizationConfig
  from safetensors.torch import load_file

  config = json.loads((folder / "config.json").read_text())["quantization_config"]
  scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
  state = load_file(str(folder / "model.safetensors"))
  out = {}
  for key in state:
    if key.endswith(".weight_packed"):
      prefix = key[:-len(".weight_packed")]
      local = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
      out[prefix] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
      assert out[prefix].dtype == torch.bfloat16
  return out


def load_decompressed(folder):
  """The int4 folder in transformers, decompressed on CPU by compressed-tensors."""
  import torch
  from transformers import AutoModelForCausalLM, CompressedTensorsConfig
  return AutoModelForCausalLM.from_pretrained(
      str(folder), dtype=torch.float32,
      quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def test_packing_matches_compressed_tensors():
  import torch
  from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
  rng = np.random.default_rng(0)
  q = rng.integers(-8, 8, size=(24, 256)).astype(np.int8)
  ours = Q.pack_int4(q)
  np.testing.assert_array_equal(ours, pack_to_int32(torch.from_numpy(q), 4).numpy())
  np.testing.assert_array_equal(Q.unpack_int4(ours, 256), q)
  zp = rng.integers(-8, 8, size=(24, 2)).astype(np.int8)
  np.testing.assert_array_equal(
      unpack_from_int32(torch.from_numpy(Q.pack_int4(zp, axis=0)), 4, (24, 2), packed_dim=0),
      zp)


def test_gptq_folder_decompresses_bit_exactly_and_logits_match(gptq_asym):
  import torch
  folder, quantized, fake_quant_model = gptq_asym
  names = sorted(os.listdir(folder))
  assert "tokenizer.json" in names and "model.safetensors" in names
  decompressed = ct_decompress(folder)
  assert set(decompressed) == set(quantized) and len(quantized) == 14
  for name, ql in quantized.items():
    np.testing.assert_array_equal(decompressed[name].float().numpy(), ql.dequantize(),
                                  err_msg=name)
  tokens = torch.as_tensor(Q.token_windows(_tok(folder), Q.medical_texts("test1", 40), 2, 64))
  with torch.no_grad():
    theirs = load_decompressed(folder)(input_ids=tokens).logits
    ours = fake_quant_model(input_ids=tokens).logits
  np.testing.assert_allclose(theirs.numpy(), ours.numpy(), atol=1e-5, rtol=0)


def _tok(folder):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(folder))


def test_rtn_export_equals_m2_fake_quant_forward(trained_run, dense, tmp_path):
  """The JAX switch ModelConfig.quant="int4" computes what the int4 file holds."""
  import torch

  from m2.model.quant import maybe_quant
  from export_helpers import TEXTS, m2_model, padded_batch
  from m2.data.tokenizers import ByteTokenizer

  cfg = Q.QuantConfig(method="rtn", symmetric=True, dtype="float32")
  Q.quantize_folder(dense, tmp_path / "rtn", cfg)
  m2_cfg, params, _, _ = to_hf.read_checkpoint(to_hf.find_stage_dir(trained_run))
  w = params["blocks"]["mlp"]["down"][0]
  assert maybe_quant(w, 1, "none") is w    # "none" leaves the graph as it was
  tokens, positions, segments = padded_batch(ByteTokenizer(), TEXTS)
  ours, _ = m2_model(m2_cfg.replace(quant="int4"), params)(tokens, positions, segments)
  dense_logits, _ = m2_model(m2_cfg, params)(tokens, positions, segments)
  with torch.no_grad():
    theirs = load_decompressed(tmp_path / "rtn")(
        input_ids=torch.as_tensor(tokens, dtype=torch.long),
        attention_mask=torch.as_tensor(segments),
        position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
  real = segments.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-4, rtol=0)
  assert np.abs(np.asarray(dense_logits)[real] - theirs[real]).max() > 1e-3  # it did quantize


def test_gptq_beats_rtn_on_held_out_layer_outputs(dense, texts, gptq_asym):
  from transformers import AutoTokenizer
  _, gptq_layers, _ = gptq_asym
  tok = AutoTokenizer.from_pretrained(str(dense))
  held = Q.token_windows(tok, texts["held"], 16, 128, seed=1)
  model = Q.load_torch_model(dense)
  hessians = Q.input_hessians(model, held)
  rtn_cfg = Q.QuantConfig(method="rtn", symmetric=False)
  wins = 0
  for name, ql in gptq_layers.items():
    w = model.get_submodule(name).weight.detach().numpy()
    e_gptq, e_rtn = Q.output_error(w, ql, hessians[name]), Q.output_error(w, Q.rtn(w, rtn_cfg),
                                                                          hessians[name])
    wins += e_gptq < e_rtn
  assert wins == len(gptq_layers), f"GPTQ better on {wins}/{len(gptq_layers)} layers"


def test_bad_inputs(dense, texts, tmp_path):
  gptq = Q.QuantConfig(method="gptq", calib_samples=2, calib_seq_len=64)
  with pytest.raises(ValueError, match="calibration set too small"):
    Q.quantize_folder(dense, tmp_path / "a", gptq, calib_texts=texts["calib"])
  assert not (tmp_path / "a").exists() and not os.listdir(tmp_path)
  rtn = Q.QuantConfig(method="rtn")
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "x").write_text("")
  with pytest.raises(FileExistsError, match="--overwrite"):
    Q.quantize_folder(dense, busy, rtn)
  no_tok = tmp_path / "no_tok"
  no_tok.mkdir()
  for f in ("config.json", "model.safetensors"):
    (no_tok / f).symlink_to(dense / f)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    Q.quantize_folder(no_tok, tmp_path / "b", rtn)
  llama = tmp_path / "llama"
  llama.mkdir()
  for f in os.listdir(dense):
    (llama / f).symlink_to(dense / f)
  config = json.loads((dense / "config.json").read_text())
  (llama / "config.json").unlink()
  (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                 "architectures": ["LlamaForCausalLM"]}))
  with pytest.raises(ValueError, match="unsupported architecture"):
    Q.quantize_folder(llama, tmp_path / "c", rtn)
  with pytest.raises(ValueError, match="method"):
    Q.QuantConfig(method="awq")
  assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_fake_quant_switch_validates_and_passes_gradients_straight_through():
  import jax
  import jax.numpy as jnp

  from m2.model.config import ModelConfig
  from m2.model.quant import fake_quant, parse
  with pytest.raises(ValueError, match="ModelConfig.quant"):
    ModelConfig(quant="int3")
  assert parse("int8_asym_g64") == parse("int8_asym_g64") and parse("none") is None
  w = jax.random.normal(jax.random.key(0), (256, 2, 8)) * 0.02
  c = jax.random.normal(jax.random.key(1), (256, 2, 8))
  for spec in ("int4_asym", "int8_g64"):
    q = fake_quant(w, 1, parse(spec))
    levels = 16 if spec.startswith("int4") else 256
    per_group = np.sort(np.asarray(q).reshape(-1, parse(spec).group_size, 16), axis=1)
    distinct = 1 + np.sum(np.diff(per_group, axis=1) != 0, axis=1)
    assert distinct.max() <= levels and not np.array_equal(np.asarray(q), np.asarray(w))
    grad = jax.grad(lambda w: jnp.sum(fake_quant(w, 1, parse(spec)) * c))(w)
    np.testing.assert_array_equal(grad, c)
  with pytest.raises(ValueError, match="group size"):
    fake_quant(jnp.zeros((100, 4)), 1, parse("int4"))
