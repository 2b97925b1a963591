"""The `eval` pipeline stage: HealthBench + simulated consultations, before and after RL.

"After" is the weights the previous stage ended with (the pipeline's current
params); "before" is the last checkpoint of `config.eval.before` ("auto": the
last stage listed before the first `rl_*` stage, e.g. `sft` or `sft_rs`). Both
are evaluated with the same settings, greedy, on the same examples and
held-out cases (`config.data.heldout_fraction`, see m2/eval/consult.py).

Writes `workdir/eval/`: `<before|after>/healthbench/` and `<before|after>/consult/`
(every judgement and transcript), `comparison.json` and `comparison.txt` (the
table), `metrics.jsonl` (step 0: before, step 1: after). The headline metric is
HealthBench after RL. The weights pass through unchanged to the next stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
TABLE_FILE = "comparison.txt"

# (label, report key, path into the report); what the comparison table shows.
ROWS = (
    ("HealthBench overall", "healthbench", ("score",)),
    ("HealthBench accuracy", "healthbench", ("metrics", "axis:accuracy")),
    ("HealthBench completeness", "healthbench", ("metrics", "axis:completeness")),
    ("HealthBench communication", "healthbench", ("metrics", "axis:communication_quality")),
    ("HealthBench context awareness", "healthbench", ("metrics", "axis:context_awareness")),
    ("consult diagnostic accuracy", "consult", ("diagnostic_accuracy",)),
    ("consult rubric score", "consult", ("rubric", "rubric_score", "mean")),
    ("consult turns", "consult", ("turns_mean",)),
    ("consult questions / fact", "consult", ("questions_per_revealed_fact",)),
    ("consult leakage / reply", "consult", ("leakage_per_reply",)),
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """config.eval (all optional)."""
  before: str = "auto"          # stage whose checkpoint is "before RL"; "": after only
  healthbench: bool = True
  healthbench_subsets: tuple[str, ...] = ("oss_eval",)
  healthbench_limit: int = 32   # first N examples (0: all)
  consult: bool = True
  consult_sources: tuple[str, ...] = ("agentclinic", "mediq")
  consult_limit: int = 8        # first N held-out cases by id (0: all)
  max_turns: int = 6
  max_new_tokens: int = 128     # HealthBench responses
  doctor_max_new_tokens: int = 64
  max_prompt_tokens: int = 1024
  batch_size: int = 16
  grader: str = "reference"     # "reference" (or "model" with grader_checkpoint)
  grader_checkpoint: str = ""
  simulator: str = "reference"  # "reference" (or "model" with simulator_checkpoint)
  simulator_checkpoint: str = ""

  def __post_init__(self):
    object.__setattr__(self, "healthbench_subsets", tuple(self.healthbench_subsets))
    object.__setattr__(self, "consult_sources", tuple(self.consult_sources))
    for f in ("healthbench_limit", "consult_limit"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 0):
        raise ValueError(f"{f} must be an int >= 0, got {getattr(self, f)!r}")
    for f in ("max_turns", "max_new_tokens", "doctor_max_new_tokens", "max_prompt_tokens",
              "batch_size"):
      if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
        raise ValueError(f"{f} must be a positive int, got {getattr(self, f)!r}")
    if self.grader not in ("reference", "model"):
      raise ValueError(f"grader must be 'reference' or 'model', got {self.grader!r}")
    if self.grader == "model" and not self.grader_checkpoint:
      raise ValueError("grader='model' needs grader_checkpoint")
    if self.simulator not in ("reference", "model"):
      raise ValueError(f"simulator must be 'reference' or 'model', got {self.simulator!r}")
    if self.simulator == "model" and not self.simulator_checkpoint:
      raise ValueError("simulator='model' needs simulator_checkpoint")
    if not (self.healthbench or self.consult):
      raise ValueError("healthbench and consult are both off: nothing to evaluate")


@dataclasses.dataclass
class _Weights:
  params: Any


@dataclasses.dataclass
class EvalStageResult:
  """What `m2.main.run` expects of a stage: `state.params` (passed on unchanged)."""
  state: _Weights
  reports: dict
  resumed_from: int | None = None


def before_stage(stages, name: str = "eval") -> str:
  """The last stage before the first RL stage ("" when no stage precedes RL)."""
  stages = list(stages)
  upto = stages[:stages.index(name)] if name in stages else stages
  first_rl = next((i for i, s in enumerate(upto) if s.startswith("rl_")), len(upto))
  return upto[first_rl - 1] if first_rl > 0 else ""


def _get(report: dict, path) -> float | None:
  node: Any = report
  for k in path:
    if not isinstance(node, dict) or k not in node:
      return None
    node = node[k]
  return node if isinstance(node, (int, float)) else None


def comparison(reports: dict[str, dict]) -> list[dict]:
  """Rows of (metric, before, after, delta) over the reports that exist."""
  rows = []
  for label, kind, path in ROWS:
    values = {side: _get(reports.get(side, {}).get(kind, {}), path) for side in reports}
    if all(v is None for v in values.values()):
      continue
    row = {"metric": label, **values}
    if values.get("before") is not None and values.get("after") is not None:
      row["delta"] = values["after"] - values["before"]
    rows.append(row)
  return rows


def format_comparison(rows: list[dict], labels: dict[str, str] | None = None) -> str:
  sides = [s for s in ("before", "after") if any(s in r for r in rows)]
  labels = labels or {}
  header = ["metric"] + [labels.get(s, s) for s in sides] + (["delta"] if len(sides) == 2 else [])
  cells = [header]
  for r in rows:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    cells.append([r["metric"]] + [fmt(r.get(s)) for s in sides]
                 + ([f"{r['delta']:+.4f}" if "delta" in r else "-"] if len(sides) == 2 else []))
  w = [max(len(c[i]) for c in cells) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row))
           for row in cells]
  lines.insert(1, "  ".join("-" * x for x in w))
  return "\n".join(lines)


def comparison_table(run_workdir: str) -> str | None:
  """The eval stage's before/after table of a run, if it has one (for the run summary)."""
  path = os.path.join(run_workdir, "eval", TABLE_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read().rstrip()


def _evaluate_side(roles: dict, params, cfg: EvalConfig, out_dir: str, examples, cases,
                   heldout_fraction, grader, backend) -> dict:
  from m2.eval import consult, healthbench
  reports = {}
  for role in roles.values():
    role.params = params   # same shapes: the compiled programs are reused
  if cfg.healthbench:
    reports["healthbench"] = healthbench.evaluate(
        roles["policy"], grader, examples, batch_size=cfg.batch_size,
        out_dir=os.path.join(out_dir, "healthbench"),
        settings={"limit": cfg.healthbench_limit, "subsets": list(cfg.healthbench_subsets),
                  "max_new_tokens": cfg.max_new_tokens})
  if cfg.consult:
    reports["consult"] = consult.evaluate(
        roles["doctor"], cases, backend=backend, grader=grader, max_turns=cfg.max_turns,
        batch_size=cfg.batch_size, out_dir=os.path.join(out_dir, "consult"),
        settings={"heldout_fraction": heldout_fraction})
  return reports


def run_eval(config, workdir: str, model_cfg, mesh_cfg, init_params):
  """`eval` stage: (result, "healthbench_after" or "consult_accuracy_after", value)."""
  from tqdm.auto import tqdm

  from m2 import configlib
  from m2.data import pipelines
  from m2.eval import consult, healthbench
  from m2.train.policy import Policy, load_policy, load_stage_params
  from m2.train.metrics import MetricsWriter
  from m2.verifier.patient import ModelPatientBackend, ReferencePatientBackend

  cfg = configlib.build(EvalConfig, config.get("eval", {}), "config.eval")
  before = before_stage(config.stages) if cfg.before == "auto" else cfg.before
  previous = list(config.stages)[:list(config.stages).index("eval")] if "eval" in \
      config.stages else list(config.stages)
  if before and before not in previous:
    raise ValueError(f"config.eval.before={before!r} must be a stage listed before eval in "
                     f"config.stages {list(config.stages)}")
  if init_params is None:
    raise ValueError("eval: no weights to evaluate (no earlier stage ran and no "
                     "config.model.hf_checkpoint)")
  data_cfg = configlib.build(pipelines.DataConfig, config.data, "config.data")
  tokenizer = pipelines.load_data_tokenizer(data_cfg, config.model.get("hf_checkpoint", ""))
  mesh = mesh_cfg.make()
  run_dir = os.path.dirname(os.path.abspath(workdir))
  sides = {"after": Policy(model_cfg, init_params, tokenizer, "current weights", mesh)}
  if before and previous and before != previous[-1]:
    before_cfg, params = load_stage_params(os.path.join(run_dir, before), mesh, mesh_cfg.rules)
    sides = {"before": Policy(before_cfg, params, tokenizer, before, mesh), **sides}
  elif before:
    log.info("eval: no RL stage ran after %s; evaluating its weights once", before)

  examples = healthbench.load_examples(data_cfg.data_dir, cfg.healthbench_subsets,
                                       limit=cfg.healthbench_limit) if cfg.healthbench else []
  cases, counts = consult.heldout_cases(cfg.consult_sources, data_cfg.heldout_fraction,
                                        data_dir=data_cfg.data_dir or None,
                                        limit=cfg.consult_limit) if cfg.consult else ([], {})
  grader = healthbench.make_grader(
      cfg.grader, role=healthbench.make_role(
          load_policy(cfg.grader_checkpoint, mesh=mesh), name="grader", max_new_tokens=96,
          max_prompt_tokens=cfg.max_prompt_tokens) if cfg.grader == "model" else None)
  backend = ReferencePatientBackend()
  if cfg.simulator == "model":
    backend = ModelPatientBackend(healthbench.make_role(
        load_policy(cfg.simulator_checkpoint, mesh=mesh), name="simulator", max_new_tokens=64,
        temperature=0.7))

  # One sampler for both roles and both sides: compiled once, weights swapped.
  first = next(iter(sides.values()))
  roles = {"policy": healthbench.make_role(first, name="policy",
                                           max_new_tokens=cfg.max_new_tokens,
                                           max_prompt_tokens=cfg.max_prompt_tokens)}
  roles["doctor"] = consult.doctor_role(first, max_new_tokens=cfg.doctor_max_new_tokens,
                                        max_prompt_tokens=cfg.max_prompt_tokens,
                                        sampler=roles["policy"].sampler)
  reports = {}
  writer = MetricsWriter(workdir)
  # The stage's own bar (shown in logs too): one tick per side, its scores as they land.
  bar = tqdm(total=len(sides), desc="eval", dynamic_ncols=True, disable=False)
  postfix = {}
  try:
    for step, (side, policy) in enumerate(sides.items()):
      if policy.model_cfg != model_cfg:
        raise ValueError(f"eval: the {side} weights ({policy.source}) are of another model "
                         f"shape than the run's: {policy.model_cfg} vs {model_cfg}")
      log.info("eval: %s (%s)", side, policy.source)
      reports[side] = _evaluate_side(roles, policy.params, cfg, os.path.join(workdir, side),
                                     examples, cases, data_cfg.heldout_fraction, grader,
                                     backend)
      scalars = {}
      if "healthbench" in reports[side]:
        scalars["healthbench_score"] = reports[side]["healthbench"]["score"]
      if "consult" in reports[side]:
        c = reports[side]["consult"]
        scalars.update(consult_diagnostic_accuracy=c["diagnostic_accuracy"],
                       consult_turns=c["turns_mean"], consult_leakage=c["leakage_per_reply"])
        if c["rubric"]:
          scalars["consult_rubric_score"] = c["rubric"]["rubric_score"]["mean"]
      writer.write(step if len(sides) == 2 else 1, scalars)
      if "healthbench_score" in scalars:
        postfix[f"healthbench_{side}"] = f"{scalars['healthbench_score']:.3f}"
      if "consult_diagnostic_accuracy" in scalars:
        postfix[f"dx_acc_{side}"] = f"{scalars['consult_diagnostic_accuracy']:.3f}"
      bar.set_postfix(postfix)
      bar.update(1)
  finally:
    bar.close()
    writer.close()
  rows = comparison(reports)
  labels = {"before": f"before ({before})" if "before" in sides else "before",
            "after": "after"}
  table = format_comparison(rows, labels)
  with open(os.path.join(workdir, COMPARISON_FILE), "w") as f:
    json.dump({"before_stage": before if "before" in sides else None, "rows": rows,
               "cases": counts, "healthbench_examples": len(examples)}, f, indent=1)
  with open(os.path.join(workdir, TABLE_FILE), "w") as f:
    f.write(table + "\n")
  log.info("eval before/after:\n%s", table)
  after = reports["after"]
  if "healthbench" in after:
    metric, value = "healthbench_after", after["healthbench"]["score"]
  else:
    metric, value = "consult_accuracy_after", after["consult"]["diagnostic_accuracy"]
  return EvalStageResult(_Weights(init_params), reports), metric, value


# m2.main: a finished eval stage has no checkpoint to restore; the weights go on unchanged.
run_eval.passes_params_through = True
