r"""Runs a grid of config overrides of one m2 experiment; collects final metrics into a CSV.

  # 2 x 2 points, one after another on this machine (each point a `python -m m2.main` run):
  python experiments/sweep.py --config=configs/tiny.py --workdir=runs/sweep_lr \
      --stages=midtrain --set=midtrain.train.steps=40 \
      --grid=midtrain.train.optimizer.learning_rate=1e-3,3e-3 \
      --grid=midtrain.train.batch_size=8,16

  # one job per point: print the commands (pipe into GNU parallel, a job array, ...)
  python experiments/sweep.py ... --mode=print
  # or submit each through a launcher template ({cmd}: the shell-quoted command, {name}: the point)
  python experiments/sweep.py ... --mode=launch --launcher='sbatch -J {name} --wrap {cmd}'
  # when the jobs are done: gather the CSV and the plot
  python experiments/sweep.py ... --mode=collect

`--grid=key=v1,v2,...` sweeps one field (a value list with commas inside, such as
tuples, is written as a Python list: `--grid='mesh.shape=[(1,8,1),(2,2,2)]'`);
the grid is the product of all `--grid` flags. `--set=key=value` applies to every
point. Keys are checked against the config before anything runs.

Each point runs in `<workdir>/<name>/` (name: index plus the swept values), so a
rerun skips finished stages and resumes interrupted ones (`m2.main` does that).
Outputs in `<workdir>/`: `sweep.json` (the points and their commands),
`results.csv` (one row per point: the swept values, status, and for every stage
its headline metric, wall time and the last logged value of each metric) and
`results.png` (`--metric`, by default the last stage's headline metric, against
each swept field; one line per setting of the other fields).

Wall time: the sum of the points' runs (`m2.main` with the overrides); the tiny
two-point test grid in tests/sweep_test.py takes under a minute on a 2-core CPU.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

MODES = ("local", "inprocess", "print", "launch", "collect")


@dataclasses.dataclass
class Point:
  name: str
  overrides: dict[str, str]    # swept field -> value text (as on the command line)
  workdir: str
  command: list[str]


# --- config and overrides -------------------------------------------------------------


def load_config(spec: str):
  """`path/to/config.py` or `path/to/config.py:arg`, as absl's config_flags reads it."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("m2_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _parse_value(key: str, text: str, current):
  """`text` as the type of the field's current value (what config_flags does)."""
  try:
    if isinstance(current, bool):
      if text.lower() in ("true", "1"):
        return True
      if text.lower() in ("false", "0"):
        return False
      raise ValueError("expected true or false")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if current is None:   # config_flags cannot type it, so m2.main would refuse the point
      raise ValueError("the field is None in the config, which a command line cannot "
                       "override; give it a value in the config file")
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  except (ValueError, SyntaxError) as e:
    kind = "" if current is None else f"not a {type(current).__name__} "
    raise ValueError(f"--config.{key}={text!r}: {kind}({e})") from None


def _field(config, key: str):
  """(parent ConfigDict, last name) of a dotted key; unknown names are named."""
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node.keys():
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      raise ValueError(f"config field {'.'.join(parts[:i + 1])!r} does not exist "
                       f"(known at that level: {known})")
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def apply_overrides(config, overrides: dict[str, str]):
  """Sets each dotted field of `config` (a ConfigDict, changed in place) from its text."""
  for key, text in overrides.items():
    parent, name = _field(config, key)
    value = _parse_value(key, text, parent[name])
    try:
      parent[name] = value   # ConfigDict refuses a value of another type
    except TypeError as e:
      raise ValueError(f"--config.{key}={text!r}: {e}") from None
  return config


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  key = key.strip().removeprefix("config.")
  if not sep or not key:
    raise ValueError(f"--{flag}={text!r}: expected key=value")
  return key, value


def parse_grid(entries: Sequence[str]) -> dict[str, list[str]]:
  """`key=v1,v2` (or `key=[v1, v2]` for values holding commas) -> {key: [value texts]}."""
  grid: dict[str, list[str]] = {}
  for entry in entries:
    key, text = parse_assignment(entry, "grid")
    if key in grid:
      raise ValueError(f"--grid: {key!r} given twice")
    text = text.strip()
    if text.startswith("["):
      try:
        values = ast.literal_eval(text)
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"--grid={entry!r}: not a Python list ({e})") from None
      texts = [repr(v) if not isinstance(v, str) else v for v in values]
    else:
      texts = [v.strip() for v in text.split(",")]
    if not texts or any(t == "" for t in texts):
      raise ValueError(f"--grid={entry!r}: empty value")
    if len(set(texts)) != len(texts):
      raise ValueError(f"--grid={entry!r}: repeated value")
    grid[key] = texts
  return grid


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:40]


def make_points(config_spec: str, workdir: str, grid: dict[str, list[str]],
                fixed: dict[str, str], stages: Sequence[str] | None) -> list[Point]:
  """The grid's points in a fixed order, every override checked against the config."""
  for key in set(grid) & set(fixed):
    raise ValueError(f"{key!r} is both swept (--grid) and fixed (--set)")
  keys = list(grid)
  points = []
  for i, values in enumerate(itertools.product(*(grid[k] for k in keys))):
    swept = dict(zip(keys, values))
    # Apply to a copy now, so a typo or a bad value fails before any point runs.
    apply_overrides(load_config(config_spec), {**fixed, **swept})
    name = f"{i:03d}" + "".join(f"_{k.split('.')[-1]}={_slug(v)}" for k, v in swept.items())
    point_dir = os.path.join(workdir, name)
    command = [sys.executable, "-m", "m2.main", f"--config={config_spec}",
               f"--workdir={point_dir}"]
    if stages:
      command.append(f"--stages={','.join(stages)}")
    command += [f"--config.{k}={v}" for k, v in {**fixed, **swept}.items()]
    points.append(Point(name, swept, point_dir, command))
  return points


# --- running ----------------------------------------------------------------------------


def run_subprocess(point: Point, log_path: str) -> int:
  with open(log_path, "w") as log:
    return subprocess.run(point.command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_in_process(config_spec: str, fixed: dict[str, str], stages: Sequence[str] | None):
  """A runner that calls `m2.main.run` in this process (no start-up cost per point)."""

  def runner(point: Point, log_path: str) -> int:
    from m2 import main
    config = apply_overrides(load_config(config_spec), {**fixed, **point.overrides})
    results = main.run(config, point.workdir, list(stages) if stages else None)
    with open(log_path, "w") as f:
      f.write(main.summary_table(results) + "\n")
    return 0

  return runner


def launch(point: Point, template: str) -> int:
  cmd = template.format(cmd=shlex.quote(shlex.join(point.command)), name=point.name)
  return subprocess.run(cmd, shell=True).returncode


# --- collecting -------------------------------------------------------------------------


def final_metrics(point_dir: str, stages: Sequence[str]) -> dict[str, float | str]:
  """Per stage: the headline metric and wall time from DONE, and the last logged value
  of each key in metrics.jsonl, as `<stage>/<key>` columns."""
  from m2.train.metrics import read_done, read_metrics
  row: dict[str, float | str] = {}
  for stage in stages:
    stage_dir = os.path.join(point_dir, stage)
    for logged in read_metrics(stage_dir):
      for k, v in logged.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          row[f"{stage}/{k}"] = v
        elif k == "step":
          row[f"{stage}/step"] = v
    done = read_done(stage_dir)
    if done is not None:
      row[f"{stage}/headline"] = done["metric"]
      row[f"{stage}/{done['metric']}"] = done["value"]
      row[f"{stage}/wall_s"] = round(done.get("wall_s", float("nan")), 2)
  return row


def collect(workdir: str, points: Sequence[Point], stages: Sequence[str],
            returncodes: dict[str, int] | None = None) -> list[dict]:
  rows = []
  for p in points:
    metrics = final_metrics(p.workdir, stages)
    done = all(f"{s}/headline" in metrics for s in stages)
    code = (returncodes or {}).get(p.name)
    status = "done" if done else ("failed" if code not in (None, 0) else "not done")
    rows.append({"point": p.name, **p.overrides, "status": status, **metrics})
  columns = ["point", *points[0].overrides.keys(), "status"] if points else ["point"]
  for r in rows:
    columns += [k for k in r if k not in columns]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  return rows


def _number(text):
  try:
    return float(text)
  except (TypeError, ValueError):
    return None


def plot(workdir: str, rows: Sequence[dict], keys: Sequence[str], metric: str) -> str | None:
  """`metric` against each swept key; one line per setting of the other keys."""
  have = [r for r in rows if isinstance(r.get(metric), (int, float))]
  if not have or not keys:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    values = list(dict.fromkeys(r[key] for r in rows))
    numeric = all(_number(v) is not None for v in values)
    others = [k for k in keys if k != key]
    lines: dict[tuple, list] = {}
    for r in have:
      lines.setdefault(tuple(r[k] for k in others), []).append(r)
    for setting, members in lines.items():
      members.sort(key=lambda r: _number(r[key]) if numeric else values.index(r[key]))
      xs = [_number(r[key]) if numeric else values.index(r[key]) for r in members]
      label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, setting)) or None
      ax.plot(xs, [r[metric] for r in members], marker="o", label=label)
    if numeric and min(_number(v) for v in values) > 0 and (
        max(_number(v) for v in values) / min(_number(v) for v in values) >= 10):
      ax.set_xscale("log")
    if not numeric:
      ax.set_xticks(range(len(values)), values, rotation=20, fontsize=7)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if others:
      ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "results.png")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def default_metric(rows: Sequence[dict], stages: Sequence[str]) -> str | None:
  for r in rows:
    headline = r.get(f"{stages[-1]}/headline")
    if headline:
      return f"{stages[-1]}/{headline}"
  return None


def table(rows: Sequence[dict], keys: Sequence[str], metric: str | None) -> str:
  columns = ["point", *keys, "status"] + ([metric] if metric else [])
  cells = [columns] + [[_fmt(r.get(c, "-")) for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def _fmt(v) -> str:
  if isinstance(v, float):
    return "nan" if math.isnan(v) else f"{v:.4g}"
  return str(v)


def run_sweep(config_spec: str, workdir: str, grid: dict[str, list[str]],
              fixed: dict[str, str] | None = None, stages: Sequence[str] | None = None,
              mode: str = "local", launcher: str = "", metric: str = "",
              runner: Callable[[Point, str], int] | None = None) -> dict:
  """Runs (or prints, launches, collects) the sweep; returns its summary."""
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  if mode == "launch" and "{cmd}" not in launcher:
    raise ValueError("--mode=launch needs --launcher with a {cmd} placeholder")
  if not grid:
    raise ValueError("no --grid: nothing to sweep")
  fixed = dict(fixed or {})
  points = make_points(config_spec, workdir, grid, fixed, stages)
  config_stages = list(load_config(config_spec).stages)
  unknown = [s for s in stages or () if s not in config_stages]
  if unknown:
    raise ValueError(f"--stages {unknown}: not in config.stages {config_stages}")
  run_stages = [s for s in config_stages if not stages or s in stages]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump({"config": config_spec, "grid": grid, "fixed": fixed, "stages": run_stages,
               "points": [dataclasses.asdict(p) for p in points]}, f, indent=1)
  if mode == "print":
    for p in points:
      print(shlex.join(p.command))
    return {"points": points}
  codes: dict[str, int] = {}
  if mode in ("local", "inprocess", "launch"):
    if runner is None and mode == "inprocess":
      runner = run_in_process(config_spec, fixed, stages)
    runner = runner or run_subprocess
    for i, p in enumerate(points):
      print(f"[{i + 1}/{len(points)}] {p.name}", flush=True)
      os.makedirs(p.workdir, exist_ok=True)
      codes[p.name] = (launch(p, launcher) if mode == "launch"
                       else runner(p, os.path.join(p.workdir, "sweep.log")))
      if codes[p.name]:
        print(f"  {p.name} exited with {codes[p.name]} (log: {p.workdir}/sweep.log)")
    if mode == "launch":
      print(f"launched {len(points)} job(s); collect with --mode=collect when they finish")
      return {"points": points, "returncodes": codes}
  rows = collect(workdir, points, run_stages, codes)
  metric = metric or default_metric(rows, run_stages)
  png = plot(workdir, rows, list(grid), metric) if metric else None
  print(table(rows, list(grid), metric))
  print(f"results: {os.path.join(workdir, 'results.csv')}" + (f", {png}" if png else ""))
  return {"points": points, "rows": rows, "metric": metric, "plot": png,
          "returncodes": codes}


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="config file (path[:arg])")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeat)")
  parser.add_argument("--set", action="append", default=[], help="key=value for every point")
  parser.add_argument("--stages", default="", help="comma-separated subset of config.stages")
  parser.add_argument("--mode", default="local", choices=MODES)
  parser.add_argument("--launcher", default="", help="shell template with {cmd} and {name}")
  parser.add_argument("--metric", default="", help="CSV column to plot (default: the last "
                      "stage's headline metric, e.g. midtrain/eval_loss)")
  args = parser.parse_args(argv)
  fixed = dict(parse_assignment(s, "set") for s in args.set)
  stages = [s for s in args.stages.split(",") if s] or None
  out = run_sweep(args.config, args.workdir, parse_grid(args.grid), fixed, stages, args.mode,
                  args.launcher, args.metric)
  return 1 if any(out.get("returncodes", {}).values()) else 0


if __name__ == "__main__":
  sys.exit(main())
