"""The memory planner against XLA's own accounting of the compiled train step.

XLA's per-device peak for a jitted step is
  argument_size + output_size - alias_size + temp_size
(arguments live for the whole step; outputs that are not donated aliases of an
argument need their own buffers; temp_size is the heap the buffer assigner
packed every temporary into, fragmentation included). The state is donated, so
outputs alias arguments and the sum is arguments + temporaries.
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer, preset
from m2.tools import memory
from m2.train import state as train_state
from m2.train.optimizer import OptimizerConfig, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEDIUM = ModelConfig(vocab_size=32768, num_layers=8, embed_dim=512, num_heads=8,
                     num_kv_heads=4, head_dim=64, mlp_dim=2048)


def compiled_memory(cfg: ModelConfig, mesh_shape, batch: int, seq_len: int, microbatches=1):
  """XLA's memory stats of the real train step, compiled (not run) on fake CPU devices."""
  n = math.prod(mesh_shape)
  if jax.device_count() < n:
    pytest.skip(f"needs {n} devices (tests/conftest.py forces 8 CPU devices)")
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:n])
  tx = make_optimizer(OptimizerConfig())
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  abstract, shardings = train_state.abstract_train_state(make, tx, mesh)
  graphdef = nnx.split(nnx.eval_shape(make))[0]
  step = train_state.make_train_step(graphdef, tx, train_state.lm_loss, mesh, shardings,
                                     microbatches=microbatches)
  spec = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=parallel.data_sharding(mesh))
  batch_spec = {k: spec for k in ("inputs", "targets", "positions", "segments", "loss_mask")}
  with parallel.sharding_context(mesh):
    return step.jitted.lower(abstract, batch_spec).compile().memory_analysis()


CASES = [
    ("tiny", (1, 8, 1), "none", 256, 1),
    ("tiny", (2, 2, 2), "full", 256, 1),
    ("tiny", (1, 1, 1), "full", 256, 1),
    ("medium", (1, 8, 1), "full", 256, 1),
    ("medium", (2, 2, 2), "none", 256, 1),
    ("medium", (1, 1, 1), "none", 256, 1),
    # Long sequences: the attention's saved state and working set must stay O(T).
    ("tiny", (2, 2, 2), "full", 1024, 1),
    ("medium", (1, 8, 1), "none", 2048, 1),
    # One device, long sequence: the query blocks' backward must run one at a time.
    ("tiny", (1, 1, 1), "full", 2048, 1),
    # Many tokens x a large vocab on one device: the loss backward dominates.
    ("medium", (1, 1, 1), "full", 1024, 1),
    # Gradient accumulation: one micro-batch's activations, an fp32 gradient sum.
    ("medium", (1, 1, 1), "none", 256, 4),
    ("tiny", (2, 2, 2), "full", 1024, 2),
    # The policy configs/qwen2_5_1_5b.py trains with: the four weight matmuls' outputs.
    ("medium", (1, 8, 1), "dots_no_batch", 1024, 1),
]


@pytest.mark.parametrize("model,mesh_shape,remat,seq_len,microbatches", CASES)
def test_plan_matches_compiled_memory(model, mesh_shape, remat, seq_len, microbatches):
  cfg = (preset("tiny") if model == "tiny" else MEDIUM).replace(remat_policy=remat)
  batch = 8
  stats = compiled_memory(cfg, mesh_shape, batch, seq_len, microbatches)
  xla_total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  p = memory.plan(cfg, mesh_shape, batch=batch, seq_len=seq_len, microbatches=microbatches)

  # The state and batch are exact: step + rng key (12 bytes) besides them.
  assert stats.argument_size_in_bytes == p.params + p.optimizer + p.inputs + 12
  # Everything together within 15 %.
  ratio = p.total / xla_total
  assert 0.85 < ratio < 1.15, (
      f"{model} {mesh_shape} {remat}: planned {p.total / 2**20:.1f} MiB, "
      f"XLA {xla_total / 2**20:.1f} MiB (ratio {ratio:.2f})\n{p.table()}")


def test_32b_on_a_mesh_that_does_not_exist():
  cfg = preset("qwen2_5_32b", dtype="bfloat16", remat_policy="full")
  p = memory.plan(cfg, (1, 64, 1), batch=64, seq_len=4096, num_devices=64)
  assert p.num_params == cfg.num_params()
  # fp32 master weights sharded 64 ways; norm scales and qkv biases (no embed
  # dimension: 1.1M parameters) stay whole on every device.
  replicated = 64 * (2 * 5120 + 8 * 7 * 128) + 5120
  assert p.params == 4 * ((cfg.num_params() - replicated) // 64 + replicated)
  assert p.grads == p.params
  assert p.optimizer == pytest.approx(2 * p.params, rel=1e-6)
  assert p.saved == 64 * 4096 * 5120 * 2  # remat full keeps each layer's bf16 input
  assert p.total < 95 * memory.GiB
  assert "fits in 95 GiB" in p.table(hbm_gib=95)


def test_sharding_and_remat_shrink_the_plan():
  cfg = preset("tiny")
  one = memory.plan(cfg, (1, 1, 1), batch=8, seq_len=256)
  fsdp = memory.plan(cfg, (1, 8, 1), batch=8, seq_len=256)
  assert fsdp.params * 8 == pytest.approx(one.params, rel=1e-2)
  assert fsdp.total < one.total
  full = memory.plan(cfg, (1, 8, 1), batch=8, seq_len=256, remat_policy="full")
  dots = memory.plan(cfg, (1, 8, 1), batch=8, seq_len=256, remat_policy="dots")
  assert full.saved < dots.saved < fsdp.saved
  # No tensor in the model is tagged "qkv_proj" yet, so that policy saves what `full` does.
  qkv = memory.plan(cfg, (1, 8, 1), batch=8, seq_len=256, remat_policy="qkv_proj")
  assert ("qkv_proj" in memory.checkpoint_names(cfg)) == (qkv.saved > full.saved)



def test_the_gpu_kernel_saves_k_and_v_per_query_head_and_the_tpu_kernel_does_not():
  cfg = preset("qwen2_5_1_5b", dtype="bfloat16")  # 12 query heads, 2 kv heads, head_dim 128
  args = dict(mesh_shape=(1, 1, 1), batch=1, seq_len=4096, remat_policy="none", num_devices=1)
  blocked = memory.plan(cfg, **args)
  gpu = memory.plan(cfg.replace(attention="pallas_gpu"), **args)
  tpu = memory.plan(cfg.replace(attention="pallas_tpu"), **args)
  repeated = 2 * 4096 * (12 - 2) * 128 * 2   # k and v, bf16, per layer
  assert gpu.saved_per_layer - blocked.saved_per_layer == repeated
  assert tpu.saved_per_layer == blocked.saved_per_layer
  assert tpu.layer_backward < blocked.layer_backward   # no [rows, keys] scores
def test_bad_input_fails_clearly():
  cfg = preset("tiny")
  with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
    memory.plan(cfg, (1, 8, 1), batch=4, seq_len=256)
  with pytest.raises(ValueError, match="needs 8 devices"):
    memory.plan(cfg, (2, 2, 2), num_devices=4)
  with pytest.raises(ValueError, match="remat_policy"):
    memory.plan(cfg, (1, 1, 1), remat_policy="some")


def test_plan_from_config():
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain",)
  c.model = ml_collections.ConfigDict(dict(preset="tiny", hf_checkpoint="",
                                           remat_policy="full"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1), axes=parallel.MESH_AXES,
                                          rules=tuple(parallel.DEFAULT_RULES)))
  c.midtrain = ml_collections.ConfigDict(dict(train=dict(batch_size=16, seq_len=128)))
  p = memory.plan_from_config(c, num_devices=8)
  assert (p.mesh, p.batch, p.seq_len, p.remat_policy) == (
      {"data": 1, "fsdp": 8, "tensor": 1}, 16, 128, "full")
  assert p.total == memory.plan(preset("tiny"), (1, 8, 1), batch=16, seq_len=128,
                                remat_policy="full").total


def test_command_line():
  out = subprocess.run(
      [sys.executable, "-m", "m2.tools.memory", "--preset=qwen2_5_32b", "--mesh=1,8,1",
       "--devices=8", "--batch=8", "--seq_len=4096", "--remat=full", "--dtype=bfloat16",
       "--attention=pallas_gpu", "--hbm_gib=80"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
  assert "data 1 x fsdp 8 x tensor 1 (8 devices), global batch 8 x 4096" in out
  assert "remat full, compute bfloat16, pallas_gpu attention" in out
  assert "fits in 80 GiB" in out or "does NOT fit in 80 GiB" in out
  assert out.strip().splitlines()[-1].startswith('{"params": ')
  # An RL stage of a config: its update (micro-batched) and its rollout.
  out = subprocess.run(
      [sys.executable, "-m", "m2.tools.memory", "--config=configs/qwen2_5_32b.py:h100x8",
       "--stage=rl_rule", "--devices=8", "--hbm_gib=80"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
  assert "global batch 128 x 4096, 16 micro-batches of 8" in out
  assert "rollout per device: 256 sequences at once, cache 3072 slots" in out
  assert "does NOT fit" not in out


# The hardware each shipped config's docstring names: (devices, GiB per device).
# GiB a device offers: an "80 GB" H100 shows about 78 to a process, a v5p chip 95.
SHIPPED = [("qwen2_5_1_5b", None, 1, 78), ("qwen2_5_32b", "h100x8", 8, 78),
           ("qwen2_5_32b", "v5p64", 32, 95)]


@pytest.mark.parametrize("name,variant,devices,hbm_gib", SHIPPED)
def test_every_training_stage_of_a_shipped_config_fits_its_hardware(name, variant, devices,
                                                                    hbm_gib):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  stages = [s for s in config.stages if "train" in config[s]]
  assert {"midtrain", "sft", "sft_rs", "rl_rule", "rl_multiturn"} <= set(stages)
  for stage in stages:
    p = memory.plan_from_config(config, num_devices=devices, stage=stage)
    assert p.fits(hbm_gib * memory.GiB), f"{name}:{variant} {stage}\n{p.table(hbm_gib)}"
    assert p.microbatches == config[stage].train.get("microbatches", 1)
  # Generation beside the resident train state fits too (`rollout_rows` parts).
  for stage in ("sft_rs", "rl_rule", "rl_rubric", "rl_multiturn"):
    r = memory.rollout_plan_from_config(config, stage, num_devices=devices)
    assert r.fits(hbm_gib * memory.GiB), (name, variant, stage, r)
  # An RL update trains on prompts x group_size / num_minibatches sequences.
  rl = config.rl_rule
  assert memory.plan_from_config(config, num_devices=devices, stage="rl_rule").batch == (
      rl.train.batch_size * rl.grpo.group_size // rl.grpo.num_minibatches)


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_kv_cache_bytes_are_what_the_sampler_allocates(layers):
  from m2.sampling import Sampler
  mesh = parallel.make_mesh((2, 2, 2))
  cfg = MEDIUM.replace(dtype="bfloat16")
  sampler = Sampler(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), mesh=mesh,
                    layers=layers)
  with parallel.sharding_context(mesh):
    cache = sampler._init_jit(8, 320).cache
  per_device = sum(x.addressable_shards[0].data.nbytes
                   for x in jax.tree.leaves((cache.k, cache.v, cache.segments)))
  assert per_device == memory.kv_cache_bytes(cfg, memory._Sharder(mesh, parallel.DEFAULT_RULES),
                                             rows=8, cache_length=320)


@pytest.mark.parametrize("mesh_shape,dtype,tied,rules,rows,prompt", [
    ((1, 1, 1), "float32", True, parallel.DEFAULT_RULES, 4, 2048),
    ((2, 2, 2), "float32", False, parallel.DEFAULT_RULES, 16, 200),
    ((1, 8, 1), "bfloat16", True, parallel.DEFAULT_RULES, 16, 200),
    ((2, 1, 4), "bfloat16", True, parallel.DEFAULT_RULES, 16, 200),
    ((1, 8, 1), "bfloat16", True, parallel.DECODE_RULES, 16, 200)])
def test_rollout_plan_matches_the_compiled_sampler(mesh_shape, dtype, tied, rules, rows, prompt):
  """The sampler's part of the rollout plan (params, cache, working set) against XLA's
  accounting of the compiled generation call (prefill + decode loop, scan forward). The
  2048-token prompts prefill in 16 query blocks (the plan counts one block's scores)."""
  from m2.sampling import Sampler, SamplingParams
  n = math.prod(mesh_shape)
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:n])
  cfg = MEDIUM.replace(dtype=dtype, tie_embeddings=tied)
  model = parallel.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  sampler = Sampler(model, mesh=mesh, layers="scan", rules=rules)
  start, seen = sampler._start_jit, {}

  def spy(*args, **kw):   # keep the call's shapes and shardings to compile it again
    seen["args"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                                if isinstance(x, jax.Array) else x, (args, kw))
    return start(*args, **kw)
  sampler._start_jit = spy
  out = sampler.generate(nnx.state(model), [[1] * prompt] * rows,
                         SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8))
  args, kw = seen["args"]
  with parallel.sharding_context(mesh, rules):
    stats = start.lower(*args, **kw).compile().memory_analysis()
  xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes
         - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  p = memory.rollout_plan(cfg, mesh_shape, rows=rows, cache_length=out.stats["cache_length"],
                          prompt_length=out.stats["prefill_length"], num_devices=n,
                          sampler_rules=rules)
  params = memory._state_bytes(memory.abstract_state(cfg).params, memory._Sharder(mesh, rules))
  ratio = (params + p.kv_cache + p.working) / xla
  assert 0.8 < ratio < 1.2, (mesh_shape, dtype, tied, ratio, p, stats)
