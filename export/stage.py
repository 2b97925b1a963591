"""The `export` stage of `m2.main`: the previous stage's weights -> workdir/export/.

  config.stages = ("midtrain", "sft", "export")
  config.export = dict(dtype="bfloat16", quantize="gptq", calib_samples=64, calib_seq_len=256)

Writes workdir/export/hf (transformers folder, tokenizer included) and, with
`quantize` = "rtn" or "gptq", workdir/export/int4 (compressed-tensors
pack-quantized, group 128, symmetric) and the quality table
workdir/export/quality.{txt,json}: held-out medical perplexity, KL to the dense
model and layer-output error of the dense weights, RTN and (if chosen) GPTQ,
and their HealthBench score (m2's sampler, reference grader) before and after
quantization. The headline metric is the bytes of the weight files of the last
folder written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

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


def run_export_stage(config, workdir: str, model_cfg, init_params):
  from export import quantize, to_hf
  from m2 import configlib
  from m2.data import pipelines

  section = config.get("export", None)
  stage = configlib.build(ExportStageConfig, section if section is not None else {},
                          "config.export")
  if init_params is None:
    raise ValueError("the export stage needs weights: list a training stage before it or set "
                     "config.model.hf_checkpoint")
  data_cfg = configlib.build(pipelines.DataConfig, config.data, "config.data")
  tokenizer = pipelines.load_data_tokenizer(data_cfg, config.model.get("hf_checkpoint", ""))
  root = pathlib.Path(workdir)
  hf_dir = root / "hf"
  with to_hf.atomic_dir(hf_dir, overwrite=True) as tmp:
    to_hf.write_hf_folder(model_cfg.replace(quant="none"), init_params, tmp, tokenizer,
                          dtype=stage.dtype or None)
  last = hf_dir
  metrics = {}
  if stage.quantize:
    data_dir = data_cfg.data_dir or None
    qcfg = quantize.QuantConfig(method=stage.quantize, calib_samples=stage.calib_samples,
                                calib_seq_len=stage.calib_seq_len,
                                dtype=stage.dtype or "bfloat16")
    calib = quantize.medical_texts("train", data_dir=data_dir) if stage.quantize == "gptq" \
        else None
    quantize.quantize_folder(hf_dir, root / "int4", qcfg, overwrite=True, calib_texts=calib)
    last = root / "int4"
    if stage.quality_windows:
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
  size = sum(f.stat().st_size for f in last.glob("*.safetensors"))
  return (ExportResult(_State(init_params), None, {"weight_bytes": size, **metrics}),
          "weight_bytes", size)
