r"""Tiny end-to-end pipeline on CPU: a 4-layer Qwen2 (d 256) on the shipped data.

  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny

Expected wall time on a 2-core CPU: about 2 minutes (midtrain: 200 steps of
8 x 256 byte tokens). Stages from later issues (sft, rl_*, eval, export) are
added to `stages` as they land.
"""

import ml_collections

from m2 import parallel


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain",)

  c.model = ml_collections.ConfigDict(dict(
      preset="tiny",        # see m2/model/config.py PRESETS
      hf_checkpoint="",     # a local HF folder (Qwen2/Qwen3) to start from instead
      family="qwen2", vocab_size=8192, num_layers=4, embed_dim=256, num_heads=4,
      num_kv_heads=2, head_dim=64, mlp_dim=1024, tie_embeddings=False,
      dtype="float32", param_dtype="float32", remat_policy="none"))

  # All CPU devices on the fsdp axis; on one device this is a 1x1x1 mesh.
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1), axes=parallel.MESH_AXES,
      rules=tuple(parallel.DEFAULT_RULES)))

  c.midtrain = ml_collections.ConfigDict(dict(
      sources=("mts_dialog", "aci_bench"),
      data_dir="",          # default: $M2_DATA_DIR or ../shared/data
      tokenizer="byte",     # "byte", or a folder with tokenizer.json ("": the HF checkpoint's)
      train=dict(steps=200, batch_size=8, seq_len=256, log_every=10, save_every=50,
                 keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=1e-3, warmup_steps=20, decay_steps=180,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  return c
