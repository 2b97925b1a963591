r"""Qwen2.5-32B from a local HF checkpoint, on 8xH100 (default) or a TPU v5p-64 slice.

One GPU node (8 x H100 80 GB), bf16 weights and optimizer state:
  python -m m2.main --config=configs/qwen2_5_32b.py:h100x8 --workdir=/ckpt/m2-32b \
      --config.model.hf_checkpoint=/models/Qwen2.5-32B

TPU v5p-64 (32 chips, 4 hosts), fp32 master weights; run on every host:
  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd m2 && \
      python -m m2.main --distributed --config=configs/qwen2_5_32b.py:v5p64 \
      --workdir=/mnt/shared/m2-32b \
      --config.model.hf_checkpoint=/models/Qwen2.5-32B"

Multi-host GPU (SLURM, one task per host):
  srun --nodes=$N --ntasks-per-node=1 python -m m2.main --distributed \
      --config=configs/qwen2_5_32b.py:h100x8 --workdir=/ckpt/m2-32b ...

The workdir must be one folder every host sees (NFS, Filestore, or a bucket mounted with
gcsfuse); m2 writes it with plain file I/O, so a gs:// URL is refused.
Each host calls jax.distributed.initialize() (auto-detected from the TPU pod and SLURM
environment; `--distributed` forces it). Every stage of tiny.py runs, at real budgets.
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

# RL updates train on 128 sequences of 4096 tokens (64 prompts x 16 samples / 8
# minibatches); `rl_microbatches` gives each device one sequence at a time.
# `rollout_rows` caps the sequences one generation call decodes (0: all 1,024):
# their KV cache is 256 KiB a token, 768 MiB a 3k-token sequence, and their
# prompts are prefilled at once (`python -m m2.tools.memory` plans both).
_MESHES = {
    # fp32 master weights + Adam need 16 B/param = 525 GB: more than 8 x 80 GB
    # holds with activations, so this mesh keeps weights and moments in bf16.
    # Rollouts reshard the weights Megatron-style (8 kv heads, one per GPU) instead of
    # all-gathering all 64 GB of them on every decode step.
    "h100x8": dict(shape=(1, 8, 1), param_dtype="bfloat16", batch=8, rl_microbatches=16,
                   rollout_rows=256, multiturn_rollout_rows=32,
                   rollout_rules=tuple(parallel.DECODE_RULES)),
    # 8 kv heads do not split 32 ways, so v5p-64 generates in the training layout.
    "v5p64": dict(shape=(1, -1, 1), param_dtype="float32", batch=32, rl_microbatches=4,
                  rollout_rows=512, multiturn_rollout_rows=128, rollout_rules=None),
}


def get_config(arg: str = "h100x8"):
  if arg not in _MESHES:
    raise ValueError(f"unknown mesh {arg!r}; choose one of {sorted(_MESHES)}")
  shape, param_dtype, batch = (_MESHES[arg][k] for k in ("shape", "param_dtype", "batch"))
  rl_micro, rollout_rows = _MESHES[arg]["rl_microbatches"], _MESHES[arg]["rollout_rows"]
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric", "rl_multiturn", "eval",
              "export")
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen2_5_32b",
      hf_checkpoint="",     # required for real runs: a local Qwen2.5-32B folder
      dtype="bfloat16", param_dtype=param_dtype, remat_policy="full",
      attention="blocked"))  # or "pallas_gpu" / "pallas_tpu" (README, Real scale)
  c.mesh = ml_collections.ConfigDict(dict(
      shape=shape, axes=parallel.MESH_AXES, rules=tuple(parallel.DEFAULT_RULES),
      rollout_rules=_MESHES[arg]["rollout_rules"]))
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
  c.sft = ml_collections.ConfigDict(dict(
      sources=("mts_dialog", "aci_bench"), thinking_mode="auto", system="", pack=True,
      train=dict(steps=400, batch_size=batch, seq_len=4096, log_every=10, save_every=100,
                 eval_every=100, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=5e-6, warmup_steps=20, decay_steps=380,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  # RL: the paper's GRPO (token-mean, no std normalisation, clip-higher, beta 0).
  rl_optimizer = dict(learning_rate=1e-6, warmup_steps=5, decay_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, grad_clip_norm=1.0, b2=0.99)
  rl_train = dict(log_every=1, save_every=10, keep_checkpoints=2, seed=0, optimizer=rl_optimizer)
  c.sft_rs = ml_collections.ConfigDict(dict(
      sources=("mediq_qa", "math"), samples_per_prompt=8, keep_threshold=1.0,
      max_keep_per_prompt=2, max_prompt_len=1024, max_new_tokens=2048, temperature=1.0,
      thinking_mode="auto", system="", rollout_rows=rollout_rows,
      reward=dict(weights=dict(correct=1.0, format=0.2, safety=0.5)),
      train=dict(rl_train, steps=100, batch_size=64, seq_len=4096, microbatches=rl_micro,
                 optimizer=dict(rl_optimizer, learning_rate=2e-6))))
  grpo = dict(group_size=16, epsilon=0.2, epsilon_high=0.28, loss_agg_mode="token-mean",
              norm_adv_by_std=False, beta=0.0, tis_cap=2.0, dynamic_sampling=True,
              max_refill_rounds=2, num_minibatches=8, overlong_buffer=512,
              overlong_penalty=0.5, length_reward=dict(coef=0.1))
  c.rl_rule = ml_collections.ConfigDict(dict(
      sources=("mediq_qa", "pubmedqa", "math"), max_prompt_len=1024, max_new_tokens=2048,
      temperature=1.0, top_p=1.0, thinking_mode="auto", system="", grpo=grpo,
      rollout_rows=rollout_rows, reward=dict(weights=dict(correct=1.0, format=0.5, safety=0.5)),
      train=dict(rl_train, steps=300, batch_size=64, seq_len=4096, microbatches=rl_micro)))
  c.rl_rubric = ml_collections.ConfigDict(dict(c.rl_rule.to_dict(),
      sources=("agentclinic", "mediq"), reward=dict(weights=dict(rubric=1.0, format=0.2,
                                                                 safety=0.5))))
  c.rl_rubric.train.update(steps=200)
  # Consultations grow to 8k tokens (2.1 GiB of cache each, and an 8k-token prefill
  # every turn): fewer rows at once.
  c.rl_multiturn = ml_collections.ConfigDict(dict(
      c.rl_rubric.to_dict(), max_turns=10, max_new_tokens=512, length_multiple=1024,
      rollout_rows=_MESHES[arg]["multiturn_rollout_rows"]))
  c.rl_multiturn.train.update(steps=200, batch_size=32, seq_len=8192,
                              microbatches=rl_micro // 2)
  c.eval = ml_collections.ConfigDict(dict(
      before="auto", healthbench=True, healthbench_subsets=("oss_eval",), healthbench_limit=0,
      consult=True, consult_sources=("agentclinic", "mediq"), consult_limit=0, max_turns=10,
      max_new_tokens=2048, doctor_max_new_tokens=512, max_prompt_tokens=8192, batch_size=64,
      grader="reference", grader_checkpoint="", simulator="reference",
      simulator_checkpoint=""))
  # The draft distiller holds the target on one device: at 32B distil it on its own
  # (`python -m export.bundle`), not inside this stage.
  c.export = ml_collections.ConfigDict(dict(dtype="bfloat16", quantize="gptq",
                                            calib_samples=128, calib_seq_len=2048,
                                            quality_eval_limit=64, draft_layers=0))
  # The paper's verifier roles are models; point them at local checkpoints (an HF
  # folder or an m2 stage dir), e.g. --config.verifier.grader=model
  # --config.verifier.grader_checkpoint=/models/Qwen2.5-72B-Instruct.
  c.verifier = ml_collections.ConfigDict(dict(
      simulator="reference", rubric_generator="reference", grader="reference", max_turns=12,
      fact_retries=2, grader_retries=2, persona_seed=0, judge_threshold=0.6,
      simulator_checkpoint="", rubric_generator_checkpoint="", grader_checkpoint=""))
  return c
