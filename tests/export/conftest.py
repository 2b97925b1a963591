"""A briefly trained tiny m2 run, shared by the export tests (trained once per session).

Shapes are multiples of 128 on every quantized input dimension (embed 128,
heads x head_dim 128, mlp 256) so int4 group-128 quantization applies to
every linear layer.
"""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_export_config(cache: str, steps: int = 60):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = ("midtrain",)
  c.model.update(preset="", vocab_size=320, num_layers=2, embed_dim=128, num_heads=2,
                 num_kv_heads=1, head_dim=64, mlp_dim=256)
  c.data.update(tokenizer="byte", cache_dir=cache, math_items=200)
  c.midtrain.domains.medical = ("mts_dialog",)
  c.midtrain.mix = dict(medical=1.0, general=0.0, math=0.0)
  c.midtrain.domains.math = ()
  c.midtrain.mix_batches = 0
  c.midtrain.train.update(steps=steps, batch_size=8, seq_len=128, log_every=20,
                          save_every=steps, eval_every=0, keep_checkpoints=1)
  c.midtrain.train.optimizer.update(learning_rate=3e-3, warmup_steps=5, decay_steps=steps - 5)
  return c


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
