"""The train loop's own checks on what it is handed."""

import dataclasses

import grain
import numpy as np
import pytest
from flax import nnx

from m2.model import ModelConfig, Transformer
from m2.train.loop import MeshConfig, TrainConfig, train

CFG = ModelConfig(vocab_size=64, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1,
                  head_dim=8, mlp_dim=32)


def _dataset(b=8, t=8):
  ids = np.random.default_rng(0).integers(3, 64, (4, b, t + 1)).astype(np.int32)
  rows = [{"inputs": x[:, :-1], "targets": x[:, 1:], "segments": np.ones((b, t), np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "loss_mask": np.ones((b, t), np.int32)} for x in ids]
  return grain.MapDataset.source(rows).to_iter_dataset()


def test_initial_params_of_another_shape_are_refused_naming_them(tmp_path):
  other = nnx.state(Transformer(dataclasses.replace(CFG, mlp_dim=48), rngs=nnx.Rngs(1)),
                    nnx.Param)
  cfg = TrainConfig(steps=1, batch_size=8, seq_len=8, async_checkpoints=False)
  with pytest.raises(ValueError, match=r"\['blocks'\]\['mlp'\]\['down'\]: got \(1, 48, 16\), "
                                       r"the model has \(1, 32, 16\)"):
    train(CFG, cfg, MeshConfig(), _dataset(), str(tmp_path), init_params=other)


def test_metrics_of_steps_a_restart_redoes_are_dropped(tmp_path):
  from m2.train.metrics import MetricsWriter, read_metrics

  def log(steps, resume_step=None):
    w = MetricsWriter(str(tmp_path), resume_step=resume_step)
    for s in steps:
      w.write(s, {"loss": float(s)})
    w.close()

  log([0, 1, 2, 3])                 # killed after step 3, last checkpoint at 2
  log([3, 4], resume_step=2)
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 4]
  log([0, 1])                       # killed before its first checkpoint: starts afresh
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1]


def test_batches_of_another_size_than_the_config_are_refused(tmp_path):
  cfg = TrainConfig(steps=1, batch_size=16, seq_len=8, async_checkpoints=False)
  with pytest.raises(ValueError, match="batches have 8 rows .*batch_size is 16"):
    train(CFG, cfg, MeshConfig(), _dataset(), str(tmp_path))


def test_on_several_hosts_only_process_0_writes_metrics(tmp_path, monkeypatch):
  import jax

  from m2.train.metrics import MetricsWriter, read_metrics
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  w = MetricsWriter(str(tmp_path / "run"))
  w.write(1, {"loss": 2.0})
  w.close()
  assert read_metrics(str(tmp_path / "run")) == [] and not (tmp_path / "run").exists()
