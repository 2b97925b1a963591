r"""PNG training curves from every `metrics.jsonl` under a run's workdir.

  python -m m2.tools.plot --workdir=runs/tiny
  python -m m2.tools.plot --workdir=runs/tiny --out=/tmp/plots --stages=sft,rl_rubric

One figure per stage directory (`<out>/<stage>.png`, default out: `<workdir>/plots`),
one panel per curve family: loss, reward, reward parts, response length,
entropy, clip fraction, then every other logged scalar (learning rate,
tokens/s, ...). Families are found by key name, so the train loop's
`loss`/`eval_loss` and RL names such as `reward/rubric`, `response_length`,
`actor/pg_clipfrac` all land in the right panel. A family a stage did not log
is skipped and named in the stage's note (printed, and returned by `plot_run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable, Sequence

from m2.train.metrics import read_metrics

# The pipeline's stage order; other directories follow in name order.
STAGE_ORDER = ("midtrain", "sft", "sft_rs", "rl_rule", "rl_rubric", "rl_multiturn", "eval",
               "export")


def _name(key: str) -> str:
  return key.lower()


def _is_reward(key: str) -> bool:
  # The headline reward: "reward", "reward_mean", "rewards/mean", "critic/rewards/mean".
  return re.search(r"(^|/)rewards?([/_]mean)?$", _name(key)) is not None


def _is_reward_part(key: str) -> bool:
  k = _name(key)
  return "reward" in k and not _is_reward(key) and not re.search(r"(^|[/_])(std|min|max)$", k)


def _is_length(key: str) -> bool:
  # Response/completion lengths ("response_length", "response_tokens", TRL's
  # "completions/mean_length") or a bare "length"; not limits such as
  # "rollout/clipped_to_seq_len" nor shaping terms ("reward/length", claimed above).
  k = _name(key)
  if re.search(r"response|completion", k) and re.search(r"length|len($|[/_])|tokens", k):
    return True
  return re.search(r"(^|/)(mean_)?(length|len)(/mean)?$", k) is not None


def _is_clip(key: str) -> bool:
  k = _name(key)
  return "clip" in k and ("frac" in k or "ratio" in k) and "norm" not in k


# (panel title, predicate); a key goes to the first family that claims it.
FAMILIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: "loss" in _name(k)),
    ("reward", _is_reward),
    ("reward parts", _is_reward_part),
    ("response length", _is_length),
    ("entropy", lambda k: "entropy" in _name(k)),
    ("clip fraction", _is_clip),
)


@dataclasses.dataclass
class StagePlot:
  stage: str
  path: str | None                    # the PNG, None when the stage logged nothing
  panels: dict[str, list[str]]        # panel title -> keys drawn in it
  missing: list[str]                  # families this stage did not log
  skipped_values: int = 0             # non-numeric entries left out

  @property
  def note(self) -> str:
    parts = [f"{self.stage}: " + (self.path or "no metrics")]
    if self.missing:
      parts.append("not logged: " + ", ".join(self.missing))
    if self.skipped_values:
      parts.append(f"{self.skipped_values} non-numeric value(s) skipped")
    return "; ".join(parts)


def find_stages(workdir: str) -> list[tuple[str, str]]:
  """(stage name, directory) of every directory under `workdir` holding a metrics.jsonl,
  in pipeline order; the name is the path relative to `workdir` ("." for itself)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir {workdir!r} is not a directory")
  found = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d not in ("tb", "checkpoints", "plots"))
    if "metrics.jsonl" in files:
      found.append((os.path.relpath(root, workdir), root))

  def order(item):
    parts = item[0].split(os.sep)
    return [(STAGE_ORDER.index(p) if p in STAGE_ORDER else len(STAGE_ORDER), p) for p in parts]

  return sorted(found, key=order)


def series(rows: Sequence[dict]) -> tuple[dict[str, tuple[list[int], list[float]]], int]:
  """key -> (steps, values) over the rows that logged it; and the count of non-numeric
  values left out (a string or null in metrics.jsonl is not a curve point)."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  skipped = 0
  for row in rows:
    step = row.get("step")
    for k, v in row.items():
      if k == "step":
        continue
      if isinstance(v, bool) or not isinstance(v, (int, float)) or step is None:
        skipped += 1
        continue
      steps, values = out.setdefault(k, ([], []))
      steps.append(int(step))
      values.append(float(v))
  return out, skipped


def group(keys: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
  """Panels (family title -> keys, then one panel per unclaimed key) and missing families."""
  panels: dict[str, list[str]] = {}
  claimed = set()
  for title, claims in FAMILIES:
    mine = sorted(k for k in keys if k not in claimed and claims(k))
    claimed.update(mine)
    if mine:
      panels[title] = mine
  missing = [title for title, _ in FAMILIES if title not in panels]
  for k in sorted(k for k in keys if k not in claimed):
    panels[k] = [k]
  return panels, missing


def plot_stage(stage: str, rows: Sequence[dict], path: str) -> StagePlot:
  data, skipped = series(rows)
  panels, missing = group(list(data))
  if not panels:
    return StagePlot(stage, None, {}, missing, skipped)
  import matplotlib
  matplotlib.use("Agg")   # files only; no display on servers
  import matplotlib.pyplot as plt

  cols = min(3, len(panels))
  nrows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
  for ax, (title, keys) in zip(axes.flat, panels.items()):
    for k in keys:
      steps, values = data[k]
      # A single point (e.g. a final eval) would be invisible as a line.
      ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=k)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(keys) > 1 or keys[0] != title:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(stage)
  # Room for the title above the first row (0.3 in), whatever the figure's height.
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return StagePlot(stage, path, panels, missing, skipped)


def plot_run(workdir: str, out: str | None = None,
             stages: Sequence[str] | None = None) -> list[StagePlot]:
  """Draws every stage's curves; returns what was drawn and what was missing per stage."""
  out = out or os.path.join(workdir, "plots")
  found = find_stages(workdir)
  if stages:
    unknown = sorted(set(stages) - {name for name, _ in found})
    if unknown:
      raise ValueError(f"--stages {unknown}: no metrics.jsonl there; found "
                       f"{[name for name, _ in found]}")
    found = [(name, d) for name, d in found if name in stages]
  results = []
  for name, directory in found:
    label = "run" if name == "." else name
    path = os.path.join(out, label.replace(os.sep, "__") + ".png")
    results.append(plot_stage(label, read_metrics(directory), path))
  return results


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  results = plot_run(f.workdir, f.out, f.stages)
  if not results:
    print(f"no metrics.jsonl under {f.workdir}")
  for r in results:
    print(r.note)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Run directory (holds <stage>/metrics.jsonl).")
  flags.DEFINE_string("out", None, "Where the PNGs go (default: <workdir>/plots).")
  flags.DEFINE_list("stages", None, "Only these stages (default: all found).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
