"""Orbax checkpoints: round trips across meshes, refusal of mismatches, crash-resume."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.train import checkpoint as ckpt_lib
from m2.train.checkpoint import Checkpointer, CheckpointError
from m2.train.optimizer import OptimizerConfig, make_optimizer
from m2.train.state import abstract_train_state, init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
TX = make_optimizer(OptimizerConfig())


def one_device_mesh():
  return parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def maker(cfg):
  return lambda: Transformer(cfg, rngs=nnx.Rngs(0))


def meta(cfg):
  return {"model": dataclasses.asdict(cfg)}


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
  mesh = parallel.make_mesh((2, 2, 2))
  _, state, _ = init_train_state(maker(CFG), TX, mesh, seed=3)
  directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
  ckpt = Checkpointer(directory, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {"iterator": {"next_index": step}}, meta(CFG))
  ckpt.wait()
  return directory, state


@pytest.fixture
def saved(saved_once, tmp_path):
  """A fresh copy of the saved checkpoints (tests add and corrupt steps) and the state."""
  directory, state = saved_once
  shutil.copytree(directory, tmp_path / "ckpt")
  return Checkpointer(str(tmp_path / "ckpt"), keep=2), state


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_keeps_the_last_n_and_restores_onto_another_mesh(saved):
  ckpt, state = saved
  assert ckpt.all_steps() == [2, 3]
  mesh = parallel.make_mesh((1, 8, 1))
  abstract, shardings = abstract_train_state(maker(CFG), TX, mesh)
  restored, data = ckpt.restore(abstract, meta=meta(CFG))
  assert data == {"iterator": {"next_index": 3}}
  _assert_same(restored, state)
  embed = restored.params["embed"][...]
  assert embed.sharding == shardings.params["embed"]
  assert embed.addressable_shards[0].data.shape == (128, 32 // 8)
  np.testing.assert_array_equal(restored.rng, state.rng)


def test_refuses_another_model_config_naming_the_fields(saved):
  ckpt, _ = saved
  other = CFG.replace(num_layers=3)
  abstract, _ = abstract_train_state(maker(other), TX, one_device_mesh())
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(abstract, meta=meta(other))
  assert "model.num_layers: checkpoint has 2, run expects 3" in str(e.value)
  assert "shape of params/blocks/mlp/down: checkpoint has (2, 64, 32)" in str(e.value)


def test_a_resumed_run_may_change_how_the_model_computes(saved):
  """remat, attention kernel and compute dtype are not part of what was saved (a
  checkpoint from before a knob existed lacks it too); quantization is."""
  ckpt, state = saved
  older = meta(CFG)
  del older["model"]["attention"]
  ckpt.save(4, state, {}, older)
  ckpt.wait()
  faster = CFG.replace(remat_policy="full", attention="pallas_gpu", dtype="bfloat16")
  abstract, _ = abstract_train_state(maker(faster), TX, one_device_mesh())
  _assert_same(ckpt.restore(abstract, meta=meta(faster))[0], state)
  with pytest.raises(CheckpointError, match="model.quant: checkpoint has 'none'"):
    ckpt.restore(abstract, meta=meta(CFG.replace(quant="int4")))


def test_refuses_missing_and_unexpected_keys(saved):
  ckpt, _ = saved
  tied = CFG.replace(tie_embeddings=True)   # no lm_head in the run's state
  abstract, _ = abstract_train_state(maker(tied), TX, one_device_mesh())
  with pytest.raises(CheckpointError, match="unexpected in checkpoint: params/lm_head"):
    ckpt.restore(abstract)
  qwen3 = CFG.replace(family="qwen3")      # q/k norms, no qkv bias
  abstract, _ = abstract_train_state(maker(qwen3), TX, one_device_mesh())
  with pytest.raises(CheckpointError, match="missing in checkpoint: params/blocks/attn/k_norm"):
    ckpt.restore(abstract)


def test_corrupt_checkpoint_is_refused(saved):
  ckpt, _ = saved
  state_dir = os.path.join(ckpt.directory, "3", "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      os.remove(os.path.join(root, f))
  abstract, _ = abstract_train_state(maker(CFG), TX, one_device_mesh())
  with pytest.raises(CheckpointError, match="3"):
    ckpt.restore(abstract, step=3)


def _final_params(workdir):
  ckpt = Checkpointer(os.path.join(workdir, "midtrain", "checkpoints"), async_save=False)
  model_cfg = ModelConfig(**TINY_MODEL)
  abstract, _ = abstract_train_state(maker(model_cfg), make_optimizer(OptimizerConfig(
      learning_rate=1e-3, warmup_steps=2, decay_steps=10)), one_device_mesh())
  step = ckpt.latest_step()
  state, _ = ckpt.restore(abstract)
  ckpt.close()
  return step, state


TINY_MODEL = dict(vocab_size=320, num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2,
                  head_dim=16, mlp_dim=128)
STEPS = 24


def _main_cmd(workdir):
  overrides = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()] + [
      "--config.model.preset=", f"--config.midtrain.train.steps={STEPS}",
      "--config.midtrain.train.save_every=4", "--config.midtrain.train.log_every=2",
      "--config.midtrain.train.batch_size=4", "--config.midtrain.train.seq_len=64",
      "--config.midtrain.train.eval_every=12", "--config.midtrain.train.eval_batches=2",
      "--config.midtrain.train.optimizer.warmup_steps=2",
      "--config.midtrain.train.optimizer.decay_steps=10",
      # Bytes and two quick sources keep the data preparation to seconds.
      "--config.data.tokenizer=byte", "--config.data.math_items=300",
      "--config.midtrain.domains.medical=('mts_dialog',)", "--config.midtrain.mix_batches=4"]
  return [sys.executable, "-m", "m2.main", "--config=configs/tiny.py", "--stages=midtrain",
          f"--workdir={workdir}", *overrides]


def _env(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device: the fastest way through on a 2-core box
  env["M2_CACHE_DIR"] = str(tmp_path / "cache")   # the runs share one prepared dataset
  return env


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_main_cmd(straight), cwd=REPO, env=_env(tmp_path), check=True,
                 capture_output=True, timeout=600)

  proc = subprocess.Popen(_main_cmd(killed), cwd=REPO, env=_env(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "midtrain" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]
    if any(int(d) >= 8 for d in done):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  interrupted_at, _ = _final_params(killed)
  assert 8 <= interrupted_at < STEPS

  result = subprocess.run(_main_cmd(killed), cwd=REPO, env=_env(tmp_path), check=True,
                          capture_output=True, text=True, timeout=600)
  assert "resumed" in result.stdout
  step_a, a = _final_params(straight)
  step_b, b = _final_params(killed)
  assert step_a == step_b == STEPS
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)
  # The metrics log has each step once, even though the killed run logged some twice;
  # held-out loss at the start, every 12 steps and at the end.
  with open(killed / "midtrain" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert [r["step"] for r in rows] == [0] + list(range(2, STEPS + 1, 2))
  assert [r["step"] for r in rows if "eval_loss" in r] == [0, 12, 24]


def test_each_host_resumes_its_own_data_position():
  # Process 0 alone writes the JSON item, so it holds what every host's allgather gave.
  states = [{"iterator": {"next_index": 3}}, {"iterator": {"next_index": 7, "epoch": "é"}}]
  blobs = [np.frombuffer(json.dumps(s).encode(), np.uint8) for s in states]

  def allgather(x):   # what jax's process_allgather returns on either host
    if x.dtype == np.int64:
      return np.stack([np.array([b.size]) for b in blobs])
    return np.stack([np.pad(b, (0, x.size - b.size)) for b in blobs])

  saved = ckpt_lib.gather_data_states(states[1], allgather, num_processes=2)
  assert saved == {"processes": states}
  assert [ckpt_lib.own_data_state(saved, i, 2) for i in (0, 1)] == states
  with pytest.raises(CheckpointError, match="2 processes and this run has 4"):
    ckpt_lib.own_data_state(saved, 0, 4)
  assert ckpt_lib.own_data_state({"iterator": {"next_index": 3}}) == states[0]   # older
