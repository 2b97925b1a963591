"""Orbax checkpoints: async save, keep-N, restore onto any mesh, refuse mismatches.

A checkpoint step holds three items:
  state: the TrainState (params, optimizer state, step, RNG) as plain arrays,
  data:  each process's data-iterator state (JSON; every host reads its own shard),
  meta:  what the state was built from (model config, ...), to refuse a
         checkpoint of another model before any array is read. How the model
         computes (compute dtype, remat, scan, attention kernel) may change.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from m2.model.config import EXECUTION_FIELDS

log = logging.getLogger(__name__)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def to_arrays(tree):
  """Replaces nnx Variables by their values, so checkpoints are plain pytrees."""
  return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _path(path) -> str:
  def part(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(part(k) for k in path)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path(p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


# Meta entries a resumed run may change: the model's execution knobs (remat, kernels).
_MAY_CHANGE = frozenset(f"model.{name}" for name in EXECUTION_FIELDS)


def _diff_meta(saved: dict, expected: dict, may_change: frozenset[str],
               prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(saved) | set(expected)):
    a, b = saved.get(key, "<missing>"), expected.get(key, "<missing>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff_meta(a, b, may_change, f"{prefix}{key}.")
    elif a != b and f"{prefix}{key}" not in may_change:
      out.append(f"{prefix}{key}: checkpoint has {a!r}, run expects {b!r}")
  return out


def gather_data_states(state: dict, allgather: Callable = multihost_utils.process_allgather,
                       num_processes: int | None = None) -> dict:
  """{"processes": [the data state of process 0, 1, ...]}: only process 0 writes the
  JSON item, but each host's iterator is at its own position in its own shard."""
  if (num_processes or jax.process_count()) == 1:
    return {"processes": [state]}
  blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
  sizes = np.asarray(allgather(np.array([blob.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(allgather(padded))
  return {"processes": [json.loads(bytes(b[:n]).decode()) for b, n in zip(blobs, sizes)]}


def own_data_state(saved: dict, index: int | None = None, count: int | None = None) -> dict:
  """This process's entry of `gather_data_states` (a checkpoint written before it: as is)."""
  if "processes" not in saved:
    return saved
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if len(saved["processes"]) != count:
    raise CheckpointError(f"the checkpoint holds the data positions of "
                          f"{len(saved['processes'])} processes and this run has {count}: "
                          f"each host's data stream cannot resume where it stopped")
  return saved["processes"][index]


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored into the requested state."""


class Checkpointer:
  """Saves and restores a run's state in `directory/<step>/`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None,
           meta: dict | None = None, force: bool = False) -> bool:
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(to_arrays(state)),
                                data=ocp.args.JsonSave(gather_data_states(data_state or {})),
                                meta=ocp.args.JsonSave(meta or {})),
        force=force)

  def check(self, step: int, abstract_state, meta: dict | None = None,
            may_change: tuple[str, ...] = ()) -> None:
    """Raises CheckpointError naming every difference from what the run expects.

    meta: the entries the run expects (others in the checkpoint are not compared);
    may_change: dotted meta names, besides the model's execution fields, that may differ.
    """
    problems = []
    try:
      saved_meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"] or {}
      saved_tree = self._manager.item_metadata(step)["state"]
    except Exception as e:  # noqa: BLE001 - any read failure means a corrupt step
      raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable or corrupt: "
                            f"{type(e).__name__}: {e}") from e
    if meta is not None:
      problems += _diff_meta({k: saved_meta.get(k, "<missing>") for k in meta}, meta,
                             _MAY_CHANGE | set(may_change))
    if saved_tree is None:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no 'state' item")
    saved = {p: (tuple(m.shape), str(m.dtype)) for p, m in
             ((_path(p), m) for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0])}
    expected = _shapes(to_arrays(abstract_state))
    # Parameters first: they say more than the optimizer moments that mirror them.
    order = lambda paths: sorted(paths, key=lambda p: (not p.startswith("params/"), p))  # noqa: E731
    for p in order(set(expected) - set(saved)):
      problems.append(f"missing in checkpoint: {p}")
    for p in order(set(saved) - set(expected)):
      problems.append(f"unexpected in checkpoint: {p}")
    for p in order(set(saved) & set(expected)):
      if saved[p][0] != expected[p][0]:
        problems.append(f"shape of {p}: checkpoint has {saved[p][0]}, run expects {expected[p][0]}")
    if problems:
      shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
      raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this run:\n  "
                            + "\n  ".join(shown))

  def restore(self, abstract_state, step: int | None = None, meta: dict | None = None,
              may_change: tuple[str, ...] = ()):
    """Restores (state, data_state) onto the shardings carried by `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings (nnx
    Variables allowed); the mesh may differ from the one that saved.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    self.check(step, abstract_state, meta, may_change)
    target = to_arrays(abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {self.directory}/{step} could not be restored: "
                            f"{type(e).__name__}: {e}") from e
    # Put the arrays back into the Variables of the template.
    state = jax.tree.map(lambda t, a: t.replace(a) if _is_var(t) else a,
                         abstract_state, restored["state"], is_leaf=_is_var)
    log.info("restored checkpoint %s/%d", self.directory, step)
    return state, dict(own_data_state(restored["data"] or {}))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
