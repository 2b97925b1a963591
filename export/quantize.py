r"""W4A16 int4 weight quantization of an exported HF folder: RTN or GPTQ.

  python -m export.quantize --model=exports/tiny --out=exports/tiny-int4 \
      --method=gptq --act_order --calib_samples=128 --calib_seq_len=512

Every linear layer of the decoder (q/k/v/o, gate/up/down) is quantized along
its input dimension in groups of 128 (one bfloat16 scale, and asymmetric one
zero point, per output channel and group); embeddings, norms, biases and the
LM head stay dense. The output is the compressed-tensors `pack-quantized`
layout (config.json `quantization_config.quant_method = "compressed-tensors"`),
which vLLM serves with Marlin int4 kernels on sm_80+ (RTX 4090 is sm_89) and
transformers decompresses on CPU; or, with --format=gptq, AutoGPTQ's layout
(qweight / qzeros / scales / g_idx, quant_method "gptq").

  python -m export.quantize --model=exports/tiny --report --group_sizes=128,64 \
      --eval_limit=16                 # the quality table (see quality_report)

Methods:
  rtn   round to nearest with min-max group scales (the baseline).
  gptq  GPTQ (Frantar et al. 2022, arXiv 2210.17323): per layer, the Hessian
        H = 2/n X^T X of the layer inputs on calibration text (de-identified
        medical dialogues, MTS-Dialog train), damped by `damp` x mean(diag H);
        columns are quantized one at a time and the error is spread over the
        not-yet-quantized columns with the Cholesky factor of H^-1, in lazy
        blocks. `act_order` visits columns by decreasing diag(H) with group
        scales fixed up front from the unquantized weights ("static groups",
        compressed-tensors actorder="weight"), so the file layout needs no
        g_idx reordering. Layers are quantized in order; each layer's Hessians
        are taken on the outputs of the already-quantized layers before it, and
        with `true_sequential` (the default, as in AutoGPTQ) also after the
        layer's earlier linears are quantized: q/k/v, then o, then gate/up,
        then down. A test checks the codes equal an independent
        column-by-column OBS formulation of the same algorithm.

The rounding is the one `m2/model/quant.py` uses, so an RTN export
dequantizes to exactly the weights of m2's fake-quant forward pass
(ModelConfig.quant="int4").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import shutil

import numpy as np

log = logging.getLogger(__name__)

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# True-sequential GPTQ visits a layer's linears in these groups (the ones that share an
# input together); each group's Hessians are taken after the groups before it are
# quantized, so o_proj and down_proj calibrate on inputs that carry the rounding of
# the projections that feed them.
SEQUENTIAL_GROUPS = (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:])
METHODS = ("rtn", "gptq")
# File layouts: compressed-tensors pack-quantized, or AutoGPTQ's qweight/qzeros/scales/g_idx.
FORMATS = ("pack-quantized", "gptq")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  method: str = "gptq"
  bits: int = 4
  group_size: int = 128
  symmetric: bool = True
  act_order: bool = False
  true_sequential: bool = True  # GPTQ: SEQUENTIAL_GROUPS, else one Hessian pass per layer
  damp: float = 0.01          # fraction of mean(diag H) added to the diagonal
  block_size: int = 128       # GPTQ lazy-update block (a multiple of group_size)
  calib_samples: int = 64     # calibration windows
  calib_seq_len: int = 256    # tokens per window
  dtype: str = "bfloat16"     # dtype of the dense tensors (embeddings, norms, head)
  seed: int = 0
  format: str = "pack-quantized"   # or "gptq" (AutoGPTQ layout, checkpoint_format "gptq")

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"QuantConfig.method: must be one of {METHODS} (got {self.method!r})")
    if self.bits not in (4, 8):
      raise ValueError(f"QuantConfig.bits: 4 or 8 (got {self.bits})")
    if self.group_size <= 0 or self.block_size % self.group_size:
      raise ValueError(f"QuantConfig.block_size={self.block_size} must be a multiple of "
                       f"group_size={self.group_size} > 0")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"QuantConfig.dtype: float32, bfloat16 or float16 (got {self.dtype!r})")
    if not 0 <= self.damp < 1:
      raise ValueError(f"QuantConfig.damp: in [0, 1) (got {self.damp})")
    if self.format not in FORMATS:
      raise ValueError(f"QuantConfig.format: one of {FORMATS} (got {self.format!r})")

  @property
  def scheme(self):
    from m2.model.quant import QuantScheme
    return QuantScheme(bits=self.bits, symmetric=self.symmetric, group_size=self.group_size)


@dataclasses.dataclass
class QuantizedLinear:
  """One linear layer in HF layout: weight ~ (q - zero) * scale, groups along `in`."""
  q: np.ndarray               # int8 [out, in] in [qmin, qmax]
  scale: np.ndarray           # bfloat16 [out, in / group]
  zero: np.ndarray | None     # int8 [out, in / group] (asymmetric) or None

  def dequantize(self) -> np.ndarray:
    """float32 [out, in]: (q - zero) in the scale's dtype times the scale, as
    compressed-tensors dequantizes."""
    group = self.q.shape[1] // self.scale.shape[1]
    q = self.q.astype(np.int32)
    if self.zero is not None:
      q = q - np.repeat(self.zero.astype(np.int32), group, axis=1)
    return (q.astype(self.scale.dtype) * np.repeat(self.scale, group, axis=1)).astype(np.float32)


# --- the numerics ---------------------------------------------------------------

def _check_groups(w: np.ndarray, group: int, name: str = "weight") -> None:
  if w.shape[1] % group:
    raise ValueError(f"{name}: input dimension {w.shape[1]} is not a multiple of the group "
                     f"size {group}")


def group_params(w: np.ndarray, cfg: QuantConfig):
  """(scale bf16 [out, G], zero int8 [out, G] or None) of w [out, in] by groups of inputs.

  The NumPy twin of m2.model.quant.group_scales (same float32 ops, bf16
  rounding, round-half-even); a test checks they agree bit for bit.
  """
  bf16 = _bf16()
  scheme = cfg.scheme
  out, n_in = w.shape
  groups = w.astype(np.float32).reshape(out, n_in // cfg.group_size, cfg.group_size)
  if scheme.symmetric:
    scale = (np.max(np.abs(groups), axis=-1) / np.float32(scheme.qmax)).astype(bf16)
  else:
    wmin = np.minimum(np.min(groups, axis=-1), np.float32(0))
    wmax = np.maximum(np.max(groups, axis=-1), np.float32(0))
    scale = ((wmax - wmin) / np.float32(scheme.qmax - scheme.qmin)).astype(bf16)
  scale = np.where(scale == 0, np.ones_like(scale), scale)
  if scheme.symmetric:
    return scale, None
  zero = np.clip(np.round(-wmin / scale.astype(np.float32)) + scheme.qmin, scheme.qmin,
                 scheme.qmax).astype(np.int8)
  return scale, zero


def _quant_columns(w: np.ndarray, scale: np.ndarray, zero, scheme) -> np.ndarray:
  """int8 codes of w ([out] or [out, n]) given per-row scale/zero of the same shape."""
  q = np.round(w.astype(np.float32) / scale.astype(np.float32))
  if zero is not None:
    q = q + zero
  return np.clip(q, scheme.qmin, scheme.qmax).astype(np.int8)


def _dequant_columns(q, scale, zero) -> np.ndarray:
  q = q.astype(np.int32) - (0 if zero is None else zero.astype(np.int32))
  return (q.astype(scale.dtype) * scale).astype(np.float32)


def rtn(w: np.ndarray, cfg: QuantConfig) -> QuantizedLinear:
  """Round-to-nearest with min-max scales per group."""
  _check_groups(w, cfg.group_size)
  scale, zero = group_params(w, cfg)
  g = cfg.group_size
  q = _quant_columns(w, np.repeat(scale, g, axis=1),
                     None if zero is None else np.repeat(zero, g, axis=1), cfg.scheme)
  return QuantizedLinear(q, scale, zero)


def gptq(w: np.ndarray, hessian: np.ndarray, cfg: QuantConfig) -> QuantizedLinear:
  """GPTQ of w [out, in] against the input Hessian [in, in] (float64)."""
  _check_groups(w, cfg.group_size)
  out, n = w.shape
  g, scheme = cfg.group_size, cfg.scheme
  W = w.astype(np.float64).copy()
  H = hessian.astype(np.float64).copy()
  dead = np.diag(H) == 0          # inputs never active: no information, weight irrelevant
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  n_groups = n // g
  scale = np.zeros((out, n_groups), _bf16())
  zero = None if scheme.symmetric else np.zeros((out, n_groups), np.int8)
  if cfg.act_order:
    # Static groups: scales from the unquantized weights, fixed before the sweep.
    s, z = group_params(W.astype(np.float32), cfg)
    scale[:] = s
    if zero is not None:
      zero[:] = z
    perm = np.argsort(-np.diag(H), kind="stable")
  else:
    perm = np.arange(n)
  W, H = W[:, perm], H[perm][:, perm]
  H[np.diag_indices(n)] += cfg.damp * np.mean(np.diag(H))
  try:
    # Upper Cholesky factor U of H^-1 (U^T U = H^-1): row i holds the update weights.
    U = np.linalg.cholesky(np.linalg.inv(H)).T
  except np.linalg.LinAlgError as err:
    raise ValueError(f"GPTQ: the damped Hessian is not positive definite ({err}); raise "
                     f"--damp or use more calibration data") from err
  Q = np.zeros((out, n), np.int8)
  for i1 in range(0, n, cfg.block_size):
    i2 = min(i1 + cfg.block_size, n)
    W1 = W[:, i1:i2].copy()
    E1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = i1 + i
      if not cfg.act_order and col % g == 0:
        # Group scales from the current (error-compensated) weights of the group.
        s, z = group_params(W1[:, i:i + g].astype(np.float32), cfg)
        scale[:, col // g] = s[:, 0]
        if zero is not None:
          zero[:, col // g] = z[:, 0]
      grp = perm[col] // g
      s_col = scale[:, grp]
      z_col = None if zero is None else zero[:, grp]
      w_col = W1[:, i]
      q = _quant_columns(w_col, s_col, z_col, scheme)
      Q[:, col] = q
      err = (w_col - _dequant_columns(q, s_col, z_col)) / U1[i, i]
      W1[:, i:] -= np.outer(err, U1[i, i:])
      E1[:, i] = err
    W[:, i2:] -= E1 @ U[i1:i2, i2:]
  inverse = np.argsort(perm)
  return QuantizedLinear(Q[:, inverse], scale, zero)


def _bf16():
  import ml_dtypes
  return ml_dtypes.bfloat16


# --- compressed-tensors pack-quantized layout -------------------------------------

def pack_int4(q: np.ndarray, axis: int = 1) -> np.ndarray:
  """int8 values in [-8, 7] -> int32 words, 8 per word along `axis`.

  compressed-tensors' layout: value + 8 as an unsigned nibble, element j of a
  run of 8 in bits 4j..4j+3 (little-endian nibbles).
  """
  if q.min(initial=0) < -8 or q.max(initial=0) > 7:
    raise ValueError("pack_int4: values outside [-8, 7]")
  v = np.moveaxis(q.astype(np.int64) + 8, axis, -1)
  if v.shape[-1] % 8:
    pad = 8 - v.shape[-1] % 8
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), v.dtype)], axis=-1)
  v = v.reshape(v.shape[:-1] + (-1, 8))
  words = np.sum(v << (4 * np.arange(8, dtype=np.int64)), axis=-1)
  return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis).copy()


def unpack_int4(words: np.ndarray, n: int, axis: int = 1) -> np.ndarray:
  v = np.moveaxis(words, axis, -1).view(np.uint32).astype(np.int64)
  v = (v[..., None] >> (4 * np.arange(8))) & 0xF
  v = v.reshape(v.shape[:-2] + (-1,))[..., :n] - 8
  return np.moveaxis(v.astype(np.int8), -1, axis)


def pack_int8(q: np.ndarray, axis: int = 1) -> np.ndarray:
  """int8 codes -> int32 words, 4 per word (value + 128 as unsigned bytes)."""
  v = np.moveaxis(q.astype(np.int64) + 128, axis, -1)
  if v.shape[-1] % 4:
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (4 - v.shape[-1] % 4,), v.dtype)], axis=-1)
  v = v.reshape(v.shape[:-1] + (-1, 4))
  words = np.sum(v << (8 * np.arange(4, dtype=np.int64)), axis=-1)
  return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis).copy()


def compressed_tensors_config(cfg: QuantConfig) -> dict:
  """config.json `quantization_config` for the compressed-tensors loader."""
  return {
      "quant_method": "compressed-tensors",
      "format": "pack-quantized",
      "quantization_status": "compressed",
      "config_groups": {"group_0": {
          "targets": ["Linear"],
          "weights": {"num_bits": cfg.bits, "type": "int", "symmetric": cfg.symmetric,
                      "strategy": "group", "group_size": cfg.group_size, "dynamic": False,
                      "actorder": "weight" if cfg.act_order else None, "observer": "minmax"},
          "input_activations": None, "output_activations": None,
          "format": "pack-quantized"}},
      "ignore": ["lm_head"],
      "kv_cache_scheme": None,
      "global_compression_ratio": None,
  }


def packed_tensors(prefix: str, ql: QuantizedLinear, bits: int) -> dict[str, np.ndarray]:
  pack = pack_int4 if bits == 4 else pack_int8
  t = {prefix + ".weight_packed": pack(ql.q, axis=1),
       prefix + ".weight_scale": ql.scale,
       prefix + ".weight_shape": np.asarray(ql.q.shape, np.int64)}
  if ql.zero is not None:
    t[prefix + ".weight_zero_point"] = pack(ql.zero, axis=0)
  return t


# --- AutoGPTQ layout (qweight / qzeros / scales / g_idx) ------------------------------

def _pack_rows(u: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Unsigned codes -> int32 words, 32 // bits per word along `axis`, element k of a run
  in bits k*bits.. (AutoGPTQ's order)."""
  per = 32 // bits
  v = np.moveaxis(u.astype(np.int64), axis, -1)
  if v.shape[-1] % per:
    raise ValueError(f"GPTQ layout: dimension {v.shape[-1]} is not a multiple of {per}")
  v = v.reshape(v.shape[:-1] + (-1, per))
  words = np.sum(v << (bits * np.arange(per, dtype=np.int64)), axis=-1)
  return np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis).copy()


def gptq_tensors(prefix: str, ql: QuantizedLinear, bits: int) -> dict[str, np.ndarray]:
  """One linear in AutoGPTQ's layout (checkpoint_format "gptq", the one vLLM's gptq and
  gptq_marlin kernels and transformers' GPTQ integration read):

    qweight int32 [in / (32/bits), out]  unsigned codes q + 2^(bits-1), packed along `in`
    qzeros  int32 [groups, out / (32/bits)]  zero point - 1 (the format's historical
                                            offset), packed along `out`
    scales  float16 [groups, out]
    g_idx   int32 [in]  group of each input (in // group: act-order here uses static
                        groups, so the order on disk is the natural one)

  and w[o, i] = scales[g, o] * (code[i, o] - (qzeros[g, o] + 1)), g = g_idx[i].
  Symmetric layers store zero point 2^(bits-1), as AutoGPTQ does.
  """
  out, n_in = ql.q.shape
  half = 1 << (bits - 1)
  group = n_in // ql.scale.shape[1]
  zero = (np.full(ql.scale.shape, half, np.int64) if ql.zero is None
          else ql.zero.astype(np.int64) + half)
  if np.any(zero == 0):
    # Stored as zero - 1 = -1, which the format's kernels read back as 2^bits - 1 + 1.
    raise ValueError(f"{prefix}: a zero point of 0 (a group with no negative weight) cannot "
                     f"be written in the GPTQ layout; use the pack-quantized format")
  scales = ql.scale.astype(np.float32)
  scales16 = scales.astype(np.float16)
  if not np.array_equal(scales16.astype(np.float32), scales):
    raise ValueError(f"{prefix}: scales outside float16's exact range (GPTQ stores float16 "
                     f"scales); use the pack-quantized format")
  mask = (1 << bits) - 1
  return {prefix + ".qweight": _pack_rows((ql.q.astype(np.int64) + half).T, bits, axis=0),
          prefix + ".qzeros": _pack_rows(((zero - 1) & mask).T, bits, axis=1),
          prefix + ".scales": np.ascontiguousarray(scales16.T),
          prefix + ".g_idx": (np.arange(n_in) // group).astype(np.int32)}


def gptq_config(cfg: QuantConfig) -> dict:
  """config.json `quantization_config` for the GPTQ layout."""
  return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": cfg.bits,
          "group_size": cfg.group_size, "sym": cfg.symmetric,
          # Act-order columns were visited by decreasing diag(H) with static groups:
          # the groups on disk are contiguous, so no desc_act reordering at load time.
          "desc_act": False, "static_groups": cfg.act_order, "damp_percent": cfg.damp,
          "true_sequential": cfg.method == "gptq" and cfg.true_sequential,
          "lm_head": False}


# --- calibration and evaluation text ----------------------------------------------

def medical_texts(split: str, limit: int | None = None, data_dir: str | None = None
                  ) -> list[str]:
  """De-identified MTS-Dialog documents of one split ("train" for calibration;
  "test1" is held out from m2's training by configs/tiny.py:TEST_SPLITS)."""
  from m2.data import deid, loaders, records

  loaded = loaders.load_source("mts_dialog", data_dir, policy="skip", purpose="train",
                               splits=(split,))
  clean, _ = deid.gate(loaded.records, purpose="train")
  docs = records.documents(clean)
  return docs[:limit] if limit else docs


def token_windows(tokenizer, texts, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
  """[n, seq_len] token windows cut from the concatenated documents (eos-separated)."""
  ids: list[int] = []
  eos = tokenizer.eos_token_id
  for t in texts:
    ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
    if len(ids) >= n * seq_len * 2:
      break
  total = len(ids) // seq_len
  if total < n:
    raise ValueError(f"calibration text too short: {len(ids)} tokens make {total} windows of "
                     f"{seq_len}, {n} requested")
  rng = np.random.default_rng(seed)
  starts = np.sort(rng.choice(total, n, replace=False)) * seq_len
  return np.stack([np.asarray(ids[s:s + seq_len], np.int64) for s in starts])


def perplexity(model, windows: np.ndarray, batch_size: int = 8) -> float:
  """exp(mean next-token NLL) of a transformers causal LM over token windows."""
  return lm_stats(model, windows, batch_size)[0]["ppl"]


def lm_stats(model, windows: np.ndarray, batch_size: int = 8, reference=None):
  """(stats, log-probs per batch) of a causal LM over equal-length token windows.

  stats: "ppl"; with `reference` (the log-probs list a previous call returned,
  the dense model's) also "kl", the mean per-token KL(dense || model);
  "top1_agree", the fraction of positions where both predict the same next
  token; and "dnll" / "dnll_se", the mean per-token NLL increase over the dense
  model with its standard error across windows. The difference is paired per
  window, so its error is far below that of either perplexity: it says whether a
  perplexity gap between two methods is more than the text sample.
  """
  import torch

  kl = agree = 0.0
  nll = []         # per window, summed over tokens
  deltas = []      # per window, NLL minus the reference's
  logps = []
  with torch.no_grad():
    for b, i in enumerate(range(0, len(windows), batch_size)):
      x = torch.as_tensor(windows[i:i + batch_size])
      targets = x[:, 1:, None]
      lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)
      window_nll = -lp.gather(-1, targets)[..., 0].sum(-1)
      nll.extend(window_nll.tolist())
      if reference is None:
        logps.append(lp.float())
      else:
        ref = reference[b].double()
        kl += float((ref.exp() * (ref - lp)).sum())
        agree += float((ref.argmax(-1) == lp.argmax(-1)).sum())
        deltas.extend((window_nll + ref.gather(-1, targets)[..., 0].sum(-1)).tolist())
  tokens = windows.shape[1] - 1
  count = len(nll) * tokens
  stats = {"ppl": math.exp(sum(nll) / count)}
  if reference is not None:
    d = np.asarray(deltas) / tokens
    stats.update(kl=kl / count, top1_agree=agree / count, dnll=float(d.mean()),
                 dnll_se=float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)
  return stats, logps


def input_hessians(model, windows: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
  """{module name: 2/n X^T X} of every decoder linear's inputs over `windows`."""
  import torch

  sums, rows, hooks = {}, {}, []
  for li, layer in enumerate(model.model.layers):
    for n in LINEARS:
      name = f"model.layers.{li}.{n}"

      def hook(module, args, name=name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        sums[name] = sums.get(name, 0) + x.T @ x
        rows[name] = rows.get(name, 0) + x.shape[0]

      hooks.append(layer.get_submodule(n).register_forward_pre_hook(hook))
  try:
    with torch.no_grad():
      for i in range(0, len(windows), batch_size):
        model(input_ids=torch.as_tensor(windows[i:i + batch_size]))
  finally:
    for h in hooks:
      h.remove()
  return {k: (2.0 / rows[k]) * v.numpy() for k, v in sums.items()}


# --- the model-level pass ---------------------------------------------------------

class _Stop(Exception):
  pass


def quantize_model(model, cfg: QuantConfig, calib: np.ndarray | None = None,
                   batch_size: int = 8) -> dict[str, QuantizedLinear]:
  """Quantizes every decoder linear of a transformers Qwen2/Qwen3 model in place
  (its weights become the dequantized values). Returns {module name: QuantizedLinear}.
  """
  import torch

  layers = model.model.layers
  results: dict[str, QuantizedLinear] = {}
  if cfg.method == "gptq":
    if calib is None:
      raise ValueError("GPTQ needs calibration windows")
    widest = max(layers[0].get_submodule(n).in_features for n in LINEARS)
    tokens = int(np.prod(calib.shape))
    if tokens < widest:
      raise ValueError(f"calibration set too small for the Hessian: {tokens} tokens < "
                       f"{widest} inputs of the widest layer (H = X^T X would be singular); "
                       f"raise calib_samples or calib_seq_len")
  groups = SEQUENTIAL_GROUPS if cfg.method == "gptq" and cfg.true_sequential else (LINEARS,)
  for li, layer in enumerate(layers):
    for group in groups:
      modules = {n: layer.get_submodule(n) for n in group}
      hessians = (_layer_input_hessians(model, layer, modules, calib, batch_size)
                  if cfg.method == "gptq" else {})
      for n, m in modules.items():
        w = m.weight.detach().float().numpy()
        name = f"model.layers.{li}.{n}"
        ql = gptq(w, hessians[n], cfg) if cfg.method == "gptq" else rtn(w, cfg)
        results[name] = ql
        with torch.no_grad():
          m.weight.copy_(torch.from_numpy(ql.dequantize()).to(m.weight.dtype))
    log.info("quantized layer %d/%d (%s)", li + 1, len(layers), cfg.method)
  return results


def _layer_input_hessians(model, layer, modules: dict, calib: np.ndarray,
                          batch_size: int) -> dict[str, np.ndarray]:
  """{name: 2/n X^T X} of the inputs of `modules` (linears of `layer`) over the
  calibration windows, with the model as it stands; the forward stops after `layer`."""
  import torch

  sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
          for n, m in modules.items()}
  rows = {n: 0 for n in modules}

  def pre_hook(name):
    def hook(module, args):
      x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
      sums[name] += x.T @ x
      rows[name] += x.shape[0]
    return hook

  def stop(module, args, output):
    raise _Stop

  hooks = [m.register_forward_pre_hook(pre_hook(n)) for n, m in modules.items()]
  hooks.append(layer.register_forward_hook(stop))
  try:
    with torch.no_grad():
      for i in range(0, len(calib), batch_size):
        try:
          model(input_ids=torch.as_tensor(calib[i:i + batch_size]))
        except _Stop:
          pass
  finally:
    for h in hooks:
      h.remove()
  return {n: (2.0 / rows[n]) * sums[n].numpy() for n in modules}


def load_torch_model(folder, dtype: str = "float32"):
  import torch
  from transformers import AutoModelForCausalLM

  return AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype)).eval()


def write_quantized(src, out, quantized: dict[str, QuantizedLinear], cfg: QuantConfig, *,
                    max_shard_bytes: int = 5 * 10**9) -> list[str]:
  """Writes the pack-quantized folder `out` (exists, empty) from the dense folder `src`.

  Dense tensors are streamed from `src` one at a time; a shard is written as
  soon as it passes `max_shard_bytes`.
  """
  import ml_dtypes
  from safetensors import safe_open
  from safetensors.numpy import save_file

  from m2.model import hf

  src, out = pathlib.Path(src), pathlib.Path(out)
  config = hf.read_hf_config(src)
  dense_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                 "float16": np.float16}[cfg.dtype]
  files, weight_map_in = hf.weight_files(src)
  quantized_names = {f"{p}.weight" for p in quantized}
  shards: list[dict[str, np.ndarray]] = []
  current: dict[str, np.ndarray] = {}
  size = 0
  names: list[str] = []
  weight_map: dict[str, str] = {}
  total = 0

  def flush():
    nonlocal current, size
    if not current:
      return
    name = f"model-{len(names) + 1:05d}.safetensors.part"
    save_file(current, str(out / name), metadata={"format": "pt"})
    names.append(name)
    for k in current:
      weight_map[k] = name
    current, size = {}, 0

  def add(tensors):
    nonlocal size, total
    nbytes = sum(t.nbytes for t in tensors.values())
    if current and size + nbytes > max_shard_bytes:
      flush()
    current.update(tensors)
    size += nbytes
    total += nbytes

  for file in files:
    with safe_open(str(src / file), framework="np") as f:
      for key in f.keys():
        if weight_map_in is not None and weight_map_in.get(key) != file:
          continue  # the index places this tensor elsewhere
        if key in quantized_names:
          prefix = key[:-len(".weight")]
          tensors = (gptq_tensors(prefix, quantized[prefix], cfg.bits) if cfg.format == "gptq"
                     else packed_tensors(prefix, quantized[prefix], cfg.bits))
          add({k: np.ascontiguousarray(v) for k, v in tensors.items()})
        else:
          add({key: np.ascontiguousarray(f.get_tensor(key).astype(dense_dtype))})
  flush()
  marker = ".qweight" if cfg.format == "gptq" else ".weight_packed"
  missing = sorted(set(quantized) - {k.rsplit(".", 1)[0] for k in weight_map
                                    if k.endswith(marker)})
  if missing:
    raise ValueError(f"{src}: quantized layers not in the checkpoint: {missing[:5]}")
  # Final names need the shard count.
  n = len(names)
  final = [hf.WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                            for i in range(n)]
  for a, b in zip(names, final):
    (out / a).rename(out / b)
  rename = dict(zip(names, final))
  if n > 1:
    (out / hf.INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total},
         "weight_map": {k: rename[v] for k, v in sorted(weight_map.items())}}, indent=2))
  config["quantization_config"] = (gptq_config(cfg) if cfg.format == "gptq"
                                   else compressed_tensors_config(cfg))
  config["torch_dtype"] = config["dtype"] = cfg.dtype
  (out / hf.CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  for extra in src.iterdir():
    if extra.is_file() and extra.name not in (hf.CONFIG_FILE, hf.INDEX_FILE, hf.WEIGHTS_FILE) \
       and not extra.name.endswith(".safetensors"):
      shutil.copy(extra, out / extra.name)
  return final


def quantize_folder(src, out, cfg: QuantConfig, *, overwrite: bool = False,
                    calib_texts: list[str] | None = None, max_shard_bytes: int = 5 * 10**9):
  """Dense HF folder -> int4 folder. Returns (quantized layers, the dequantized torch model)."""
  from export.to_hf import TOKENIZER_FILES, atomic_dir

  src = pathlib.Path(src)
  missing = [f for f in TOKENIZER_FILES if not (src / f).is_file()]
  if missing:
    raise FileNotFoundError(f"{src}: missing tokenizer files {missing}; export with "
                            f"export.to_hf first")
  from m2.model import hf
  from m2.model.config import ModelConfig
  ModelConfig.from_hf_config(hf.read_hf_config(src))   # unknown families fail here
  with atomic_dir(out, overwrite) as tmp:
    model = load_torch_model(src)
    calib = None
    if cfg.method == "gptq":
      from transformers import AutoTokenizer
      tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
      texts = calib_texts if calib_texts is not None else medical_texts("train")
      calib = token_windows(tok, texts, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    quantized = quantize_model(model, cfg, calib)
    write_quantized(src, tmp, quantized, cfg, max_shard_bytes=max_shard_bytes)
    (tmp / "m2_quantize.json").write_text(json.dumps(
        {"source": str(src.absolute()), **dataclasses.asdict(cfg)}, indent=2))
  return quantized, model


def relative_output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
  """||(W - W_hat) X||^2 / ||W X||^2 over the inputs X whose H = 2/n X^T X is given."""
  w = w.astype(np.float64)
  d = w - w_hat.astype(np.float64)
  return float(np.sum((d @ hessian) * d) / np.sum((w @ hessian) * w))


def output_error(w: np.ndarray, ql: QuantizedLinear, hessian: np.ndarray) -> float:
  """Relative layer-output error ||(W - Q) X||^2 / ||W X||^2, with H = 2/n X^T X."""
  return relative_output_error(w, ql.dequantize(), hessian)


def model_output_error(model, dense_weights: dict[str, np.ndarray],
                       hessians: dict[str, np.ndarray]) -> float:
  """Mean over the decoder linears of `relative_output_error` of the model's current
  weights against the dense ones."""
  errors = [relative_output_error(w, model.get_submodule(k).weight.detach().float().numpy(),
                                  hessians[k]) for k, w in dense_weights.items()]
  return float(np.mean(errors))


def _m2_params(model, src: pathlib.Path, mesh):
  """The torch model's current weights as m2 params (through m2/model/hf.py, the one
  name map), via a temporary HF folder with the source's config."""
  import tempfile

  from safetensors.torch import save_file

  from m2.model import hf
  with tempfile.TemporaryDirectory(prefix="m2_quant_eval_") as tmp:
    shutil.copy(src / hf.CONFIG_FILE, pathlib.Path(tmp) / hf.CONFIG_FILE)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
             if k != "lm_head.weight" or not getattr(model.config, "tie_word_embeddings", False)}
    save_file(state, str(pathlib.Path(tmp) / hf.WEIGHTS_FILE), metadata={"format": "pt"})
    _, params = hf.load_hf_checkpoint(tmp, mesh=mesh)
  return params


class HealthBenchScorer:
  """HealthBench score of a torch model's weights, generated greedily by m2's own
  sampler and graded by m2's reference grader (m2.eval.healthbench): the eval score
  before and after quantization. HealthBench is evaluation data only here; neither
  calibration nor anything else is tuned on it.

  `same_response` is the fraction of responses identical to the first model scored
  (the dense one): at tiny scale the score itself moves little, the text does.
  """

  def __init__(self, src, limit: int, *, max_new_tokens: int = 48, batch_size: int = 16,
               data_dir: str = ""):
    from m2.eval import healthbench
    from m2.train.policy import load_policy

    self.src = pathlib.Path(src)
    self.policy = load_policy(str(self.src))
    self.examples = healthbench.load_examples(data_dir, ("oss_eval",), limit=limit)
    self.grader = healthbench.make_grader("reference")
    self.role = healthbench.make_role(self.policy, name="policy", max_new_tokens=max_new_tokens)
    self.batch_size = batch_size
    self.reference: list[str] | None = None

  def __call__(self, model) -> dict:
    from m2.eval import healthbench

    # Same shapes each time: the sampler's compiled programs are reused.
    self.role.params = _m2_params(model, self.src, self.policy.mesh)
    responses = healthbench.generate(self.role, self.examples, self.batch_size, progress=False)
    records = healthbench.grade(self.grader, self.examples, responses, self.batch_size,
                                progress=False)
    result = healthbench.report(records, n_bootstrap=200)
    if self.reference is None:
      self.reference = responses
    same = np.mean([a == b for a, b in zip(responses, self.reference)])
    # The official score clips the mean at 0, where a tiny model sits; the unclipped
    # mean of the example scores (Σ met points / Σ positive points) still moves.
    raw = [r["score"] for r in records if r["score"] is not None]
    return {"healthbench": float(result["score"]),
            "healthbench_std": float(result["metrics"].get("overall_score:bootstrap_std", 0.0)),
            "healthbench_raw": float(np.mean(raw)) if raw else float("nan"),
            "same_response": float(same)}


def quality_report(src, configs: dict[str, QuantConfig], *, held_windows: int = 64,
                   seq_len: int = 256, calib_texts=None, held_texts=None, eval_limit: int = 0,
                   eval_max_new_tokens: int = 48, data_dir: str = "") -> list[dict]:
  """Held-out medical perplexity, KL to the dense model, top-1 agreement, layer-output
  error and (with `eval_limit` > 0) the HealthBench score of the dense model (fp32 and
  bf16 weights) and of each config. The first row is the reference.

  The held-out text is MTS-Dialog test1, which m2's configs never train on;
  the output error uses the held-out activations of the dense model, so it
  measures how well a method generalises beyond its calibration set.
  """
  import torch

  from transformers import AutoTokenizer

  src = pathlib.Path(src)
  tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
  held = token_windows(tok, held_texts if held_texts is not None
                       else medical_texts("test1", data_dir=data_dir or None),
                       held_windows, seq_len, seed=1)
  if calib_texts is None and any(c.method == "gptq" for c in configs.values()):
    calib_texts = medical_texts("train", data_dir=data_dir or None)
  dense = load_torch_model(src)
  hessians = input_hessians(dense, held)
  dense_weights = {k: dense.get_submodule(k).weight.detach().float().numpy().copy()
                   for k in hessians}
  scorer = (HealthBenchScorer(src, eval_limit, max_new_tokens=eval_max_new_tokens,
                              data_dir=data_dir) if eval_limit else None)
  rows = []
  reference = None

  def add(name, model, cfg=None):
    nonlocal reference
    stats, logps = lm_stats(model, held, reference=reference)
    if reference is None:   # the first model (fp32) is the reference
      reference = logps
      stats.update(kl=0.0, top1_agree=1.0, dnll=0.0, dnll_se=0.0)
    row = {"method": name, **stats,
           "output_error": model_output_error(model, dense_weights, hessians)}
    if cfg is not None:
      row.update(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric,
                 act_order=cfg.act_order)
    if scorer is not None:
      row.update(scorer(model))
    rows.append(row)
    log.info("quality %s: %s", name, row)

  from m2.model import hf
  src_config = hf.read_hf_config(src)
  stored = src_config.get("dtype") or src_config.get("torch_dtype") or "float32"
  # The folder's own weights (computed in fp32) are the reference; a bf16 row shows
  # what bf16 rounding alone costs when the folder holds fp32.
  add("fp32" if stored == "float32" else f"dense ({stored})", dense)
  del dense
  if stored == "float32":
    bf16 = load_torch_model(src)
    with torch.no_grad():
      for p in bf16.parameters():
        p.copy_(p.to(torch.bfloat16).float())
    add("bf16", bf16)
    del bf16
  for name, cfg in configs.items():
    model = load_torch_model(src)
    calib = (token_windows(tok, calib_texts, cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
             if cfg.method == "gptq" else None)
    quantize_model(model, cfg, calib)
    add(name, model, cfg)
    del model
  return rows


def format_report(rows: list[dict]) -> str:
  has_eval = any("healthbench" in r for r in rows)
  head = (f"{'method':<24} {'held-out ppl':>12} {'NLL shift ± se':>18} {'KL vs fp32':>10} "
          f"{'top-1 agree':>11} {'layer output err':>16}")
  if has_eval:
    head += f" {'HealthBench':>11} {'± std':>7} {'unclipped':>9} {'same text':>9}"
  lines = [head]
  for r in rows:
    shift = f"{r['dnll']:+.5f} ± {r['dnll_se']:.5f}"
    line = (f"{r['method']:<24} {r['ppl']:>12.4f} {shift:>18} {r['kl']:>10.6f} "
            f"{r['top1_agree']:>11.4f} {r['output_error']:>16.5f}")
    if has_eval:
      line += (f" {r['healthbench']:>11.4f} {r['healthbench_std']:>7.4f} "
               f"{r['healthbench_raw']:>9.4f} {r['same_response']:>9.2f}")
    lines.append(line)
  return "\n".join(lines)


def report_configs(group_sizes=(128,), *, bits: int = 4, damp: float = 0.01,
                   calib_samples: int = 64, calib_seq_len: int = 256,
                   true_sequential: bool = True) -> dict[str, QuantConfig]:
  """RTN, GPTQ and GPTQ + act-order, symmetric and asymmetric, per group size."""
  configs = {}
  for g in group_sizes:
    for sym in (True, False):
      for m, ao in (("rtn", False), ("gptq", False), ("gptq", True)):
        name = f"{m}{'+act_order' if ao else ''} {'sym' if sym else 'asym'} g{g}"
        configs[name] = QuantConfig(method=m, symmetric=sym, act_order=ao, bits=bits,
                                    group_size=g, block_size=max(g, 128 // g * g), damp=damp,
                                    calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                                    true_sequential=true_sequential)
  return configs


def main(argv=None):
  import argparse

  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="dense HF folder (from export.to_hf)")
  p.add_argument("--out", default=None, help="output folder (not needed with --report)")
  p.add_argument("--method", default="gptq", choices=METHODS)
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--group_size", type=int, default=128)
  p.add_argument("--asym", action="store_true", help="asymmetric (zero points)")
  p.add_argument("--act_order", action="store_true")
  p.add_argument("--true_sequential", action=argparse.BooleanOptionalAction, default=True,
                 help="GPTQ: re-take Hessians after each group of a layer's linears")
  p.add_argument("--damp", type=float, default=0.01)
  p.add_argument("--calib_samples", type=int, default=64)
  p.add_argument("--calib_seq_len", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--format", default="pack-quantized", choices=FORMATS,
                 help="pack-quantized (compressed-tensors) or gptq (qweight/qzeros/scales/g_idx)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--report", action="store_true",
                 help="print the quality table (held-out perplexity, layer-output error and, "
                      "with --eval_limit, HealthBench) of fp32 / bf16 / RTN / GPTQ, sym and asym, "
                      "and exit")
  p.add_argument("--group_sizes", default="",
                 help="--report: comma-separated group sizes (default: --group_size)")
  p.add_argument("--held_windows", type=int, default=64, help="--report: held-out windows")
  p.add_argument("--eval_limit", type=int, default=0,
                 help="--report: HealthBench examples to score each model on (0: none)")
  p.add_argument("--eval_max_new_tokens", type=int, default=48)
  p.add_argument("--report_out", default="",
                 help="--report: also write the table (.txt) and rows (.json) to this prefix")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  if a.report:
    groups = tuple(int(g) for g in a.group_sizes.split(",")) if a.group_sizes else (a.group_size,)
    configs = report_configs(groups, bits=a.bits, damp=a.damp, calib_samples=a.calib_samples,
                             calib_seq_len=a.calib_seq_len, true_sequential=a.true_sequential)
    rows = quality_report(a.model, configs, held_windows=a.held_windows,
                          seq_len=a.calib_seq_len, eval_limit=a.eval_limit,
                          eval_max_new_tokens=a.eval_max_new_tokens)
    table = format_report(rows)
    print(table)
    print(json.dumps({"bench": "int4_quality", "model": a.model, "rows": rows}))
    if a.report_out:
      pathlib.Path(a.report_out + ".txt").write_text(table + "\n")
      pathlib.Path(a.report_out + ".json").write_text(json.dumps(
          {"model": a.model, "args": vars(a), "rows": rows}, indent=1))
    return
  if not a.out:
    p.error("--out is required unless --report")
  cfg = QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, symmetric=not a.asym,
                    act_order=a.act_order, true_sequential=a.true_sequential, damp=a.damp,
                    calib_samples=a.calib_samples,
                    calib_seq_len=a.calib_seq_len, dtype=a.dtype, format=a.format)
  quantize_folder(a.model, a.out, cfg, overwrite=a.overwrite)
  print(a.out)


if __name__ == "__main__":
  main()
