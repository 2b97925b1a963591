r"""Runs the stages an experiment config lists, in order, in one workdir.

  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny
  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny --stages=midtrain \
      --config.midtrain.train.steps=50

Stages (config.stages, in order): `midtrain` (LM loss on the medical/general/math
mix, held-out loss every `eval_every` steps), `sft` (assistant-only loss on doctor
turns), the RL stages of m2/rl/stages.py (`sft_rs`, `rl_rule`, `rl_rubric`,
`rl_multiturn`), `eval` (HealthBench + held-out consultations, before and after
RL, m2/eval/stage.py) and `export` (HF safetensors, int4, a distilled draft and the
serve.sh / memory-budget bundle, export/stage.py).
Each stage writes `workdir/<stage>/`: checkpoints, metrics.jsonl, TensorBoard
events, DONE (headline metric, wall and CPU seconds) and its own outputs. A
finished stage is skipped, an interrupted one resumes from its last checkpoint
(data iterator included), and a stage starts from the weights the previous stage
ended with (or `config.model.hf_checkpoint`). At the end the run prints a summary
(each stage's status, wall and CPU time, headline metric), the eval stage's
before/after table and the exported bundle's path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from m2 import configlib
from m2.eval import stage as eval_stage
from m2.model.config import model_config_from
from m2.rl import stages as rl_stages
from m2.train.loop import TrainConfig
from m2.train.metrics import read_done, write_json

# Not __name__: under `python -m m2.main` that is "__main__", outside the "m2" logger
# whose INFO level main() turns on (the data tables and skip notices would be lost).
log = logging.getLogger("m2.main")

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
  wall_s: float          # this run's time; a skipped stage: the time it took when it ran
  metric: str            # headline metric name
  value: float | None
  params: object = None  # the weights the stage ended with, for the next stage
  cpu_s: float | None = None  # process CPU time (all threads); wall >> cpu: a busy machine


def _initial_params(config, model_cfg, mesh_cfg):
  path = config.model.get("hf_checkpoint", "")
  if not path:
    return None
  from m2.model import hf
  _, params = hf.load_hf_checkpoint(path, mesh=mesh_cfg.make(), rules=mesh_cfg.rules,
                                    dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
  return params


@dataclasses.dataclass(frozen=True)
class MidtrainConfig:
  """config.midtrain: LM loss on a domain mix (ratios over named groups of sources)."""
  mix: dict = dataclasses.field(default_factory=lambda: {"medical": 2.0, "general": 2.0,
                                                         "math": 1.0})
  domains: dict = dataclasses.field(default_factory=lambda: {
      "medical": ("agentclinic", "mediq_qa", "mts_dialog", "aci_bench", "pubmedqa", "cmtmedqa"),
      "general": (), "math": ("math",)})
  mix_batches: int = 256   # training batches counted at the start to report the realised mix
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    from m2.data.mixture import Mixture
    Mixture(self.mix, self.domains)   # validates ratios and domains
    if not (isinstance(self.mix_batches, int) and self.mix_batches >= 0):
      raise ValueError(f"mix_batches must be an int >= 0, got {self.mix_batches!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """config.sft: assistant-only loss on the doctor turns of dialogue sources."""
  sources: tuple[str, ...] = ("mts_dialog", "aci_bench")
  # QA sources (m2/data/loaders.py, "math") as one-turn chats answered "Answer: <gold>";
  # keep them apart from the RL stages' prompts.
  qa_sources: tuple[str, ...] = ()
  thinking_mode: str = "off"   # Baichuan-M2's switch: "on", "off" or "auto"
  system: str = ""             # a system prompt for every chat ("": none)
  pack: bool = True            # first-fit pack windows into rows (else one per row, padded)
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    from m2.data.chat import THINKING_MODES
    if self.thinking_mode not in THINKING_MODES:
      raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {self.thinking_mode!r}")
    if not self.sources:
      raise ValueError("sources: no dialogue source")


def _data_config(config):
  """config.data, its tokenizer resolved (the HF checkpoint's when it names none)."""
  from m2.data import pipelines
  return pipelines.resolve_tokenizer(configlib.build(pipelines.DataConfig, config.data,
                                                     "config.data"),
                                     config.model.get("hf_checkpoint", ""))


def _data_setup(config, model_cfg):
  """(DataConfig, tokenizer) shared by the data stages; checks the vocabulary fits."""
  from m2.data import pipelines
  data_cfg = _data_config(config)
  tokenizer = pipelines.load_data_tokenizer(data_cfg)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} (config.data.tokenizer)")
  return data_cfg, tokenizer


def _prepare(kind, sources, data_cfg):
  """Prepares once per cache: process 0 first, then the others (shared or local disks)."""
  import jax

  from m2.data import pipelines
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      pipelines.prepare_data(kind, sources, data_cfg)
    multihost_utils.sync_global_devices(f"m2.prepare.{kind}")
  prepared = pipelines.prepare_data(kind, sources, data_cfg)
  log.info("%s data (%s):\n%s", kind, prepared.directory, _source_table(prepared.report))
  return prepared


def _source_table(report) -> str:
  rows = [("source", "train", "held out", "excluded", "skipped", "PHI replaced")]
  for name, r in report["sources"].items():
    phi = ", ".join(f"{k} {v}" for k, v in sorted(r["phi_replaced"].items())) or "-"
    rows.append((name, str(r["train"]), str(r["heldout"]), str(r["excluded"]),
                 str(r["skipped"]), phi))
  w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w[i]) if i in (0, 5) else c.rjust(w[i])
                             for i, c in enumerate(row)) for row in rows)


def _save_json(workdir, name, obj):
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, name), obj)


def run_midtrain(config, workdir, model_cfg, mesh_cfg, init_params):
  """LM training on the domain mix; held-out loss on documents never trained on."""
  import itertools

  import jax

  from m2.data import mixture, pipelines, tfds_builders
  from m2.train.loop import train

  stage = configlib.build(MidtrainConfig, config.midtrain, "config.midtrain")
  train_cfg = stage.train
  data_cfg, tokenizer = _data_setup(config, model_cfg)
  specs = [s for names in stage.domains.values() for s in names]
  docs = _prepare("documents", specs, data_cfg)
  mix = mixture.Mixture(stage.mix, {d: tuple(tfds_builders.source_name(s) for s in names)
                                    for d, names in stage.domains.items()})
  resolved = mix.resolve(n for n, r in docs.report["sources"].items() if r["train"])
  hosts, host = jax.process_count(), jax.process_index()

  def data(heldout: bool, keep_sources: bool = False, seed: int = train_cfg.seed):
    split = "heldout" if heldout else "train"
    sources = docs.report["sources"]
    return pipelines.lm_dataset(
        docs.sources_dict(heldout), tokenizer, batch_size=train_cfg.batch_size // hosts,
        seq_len=train_cfg.seq_len, seed=seed, keep_sources=keep_sources,
        mixture=mix.resolve(n for n, r in sources.items() if r[split]) if heldout else resolved,
        shard_index=host, shard_count=hosts, read_threads=data_cfg.read_threads,
        chars={s: r[f"{split}_chars"] for s, r in sources.items()})

  _save_json(workdir, "data.json", {"tokenizer": data_cfg.tokenizer, "documents": docs.report})
  mix_path = os.path.join(workdir, "mix.json")
  if not os.path.exists(mix_path) and stage.mix_batches:
    # The same seed gives the same stream: these are the run's first batches.
    n = min(stage.mix_batches, train_cfg.steps)
    counts = mixture.count_tokens(itertools.islice(data(False, keep_sources=True), n),
                                  list(docs.sources))
    _save_json(workdir, "mix.json", {"batches": n, **mixture.mix_report(counts, resolved)})
  if os.path.exists(mix_path):
    with open(mix_path) as f:
      realised = json.load(f)
    log.info("realised mix over the first %d batches (%s tokens):\n%s", realised["batches"],
             f"{realised['tokens']:,}", mixture.format_mix(realised))
  has_heldout = any(r["heldout"] for r in docs.report["sources"].values())
  if not has_heldout and train_cfg.eval_every:
    log.warning("midtrain: no held-out documents (config.data.heldout_fraction); no eval_loss")
  result = train(model_cfg, train_cfg, mesh_cfg, data(False), workdir, init_params=init_params,
                 eval_dataset=data(True, seed=train_cfg.seed + 1) if has_heldout else None,
                 meta={"stage": "midtrain", "sources": specs, "tokenizer": data_cfg.tokenizer})
  return _headline(result)


def run_sft(config, workdir, model_cfg, mesh_cfg, init_params):
  """Assistant-only loss on the doctor turns of the dialogue sets (and the answers of
  `qa_sources`), from midtrain's weights."""
  import jax

  from m2.data import pipelines
  from m2.data.chat import ChatFormat
  from m2.train.loop import train

  stage = configlib.build(SFTConfig, config.sft, "config.sft")
  train_cfg = stage.train
  data_cfg, tokenizer = _data_setup(config, model_cfg)
  chats = _prepare("chats", stage.sources, data_cfg)
  qa = _prepare("prompts", stage.qa_sources, data_cfg) if stage.qa_sources else None

  def sources(heldout: bool) -> dict:
    pools = chats.sources_dict(heldout)
    if qa is not None:
      pools.update({f"{k}:qa": v for k, v in pipelines.qa_chats(qa.sources_dict(heldout)).items()})
    return pools

  fmt = ChatFormat(tokenizer, thinking_mode=stage.thinking_mode, system=stage.system or None)
  stats = pipelines.window_stats(sources(False), fmt, train_cfg.seq_len)
  log.info("sft windows (seq_len %d): %s", train_cfg.seq_len, stats.summary())
  _save_json(workdir, "data.json", {"tokenizer": data_cfg.tokenizer, "chats": chats.report,
                                    "qa": qa.report if qa else None,
                                    "windows": dataclasses.asdict(stats)})
  if init_params is None:
    log.warning("sft starts from random weights: no earlier stage ran and no hf_checkpoint")
  hosts, host = jax.process_count(), jax.process_index()

  def data(heldout: bool, seed: int):
    return pipelines.sft_dataset(
        sources(heldout), fmt, batch_size=train_cfg.batch_size // hosts,
        seq_len=train_cfg.seq_len, seed=seed, pack=stage.pack, shard_index=host,
        shard_count=hosts, read_threads=data_cfg.read_threads)

  has_heldout = any(r["heldout"] for p in (chats, qa) if p for r in p.report["sources"].values())
  if not has_heldout and train_cfg.eval_every:
    log.warning("sft: no held-out chats (config.data.heldout_fraction); no eval_loss")
  result = train(model_cfg, train_cfg, mesh_cfg, data(False, train_cfg.seed), workdir,
                 init_params=init_params,
                 eval_dataset=data(True, train_cfg.seed + 1) if has_heldout else None,
                 meta={"stage": "sft", "sources": list(stage.sources + stage.qa_sources),
                       "tokenizer": data_cfg.tokenizer, "thinking_mode": stage.thinking_mode})
  return _headline(result)


def _headline(result):
  """The stage's headline metric: held-out loss when it was measured, else train loss."""
  metrics = result.final_metrics
  if "eval_loss" in metrics:
    return result, "eval_loss", metrics["eval_loss"]
  return result, "loss", metrics.get("loss")


STAGES: dict[str, Callable] = {"midtrain": run_midtrain, "sft": run_sft}
STAGES["eval"] = eval_stage.run_eval   # HealthBench + consultations, before/after RL
STAGES.update(rl_stages.STAGES)        # sft_rs, rl_rule, rl_rubric, rl_multiturn (m2/rl/stages.py)


def run_export(config, workdir, model_cfg, mesh_cfg, init_params):
  """HF safetensors (+ int4 and the bundle with config.export.quantize, + a distilled
  draft with config.export.draft_layers) of the previous stage's weights.
  `export/` sits above the library; it is imported only when this stage runs."""
  from export.stage import run_export_stage
  return run_export_stage(config, workdir, model_cfg, init_params)


run_export.passes_params_through = True
STAGES["export"] = run_export


def _stage_config_class(name: str):
  """The dataclass `config.<name>` is built into (None: the stage reads no block)."""
  if name == "export":
    from export.stage import ExportStageConfig
    return ExportStageConfig
  return {"midtrain": MidtrainConfig, "sft": SFTConfig, "eval": eval_stage.EvalConfig,
          "sft_rs": rl_stages.SFTRSConfig}.get(name, rl_stages.RLStageConfig
                                               if name.startswith("rl_") else None)


def check_config(config) -> None:
  """Builds every block the listed stages read, so that a mistyped field fails at
  start-up with its full name, not when its stage comes up hours into the run."""
  from m2.data import pipelines
  from m2.train.loop import MeshConfig
  from m2.verifier import VerifierConfig
  known = {"stages", "model", "mesh", "data", "verifier", *STAGES}
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise ValueError(f"unknown config block(s) {', '.join(f'config.{k}' for k in unknown)}; "
                     f"known: {sorted(known)}")
  bad = [s for s in config.stages if s not in STAGES]
  if bad:
    raise ValueError(f"config.stages names unknown stage(s) {bad}; known: {list(STAGES)}")
  model_config_from(config.model)
  configlib.build(MeshConfig, config.mesh, "config.mesh")
  configlib.build(pipelines.DataConfig, config.data, "config.data")
  configlib.build(VerifierConfig, config.get("verifier", {}), "config.verifier")
  for name in config.stages:
    cls = _stage_config_class(name)
    if cls is None:
      continue
    if name not in config and name not in ("eval", "export"):   # all-default blocks
      raise ValueError(f"config.stages lists {name!r} but the config has no config.{name} "
                       f"block (see configs/tiny.py)")
    configlib.build(cls, config.get(name, {}), f"config.{name}")


def _ensure_metrics(stage_dir: str, result, metric: str, value) -> None:
  """Every stage directory gets metrics.jsonl + TensorBoard events: a stage that logs
  none itself (export) gets its final scalars (else its headline) as step 1."""
  from m2.train.metrics import MetricsWriter
  if os.path.exists(os.path.join(stage_dir, "metrics.jsonl")):
    return
  final = dict(getattr(result, "final_metrics", None) or {})
  if not final and value is not None:
    final = {metric: value}
  scalars = {k: float(v) for k, v in final.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
  if not scalars:
    log.warning("stage %s logged no scalar metrics", os.path.basename(stage_dir))
    return
  writer = MetricsWriter(stage_dir)
  try:
    writer.write(1, scalars)
  finally:
    writer.close()


def run(config, workdir: str, stages: list[str] | None = None) -> list[StageResult]:
  from m2.train.loop import MeshConfig, TrainConfig, restore_params

  check_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a directory")
  selected = stages or list(config.stages)
  for s in selected:
    if s not in config.stages:
      raise ValueError(f"--stages={s}: not in config.stages {list(config.stages)}")
  model_cfg = model_config_from(config.model)
  mesh_cfg = configlib.build(MeshConfig, config.mesh, "config.mesh")
  params = _initial_params(config, model_cfg, mesh_cfg)
  results, finished = [], None
  for name in config.stages:
    stage_dir = os.path.join(workdir, name)
    start, cpu_start = time.time(), time.process_time()
    done = read_done(stage_dir)
    if done is not None:
      if name in selected:
        results.append(StageResult(name, "skipped", done.get("wall_s", 0.0), done["metric"],
                                   done["value"], cpu_s=done.get("cpu_s")))
        log.info("stage %s already complete; skipping", name)
      # A finished stage hands its weights to the next stage that runs (also under
      # --stages=); stages that do not train (eval, export) pass them through.
      if not getattr(STAGES[name], "passes_params_through", False):
        finished = name
      continue
    if name not in selected:
      continue
    if finished is not None:
      params = restore_params(os.path.join(workdir, finished), model_cfg, configlib.build(
          TrainConfig, config[finished].train, f"config.{finished}.train"), mesh_cfg,
                              tokenizer=_data_config(config).tokenizer)
      finished = None
    result, metric, value = STAGES[name](config, stage_dir, model_cfg, mesh_cfg, params)
    params = result.state.params
    _ensure_metrics(stage_dir, result, metric, value)
    status = "resumed" if result.resumed_from is not None else "ran"
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    write_json(os.path.join(stage_dir, "DONE"),
               {"metric": metric, "value": value, "wall_s": wall, "cpu_s": cpu})
    results.append(StageResult(name, status, wall, metric, value, params, cpu))
  return results


def _format_value(metric: str, value) -> str:
  if value is None:
    return "-"
  if metric.endswith("_bytes"):
    return f"{value / 2**20:.1f} MiB"
  if float(value).is_integer() and abs(value) >= 1000:
    return f"{int(value):,}"
  return f"{value:.4f}"


def _format_time(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def summary_table(results: list[StageResult]) -> str:
  """Stage, status, wall and CPU time, headline metric. A skipped stage shows the times
  it took when it ran; the total counts this run's stages only."""
  rows = [("stage", "status", "wall time", "cpu time", "metric", "value")]
  for r in results:
    rows.append((r.name, r.status, _format_time(r.wall_s), _format_time(r.cpu_s), r.metric,
                 _format_value(r.metric, r.value)))
  ran = [r for r in results if r.status != "skipped"]
  if ran:
    cpu = None if any(r.cpu_s is None for r in ran) else sum(r.cpu_s for r in ran)
    rows.append(("total", f"{len(ran)} run", _format_time(sum(r.wall_s for r in ran)),
                 _format_time(cpu), "", ""))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  right = (2, 3, 5)   # times and values line up on the right
  lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
  rule = "  ".join("-" * w for w in widths)
  lines.insert(1, rule)
  if ran:
    lines.insert(len(lines) - 1, rule)
  return "\n".join(lines)


def export_line(workdir: str) -> str | None:
  """Where the export stage put the model: the bundle (the folder with serve.sh), else
  the dense folder (config.export.quantize="" writes no int4 target to serve)."""
  folder = os.path.abspath(os.path.join(workdir, "export"))
  if os.path.isfile(os.path.join(folder, "serve.sh")):
    return f"exported bundle: {folder}"
  if os.path.isdir(os.path.join(folder, "hf")):
    return f"exported model (dense, no bundle: config.export.quantize is empty): {folder}/hf"
  return None


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if "://" in _WORKDIR.value:
    raise app.UsageError(f"--workdir={_WORKDIR.value}: m2 writes its workdir with plain file "
                         f"I/O; give a folder every host sees (e.g. a bucket mounted with "
                         f"gcsfuse), not a URL")
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
  if any(r.status == "skipped" for r in results):
    print("(skipped: finished by an earlier run; its times are that run's)")
  table = eval_stage.comparison_table(_WORKDIR.value)
  if table:
    print("\neval scores before / after RL:\n" + table)
  if any(r.name == "export" for r in results):
    line = export_line(_WORKDIR.value)
    if line:
      print("\n" + line)


def _parse_flags(argv):
  """absl's flag parsing, where a --config.* override naming no field gets its name back
  (ml_collections raises a bare KeyError / AttributeError with the last key only)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as err:
    while err.args and isinstance(err.args[0], BaseException):   # AttributeError(KeyError)
      err = err.args[0]
    message = str(err.args[0] if err.args else err)
    key = re.match(r"'(\w+)'", message)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if key and key[1] in o.split(".")] or overrides
    sys.exit(f"FATAL: {', '.join(named)}: no such config field "
             f"({message.replace(chr(10), '; ')})")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=_parse_flags)
