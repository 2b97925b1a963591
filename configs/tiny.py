r"""Tiny end-to-end pipeline on CPU: a 4-layer Qwen2 (d 256) on the shipped data.

  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny

Stages: midtrain (LM loss on medical : math = 2 : 1, see below) then sft
(doctor turns of MTS-Dialog and ACI-Bench, thinking off), both on the 8192-piece
SentencePiece tokenizer that m2 trains on the de-identified corpus.

Expected wall time on a 2-core CPU: a few minutes per stage (not yet timed on a quiet machine).

The data: every record passes the de-identification gate; 2 % of each source
(by record id) is held out for `eval_loss`; the benchmark test splits in
`exclude_splits` are never trained on; HealthBench is refused. The shipped data
has no general (non-medical) corpus, so `domains.general` is empty and the
paper's 2 : 2 : 1 renormalises to medical : math = 2 : 1 (a warning says so;
midtrain/mix.json has the realised mix). List general text as "name=glob"
(.txt files, or .jsonl with a "text" field) to fill the slot.
"""

import ml_collections

from m2 import parallel

# Benchmark test sets stay unseen by training (evaluation issues score on them).
# CMtMedQA's only file is its "test" set; it is no benchmark here, so it trains.
TEST_SPLITS = ("pubmedqa:test", "mts_dialog:test1", "mts_dialog:test2", "aci_bench:test1",
               "aci_bench:test2", "aci_bench:test3")


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain", "sft")

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

  c.data = ml_collections.ConfigDict(dict(
      data_dir="",          # default: $M2_DATA_DIR or ../shared/data
      cache_dir="",         # default: $M2_CACHE_DIR or ~/.cache/m2 (tokenizer, prepared TFDS)
      tokenizer="sp:8192",  # "byte", "sp:<vocab>", "qwen2.5", a folder ("": the HF checkpoint's)
      heldout_fraction=0.02, exclude_splits=TEST_SPLITS,
      math_items=20000, math_seed=0, read_threads=0))

  c.midtrain = ml_collections.ConfigDict(dict(
      mix=dict(medical=2.0, general=2.0, math=1.0),   # token ratios (Baichuan-M2)
      domains=dict(
          # mediq (cases) is left out: its facts repeat mediq_qa's vignettes.
          medical=("agentclinic", "mediq_qa", "mts_dialog", "aci_bench", "pubmedqa", "cmtmedqa"),
          general=(),       # none shipped; e.g. ("wiki=/data/wiki/*.jsonl",)
          math=("math",)),
      mix_batches=256,
      train=dict(steps=240, batch_size=8, seq_len=256, log_every=10, save_every=60,
                 eval_every=40, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=2e-3, warmup_steps=20, decay_steps=220,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))

  c.sft = ml_collections.ConfigDict(dict(
      sources=("mts_dialog", "aci_bench"),
      thinking_mode="off",  # no reasoning traces in these dialogues
      system="", pack=True,
      train=dict(steps=80, batch_size=8, seq_len=256, log_every=10, save_every=40,
                 eval_every=20, eval_batches=4, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=5e-4, warmup_steps=8, decay_steps=72,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  return c
