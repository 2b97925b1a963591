"""The GRPO learner: a jitted, sharded update of the policy on rollout batches.

The learner owns the policy's `TrainState` (m2.train.state) on the mesh; its
`params` are device arrays that go straight to `Sampler.generate` (no host
round trip), and each `update` donates the old state. With `beta > 0` it also
keeps a frozen copy of the starting params as the reference policy, on the
same mesh; with `beta = 0` no reference exists and none is ever run.

    learner = GRPOLearner(model_cfg, grpo_cfg, opt_cfg, mesh, rules, init_params=params)
    out = sampler.generate(learner.params, prompts, sampling)      # rollout
    batch = learner_batch(trajectories, advantages, rows=learner_rows)
    metrics = learner.update(batch)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.rl.grpo import GRPOConfig, grpo_loss
from m2.train.checkpoint import to_arrays
from m2.train.optimizer import OptimizerConfig, make_optimizer
from m2.train.state import (abstract_train_state, init_train_state, make_train_step,
                            split_microbatches)

LENGTH_MULTIPLE = 32   # learner sequence lengths are padded to this (bounds recompiles)


@dataclasses.dataclass
class Trajectory:
  """One token sequence the policy took part in.

  ids:          [L] the whole sequence (prompt, policy turns, other turns).
  mask:         [L] 1 where the policy sampled the token (trained), else 0.
  sampler_logp: [L] the sampler's log-prob of each policy token (0 elsewhere).
  """
  ids: np.ndarray
  mask: np.ndarray
  sampler_logp: np.ndarray

  def __post_init__(self):
    self.ids = np.asarray(self.ids, np.int32)
    self.mask = np.asarray(self.mask, np.int32)
    self.sampler_logp = np.asarray(self.sampler_logp, np.float32)
    if not (self.ids.shape == self.mask.shape == self.sampler_logp.shape) or self.ids.ndim != 1:
      raise ValueError(f"Trajectory: ids {self.ids.shape}, mask {self.mask.shape} and "
                       f"sampler_logp {self.sampler_logp.shape} must be equal 1-D shapes")
    if self.mask[:1].any():
      raise ValueError("Trajectory: the first token has no context to be sampled from")

  @classmethod
  def single_turn(cls, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                  completion_logp: Sequence[float]) -> "Trajectory":
    p, c = len(prompt_ids), len(completion_ids)
    return cls(np.concatenate([np.asarray(prompt_ids, np.int32),
                               np.asarray(completion_ids, np.int32)]),
               np.r_[np.zeros(p, np.int32), np.ones(c, np.int32)],
               np.r_[np.zeros(p, np.float32), np.asarray(completion_logp, np.float32)[:c]])


def learner_batch(trajectories: Sequence[Trajectory], advantages: Sequence[float], rows: int,
                  *, pad_id: int = 0, multiple: int = LENGTH_MULTIPLE,
                  max_length: int | None = None, width: int | None = None
                  ) -> dict[str, np.ndarray]:
  """[rows, T] numpy arrays for `GRPOLearner.update`, targets-aligned.

  Rows past the trajectories are padding (segment 0, no loss). T is `width`
  when given (a fixed shape: one compile for a whole run), else the longest
  trajectory minus one, rounded up to `multiple`. A trajectory longer than
  `max_length` + 1 keeps its end (the policy's last tokens) and is counted by
  the caller through `truncated`.
  """
  if len(trajectories) != len(advantages):
    raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
  if len(trajectories) > rows:
    raise ValueError(f"{len(trajectories)} trajectories do not fit {rows} learner rows")
  if not trajectories:
    raise ValueError("learner_batch: no trajectory")
  longest = max(len(t.ids) for t in trajectories) - 1
  if max_length is not None:
    longest = min(longest, max_length)
  if width is None:
    width = max(multiple, -(-longest // multiple) * multiple)
    if max_length is not None:
      width = min(width, max_length)
  out = {k: np.zeros((rows, width), np.int32) for k in
         ("inputs", "targets", "positions", "segments", "loss_mask")}
  out["inputs"][:] = pad_id
  out["targets"][:] = pad_id
  out["advantages"] = np.zeros((rows, width), np.float32)
  out["sampler_logp"] = np.zeros((rows, width), np.float32)
  for i, (t, a) in enumerate(zip(trajectories, advantages)):
    ids, mask, lp = t.ids, t.mask, t.sampler_logp
    if len(ids) - 1 > width:   # keep the end: that is where the policy's tokens are
      ids, mask, lp = ids[-(width + 1):], mask[-(width + 1):], lp[-(width + 1):]
    n = len(ids) - 1
    out["inputs"][i, :n] = ids[:-1]
    out["targets"][i, :n] = ids[1:]
    out["positions"][i, :n] = np.arange(n)
    out["segments"][i, :n] = 1
    out["loss_mask"][i, :n] = mask[1:]
    out["sampler_logp"][i, :n] = lp[1:]
    out["advantages"][i, :n] = np.float32(a) * mask[1:]
  return out


class GRPOLearner:
  """The policy's train state on a mesh and its jitted GRPO update."""

  def __init__(self, model_cfg: ModelConfig, cfg: GRPOConfig, opt_cfg: OptimizerConfig,
               mesh, rules=parallel.DEFAULT_RULES, *, init_params: nnx.State | None = None,
               seed: int = 0, state=None, microbatches: int = 1):
    """`microbatches`: each minibatch runs as this many sequential pieces
    (`TrainConfig.microbatches`), and the old and reference log-prob passes over
    the whole batch in pieces of the same size."""
    self.model_cfg, self.cfg, self.mesh, self.rules = model_cfg, cfg, mesh, tuple(rules)
    self.microbatches = microbatches
    self.tx = make_optimizer(opt_cfg)
    self.make_model = lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    if state is None:
      self.graphdef, state, self.shardings = init_train_state(self.make_model, self.tx, mesh,
                                                              self.rules, seed)
      if init_params is not None:
        state = state.replace(params=place_params(init_params, self.shardings.params))
    else:
      self.graphdef = nnx.split(nnx.eval_shape(self.make_model))[0]
      _, self.shardings = abstract_train_state(self.make_model, self.tx, mesh, self.rules)
    self.state = state
    self._step = make_train_step(self.graphdef, self.tx, functools.partial(grpo_loss, cfg=cfg),
                                 mesh, self.shardings, self.rules, microbatches)
    self.batch_sharding = parallel.data_sharding(mesh, self.rules)
    self.data_shards = parallel.batch_shards(mesh, self.rules)
    # A learner batch splits into whole minibatches of whole micro-batches on every shard.
    self.row_multiple = self.data_shards * cfg.num_minibatches * microbatches
    # The reference policy exists only when the KL term is on.
    self.ref_params = None
    if cfg.beta > 0:
      self.ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                out_shardings=self.shardings.params)(state.params)
    self._logp = jax.jit(self._token_logp, in_shardings=(self.shardings.params,
                                                         self.batch_sharding),
                         out_shardings=self.batch_sharding)
    self.ref_forwards = 0   # reference-model passes run (stays 0 with beta = 0)

  @classmethod
  def abstract_state(cls, model_cfg, opt_cfg, mesh, rules, seed: int = 0):
    """Shapes and shardings of the learner's state (for restoring a checkpoint)."""
    make_model = lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    return abstract_train_state(make_model, make_optimizer(opt_cfg), mesh, rules)[0]

  @property
  def params(self) -> nnx.State:
    """The current policy params, on device (use before the next `update` donates them)."""
    return self.state.params

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def _token_logp(self, params, batch):
    def logp(batch):
      model = nnx.merge(self.graphdef, params)
      hidden, _ = model(batch["inputs"], batch["positions"], batch["segments"],
                        return_hidden=True)
      return model.target_logprobs(hidden, batch["targets"])[0]

    # The whole learner batch, in pieces the size of one training micro-batch.
    k = self.cfg.num_minibatches * self.microbatches
    if k == 1:
      return logp(batch)
    rows = batch["inputs"].shape[0]
    micro = jax.lax.map(logp, split_microbatches(batch, k, self.mesh, self.rules))
    return jnp.moveaxis(micro, 0, 1).reshape(rows, -1)   # undo the strided split

  def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    rows = next(iter(batch.values())).shape[0]
    if rows % self.data_shards:
      raise ValueError(f"learner batch of {rows} rows is not divisible by the data-parallel "
                       f"size {self.data_shards}")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def update(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """`cfg.num_minibatches` optimizer steps on a `learner_batch`; returns the
    device metrics of the last one that ran, plus `empty_minibatches`.

    A minibatch without a trained token (all padding: a batch rounded up to
    whole minibatches, or dynamic sampling that kept few groups) is skipped:
    its gradient is zero, but AdamW would still apply weight decay and the
    momentum of earlier steps, moving the policy on no data.
    """
    k = self.cfg.num_minibatches
    rows = batch["inputs"].shape[0]
    if rows % k:
      raise ValueError(f"learner batch of {rows} rows does not split into num_minibatches={k}")
    size = rows // k
    tokens = np.asarray(batch["loss_mask"]).reshape(k, size, -1).sum(axis=(1, 2))
    live = [i for i in range(k) if tokens[i] > 0]
    skipped = {"empty_minibatches": float(k - len(live))}
    if not live:
      return skipped
    placed = self._place(batch)
    extra = {}
    with parallel.sharding_context(self.mesh, self.rules):
      if self.cfg.beta > 0:
        extra["ref_logp"] = self._logp(self.ref_params, placed)
        self.ref_forwards += 1
      if k > 1:
        extra["old_logp"] = self._logp(self.state.params, placed)
    if k == 1:
      self.state, metrics = self._step(self.state, {**placed, **extra})
      return {**metrics, **skipped}
    # Minibatches are cut on the host: the old log-probs are small ([B, T] floats).
    host = {**batch, **{n: np.asarray(jax.device_get(v)) for n, v in extra.items()}}
    for i in live:
      mini = {n: v[i * size:(i + 1) * size] for n, v in host.items()}
      self.state, metrics = self._step(self.state, self._place(mini))
    return {**metrics, **skipped}


def place_params(params: nnx.State, shardings) -> nnx.State:
  """Puts `params` on the learner's shardings after checking they fit the model."""
  got = jax.tree_util.tree_flatten_with_path(to_arrays(params))[0]
  want = jax.tree_util.tree_flatten_with_path(to_arrays(shardings))[0]
  if [p for p, _ in got] != [p for p, _ in want]:
    raise ValueError("initial params do not have this model's parameter tree: "
                     f"{sorted(map(jax.tree_util.keystr, {p for p, _ in got} ^ {p for p, _ in want}))}")
  # A copy (jit outputs never alias undonated inputs): the learner donates its
  # state, and the caller may still use `params`. device_put may alias a shard.
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(params)
