r"""GRPO ablation on the tiny config: vanilla vs improved GRPO vs each change alone.

Variants (config.rl_rule.grpo overrides on top of configs/tiny.py):
  vanilla    DeepSeekMath GRPO: std-normalised advantages, symmetric clip 0.2,
             sequence-mean aggregation, KL to the reference (beta 0.04, k3), no
             length reward, no dynamic sampling, no overlong shaping, no TIS
  improved   Baichuan-M2's: the config's rl_rule.grpo (no std, clip-higher,
             token-mean, beta 0, dynamic length reward, dynamic sampling)
  +<change>  vanilla with one change of `improved` applied: no_std, clip_higher,
             token_mean, no_kl, length_reward, dynamic_sampling

Each variant runs the rl_rule stage for `--steps` steps per seed, from the same
starting weights (`--init`: a stage directory with checkpoints, e.g. the sft
stage of a tiny run; default: random weights). It writes, under `--out`:
  table.md      mean reward of the first/last 10 steps, gain, step-to-step std and
                wall time per variant (mean ± std over seeds)
  reward.png    reward against step and against wall time (mean over seeds)
  results.json  every run's per-step rewards and times
and ends with one JSON line. Everything is reported as measured.

Command (2-core CPU; about 3 min per run, 8 variants x 3 seeds):
    /tmp/venv/bin/python experiments/ablate_grpo.py --init=runs/tiny/sft --out=runs/ablate
A smaller sweep:
    ... --variants=vanilla,improved --seeds=0 --steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

VANILLA = dict(norm_adv_by_std=True, epsilon=0.2, epsilon_high=0.2,
               loss_agg_mode="seq-mean-token-mean", beta=0.04, tis_cap=0.0,
               dynamic_sampling=False, overlong_buffer=0, length_reward=dict(coef=0.0))
CHANGES = {
    "no_std": dict(norm_adv_by_std=False),
    "clip_higher": dict(epsilon_high=0.28),
    "token_mean": dict(loss_agg_mode="token-mean"),
    "no_kl": dict(beta=0.0),
    "length_reward": dict(length_reward=dict(coef=0.1)),
    "dynamic_sampling": dict(dynamic_sampling=True),
}
VARIANTS = ["vanilla", "improved"] + [f"+{k}" for k in CHANGES]


def grpo_overrides(variant: str, improved: dict) -> dict:
  if variant == "improved":
    return dict(improved)
  if variant == "vanilla":
    return dict(VANILLA)
  if variant.startswith("+") and variant[1:] in CHANGES:
    return {**VANILLA, **CHANGES[variant[1:]]}
  raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--init", default="", help="stage dir whose last checkpoint seeds every run")
  p.add_argument("--out", default="runs/ablate_grpo")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--num_minibatches", type=int, default=2,
                 help="updates per rollout batch for every variant; with 1 the ratio is "
                      "always 1 and the clip knobs cannot matter")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import importlib.util

  import numpy as np

  from m2 import configlib
  from m2.model.config import model_config_from
  from m2.rl import stages
  from m2.train.loop import MeshConfig, TrainConfig, restore_params
  from m2.train.metrics import read_metrics

  spec = importlib.util.spec_from_file_location("cfg", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config()
  model_cfg = model_config_from(base.model)
  mesh_cfg = configlib.build(MeshConfig, base.mesh, "config.mesh")
  init = None
  if args.init:
    init = restore_params(args.init, model_cfg, configlib.build(TrainConfig, base.sft.train,
                                                                "config.sft.train"), mesh_cfg)
  improved = base.rl_rule.grpo.to_dict()
  variants = args.variants.split(",")
  seeds = [int(s) for s in args.seeds.split(",")]
  results: dict[str, list[dict]] = {}
  for variant in variants:
    for seed in seeds:
      c = module.get_config()
      for k, v in grpo_overrides(variant, improved).items():
        c.rl_rule.grpo[k] = v
      c.rl_rule.grpo.num_minibatches = args.num_minibatches
      c.rl_rule.train.update(steps=args.steps, seed=seed, save_every=args.steps)
      workdir = os.path.join(args.out, f"{variant}_s{seed}", "rl_rule")
      start = time.time()
      if not os.path.exists(os.path.join(workdir, "reward_trend.json")):
        stages.run_rl_rule(c, workdir, model_cfg, mesh_cfg, init)
      rows = read_metrics(workdir)
      rewards = [r["reward_mean"] for r in rows]
      walls = np.cumsum([r["step_s"] for r in rows]).tolist()
      results.setdefault(variant, []).append(
          {"seed": seed, "reward": rewards, "wall_s": walls,
           "trend": stages.reward_trend(rewards), "run_s": time.time() - start})
      print(f"{variant} seed {seed}: {results[variant][-1]['trend']}", flush=True)

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| variant | first 10 | last 10 | gain | step-to-step std | wall s |",
           "|---|---|---|---|---|---|"]

  def ms(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 \
        else f"{values[0]:.3f}"

  summary = {}
  for variant, runs in results.items():
    t = [r["trend"] for r in runs]
    gain = [x["gain"] for x in t]
    summary[variant] = float(np.mean(gain))
    lines.append(f"| {variant} | {ms([x['first_mean'] for x in t])} | "
                 f"{ms([x['last_mean'] for x in t])} | {ms(gain)} | "
                 f"{ms([x['step_to_step_std'] for x in t])} | "
                 f"{ms([r['wall_s'][-1] for r in runs])} |")
  table = "\n".join(lines)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  for variant, runs in results.items():
    n = min(len(r["reward"]) for r in runs)
    mean = np.mean([r["reward"][:n] for r in runs], axis=0)
    wall = np.mean([r["wall_s"][:n] for r in runs], axis=0)
    a.plot(np.arange(1, n + 1), mean, label=variant)
    b.plot(wall, mean, label=variant)
  a.set(xlabel="step", ylabel=f"mean reward (mean of {len(seeds)} seeds)", title="reward vs step")
  b.set(xlabel="wall time (s)", title="reward vs wall time")
  a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "reward.png"), dpi=110)
  print(json.dumps({"bench": "ablate_grpo", "steps": args.steps, "seeds": seeds,
                    "mean_gain": summary}))


if __name__ == "__main__":
  main()
