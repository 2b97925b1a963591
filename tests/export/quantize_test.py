"""export.quantize: int4 GPTQ/RTN, compressed-tensors layout checked by the library itself."""

import dataclasses
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
  return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


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
  _, gptq_layers, _ = gptq_asym
  tok = _tok(dense)
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


def _naive_gptq(w, hessian, cfg):
  """GPTQ written the OBS way, independently of export.quantize.gptq: no Cholesky, no
  lazy blocks; after each column the remaining weights move by err * H^-1[j, j:] and
  column j is eliminated from H^-1 (Frantar et al. 2022, eqs. 2-3)."""
  out, n = w.shape
  W, H = w.astype(np.float64).copy(), hessian.copy()
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.diag_indices(n)] += cfg.damp * np.mean(np.diag(H))
  Hinv = np.linalg.inv(H)
  codes = np.zeros((out, n), np.int8)
  for j in range(n):
    if j % cfg.group_size == 0:   # group scale from the updated weights at the group start
      scale, zero = Q.group_params(W[:, j:j + cfg.group_size].astype(np.float32), cfg)
      scale, zero = scale[:, 0], None if zero is None else zero[:, 0]
    codes[:, j] = Q._quant_columns(W[:, j], scale, zero, cfg.scheme)
    err = (W[:, j] - Q._dequant_columns(codes[:, j], scale, zero)) / Hinv[j, j]
    W[:, j:] -= np.outer(err, Hinv[j, j:])
    Hinv -= np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
  return codes


def _correlated_inputs(d, seed=0):
  """Sampler of layer inputs with correlated channels and a few outlier channels, the
  structure trained transformers show and GPTQ exploits."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((d, d)) / np.sqrt(d) * 0.97 ** np.arange(d)[:, None] + 0.05 * np.eye(d)
  gain = np.ones(d)
  gain[rng.choice(d, 4, replace=False)] = 20.0
  return lambda n, seed: (np.random.default_rng(seed).standard_normal((n, d)) @ mix) * gain


def test_gptq_equals_the_obs_formulation_and_beats_rtn_on_held_out_inputs():
  d = 256
  sample = _correlated_inputs(d)
  x_calib, x_held = sample(2048, 1), sample(2048, 2)
  h_calib, h_held = 2 * x_calib.T @ x_calib / 2048, 2 * x_held.T @ x_held / 2048
  w = (np.random.default_rng(3).standard_normal((32, d)) * 0.05).astype(np.float32)
  # Several groups per lazy block, so the block-boundary updates are exercised too.
  cfg = Q.QuantConfig(symmetric=False, group_size=32, block_size=128)
  np.testing.assert_array_equal(Q.gptq(w, h_calib, cfg).q, _naive_gptq(w, h_calib, cfg))
  h_dead = h_calib.copy()
  h_dead[5, :] = h_dead[:, 5] = 0   # an input never active
  np.testing.assert_array_equal(Q.gptq(w, h_dead, cfg).q, _naive_gptq(w, h_dead, cfg))
  for sym in (True, False):
    rtn = Q.rtn(w, Q.QuantConfig(method="rtn", symmetric=sym))
    for act_order in (False, True):
      ql = Q.gptq(w, h_calib, Q.QuantConfig(symmetric=sym, act_order=act_order))
      for h in (h_calib, h_held):
        assert Q.output_error(w, ql, h) < 0.3 * Q.output_error(w, rtn, h), (sym, act_order)


def _autogptq_dequantize(qweight, qzeros, scales, g_idx, bits):
  """[out, in] float32 weights of one GPTQ-layout linear, unpacked as AutoGPTQ's
  reference kernel (qlinear_cuda_old) does: nibble k of word r of qweight is input
  r * (32/bits) + k; qzeros hold zero - 1 along outputs; w = scale * (code - zero)."""
  per, mask = 32 // bits, (1 << bits) - 1
  words, zwords = qweight.view(np.uint32).astype(np.int64), qzeros.view(np.uint32).astype(np.int64)
  codes = np.zeros((words.shape[0] * per, words.shape[1]), np.int64)
  zeros = np.zeros((zwords.shape[0], zwords.shape[1] * per), np.int64)
  for k in range(per):
    codes[k::per] = (words >> (bits * k)) & mask
    zeros[:, k::per] = (((zwords >> (bits * k)) & mask) + 1) & mask
  return ((codes - zeros[g_idx]) * scales[g_idx].astype(np.float32)).T


def test_gptq_layout_unpacks_to_the_quantized_weights(gptq_asym, dense, tmp_path):
  import ml_dtypes
  from safetensors.numpy import load_file
  _, quantized, _ = gptq_asym
  for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
    ql = quantized[name]
    for sym in (False, True):
      layer = ql if not sym else Q.rtn(ql.dequantize(), Q.QuantConfig(method="rtn"))
      t = Q.gptq_tensors(name, layer, 4)
      assert t[name + ".qweight"].shape == (layer.q.shape[1] // 8, layer.q.shape[0])
      ours = _autogptq_dequantize(t[name + ".qweight"], t[name + ".qzeros"], t[name + ".scales"],
                                  t[name + ".g_idx"], 4)
      zero = 0 if layer.zero is None else np.repeat(layer.zero, 128, axis=1).astype(np.int64)
      exact = ((layer.q - zero) * np.repeat(layer.scale.astype(np.float32), 128, axis=1))
      np.testing.assert_array_equal(ours, exact)   # same codes, zeros and scales, exactly
      # ... which compressed-tensors' bf16 dequantization rounds to our weights.
      np.testing.assert_array_equal(ours.astype(ml_dtypes.bfloat16).astype(np.float32),
                                    layer.dequantize())
  # The folder: every linear in the GPTQ layout, the config says so, dense tensors stay.
  cfg = Q.QuantConfig(method="rtn", format="gptq", dtype="float32")
  quantized_rtn, _ = Q.quantize_folder(dense, tmp_path / "g", cfg)
  state = load_file(str(tmp_path / "g" / "model.safetensors"))
  config = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
  assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["sym"]
  assert {k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")} == set(quantized_rtn)
  assert "lm_head.weight" in state and not any(k.endswith("proj.weight") for k in state)
  for name, ql in quantized_rtn.items():
    w = _autogptq_dequantize(*(state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales",
                                                              "g_idx")), 4)
    np.testing.assert_array_equal(w.astype(ml_dtypes.bfloat16).astype(np.float32),
                                  ql.dequantize(), err_msg=name)
  zero_group = Q.QuantizedLinear(np.zeros((8, 128), np.int8), np.ones((8, 1), ml_dtypes.bfloat16),
                                 np.full((8, 1), -8, np.int8))
  with pytest.raises(ValueError, match="zero point of 0"):
    Q.gptq_tensors("x", zero_group, 4)


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



def test_true_sequential_gptq_calibrates_each_group_on_the_quantized_groups_before_it(
    dense, texts):
  """o_proj's Hessian is taken with q/k/v already quantized (AutoGPTQ's true_sequential);
  without it, on the dense layer's inputs."""
  import torch
  calib = Q.token_windows(_tok(dense), texts["calib"], 8, 128)
  cfg = Q.QuantConfig(method="gptq", symmetric=False, dtype="float32", **CALIB)
  o_proj = "model.layers.0.self_attn.o_proj"
  codes = {}
  for sequential in (True, False):
    got = Q.quantize_model(Q.load_torch_model(dense),
                           dataclasses.replace(cfg, true_sequential=sequential), calib)
    model = Q.load_torch_model(dense)
    w = model.get_submodule(o_proj).weight.detach().numpy().copy()
    if sequential:  # the model as it stood when o_proj was quantized
      for n in Q.SEQUENTIAL_GROUPS[0]:
        with torch.no_grad():
          model.get_submodule(f"model.layers.0.{n}").weight.copy_(
              torch.from_numpy(got[f"model.layers.0.{n}"].dequantize()))
    want = Q.gptq(w, Q.input_hessians(model, calib)[o_proj], cfg).q
    np.testing.assert_array_equal(got[o_proj].q, want)
    codes[sequential] = want
  assert not np.array_equal(codes[True], codes[False])
