"""The `export` stage of `m2.main`: the previous stage's weights -> a bundle in workdir/export/.

  config.stages = ("midtrain", "sft", "export")
  config.export = dict(dtype="bfloat16", quantize="gptq", calib_samples=64, calib_seq_len=256,
                       draft_layers=1, draft_steps=200, draft_prompts=256)

workdir/export/ is the consumer-GPU bundle of export/bundle.py (`python -m m2.main`
prints its path at the end):
  serve.sh, README.md, budget.json   vLLM / SGLang / local command lines and the 24 GB
                                     memory budget (export.bundle.write_bundle_files)
  int4/      the target: compressed-tensors pack-quantized, group 128, symmetric
             (`quantize` = "rtn" or "gptq"); a quantization-aware model
             (`config.model.quant`) in the scheme it trained with
  draft/     a `draft_layers`-layer draft distilled from the same weights on the
             target's own greedy samples (export.draft), with draft_report.json: the
             tokens per speculative round at k = `draft_k` with m2's SpeculativeSampler
             (goal >= 2.5 at k = 4). `draft_layers` = 0: no draft, no speculative lines.
  tokenizer.json, tokenizer_config.json, tokenization_m2.py
  hf/        the dense transformers folder (the int4 target's source; not needed to serve;
             of a quantization-aware model, the fake-quantized weights it computes with)
  quality.{txt,json}  held-out medical perplexity, KL to the dense model and layer-output
             error of the dense weights, RTN and (if chosen) GPTQ, and their HealthBench
             score (m2's sampler, reference grader) before and after quantization.
With `quantize` = "" only hf/ (and draft/) are written: there is no int4 target to serve.
The headline metric is the bytes of the weight files of the last model folder written
(int4/, else hf/); the final metrics add the quality numbers and the draft's
tokens_per_round and acceptance rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

QUALITY_FILE = "quality"    # .txt (the table) and .json (its rows)


@dataclasses.dataclass(frozen=True)
class ExportStageConfig:
  dtype: str = ""              # "" keeps the parameter dtype; or float32 / bfloat16 / float16
  quantize: str = ""           # "", "rtn" or "gptq"
  calib_samples: int = 64
  calib_seq_len: int = 256
  quality_windows: int = 16    # held-out windows of calib_seq_len for the table (0: no table)
  quality_eval_limit: int = 8  # HealthBench examples scored per model (0: no eval score)
  quality_eval_max_new_tokens: int = 48
  draft_layers: int = 1        # layers of the distilled draft (0: no draft)
  draft_steps: int = 200       # distillation steps (m2's train loop, batch 16)
  draft_prompts: int = 256     # medical prompts the target continues for the draft to learn
  draft_new_tokens: int = 96   # target tokens per prompt
  draft_eval_prompts: int = 8  # held-out prompts for the tokens-per-round measurement
  draft_k: int = 4             # draft tokens per speculative round (serve.sh uses the same)

  def __post_init__(self):
    if self.dtype not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"config.export.dtype: '', float32, bfloat16 or float16 "
                       f"(got {self.dtype!r})")
    if self.quantize not in ("", "rtn", "gptq"):
      raise ValueError(f"config.export.quantize: '', 'rtn' or 'gptq' (got {self.quantize!r})")
    for f in ("quality_windows", "quality_eval_limit"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
        raise ValueError(f"config.export.{f}: an int >= 0 (got {getattr(self, f)!r})")
    if self.quality_eval_max_new_tokens <= 0:
      raise ValueError(f"config.export.quality_eval_max_new_tokens: positive "
                       f"(got {self.quality_eval_max_new_tokens})")
    if not _is_int(self.draft_layers) or self.draft_layers < 0:
      raise ValueError(f"config.export.draft_layers: an int >= 0, 0 for no draft "
                       f"(got {self.draft_layers!r})")
    for f in ("draft_steps", "draft_prompts", "draft_new_tokens", "draft_eval_prompts"):
      if not _is_int(getattr(self, f)) or getattr(self, f) <= 0:
        raise ValueError(f"config.export.{f}: a positive int (got {getattr(self, f)!r})")
    if not _is_int(self.draft_k) or not 1 <= self.draft_k <= 16:
      raise ValueError(f"config.export.draft_k: an int in [1, 16] (got {self.draft_k!r})")

  def draft_config(self):
    from export.draft import DraftConfig
    return DraftConfig(layers=self.draft_layers, prompts=self.draft_prompts,
                       new_tokens=self.draft_new_tokens, steps=self.draft_steps)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass
class _State:
  params: Any


@dataclasses.dataclass
class ExportResult:
  state: _State            # the weights pass through to any later stage
  resumed_from: None
  final_metrics: dict


def write_quality(root: pathlib.Path, rows: list[dict], settings: dict) -> str:
  """quality.txt (the table) and quality.json (rows + settings) in `root`."""
  from export import quantize
  table = quantize.format_report(rows)
  (root / f"{QUALITY_FILE}.txt").write_text(table + "\n")
  (root / f"{QUALITY_FILE}.json").write_text(json.dumps({"settings": settings, "rows": rows},
                                                        indent=1))
  return table


def _host_params(params) -> dict:
  """The stage's weights as the nested dict of host arrays that export.draft reads."""
  import jax
  import numpy as np
  from flax import nnx

  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  return jax.tree.map(np.asarray, params)


def _mib(folder: pathlib.Path) -> float:
  return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def run_export_stage(config, workdir: str, model_cfg, init_params):
  from export import bundle, quantize, to_hf
  from export import draft as draft_lib
  from m2 import configlib
  from m2.data import pipelines
  from m2.model import quant

  section = config.get("export", None)
  stage = configlib.build(ExportStageConfig, section if section is not None else {},
                          "config.export")
  if init_params is None:
    raise ValueError("the export stage needs weights: list a training stage before it or set "
                     "config.model.hf_checkpoint")
  if stage.draft_layers > model_cfg.num_layers:
    raise ValueError(f"config.export.draft_layers={stage.draft_layers}: at most the target's "
                     f"{model_cfg.num_layers} layers (config.model.num_layers)")
  data_cfg = configlib.build(pipelines.DataConfig, config.data, "config.data")
  tokenizer = pipelines.load_data_tokenizer(data_cfg, config.model.get("hf_checkpoint", ""))
  data_dir = data_cfg.data_dir or None
  root = pathlib.Path(workdir)
  hf_dir = root / "hf"
  # A quantization-aware model ships, and drafts from, the weights it computes with.
  params = quant.computed_weights(init_params, model_cfg.quant)
  target_cfg = model_cfg.replace(quant="none")
  # Stale outputs of an interrupted run with other settings would ship with the bundle.
  if not stage.draft_layers:
    shutil.rmtree(root / "draft", ignore_errors=True)
  if not stage.quantize:
    shutil.rmtree(root / "int4", ignore_errors=True)
    for f in ("serve.sh", "budget.json", "README.md"):
      (root / f).unlink(missing_ok=True)
  steps = ["hf"] + (["int4"] if stage.quantize else []) \
      + (["quality"] if stage.quantize and stage.quality_windows else []) \
      + (["draft"] if stage.draft_layers else []) + (["bundle"] if stage.quantize else [])
  bar = tqdm(total=len(steps), desc="export", dynamic_ncols=True, disable=False)
  postfix = {}

  def done(**shown):
    postfix.update(shown)
    bar.set_postfix(postfix)
    bar.update(1)

  try:
    bar.set_description("export: hf")
    with to_hf.atomic_dir(hf_dir, overwrite=True) as tmp:
      to_hf.write_hf_folder(target_cfg, params, tmp, tokenizer, dtype=stage.dtype or None)
    done(dense=f"{_mib(hf_dir):.1f} MiB")
    last = hf_dir
    metrics, table = {}, ""
    if stage.quantize:
      bar.set_description("export: int4")
      # A quantization-aware model is quantized in the scheme it trained with.
      scheme = quant.parse(model_cfg.quant)
      trained = {} if scheme is None else dict(
          bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric,
          block_size=scheme.group_size * -(-128 // scheme.group_size))
      qcfg = quantize.QuantConfig(method=stage.quantize, calib_samples=stage.calib_samples,
                                  calib_seq_len=stage.calib_seq_len,
                                  dtype=stage.dtype or "bfloat16", **trained)
      calib = quantize.medical_texts("train", data_dir=data_dir) \
          if stage.quantize == "gptq" else None
      quantize.quantize_folder(hf_dir, root / "int4", qcfg, overwrite=True, calib_texts=calib)
      last = root / "int4"
      done(int4=f"{_mib(last):.1f} MiB")
      if stage.quality_windows:
        bar.set_description("export: quality")
        # RTN is the baseline every table carries; GPTQ joins when it is the chosen method.
        configs = {"rtn": dataclasses.replace(qcfg, method="rtn")}
        if stage.quantize == "gptq":
          configs["gptq"] = qcfg
        rows = quantize.quality_report(
            hf_dir, configs, held_windows=stage.quality_windows, seq_len=stage.calib_seq_len,
            calib_texts=calib, eval_limit=stage.quality_eval_limit,
            eval_max_new_tokens=stage.quality_eval_max_new_tokens, data_dir=data_cfg.data_dir)
        table = write_quality(root, rows, dataclasses.asdict(stage))
        log.info("export: int4 quality (held-out MTS-Dialog test1):\n%s", table)
        by = {r["method"]: r for r in rows}
        chosen = by[stage.quantize]
        metrics = {"ppl_dense": rows[0]["ppl"], "ppl_int4": chosen["ppl"],
                   "kl_int4": chosen["kl"]}
        if "healthbench" in chosen:
          metrics.update(healthbench_dense=rows[0]["healthbench"],
                         healthbench_int4=chosen["healthbench"])
        done(ppl_int4=f"{chosen['ppl']:.2f}")
    report = None
    if stage.draft_layers:
      bar.set_description("export: draft")
      # Distilled from the weights this stage exports; the train dir lets a rerun resume.
      train_dir = root / ".draft_train"
      report = draft_lib.draft_folder(
          target_cfg, _host_params(params), tokenizer, str(root / "draft"),
          stage.draft_config(), train_dir=str(train_dir), overwrite=True,
          eval_prompts=stage.draft_eval_prompts, k=stage.draft_k, data_dir=data_dir)
      shutil.rmtree(train_dir, ignore_errors=True)
      spec = report["m2_speculative"]
      log.info("export: %d-layer draft: %.2f tokens per round at k=%d (acceptance %.2f, "
               "%.2fx wall speed-up on this machine; goal >= 2.5 at k=4)", stage.draft_layers,
               spec["tokens_per_round"], spec["k"], spec["acceptance_rate"], spec["speedup"])
      metrics.update(tokens_per_round=spec["tokens_per_round"],
                     draft_acceptance_rate=spec["acceptance_rate"],
                     draft_speedup=spec["speedup"])
      if "loss" in report.get("final", {}):
        metrics["draft_loss"] = report["final"]["loss"]
      done(tok_per_round=f"{spec['tokens_per_round']:.2f}")
    if stage.quantize:
      bar.set_description("export: bundle")
      plan = bundle.ServePlan(bits=qcfg.bits, group_size=qcfg.group_size,
                              symmetric=qcfg.symmetric, num_draft_tokens=stage.draft_k)
      content = bundle.write_bundle_files(
          root, plan, target="int4", draft="draft" if stage.draft_layers else None,
          draft_report=report, quality=table, method=stage.quantize,
          notes=("`hf/`: the dense model (the int4 target's source); not needed to serve.",))
      done(max_len=content["max_model_len"])
  finally:
    bar.close()
  size = sum(f.stat().st_size for f in last.glob("*.safetensors"))
  return (ExportResult(_State(init_params), None, {"weight_bytes": size, **metrics}),
          "weight_bytes", size)
