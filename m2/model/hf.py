"""Hugging Face safetensors checkpoints <-> m2 parameters.

Supports `Qwen2ForCausalLM` and `Qwen3ForCausalLM` folders as written by
transformers' `save_pretrained`: `config.json` plus either `model.safetensors`
or shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.

`conversions(cfg)` is the single name map between the two layouts. For every
m2 parameter (one layer slice at a time for the stacked `blocks`), it names the
HF tensors the slice is made of and gives the functions that convert between
them. Loading, saving and `export/` are all built on it.

Both directions stream: loading reads and places one m2 parameter at a time
(directly with its mesh sharding when a mesh is given); saving holds one
output shard's tensors in host memory at a time.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import pathlib
import re
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from m2 import parallel
from m2.model.config import ModelConfig
from m2.model.transformer import Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default "5GB"


_SHARD_FILE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Non-parameter buffers that older exports carry; they hold nothing to load.
_IGNORED = re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
_MAX_LISTED = 20

ParamPath = tuple[str, ...]


# --- the name map -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conversion:
  """One m2 parameter (or one layer of a stacked one) and its HF tensors.

  m2_path:  path of the parameter in the Transformer's state, e.g.
            ("blocks", "attn", "qkv").
  layer:    index into the leading `layers` axis, or None for an unstacked
            parameter (embed, final_norm, lm_head).
  hf_names: the HF tensors the slice is made of, in `from_hf` argument order.
  hf_shapes: their shapes, as config.json implies.
  from_hf:  (*hf_tensors) -> m2 slice.
  to_hf:    m2 slice -> tuple of HF tensors (same order as hf_names).
  """

  m2_path: ParamPath
  layer: int | None
  hf_names: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  from_hf: Callable[..., np.ndarray]
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(name: str, path: ParamPath, layer: int | None, shape) -> Conversion:
  return Conversion(path, layer, (name,), (tuple(shape),), lambda t: t, lambda a: (a,))


def _transposed(name: str, path: ParamPath, layer: int | None, shape) -> Conversion:
  # torch Linear weights are [out, in]; m2 kernels are [in, out].
  return Conversion(path, layer, (name,), (tuple(shape),), lambda t: t.T, lambda a: (a.T,))


def conversions(cfg: ModelConfig) -> Iterator[Conversion]:
  """Yields every conversion for `cfg`, in HF's layer order (embed, layers, norm, head)."""
  e, h, kv, g, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim
  m, v = cfg.mlp_dim, cfg.vocab_size

  # Query head h = k * G + g sits at [:, k, g] (HF's repeat_kv grouping), key
  # head k at [:, k, G] and value head k at [:, k, G + 1].
  def qkv_from_hf(q, k, vv):
    return np.concatenate([q.T.reshape(e, kv, g, d), k.T.reshape(e, kv, 1, d),
                           vv.T.reshape(e, kv, 1, d)], axis=2)

  def qkv_to_hf(a):
    return (a[:, :, :g].reshape(e, h * d).T, a[:, :, g].reshape(e, kv * d).T,
            a[:, :, g + 1].reshape(e, kv * d).T)

  def bias_from_hf(q, k, vv):
    return np.concatenate([q.reshape(kv, g, d), k.reshape(kv, 1, d), vv.reshape(kv, 1, d)],
                          axis=1)

  def bias_to_hf(a):
    return a[:, :g].reshape(h * d), a[:, g].reshape(kv * d), a[:, g + 1].reshape(kv * d)

  def gate_up_from_hf(gate, up):
    return np.stack([gate.T, up.T], axis=1)

  def gate_up_to_hf(a):
    return a[:, 0].T, a[:, 1].T

  yield _same("model.embed_tokens.weight", ("embed",), None, (v, e))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    yield _same(p + "input_layernorm.weight", ("blocks", "attn_norm", "scale"), i, (e,))
    yield Conversion(("blocks", "attn", "qkv"), i,
                     (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                     ((h * d, e), (kv * d, e), (kv * d, e)), qkv_from_hf, qkv_to_hf)
    if cfg.qkv_bias:
      yield Conversion(("blocks", "attn", "qkv_bias"), i,
                       (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                       ((h * d,), (kv * d,), (kv * d,)), bias_from_hf, bias_to_hf)
    yield Conversion(("blocks", "attn", "out"), i, (a + "o_proj.weight",), ((e, h * d),),
                     lambda t: t.T.reshape(kv, g, d, e),
                     lambda x: (x.reshape(h * d, e).T,))
    if cfg.qk_norm:
      yield _same(a + "q_norm.weight", ("blocks", "attn", "q_norm", "scale"), i, (d,))
      yield _same(a + "k_norm.weight", ("blocks", "attn", "k_norm", "scale"), i, (d,))
    yield _same(p + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale"), i, (e,))
    yield Conversion(("blocks", "mlp", "gate_up"), i,
                     (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                     ((m, e), (m, e)), gate_up_from_hf, gate_up_to_hf)
    yield _transposed(p + "mlp.down_proj.weight", ("blocks", "mlp", "down"), i, (e, m))
  yield _same("model.norm.weight", ("final_norm", "scale"), None, (e,))
  if not cfg.tie_embeddings:
    yield _transposed("lm_head.weight", ("lm_head",), None, (v, e))


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name `cfg` implies, with its shape."""
  return {n: s for c in conversions(cfg) for n, s in zip(c.hf_names, c.hf_shapes)}


# --- config ---------------------------------------------------------------------

def read_hf_config(path) -> dict[str, Any]:
  """Reads `config.json` from an HF folder, with a clear error if it is missing."""
  folder = _folder(path)
  file = folder / CONFIG_FILE
  if not file.is_file():
    raise ValueError(f"HF checkpoint {folder}: no {CONFIG_FILE} (found: {_listing(folder)})")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"HF checkpoint {file}: not valid JSON: {err}") from err


# --- reading safetensors ---------------------------------------------------------

def weight_files(folder) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of an HF folder, and its index's weight map (None for one file).

  As in transformers, one `model.safetensors` wins over an index beside it: re-saving a
  sharded folder unsharded, or copying over one, leaves the old index (and shards) behind.
  """
  folder = pathlib.Path(folder)
  single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
  if single.is_file():
    if index.is_file():
      logging.warning("HF checkpoint %s: reading %s; the %s beside it is ignored, as "
                      "transformers ignores it", folder, WEIGHTS_FILE, INDEX_FILE)
    return [WEIGHTS_FILE], None
  if not index.is_file():
    raise ValueError(f"HF checkpoint {folder}: no weights: expected {WEIGHTS_FILE} or "
                     f"{INDEX_FILE} with its shards (found: {_listing(folder)})")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as err:
    raise ValueError(f"HF checkpoint {index}: malformed index ({err!r})") from err
  files = sorted(set(weight_map.values()))
  missing_files = [f for f in files if not (folder / f).is_file()]
  if missing_files:
    raise ValueError(f"HF checkpoint {folder}: {INDEX_FILE} names weight files that do not "
                     f"exist: {missing_files}")
  return files, weight_map


class _Reader:
  """Tensor names, shapes and values across one or many safetensors files."""

  def __init__(self, folder: pathlib.Path, stack: contextlib.ExitStack):
    files, weight_map = weight_files(folder)
    self._handles = {f: stack.enter_context(safe_open(str(folder / f), framework="np"))
                     for f in files}
    self.file_of: dict[str, str] = {}
    for f, handle in self._handles.items():
      for name in handle.keys():
        if weight_map is None or weight_map.get(name) == f:
          self.file_of[name] = f
    if weight_map is not None:
      absent = [f"{n} (in {f})" for n, f in weight_map.items() if n not in self.file_of]
      if absent:
        raise ValueError(f"HF checkpoint {folder}: {INDEX_FILE} lists tensors that their "
                         f"files lack: {_short(absent)}")

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._handles[self.file_of[name]].get_slice(name).get_dtype()

  def get(self, name: str) -> np.ndarray:
    return self._handles[self.file_of[name]].get_tensor(name)


def _check_weights(cfg: ModelConfig, reader: _Reader, folder: pathlib.Path) -> None:
  """Fails, naming every offending tensor, unless the files match config.json."""
  expected = hf_tensor_shapes(cfg)
  available = reader.file_of
  missing = [n for n in expected if n not in available]
  # A tied model may still carry its lm_head; the embedding is used, so it must be a copy
  # (transformers unties the two where it is not).
  allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
  head, embed = "lm_head.weight", "model.embed_tokens.weight"
  if allowed & set(available) and embed in available and (
      reader.shape(head) != reader.shape(embed)
      or not np.array_equal(reader.get(head), reader.get(embed))):
    raise ValueError(f"HF checkpoint {folder}: {CONFIG_FILE} says tie_word_embeddings=true, "
                     f"but lm_head.weight is not a copy of model.embed_tokens.weight; if the "
                     f"head was trained on its own, set tie_word_embeddings=false")
  extra = sorted(n for n in available
                 if n not in expected and n not in allowed and not _IGNORED.match(n))
  wrong_shape = [f"{n}: config.json implies {list(s)}, file has {list(reader.shape(n))}"
                 for n, s in expected.items() if n in available and reader.shape(n) != s]
  wrong_dtype = [f"{n}: {reader.dtype(n)}" for n in expected
                 if n in available and reader.dtype(n) not in _FLOAT_DTYPES]
  problems = []
  if missing:
    problems.append(f"missing tensors: {_short(missing)}")
  if extra:
    problems.append(f"unexpected tensors: {_short(extra)}")
  if wrong_shape:
    problems.append(f"shape mismatches: {_short(wrong_shape)}")
  if wrong_dtype:
    problems.append(f"non-float tensors: {_short(wrong_dtype)}")
  if problems:
    raise ValueError(f"HF checkpoint {folder} does not match its {CONFIG_FILE} "
                     f"({cfg.family}, {cfg.num_layers} layers, embed {cfg.embed_dim}, "
                     f"tie_embeddings={cfg.tie_embeddings}): " + "; ".join(problems))


# --- loading --------------------------------------------------------------------

def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """GraphDef and abstract (shape-only) state of a Transformer, with no allocation."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def load_hf_checkpoint(path, mesh: jax.sharding.Mesh | None = None,
                       rules: parallel.Rules = parallel.DEFAULT_RULES,
                       **config_overrides) -> tuple[ModelConfig, nnx.State]:
  """Reads an HF Qwen2/Qwen3 folder into (ModelConfig, nnx.State).

  Args:
    path: local folder with config.json and safetensors weights.
    mesh: if given, each parameter is placed directly with the NamedSharding
      that `parallel.state_shardings` gives it; else on the default device.
    rules: logical-axis rules for `mesh`.
    **config_overrides: ModelConfig fields to set, e.g. param_dtype="bfloat16",
      dtype="bfloat16", remat_policy="full".

  Returns:
    The config and a state that `nnx.merge(abstract_model(cfg)[0], state)`
    accepts. Weights are cast to `cfg.param_dtype`.
  """
  folder = _folder(path)
  cfg = ModelConfig.from_hf_config(read_hf_config(folder), **config_overrides)
  _, abstract = abstract_model(cfg)
  shardings = {}
  if mesh is not None:
    shardings = dict(nnx.to_flat_state(parallel.state_shardings(abstract, mesh, rules)))
  by_path: dict[ParamPath, list[Conversion]] = collections.defaultdict(list)
  for conv in conversions(cfg):
    by_path[conv.m2_path].append(conv)

  flat = []
  with contextlib.ExitStack() as stack:
    reader = _Reader(folder, stack)
    _check_weights(cfg, reader, folder)
    for m2_path, var in nnx.to_flat_state(abstract):
      if m2_path not in by_path:
        raise ValueError(f"m2 parameter {'.'.join(m2_path)} has no HF conversion "
                         f"(update m2/model/hf.py:conversions)")
      spec = var.get_value()
      # One m2 parameter in host memory at a time; stacked layers are filled in place.
      host = np.empty(spec.shape, np.dtype(spec.dtype))
      for conv in by_path.pop(m2_path):
        value = conv.from_hf(*(reader.get(n) for n in conv.hf_names))
        if conv.layer is None:
          host[...] = value
        else:
          host[conv.layer] = value
      flat.append((m2_path, var.replace(_place(host, shardings.get(m2_path)))))
      del host
  if by_path:
    raise ValueError(f"HF conversions for parameters the model lacks: "
                     f"{['.'.join(p) for p in by_path]}")
  logging.info("loaded %s (%s, %d layers) from %s", cfg.family, cfg.param_dtype,
               cfg.num_layers, folder)
  return cfg, nnx.from_flat_state(flat)


def load_model(path, mesh: jax.sharding.Mesh | None = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES,
               **config_overrides) -> Transformer:
  """`load_hf_checkpoint`, merged into a Transformer."""
  cfg, state = load_hf_checkpoint(path, mesh, rules, **config_overrides)
  graphdef, _ = abstract_model(cfg)
  return nnx.merge(graphdef, state)


def _place(host: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(host)
  # Each device copies only its own slice; the host array is the only full copy.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


# --- saving ---------------------------------------------------------------------

def save_hf_checkpoint(cfg: ModelConfig, state_or_model, path, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       dtype: str | None = None,
                       generation_config: Mapping[str, Any] | None = None) -> list[str]:
  """Writes an HF folder that transformers' `from_pretrained` loads.

  Args:
    cfg: the model's config; written as config.json via `cfg.to_hf_config()`.
    state_or_model: a Transformer, its nnx.State, or the same as a nested dict
      of arrays (e.g. restored from orbax). Arrays may be sharded on a mesh,
      across processes too; every process must call this, process 0 writes.
    path: output folder (created). Old weight files in it are replaced.
    max_shard_bytes: above this the weights are split into
      model-0000i-of-0000n.safetensors with model.safetensors.index.json.
    dtype: weight dtype to write ("float32", "bfloat16", "float16"); default
      keeps each parameter's own dtype.
    generation_config: extra fields for generation_config.json.

  Returns:
    The names of the weight files written.
  """
  folder = pathlib.Path(path)
  params = _flat_params(state_or_model)
  _, abstract = abstract_model(cfg)
  problems = []
  for m2_path, var in nnx.to_flat_state(abstract):
    name, want = ".".join(m2_path), list(var.get_value().shape)
    if m2_path not in params:
      problems.append(f"{name} is missing")
    elif list(params[m2_path].shape) != want:
      problems.append(f"{name} has shape {list(params[m2_path].shape)}, config implies {want}")
  if problems:
    raise ValueError(f"save_hf_checkpoint: state does not match the config: {_short(problems)}")
  out_dtype = None
  if dtype is not None:
    if dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"save_hf_checkpoint: dtype must be float32, bfloat16 or float16, "
                       f"got {dtype!r}")
    out_dtype = np.dtype(jnp.dtype(dtype))

  # Plan shards from shapes alone; a conversion's tensors stay in one shard.
  convs = list(conversions(cfg))
  shards: list[list[Conversion]] = [[]]
  shard_bytes = 0
  for conv in convs:
    itemsize = (out_dtype or np.dtype(params[conv.m2_path].dtype)).itemsize
    size = sum(math.prod(s) for s in conv.hf_shapes) * itemsize
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(conv)
    shard_bytes += size

  writer = jax.process_index() == 0
  if writer:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
      if old.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_FILE.match(old.name):
        old.unlink()
    hf_config = cfg.to_hf_config()
    if dtype is not None:
      hf_config["dtype"] = hf_config["torch_dtype"] = dtype
    _write_json(folder / CONFIG_FILE, hf_config)
    _write_json(folder / GENERATION_CONFIG_FILE,
                {"_from_model_config": True, **dict(generation_config or {})})

  n = len(shards)
  names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                         for i in range(n)]
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    tensors = {}
    for conv in shard:
      host = _host(params[conv.m2_path], conv.layer)
      for hf_name, t in zip(conv.hf_names, conv.to_hf(host)):
        t = np.ascontiguousarray(t if out_dtype is None else t.astype(out_dtype))
        tensors[hf_name] = t
        weight_map[hf_name] = name
        total += t.nbytes
    if writer:
      save_file(tensors, str(folder / name), metadata={"format": "pt"})
    del tensors
  if writer and n > 1:
    _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                      "weight_map": dict(sorted(weight_map.items()))})
  logging.info("saved %s (%d weight files) to %s", cfg.family, n, folder)
  return names


def _flat_params(state_or_model) -> dict[ParamPath, Any]:
  """{path: array} from a Transformer, an nnx.State or a nested dict."""
  if isinstance(state_or_model, nnx.Module):
    state_or_model = nnx.state(state_or_model, nnx.Param)
  if isinstance(state_or_model, nnx.State):
    state_or_model = nnx.to_pure_dict(state_or_model)
  flat = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for key, child in node.items():
        walk(child, prefix + (str(key),))
    elif isinstance(node, nnx.Variable):
      flat[prefix] = node.get_value()
    else:
      flat[prefix] = node

  walk(state_or_model, ())
  return flat


def _host(x, layer: int | None) -> np.ndarray:
  """One parameter (or one layer of it) as a host numpy array, gathered if sharded."""
  if layer is not None:
    x = x[layer]  # slice on device so only this layer travels to the host
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


# --- small helpers --------------------------------------------------------------

def _folder(path) -> pathlib.Path:
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ValueError(f"HF checkpoint folder {folder} does not exist or is not a directory")
  return folder


def _listing(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir())[:_MAX_LISTED]


def _short(items: list[str]) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f" ... and {more} more" if more > 0 else "")


def _write_json(file: pathlib.Path, data) -> None:
  file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
