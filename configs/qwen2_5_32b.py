r"""Qwen2.5-32B from a local HF checkpoint, on 8xH100 (default) or a TPU v5p-64 slice.

One GPU node (8 x H100 80 GB), bf16 weights and optimizer state:
  python -m m2.main --config=configs/qwen2_5_32b.py:h100x8 --workdir=/ckpt/m2-32b \
      --config.model.hf_checkpoint=/models/Qwen2.5-32B

TPU v5p-64 (32 chips, 4 hosts), fp32 master weights; run on every host:
  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd m2 && \
      python -m m2.main --config=configs/qwen2_5_32b.py:v5p64 --workdir=gs://bucket/m2-32b \
      --config.model.hf_checkpoint=/models/Qwen2.5-32B"

Each host calls jax.distributed.initialize() (auto-detected on TPU pods and SLURM).
Memory per device: `python -m m2.tools.memory --config=configs/qwen2_5_32b.py:h100x8`.
Expected wall time: midtrain, 1000 steps of 64 x 4096 tokens, about 14 h on 8xH100 at
40 % MFU (6 * 32.8e9 * 262k tokens per step / (8 * 989 TFLOP/s * 0.4) = 16 s a step),
about 6 h on v5p-64. Planned, not yet measured on hardware.
"""

import ml_collections

from m2 import parallel

# Benchmark test sets stay unseen by training (evaluation issues score on them).
TEST_SPLITS = ("pubmedqa:test", "mts_dialog:test1", "mts_dialog:test2", "aci_bench:test1",
               "aci_bench:test2", "aci_bench:test3")
MEDICAL = ("agentclinic", "mediq_qa", "mts_dialog", "aci_bench", "pubmedqa", "cmtmedqa")

# (mesh shape over (data, fsdp, tensor), param_dtype, global batch)
_MESHES = {
    # fp32 master weights + Adam need 16 B/param = 525 GB: more than 8 x 80 GB
    # holds with activations, so this mesh keeps weights and moments in bf16.
    "h100x8": ((1, 8, 1), "bfloat16", 8),
    "v5p64": ((1, -1, 1), "float32", 32),
}


def get_config(arg: str = "h100x8"):
  if arg not in _MESHES:
    raise ValueError(f"unknown mesh {arg!r}; choose one of {sorted(_MESHES)}")
  shape, param_dtype, batch = _MESHES[arg]
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain",)
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen2_5_32b",
      hf_checkpoint="",     # required for real runs: a local Qwen2.5-32B folder
      dtype="bfloat16", param_dtype=param_dtype, remat_policy="full"))
  c.mesh = ml_collections.ConfigDict(dict(
      shape=shape, axes=parallel.MESH_AXES, rules=tuple(parallel.DEFAULT_RULES)))
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", cache_dir="",
      tokenizer="",         # "": the HF checkpoint's tokenizer.json
      heldout_fraction=0.02, exclude_splits=TEST_SPLITS,
      math_items=20000, math_seed=0, read_threads=4))
  c.midtrain = ml_collections.ConfigDict(dict(
      mix=dict(medical=2.0, general=2.0, math=1.0),
      domains=dict(medical=MEDICAL, general=(), math=("math",)),   # general: "name=glob"
      mix_batches=256,
      train=dict(steps=1000, batch_size=batch, seq_len=4096, log_every=10, save_every=200,
                 eval_every=100, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=1e-5, warmup_steps=50, decay_steps=950,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  return c
