r"""Qwen2.5-1.5B on one GPU (80 GB): the real pipeline at a size one device holds.

  python -m m2.main --config=configs/qwen2_5_1_5b.py --workdir=runs/qwen1_5b \
      --config.model.hf_checkpoint=/models/Qwen2.5-1.5B

Expected wall time: midtrain, 500 steps of 16 x 2048 tokens, about 25 min on one
H100 at 40 % MFU (6 * 1.5e9 * 32k tokens / (989e12 * 0.4) = 0.75 s a step).
Planned, not yet measured on hardware.
"""

import ml_collections

from m2 import parallel

# Benchmark test sets stay unseen by training (evaluation issues score on them).
TEST_SPLITS = ("pubmedqa:test", "mts_dialog:test1", "mts_dialog:test2", "aci_bench:test1",
               "aci_bench:test2", "aci_bench:test3")
MEDICAL = ("agentclinic", "mediq_qa", "mts_dialog", "aci_bench", "pubmedqa", "cmtmedqa")


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain",)
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen2_5_1_5b", hf_checkpoint="",
      dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch"))
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1), axes=parallel.MESH_AXES, rules=tuple(parallel.DEFAULT_RULES)))
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", cache_dir="",
      tokenizer="",         # "": the HF checkpoint's tokenizer.json
      heldout_fraction=0.02, exclude_splits=TEST_SPLITS,
      math_items=20000, math_seed=0, read_threads=0))
  c.midtrain = ml_collections.ConfigDict(dict(
      mix=dict(medical=2.0, general=2.0, math=1.0),
      domains=dict(medical=MEDICAL, general=(), math=("math",)),   # general: "name=glob"
      mix_batches=256,
      train=dict(steps=500, batch_size=16, seq_len=2048, log_every=10, save_every=100,
                 eval_every=100, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=2e-5, warmup_steps=25, decay_steps=475,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  return c
