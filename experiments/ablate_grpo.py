r"""GRPO ablation on the tiny config: vanilla vs improved GRPO vs each change alone.

Variants (config.rl_rule.grpo overrides on top of configs/tiny.py):
  vanilla    DeepSeekMath GRPO: std-normalised advantages, symmetric clip 0.2,
             sequence-mean aggregation, KL to the reference (beta 0.04, k3), no
             length reward, no dynamic sampling, no overlong shaping, no TIS
  improved   Baichuan-M2's: the config's rl_rule.grpo (no std, clip-higher,
             token-mean, beta 0, dynamic length reward, dynamic sampling, and
             also DAPO's overlong shaping and truncated importance sampling)
  +<change>  vanilla with one change of `improved` applied: no_std, clip_higher,
             token_mean, no_kl, length_reward, dynamic_sampling

Each variant runs the rl_rule stage for `--steps` steps per seed, from the same
starting weights (`--init`: a stage directory with checkpoints, e.g. the sft
stage of a tiny run; default: random weights). Every variant uses the same
rollout budget per step and `--num_minibatches` updates per rollout batch (with
one, the ratio is always 1 and the clip knobs cannot matter). The defaults size
a run for a 2-core CPU: math prompts (short, so the learner's rows are short),
4 prompts x 8 samples a step, 15 steps.

The comparison reads the *unshaped* reward (`reward/total`: correct + format +
safety as config.rl_rule.reward weighs them): the overlong and length terms
are part of some variants' objective only, so their shaped rewards sit on
different scales. The shaped reward is kept too.

Outputs under `--out` (the per-run stage directories, with checkpoints, go to
`--workdir`):
  runs.csv      one row per run and step: rewards, reward parts, learner metrics,
                wall time
  summary.csv   one row per variant and seed: the reward trend (first/last
                window means, gain, step-to-step std, gain > 2 std) and wall time
  table.md      the summary as mean ± std over seeds
  reward.png    unshaped reward against step and against wall time (mean over
                seeds, band: ± one std)
  results.json  the same data for the notebook (notebooks/02_grpo_ablation.ipynb)
  README.md     the command, the settings, and the table
It ends with one JSON line. Everything is reported as measured.

Command (2-core CPU):
    python -m m2.main --config=configs/tiny.py --workdir=runs/tiny --stages=midtrain,sft
    python experiments/ablate_grpo.py --init=runs/tiny/sft
A smaller sweep:
    ... --variants=vanilla,improved --seeds=0 --steps=10
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
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
# Logged per step into runs.csv (absent values stay empty).
COLUMNS = ("reward_mean", "reward/total", "reward/correct", "reward/format", "reward/safety",
           "reward/overlong", "reward/length", "response_tokens", "entropy", "clip_frac_low",
           "clip_frac_high", "kl_ref", "kl_old", "grad_norm", "rollout/groups_dropped",
           "rollout/skipped_updates", "rollout/truncated", "step_s", "step_cpu_s", "rollout_s")


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
  p.add_argument("--out", default="experiments/results/ablate_grpo",
                 help="tables, CSVs, plot, README")
  p.add_argument("--workdir", default="runs/ablate_grpo",
                 help="the runs' stage directories (checkpoints, metrics.jsonl)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--num_minibatches", type=int, default=2,
                 help="updates per rollout batch for every variant; with 1 the ratio is "
                      "always 1 and the clip knobs cannot matter")
  p.add_argument("--sources", default="math",
                 help="rl_rule prompt sources ('': the config's)")
  p.add_argument("--batch_size", type=int, default=4, help="prompts per step (0: config's)")
  p.add_argument("--group_size", type=int, default=8, help="samples per prompt (0: config's)")
  p.add_argument("--max_new_tokens", type=int, default=24, help="0: the config's")
  p.add_argument("--seq_len", type=int, default=96,
                 help="learner row length; must hold prompt + response (0: the config's)")
  p.add_argument("--window", type=int, default=5,
                 help="steps averaged at each end for the gain (reward_trend)")
  p.add_argument("--compile_cache", default="",
                 help="JAX persistent compilation cache dir ('': <workdir>/jax_cache; "
                      "'none': off); seeds of a variant then compile once")
  return p.parse_args(argv)


def _fmt(values, digits=3):
  import numpy as np
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main(argv=None):
  args = parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import importlib.util

  import jax
  import numpy as np

  if args.compile_cache != "none":
    cache = args.compile_cache or os.path.join(args.workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  from m2 import configlib
  from m2.model.config import model_config_from
  from m2.rl import stages
  from m2.train.loop import MeshConfig, TrainConfig, restore_params
  from m2.train.metrics import read_metrics

  spec = importlib.util.spec_from_file_location("cfg", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def run_config(variant, seed):
    c = module.get_config()
    for k, v in grpo_overrides(variant, improved).items():
      c.rl_rule.grpo[k] = v
    c.rl_rule.grpo.num_minibatches = args.num_minibatches
    if args.sources:
      c.rl_rule.sources = tuple(args.sources.split(","))
    if args.max_new_tokens:
      c.rl_rule.max_new_tokens = args.max_new_tokens
      c.rl_rule.grpo.overlong_buffer = min(c.rl_rule.grpo.overlong_buffer, args.max_new_tokens)
    if args.group_size:
      c.rl_rule.grpo.group_size = args.group_size
    if args.batch_size:
      c.rl_rule.train.batch_size = args.batch_size
    if args.seq_len:
      c.rl_rule.train.seq_len = args.seq_len
      c.rl_rule.max_prompt_len = min(c.rl_rule.max_prompt_len,
                                     args.seq_len - c.rl_rule.max_new_tokens)
    c.rl_rule.train.update(steps=args.steps, seed=seed, save_every=args.steps, log_every=1)
    return c

  base = module.get_config()
  model_cfg = model_config_from(base.model)
  mesh_cfg = configlib.build(MeshConfig, base.mesh, "config.mesh")
  init = None
  if args.init:
    init = restore_params(args.init, model_cfg, configlib.build(TrainConfig, base.sft.train,
                                                                "config.sft.train"), mesh_cfg)
  improved = base.rl_rule.grpo.to_dict()
  variants = args.variants.split(",")
  for v in variants:
    grpo_overrides(v, improved)   # unknown names fail before anything runs
  seeds = [int(s) for s in args.seeds.split(",")]
  results: dict[str, list[dict]] = {}
  csv_rows = []
  total_start = time.time()
  # Seed-major order: a drift in the machine's load (shared CPUs) falls on every
  # variant alike rather than on whichever ran first.
  for seed in seeds:
    for variant in variants:
      c = run_config(variant, seed)
      workdir = os.path.join(args.workdir, f"{variant}_s{seed}", "rl_rule")
      start = time.time()
      ran = not os.path.exists(os.path.join(workdir, "reward_trend.json"))
      if ran:
        stages.run_rl_rule(c, workdir, model_cfg, mesh_cfg, init)
      rows = read_metrics(workdir)
      # Wall time of the steps after the first: the first step compiles, and how much
      # of that the persistent cache saves depends on which runs came before.
      walls = np.cumsum([0.0] + [r["step_s"] for r in rows[1:]]).tolist()
      series = {k: [r.get(k) for r in rows] for k in COLUMNS}
      trend = stages.reward_trend(series["reward/total"], args.window)
      cpus = np.cumsum([0.0] + [r.get("step_cpu_s", np.nan) for r in rows[1:]]).tolist()
      results.setdefault(variant, []).append({
          "seed": seed, "reward": series["reward/total"], "reward_shaped": series["reward_mean"],
          "correct": series["reward/correct"], "wall_s": walls, "cpu_s": cpus, "trend": trend,
          "trend_shaped": stages.reward_trend(series["reward_mean"], args.window),
          "run_s": time.time() - start if ran else None})
      for r, w in zip(rows, walls):
        csv_rows.append({"variant": variant, "seed": seed, "step": r["step"], "wall_s": w,
                         **{k: r.get(k, "") for k in COLUMNS}})
      print(f"{variant} seed {seed}: {trend}", flush=True)
  total_s = time.time() - total_start

  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, ["variant", "seed", "step", "wall_s", *COLUMNS])
    w.writeheader()
    w.writerows(csv_rows)
  summary_fields = ["variant", "seed", "first_mean", "last_mean", "gain", "step_to_step_std",
                    "gain_over_2std", "last_correct", "s_per_step", "cpu_s_per_step", "run_s"]
  with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, summary_fields)
    w.writeheader()
    for variant, runs in results.items():
      for r in runs:
        t = r["trend"]
        w.writerow({"variant": variant, "seed": r["seed"],
                    **{k: t.get(k) for k in summary_fields[2:7]},
                    "last_correct": float(np.mean(r["correct"][-t["window"]:])),
                    "s_per_step": r["wall_s"][-1] / max(len(r["wall_s"]) - 1, 1),
                    "cpu_s_per_step": r["cpu_s"][-1] / max(len(r["cpu_s"]) - 1, 1),
                    "run_s": r["run_s"]})

  win = min(args.window, args.steps // 2)
  lines = [f"| variant | first {win} | last {win} | gain | step-to-step std | "
           f"gain > 2 std (seeds) | correct, last {win} | s / step | CPU s / step |",
           "|---|---|---|---|---|---|---|---|---|"]
  summary = {}
  for variant, runs in results.items():
    t = [r["trend"] for r in runs]
    gain = [x["gain"] for x in t]
    correct = [float(np.mean(r["correct"][-x["window"]:])) for r, x in zip(runs, t)]
    summary[variant] = {"gain": float(np.mean(gain)), "gain_std": float(np.std(gain)),
                        "last_mean": float(np.mean([x["last_mean"] for x in t]))}
    lines.append(f"| {variant} | {_fmt([x['first_mean'] for x in t])} | "
                 f"{_fmt([x['last_mean'] for x in t])} | {_fmt(gain)} | "
                 f"{_fmt([x['step_to_step_std'] for x in t])} | "
                 f"{sum(bool(x['gain_over_2std']) for x in t)}/{len(t)} | "
                 f"{_fmt(correct)} | "
                 f"{_fmt([r['wall_s'][-1] / max(len(r['wall_s']) - 1, 1) for r in runs], 1)} | "
                 f"{_fmt([r['cpu_s'][-1] / max(len(r['cpu_s']) - 1, 1) for r in runs], 1)} |")
  table = "\n".join(lines)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b, c3) = plt.subplots(1, 3, figsize=(16, 4.5))
  for variant, runs in results.items():
    n = min(len(r["reward"]) for r in runs)
    rewards = np.array([r["reward"][:n] for r in runs], np.float64)
    mean, std = rewards.mean(0), rewards.std(0)
    wall = np.mean([r["wall_s"][:n] for r in runs], axis=0)
    cpu = np.mean([r["cpu_s"][:n] for r in runs], axis=0)
    line, = a.plot(np.arange(1, n + 1), mean, label=variant,
                   ls="--" if variant == "vanilla" else "-",
                   lw=2.2 if variant in ("vanilla", "improved") else 1.2)
    if len(runs) > 1:
      a.fill_between(np.arange(1, n + 1), mean - std, mean + std, color=line.get_color(),
                     alpha=0.08)
    b.plot(wall, mean, color=line.get_color(), ls=line.get_linestyle(), lw=line.get_linewidth())
    c3.plot(cpu, mean, color=line.get_color(), ls=line.get_linestyle(), lw=line.get_linewidth())
  a.set(xlabel="GRPO step", ylabel=f"unshaped reward (mean of {len(seeds)} seeds)",
        title="reward vs step")
  b.set(xlabel="wall time (s, GRPO steps after the first)", title="reward vs wall time")
  c3.set(xlabel="CPU time (s, same steps)", title="reward vs CPU time")
  a.legend(fontsize=8)
  a.grid(alpha=0.3)
  b.grid(alpha=0.3)
  c3.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "reward.png"), dpi=110)

  command = "python experiments/ablate_grpo.py " + " ".join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  sample = run_config(variants[0], seeds[0]).rl_rule
  load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
  readme = [
      "# GRPO ablation (rl_rule on configs/tiny.py)", "",
      "Written by `experiments/ablate_grpo.py` (re-running it overwrites this file).", "",
      f"    {command}", "",
      f"- start: `{args.init or 'random weights'}`; variants: {', '.join(variants)}; "
      f"seeds: {seeds}",
      f"- per run: {args.steps} GRPO steps of {sample.train.batch_size} prompts x "
      f"{sample.grpo.group_size} samples; sources {list(sample.sources)}; max_new_tokens "
      f"{sample.max_new_tokens}; learner rows of {sample.train.seq_len} tokens; "
      f"{args.num_minibatches} optimizer updates per rollout batch",
      f"- optimizer: {dict(sample.train.optimizer)}",
      f"- reward compared: the unshaped `reward/total` (weights "
      f"{dict(sample.reward.weights)}); gain = mean of the last {win} steps - mean of the "
      f"first {win}; \"gain > 2 std\": gain above twice the std of the step-to-step differences",
      "- \"s / step\": mean wall time of the steps after the first (the first compiles, and "
      "the persistent compilation cache shares compiles between runs); \"CPU s / step\": "
      "the same in CPU seconds of the process (all threads), which other jobs on a shared "
      "machine move much less than wall time",
      f"- total wall time of this invocation: {total_s:.0f} s on {os.cpu_count()} CPU(s), "
      f"load average at the end {load} (runs already present are not re-run; `run_s` in "
      "summary.csv is empty for them)", "",
      table, "",
      "Files: `runs.csv` (per step), `summary.csv` (per run), `results.json`, `reward.png`.", ""]
  with open(os.path.join(args.out, "README.md"), "w") as f:
    f.write("\n".join(readme))
  print(json.dumps({"bench": "ablate_grpo", "steps": args.steps, "seeds": seeds,
                    "total_s": round(total_s, 1), "mean_gain": summary}))


if __name__ == "__main__":
  main()
