r"""One full GRPO step (rollout, reward, update) on the tiny config: m2 vs tunix 0.1.7.

The work matches the peer measurement in issue 6 exactly:
  * tiny Qwen2 shape: 4 layers, d_model 256, 4 query / 2 kv heads, head_dim 64,
    mlp 1024, vocab 8192, fp32, one device;
  * 16 prompts x 32 tokens, group size 8 (128 rows);
  * exactly 64 new tokens per row at temperature 1.0 (no stop token);
  * beta 0 (no reference model), one AdamW update over prompt + completion tokens
    (128 rows x 96 tokens forward and backward; the loss mask covers the completion).

m2's step: `Sampler.generate` (one jit: prefill + decode loop, per-row seeds),
rule reward on the decoded text (`m2.rl.rewards.rule_reward` on generated math
problems, SentencePiece-8192 text when the tokenizer is cached, else bytes of
the ids), group advantages, `learner_batch`, `GRPOLearner.update` (jitted,
donated state). The policy params go from the learner to the sampler as device
arrays. Times: generation, reward (host), learner; the median of `--steps`
timed steps after one warm-up step (compiles).

Peer: tunix 0.1.7 GRPO on the same work, about 9.6 s per step on this CPU
(rollout 2.5 s, update 7.1 s; 1.7k trained tok/s), measured side by side when
issue 6 was filed. tunix is not installable here (PyPI has no 0.1.7 for this
environment), so its figure is the reference, not rerun; the ratio printed is
against it. Runs vary by ~15 % on this shared machine.

XLA CPU flags: default XLA; `--xla_cpu_flags` appends to XLA_FLAGS. jaxlib 0.10.2's
experimental oneDNN fusion (`--xla_cpu_use_onednn=true
--xla_cpu_experimental_onednn_fusion_type=dot`) aborts at compile ("partition compile
failed") on the MLP's VJP; see experiments/bench/train_step.py.

Command (2-core CPU, about 2 minutes):
    /tmp/venv/bin/python experiments/bench/grpo_step.py
GPU, a ~0.5B config:
    python experiments/bench/grpo_step.py --preset=qwen2_5_0_5b --dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PEER = {"name": "tunix 0.1.7", "step_s": 9.6, "rollout_s": 2.5, "update_s": 7.1}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  p.add_argument("--preset", default="tiny", help="m2.model.config PRESETS name")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--xla_cpu_flags", default="")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.xla_cpu_flags and "cuda" not in os.environ.get("JAX_PLATFORMS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_cpu_flags).strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

  import dataclasses

  import jax
  import numpy as np
  from flax import nnx

  from m2 import parallel
  from m2.data.math import generate_math
  from m2.model import Transformer
  from m2.model.config import preset
  from m2.rl import grpo, rewards
  from m2.rl.learner import GRPOLearner, Trajectory, learner_batch
  from m2.sampling import Sampler, SamplingParams
  from m2.train.optimizer import OptimizerConfig

  cfg = preset(args.preset)
  if args.preset == "tiny":   # the peer's shape, spelled out
    cfg = dataclasses.replace(cfg, family="qwen2", vocab_size=8192, num_layers=4, embed_dim=256,
                              num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=1024,
                              tie_embeddings=False)
  cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype="float32")
  device = jax.devices()[0]
  mesh = parallel.make_mesh((1, 1, 1), devices=[device])

  tokenizer = _tokenizer(cfg.vocab_size)
  items = generate_math(args.prompts, seed=args.seed)
  prompts = []
  for item in items:   # exactly prompt_len tokens: the question, cut or left-filled
    ids = tokenizer.encode(item.prompt())[:args.prompt_len]
    prompts.append([tokenizer.pad_id + 1] * (args.prompt_len - len(ids)) + ids)

  gcfg = grpo.GRPOConfig(group_size=args.group, beta=0.0, dynamic_sampling=False)
  opt = OptimizerConfig(learning_rate=1e-6, warmup_steps=0)
  init = nnx.state(Transformer(cfg, rngs=nnx.Rngs(args.seed)))
  learner = GRPOLearner(cfg, gcfg, opt, mesh, init_params=init, seed=args.seed)
  del init
  sampler = Sampler.for_config(cfg, mesh=mesh, pad_id=tokenizer.pad_id)
  reward_cfg = rewards.RewardConfig(weights={"correct": 1.0, "format": 0.2})
  rows = [p for p in prompts for _ in range(args.group)]
  row_items = [it for it in items for _ in range(args.group)]
  rng = np.random.default_rng(args.seed)

  def step():
    c0 = time.process_time()
    t0 = time.perf_counter()
    sampling = [SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens,
                               seed=int(s)) for s in rng.integers(0, 2**32, len(rows))]
    out = sampler.generate(learner.params, rows, sampling)
    t1 = time.perf_counter()
    completions = out.token_lists()
    texts = [tokenizer.decode(c) for c in completions]
    scored = [rewards.rule_reward(it, t, reward_cfg, finished=False)
              for it, t in zip(row_items, texts)]
    adv = grpo.group_advantages([r.total for r in scored], args.group)
    trajs = [Trajectory.single_turn(p, c, out.logprobs[i, :len(c)])
             for i, (p, c) in enumerate(zip(rows, completions))]
    batch = learner_batch(trajs, adv, len(rows), pad_id=tokenizer.pad_id)
    t2 = time.perf_counter()
    metrics = learner.update(batch)
    jax.block_until_ready(metrics)
    t3 = time.perf_counter()
    new_tokens = int(out.lengths.sum())
    return {"cpu_s": time.process_time() - c0, "generate_s": t1 - t0, "reward_s": t2 - t1, "learner_s": t3 - t2, "step_s": t3 - t0,
            "new_tokens": new_tokens, "trained_tokens": int(batch["segments"].sum()),
            "learner_width": batch["inputs"].shape[1]}

  warm = step()
  timed = [step() for _ in range(args.steps)]
  med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
  if med["new_tokens"] != len(rows) * args.new_tokens:
    raise RuntimeError(f"expected exactly {len(rows) * args.new_tokens} new tokens, got "
                       f"{med['new_tokens']}")
  gen_tps = med["new_tokens"] / med["generate_s"]
  learn_tps = med["trained_tokens"] / med["learner_s"]
  reward_tps = med["new_tokens"] / max(med["reward_s"], 1e-9)
  speedup = PEER["step_s"] / med["step_s"]
  print(f"device: {device.device_kind}  model: {args.preset} {args.dtype}  rows: {len(rows)} "
        f"({args.prompts} prompts x {args.group}), prompt {args.prompt_len} + {args.new_tokens} "
        f"new tokens; warm-up step {warm['step_s']:.1f} s (compiles)")
  print(f"{'part':<12}{'m2 s':>9}{'tok/s':>10}{'tunix s':>10}")
  print(f"{'generation':<12}{med['generate_s']:>9.3f}{gen_tps:>10.0f}{PEER['rollout_s']:>10.1f}")
  print(f"{'reward':<12}{med['reward_s']:>9.3f}{reward_tps:>10.0f}{'-':>10}")
  print(f"{'learner':<12}{med['learner_s']:>9.3f}{learn_tps:>10.0f}{PEER['update_s']:>10.1f}")
  print(f"{'step':<12}{med['step_s']:>9.3f}{'':>10}{PEER['step_s']:>10.1f}")
  load = os.getloadavg()[0]
  print(f"CPU time of the step (all threads): {med['cpu_s']:.2f} s on {os.cpu_count()} cores; "
        f"load average during the run {load:.1f} (a busy machine inflates wall times)")
  print(f"m2 vs {PEER['name']} (reference figure, not rerun): {speedup:.2f}x faster per step "
        f"(goal >= 1.5x)")
  print(json.dumps({"bench": "grpo_step", "preset": args.preset, "dtype": args.dtype,
                    "device": device.device_kind, "step_s": round(med["step_s"], 4),
                    "generate_s": round(med["generate_s"], 4),
                    "reward_s": round(med["reward_s"], 4),
                    "learner_s": round(med["learner_s"], 4),
                    "generate_tok_s": round(gen_tps, 1), "learner_tok_s": round(learn_tps, 1),
                    "cpu_s": round(med["cpu_s"], 3), "load_avg": round(load, 2),
                    "peer": PEER["name"], "peer_step_s": PEER["step_s"],
                    "speedup_vs_peer": round(speedup, 3), "timed_steps": args.steps,
                    "xla_cpu_flags": args.xla_cpu_flags}))


def _tokenizer(vocab_size: int):
  """SentencePiece-8192 from the m2 cache when present (no training here), else bytes."""
  from m2.data import tokenizers
  if vocab_size == 8192:
    try:
      return tokenizers.load_tokenizer("sp:8192")
    except Exception as e:  # noqa: BLE001 - a bench falls back rather than trains
      print(f"(sp:8192 tokenizer unavailable: {type(e).__name__}; using bytes)")
  return tokenizers.ByteTokenizer()


if __name__ == "__main__":
  main()
