"""A stage directory's records: metrics.jsonl, TensorBoard events, DONE.

A run may be killed in the middle of any write: JSON files are replaced atomically,
and a torn last line of metrics.jsonl is left out with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines. On resume it drops the lines past
  `resume_step` (steps the killed run logged after its last checkpoint, which will be
  redone); a fresh run (None) drops all (a run killed before its first checkpoint).
  On several hosts only process 0 writes: the workdir is one folder they share."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if jax.process_index() != 0:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      kept = [r for r in _read_jsonl(self.path)
              if resume_step is not None and r.get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    from tensorboardX import SummaryWriter  # heavy import; only when writing
    self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                             purge_step=0 if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._tb is None:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return _read_jsonl(path) if os.path.exists(path) else []


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        log.warning("%s:%d: not JSON (torn by a killed run?); left out", path, n)
  return rows


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON through a temporary file: never a half-written file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)
  os.replace(tmp, path)


def read_done(stage_dir: str) -> dict | None:
  """A finished stage's DONE record (metric, value, wall_s, cpu_s); None when the stage
  has not finished, or its DONE is unreadable (then it resumes from its last checkpoint)."""
  path = os.path.join(stage_dir, "DONE")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      done = json.load(f)
    if isinstance(done, dict) and "metric" in done and "value" in done:
      return done
  except (json.JSONDecodeError, UnicodeDecodeError):
    pass
  log.warning("%s is unreadable; the stage runs again from its last checkpoint", path)
  return None
