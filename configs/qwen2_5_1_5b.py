r"""Qwen2.5-1.5B on one GPU (80 GB): every stage of the pipeline at a size one device holds.

  python -m m2.main --config=configs/qwen2_5_1_5b.py --workdir=runs/qwen1_5b \
      --config.model.hf_checkpoint=/models/Qwen2.5-1.5B

The stages are tiny.py's, at real budgets. Each optimizer step runs as micro-batches of
about 8k tokens (`train.microbatches`), which keeps every training stage within one
80 GB GPU: `python -m m2.tools.memory --config=configs/qwen2_5_1_5b.py --stage=rl_rubric`
shows a stage's plan. The verifier roles are the reference
backends unless `config.verifier` names model checkpoints, e.g.
  --config.verifier.grader=model --config.verifier.grader_checkpoint=/models/Qwen2.5-7B-Instruct

Expected wall time: midtrain, 500 steps of 16 x 2048 tokens, about 25 min on one
H100 at 40 % MFU (6 * 1.5e9 * 32k tokens / (989e12 * 0.4) = 0.75 s a step); sft
about 15 min. The RL stages are generation-bound. Planned, not yet measured on hardware.
"""

import ml_collections

from m2 import parallel

# Benchmark test sets stay unseen by training (evaluation issues score on them).
TEST_SPLITS = ("pubmedqa:test", "mts_dialog:test1", "mts_dialog:test2", "aci_bench:test1",
               "aci_bench:test2", "aci_bench:test3")
MEDICAL = ("agentclinic", "mediq_qa", "mts_dialog", "aci_bench", "pubmedqa", "cmtmedqa")


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = ("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric", "rl_multiturn", "eval",
              "export")
  c.model = ml_collections.ConfigDict(dict(
      preset="qwen2_5_1_5b", hf_checkpoint="",
      dtype="bfloat16", param_dtype="float32", remat_policy="dots_no_batch",
      attention="blocked"))  # or "pallas_gpu" (README, Real scale)
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1), axes=parallel.MESH_AXES, rules=tuple(parallel.DEFAULT_RULES),
      rollout_rules=None))
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", cache_dir="",
      tokenizer="",         # "": the HF checkpoint's tokenizer.json
      heldout_fraction=0.02, exclude_splits=TEST_SPLITS,
      math_items=20000, math_seed=0, read_threads=0))
  c.midtrain = ml_collections.ConfigDict(dict(
      mix=dict(medical=2.0, general=2.0, math=1.0),
      domains=dict(medical=MEDICAL, general=(), math=("math",)),   # general: "name=glob"
      mix_batches=256,
      train=dict(steps=500, batch_size=16, seq_len=2048, microbatches=4, log_every=10,
                 save_every=100, eval_every=100, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=2e-5, warmup_steps=25, decay_steps=475,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  c.sft = ml_collections.ConfigDict(dict(
      sources=("mts_dialog", "aci_bench"), thinking_mode="off", system="", pack=True,
      train=dict(steps=300, batch_size=16, seq_len=2048, microbatches=4, log_every=10,
                 save_every=100, eval_every=100, eval_batches=8, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=1e-5, warmup_steps=15, decay_steps=285,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  rl_optimizer = dict(learning_rate=1e-6, warmup_steps=5, decay_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, grad_clip_norm=1.0, b2=0.99)
  rl_train = dict(log_every=1, save_every=20, keep_checkpoints=2, seed=0, optimizer=rl_optimizer)
  c.sft_rs = ml_collections.ConfigDict(dict(
      sources=("mediq_qa", "math"), samples_per_prompt=8, keep_threshold=1.0,
      max_keep_per_prompt=2, max_prompt_len=512, max_new_tokens=512, temperature=1.0,
      thinking_mode="off", system="",
      reward=dict(weights=dict(correct=1.0, format=0.2, safety=0.5)),
      train=dict(rl_train, steps=100, batch_size=32, seq_len=1024, microbatches=8,
                 optimizer=dict(rl_optimizer, learning_rate=5e-6))))
  grpo = dict(group_size=8, epsilon=0.2, epsilon_high=0.28, loss_agg_mode="token-mean",
              norm_adv_by_std=False, beta=0.0, tis_cap=2.0, dynamic_sampling=True,
              max_refill_rounds=2, num_minibatches=4, overlong_buffer=128,
              overlong_penalty=0.5, length_reward=dict(coef=0.1))
  c.rl_rule = ml_collections.ConfigDict(dict(
      sources=("mediq_qa", "pubmedqa", "math"), max_prompt_len=512, max_new_tokens=512,
      temperature=1.0, top_p=1.0, thinking_mode="off", system="", grpo=grpo,
      reward=dict(weights=dict(correct=1.0, format=0.5, safety=0.5)),
      train=dict(rl_train, steps=200, batch_size=32, seq_len=1024, microbatches=8)))
  c.rl_rubric = ml_collections.ConfigDict(dict(c.rl_rule.to_dict(),
      sources=("agentclinic", "mediq"), max_new_tokens=768,
      reward=dict(weights=dict(rubric=1.0, format=0.2, safety=0.5))))
  c.rl_rubric.train.update(steps=100, seq_len=2048, microbatches=16)
  # Each turn prefills whole consultations (up to 4k tokens): 32 at a time.
  c.rl_multiturn = ml_collections.ConfigDict(dict(c.rl_rubric.to_dict(), max_turns=8,
                                                  max_new_tokens=256, length_multiple=512,
                                                  rollout_rows=32))
  c.rl_multiturn.train.update(steps=100, batch_size=16, seq_len=4096, microbatches=16)
  c.eval = ml_collections.ConfigDict(dict(
      before="auto", healthbench=True, healthbench_subsets=("oss_eval",), healthbench_limit=0,
      consult=True, consult_sources=("agentclinic", "mediq"), consult_limit=0, max_turns=8,
      max_new_tokens=1024, doctor_max_new_tokens=256, max_prompt_tokens=4096, batch_size=32,
      grader="reference", grader_checkpoint="", simulator="reference",
      simulator_checkpoint=""))
  c.export = ml_collections.ConfigDict(dict(dtype="bfloat16", quantize="gptq",
                                            calib_samples=128, calib_seq_len=2048,
                                            quality_eval_limit=32))
  c.verifier = ml_collections.ConfigDict(dict(
      simulator="reference", rubric_generator="reference", grader="reference", max_turns=12,
      fact_retries=2, grader_retries=2, persona_seed=0, judge_threshold=0.6,
      simulator_checkpoint="", rubric_generator_checkpoint="", grader_checkpoint=""))
  return c
