"""A model loaded from one path: weights, model config and tokenizer.

What evaluation runs (`--checkpoint`) and what the RL stages' model-backed
verifier roles run (`config.verifier.grader_checkpoint`, ...). The path is either
an HF folder (config.json + safetensors, tokenizer.json) or an m2 stage directory
(`runs/tiny/sft`: orbax `checkpoints/` written by the train loop, whose metadata
holds the model config, and `data.json` naming the tokenizer the stage trained with).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from flax import nnx

from m2 import parallel
from m2.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Policy:
  model_cfg: ModelConfig
  params: nnx.State
  tokenizer: object
  source: str
  mesh: object = None   # where params live; the sampler uses the same mesh


def _tokenizer(spec: str, cache_dir: str | None):
  from m2.data import tokenizers
  if spec == "sp" or spec.startswith("sp:"):
    parts = spec.split(":")
    return tokenizers.corpus_sentencepiece(
        cache_dir or None, vocab_size=int(parts[1]) if len(parts) > 1 else 8192,
        model_type=parts[2] if len(parts) > 2 else "bpe")
  return tokenizers.load_tokenizer(spec)


def default_mesh():
  return parallel.make_mesh((1, -1, 1), parallel.MESH_AXES)


def _manager(stage_dir: str):
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.path.join(stage_dir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{stage_dir}: no checkpoints/ directory (not an m2 stage dir)")
  return directory, ocp.CheckpointManager(directory, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def _meta(manager, directory: str, step: int | None) -> tuple[int, dict]:
  import orbax.checkpoint as ocp
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint step")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  return step, meta or {}


def stage_tokenizer(stage_dir: str) -> str:
  """The tokenizer spec a stage trained with: its data.json, else its checkpoint metadata."""
  data_json = os.path.join(stage_dir, "data.json")
  spec = None
  if os.path.exists(data_json):
    with open(data_json) as f:
      spec = json.load(f).get("tokenizer")
  if spec is not None:
    if not spec:   # "": the HF checkpoint's, which runs before 2026-12-07 did not record
      raise FileNotFoundError(f"{stage_dir}: trained with the HF checkpoint's tokenizer, "
                              f"which it does not name; pass --tokenizer")
    return spec
  directory, manager = _manager(stage_dir)
  try:
    spec = _meta(manager, directory, None)[1].get("tokenizer")
  finally:
    manager.close()
  if not spec:
    raise FileNotFoundError(f"{stage_dir}: neither data.json nor the checkpoint names the "
                            f"tokenizer; pass --tokenizer")
  return spec


def load_stage_params(stage_dir: str, mesh=None, rules=parallel.DEFAULT_RULES,
                      step: int | None = None) -> tuple[ModelConfig, nnx.State]:
  """(model config, params) of the last (or `step`) checkpoint in `stage_dir/checkpoints`.

  Only the metadata and the saved tree are needed: the optimizer the stage
  used does not have to be known, since only `params` is read (onto `mesh`).
  """
  import orbax.checkpoint as ocp

  directory, manager = _manager(stage_dir)
  try:
    step, meta = _meta(manager, directory, step)
    if "model" not in meta:
      raise ValueError(f"{directory}/{step}: metadata has no model config")
    model = dict(meta["model"])
    model_cfg = ModelConfig(**{f.name: (tuple(model[f.name]) if isinstance(model[f.name], list)
                                        else model[f.name])
                               for f in dataclasses.fields(ModelConfig) if f.name in model})
    from m2.model.hf import abstract_model
    _, abstract = abstract_model(model_cfg)
    mesh = mesh or default_mesh()
    shardings = parallel.state_shardings(abstract, mesh, rules)
    replicated = parallel.replicated(mesh)
    saved = manager.item_metadata(step)["state"]
    target = {"params": jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved["params"])}
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for path, _ in nnx.to_flat_state(abstract):
      node = target["params"]
      for k in path[:-1]:
        node = node[k]
      leaf = node[path[-1]]
      node[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                            sharding=flat_shardings[path].get_value()
                                            if isinstance(flat_shardings[path], nnx.Variable)
                                            else flat_shardings[path])
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    node = restored["params"]
    for k in path:
      node = node[k]
    if tuple(node.shape) != tuple(var.get_value().shape):
      raise ValueError(f"{directory}/{step}: {'.'.join(map(str, path))} has shape "
                       f"{tuple(node.shape)}, the model expects {var.get_value().shape}")
    flat.append((path, var.replace(node)))
  log.info("loaded params of %s step %d", stage_dir, step)
  return model_cfg, nnx.from_flat_state(flat)


def load_policy(path: str, *, tokenizer: str = "", cache_dir: str | None = None,
                mesh=None, rules=parallel.DEFAULT_RULES) -> Policy:
  """An HF folder or an m2 stage directory; `tokenizer` overrides the one it names."""
  mesh = mesh or default_mesh()
  if os.path.exists(os.path.join(path, "config.json")):
    from m2.model import hf
    model_cfg, params = hf.load_hf_checkpoint(path, mesh=mesh, rules=rules)
    return Policy(model_cfg, params, _tokenizer(tokenizer or path, cache_dir), path, mesh)
  model_cfg, params = load_stage_params(path, mesh, rules)
  spec = tokenizer or stage_tokenizer(path)
  tok = _tokenizer(spec, cache_dir)
  if getattr(tok, "vocab_size", 0) > model_cfg.vocab_size:
    raise ValueError(f"tokenizer {spec!r} has {tok.vocab_size} ids, more than the model's "
                     f"vocab_size {model_cfg.vocab_size}")
  return Policy(model_cfg, params, tok, path, mesh)

