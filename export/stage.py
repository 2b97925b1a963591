"""The `export` stage of `m2.main`: the previous stage's weights -> workdir/export/.

  config.stages = ("midtrain", "sft", "export")
  config.export = dict(dtype="bfloat16", quantize="gptq", calib_samples=64, calib_seq_len=256)

Writes workdir/export/hf (transformers folder, tokenizer included) and, with
`quantize` = "rtn" or "gptq", workdir/export/int4 (compressed-tensors
pack-quantized, group 128, symmetric). The headline metric is the bytes of the
weight files of the last folder written.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class ExportStageConfig:
  dtype: str = ""              # "" keeps the parameter dtype; or float32 / bfloat16 / float16
  quantize: str = ""           # "", "rtn" or "gptq"
  calib_samples: int = 64
  calib_seq_len: int = 256

  def __post_init__(self):
    if self.dtype not in ("", "float32", "bfloat16", "float16"):
      raise ValueError(f"config.export.dtype: '', float32, bfloat16 or float16 "
                       f"(got {self.dtype!r})")
    if self.quantize not in ("", "rtn", "gptq"):
      raise ValueError(f"config.export.quantize: '', 'rtn' or 'gptq' (got {self.quantize!r})")


@dataclasses.dataclass
class _State:
  params: Any


@dataclasses.dataclass
class ExportResult:
  state: _State            # the weights pass through to any later stage
  resumed_from: None
  final_metrics: dict


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
  if stage.quantize:
    qcfg = quantize.QuantConfig(method=stage.quantize, calib_samples=stage.calib_samples,
                                calib_seq_len=stage.calib_seq_len,
                                dtype=stage.dtype or "bfloat16")
    quantize.quantize_folder(hf_dir, root / "int4", qcfg, overwrite=True)
    last = root / "int4"
  size = sum(f.stat().st_size for f in last.glob("*.safetensors"))
  return ExportResult(_State(init_params), None, {"weight_bytes": size}), "weight_bytes", size
