r"""Tiny end-to-end pipeline on CPU: a 4-layer Qwen2 (d 256) on the shipped data.

  python -m m2.main --config=configs/tiny.py --workdir=runs/tiny

Stages: midtrain (LM loss on medical : math = 2 : 1, see below) then sft
(doctor turns of MTS-Dialog and ACI-Bench plus PubMedQA answers, thinking off), both
on the 8192-piece SentencePiece tokenizer that m2 trains on the de-identified corpus;
then the RL side (m2/rl/stages.py): sft_rs (rejection-sampling SFT on verifiable QA),
rl_rule (GRPO, exact-match rewards), rl_rubric (GRPO, one doctor reply graded on
the case's rubric) and rl_multiturn (GRPO, whole consultations with the patient
simulator; the rubric score plus the share of case facts the doctor elicited, a
denser signal than the rubric that a 4-layer model can move), all with the reference
verifier backends; then eval (HealthBench and held-out consultations, before and
after RL) and export (the consumer-GPU bundle: GPTQ int4, a distilled draft, serve.sh).

Time on a quiet 2-core CPU (nothing else running), from a cold data cache (tokenizer
training and TFDS preparation included), all eight stages: 10 min 26 s wall, 18.1 min of
CPU on a Sapphire Rapids (2026-12-05); 15 min 03 s wall, 25.8 min of CPU on the older CPU
of 2026-12-02. The run's summary table gives each stage's wall and CPU time.

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
  c.stages = ("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric", "rl_multiturn", "eval",
              "export")

  c.model = ml_collections.ConfigDict(dict(
      preset="tiny",        # see m2/model/config.py PRESETS
      hf_checkpoint="",     # a local HF folder (Qwen2/Qwen3) to start from instead
      family="qwen2", vocab_size=8192, num_layers=4, embed_dim=256, num_heads=4,
      num_kv_heads=2, head_dim=64, mlp_dim=1024, tie_embeddings=False,
      dtype="float32", param_dtype="float32", remat_policy="none",
      attention="blocked"))

  # All CPU devices on the fsdp axis; on one device this is a 1x1x1 mesh.
  # rollout_rules: how the samplers shard the weights, e.g. parallel.DECODE_RULES
  # (None: as in training).
  c.mesh = ml_collections.ConfigDict(dict(
      shape=(1, -1, 1), axes=parallel.MESH_AXES,
      rules=tuple(parallel.DEFAULT_RULES), rollout_rules=None))

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
      # 160 steps: held-out loss 9.05 -> 4.50 (80 steps reached 5.14).
      train=dict(steps=160, batch_size=8, seq_len=256, log_every=10, save_every=80,
                 eval_every=20, eval_batches=4, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=2e-3, warmup_steps=8, decay_steps=152,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))

  c.sft = ml_collections.ConfigDict(dict(
      sources=("mts_dialog", "aci_bench"),
      # PubMedQA as one-turn chats answered "Answer: yes|no|maybe": the answer format the
      # rule reward reads. The RL stages' QA prompts (MediQ, math) stay unseen.
      qa_sources=("pubmedqa",),
      thinking_mode="off",  # no reasoning traces in these dialogues
      system="", pack=True,
      # 120 steps: held-out loss 5.08 (40 steps: 6.23, and the doctor rarely ended a turn).
      train=dict(steps=120, batch_size=8, seq_len=256, log_every=10, save_every=40,
                 eval_every=20, eval_batches=4, keep_checkpoints=2, seed=0,
                 optimizer=dict(learning_rate=5e-4, warmup_steps=4, decay_steps=116,
                                end_lr_ratio=0.1, weight_decay=0.1, grad_clip_norm=1.0)),
  ))
  # HealthBench (eval only) + consultations on held-out cases, before and after RL
  # (m2/eval/stage.py); "before" is the last stage before the first rl_* stage.
  c.eval = ml_collections.ConfigDict(dict(
      before="auto", healthbench=True, healthbench_subsets=("oss_eval",), healthbench_limit=32,
      consult=True, consult_sources=("agentclinic", "mediq"), consult_limit=8, max_turns=6,
      max_new_tokens=128, doctor_max_new_tokens=64, max_prompt_tokens=1024, batch_size=16,
      grader="reference", grader_checkpoint="", simulator="reference",
      simulator_checkpoint=""))

  # Rejection-sampling SFT and the three GRPO stages (m2/rl/stages.py). Budgets are
  # small: each RL step samples train.batch_size prompts x grpo.group_size responses.
  rl_optimizer = dict(learning_rate=2e-5, warmup_steps=0, decay_steps=0, end_lr_ratio=1.0,
                      weight_decay=0.0, grad_clip_norm=1.0, b2=0.99)
  c.sft_rs = ml_collections.ConfigDict(dict(
      sources=("pubmedqa", "mediq_qa"), samples_per_prompt=8, keep_threshold=1.0,
      # PubMedQA abstracts run to ~570 tokens (90th percentile).
      max_keep_per_prompt=2, max_prompt_len=640, max_new_tokens=24, temperature=1.0,
      thinking_mode="off", system="",
      reward=dict(weights=dict(correct=1.0, format=0.2, safety=0.5)),
      train=dict(steps=10, batch_size=8, seq_len=672, log_every=1, save_every=10,
                 keep_checkpoints=1, seed=0, optimizer=dict(rl_optimizer, learning_rate=1e-4))))
  c.rl_rule = ml_collections.ConfigDict(dict(
      sources=("mediq_qa", "math"), max_prompt_len=192, max_new_tokens=24, temperature=1.0,
      top_p=1.0, thinking_mode="off", system="",
      grpo=dict(group_size=8, epsilon=0.2, epsilon_high=0.28, loss_agg_mode="token-mean",
                norm_adv_by_std=False, beta=0.0, tis_cap=2.0, dynamic_sampling=True,
                max_refill_rounds=1, num_minibatches=1, overlong_buffer=8,
                overlong_penalty=0.5, length_reward=dict(coef=0.1)),
      reward=dict(weights=dict(correct=1.0, format=0.5, safety=0.5)),
      train=dict(steps=30, batch_size=4, seq_len=224, log_every=1, save_every=10,
                 keep_checkpoints=1, seed=0, optimizer=dict(rl_optimizer, learning_rate=2e-4))))
  c.rl_rubric = ml_collections.ConfigDict(dict(c.rl_rule.to_dict(),
      sources=("agentclinic",), max_new_tokens=32, case_limit=64,
      reward=dict(weights=dict(rubric=1.0, format=0.2, safety=0.5))))
  c.rl_rubric.train.update(steps=20)
  # No refill: its rollouts run the simulator and grader, and at this scale a refill
  # mostly finds groups as uniform as the first.
  c.rl_rubric.grpo.update(max_refill_rounds=0)
  # rl_multiturn: 8 cases x 4 consultations of 2 doctor turns a step, no refill round
  # (it would double a step's rollout), learner rows padded to 128-token multiples:
  # 4-5 CPU-minutes here.
  c.rl_multiturn = ml_collections.ConfigDict(dict(c.rl_rubric.to_dict(), max_turns=2,
                                                  length_multiple=128))
  c.rl_multiturn.grpo.update(group_size=4, max_refill_rounds=0)
  # The rubric alone does not move at this scale (its criteria need case knowledge a 4-layer
  # model lacks; gain -0.003 over 20 steps): the elicited-facts share carries the signal.
  # 8 cases, the same ones every step, so the step-to-step noise is the policy's, not
  # the case mix's (16 or 64 cases: gain 0.04-0.08 against a std of 0.07-0.08).
  c.rl_multiturn.reward.weights.elicited = 2.0
  c.rl_multiturn.update(case_limit=8)
  c.rl_multiturn.train.update(steps=20, batch_size=8, seq_len=320)
  c.rl_multiturn.train.optimizer.update(learning_rate=4e-4)
  # The bundle of the final weights (export/stage.py): HF safetensors, GPTQ int4, a
  # distilled 1-layer draft, serve.sh and the memory budget. quality.txt scores
  # HealthBench on 4 examples per model (dense, RTN, GPTQ). The draft (40 steps on 32
  # prompts x 48 target tokens, tokens per round on 4 held-out prompts) adds ~75 CPU-s here.
  c.export = ml_collections.ConfigDict(dict(dtype="bfloat16", quantize="gptq",
                                            calib_samples=64, calib_seq_len=256,
                                            quality_eval_limit=4, draft_layers=1,
                                            draft_steps=40, draft_prompts=32,
                                            draft_new_tokens=48, draft_eval_prompts=4))
  # Verifier roles (m2/verifier/config.py VerifierConfig): "reference" needs no model.
  c.verifier = ml_collections.ConfigDict(dict(
      simulator="reference", rubric_generator="reference", grader="reference", max_turns=12,
      fact_retries=2, grader_retries=2, persona_seed=0, judge_threshold=0.6))
  return c
