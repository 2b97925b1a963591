r"""Runs the stages an experiment config lists, in order, in one workdir.

  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny
  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny --stages=midtrain \
      --config.midtrain.steps=50

Each stage writes `workdir/<stage>/`. A finished stage is skipped, an
interrupted one resumes from its last checkpoint, and a stage starts from the
weights the previous stage ended with (or `config.model.hf_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from m2 import configlib
from m2.model.config import model_config_from

log = logging.getLogger(__name__)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, outputs.")
_STAGES = flags.DEFINE_list("stages", None, "Subset of config.stages to run (default: all).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: when the standard "
    "multi-host environment variables are set).")

_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass
class StageResult:
  name: str
  status: str            # "ran", "resumed", "skipped"
  wall_s: float
  metric: str            # headline metric name
  value: float | None
  params: object = None  # the weights the stage ended with, for the next stage


def _initial_params(config, model_cfg, mesh_cfg):
  path = config.model.get("hf_checkpoint", "")
  if not path:
    return None
  from m2.model import hf
  _, params = hf.load_hf_checkpoint(path, mesh=mesh_cfg.make(), rules=mesh_cfg.rules,
                                    dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
  return params


def run_midtrain(config, workdir, model_cfg, mesh_cfg, init_params):
  """Language-model training on the medical text corpus (packed documents)."""
  import jax

  from m2.data.text import lm_dataset, read_texts
  from m2.data.tokenizers import load_tokenizer
  from m2.train.loop import TrainConfig, train

  stage = config.midtrain
  train_cfg = configlib.build(TrainConfig, stage.train, "config.midtrain.train")
  tokenizer = load_tokenizer(stage.tokenizer or config.model.hf_checkpoint or "byte")
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size}")
  texts = read_texts(stage.sources, stage.data_dir or None)
  # Each host reads its own documents and feeds its share of the global batch.
  hosts, host = jax.process_count(), jax.process_index()
  data = lm_dataset(texts[host::hosts], tokenizer, batch_size=train_cfg.batch_size // hosts,
                    seq_len=train_cfg.seq_len, seed=train_cfg.seed)
  result = train(model_cfg, train_cfg, mesh_cfg, data, workdir, init_params=init_params,
                 meta={"stage": "midtrain", "sources": list(stage.sources)})
  return result, "loss", result.final_metrics.get("loss")


STAGES: dict[str, Callable] = {"midtrain": run_midtrain}


def run(config, workdir: str, stages: list[str] | None = None) -> list[StageResult]:
  from m2.train.loop import MeshConfig, TrainConfig, restore_params

  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ValueError(f"config.stages names unknown stage(s) {unknown}; known: {list(STAGES)}")
  selected = stages or list(config.stages)
  for s in selected:
    if s not in config.stages:
      raise ValueError(f"--stages={s}: not in config.stages {list(config.stages)}")
  model_cfg = model_config_from(config.model)
  mesh_cfg = configlib.build(MeshConfig, config.mesh, "config.mesh")
  params = _initial_params(config, model_cfg, mesh_cfg)
  results = []
  for name in config.stages:
    if name not in selected:
      continue
    stage_dir = os.path.join(workdir, name)
    done_file = os.path.join(stage_dir, "DONE")
    start = time.time()
    if os.path.exists(done_file):
      with open(done_file) as f:
        done = json.load(f)
      results.append(StageResult(name, "skipped", 0.0, done["metric"], done["value"]))
      if any(s in selected for s in config.stages[config.stages.index(name) + 1:]):
        params = restore_params(stage_dir, model_cfg, configlib.build(
            TrainConfig, config[name].train, f"config.{name}.train"), mesh_cfg)
      log.info("stage %s already complete; skipping", name)
      continue
    result, metric, value = STAGES[name](config, stage_dir, model_cfg, mesh_cfg, params)
    params = result.state.params
    status = "resumed" if result.resumed_from is not None else "ran"
    with open(done_file, "w") as f:
      json.dump({"metric": metric, "value": value, "wall_s": time.time() - start}, f)
    results.append(StageResult(name, status, time.time() - start, metric, value, params))
  return results


def summary_table(results: list[StageResult]) -> str:
  rows = [("stage", "status", "wall time", "metric", "value")]
  for r in results:
    value = "-" if r.value is None else f"{r.value:.4f}"
    rows.append((r.name, r.status, f"{r.wall_s:.1f} s", r.metric, value))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _DISTRIBUTED.value or (_DISTRIBUTED.value is None
                            and any(os.environ.get(v) for v in _MULTIHOST_ENV)):
    import jax
    jax.distributed.initialize()
  # Library chatter (orbax, grain) stays at warnings; m2's own progress is shown.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("m2").setLevel(logging.INFO)
  results = run(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  print()
  print(summary_table(results))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
