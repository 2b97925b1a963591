"""A briefly trained tiny m2 run, shared by the export tests (trained once per session).

Shapes are multiples of 128 on every quantized input dimension (embed 128,
heads x head_dim 128, mlp 256) so int4 group-128 quantization applies to
every linear layer.
"""

import os

import pytest

from export_helpers import tiny_export_config


def train_tiny_run(workdir: str, cache: str, steps: int = 60) -> str:
  from m2 import main
  main.run(tiny_export_config(cache, steps), workdir)
  return workdir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """Workdir of a 60-step midtrain run of a 2-layer byte-level Qwen2."""
  root = tmp_path_factory.mktemp("export_run")
  return train_tiny_run(str(root / "run"), str(root / "cache"))


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
  """The trained run as a dense transformers folder (export.to_hf)."""
  from export import to_hf
  out = tmp_path_factory.mktemp("hf") / "model"
  to_hf.export(trained_run, str(out))
  return out
