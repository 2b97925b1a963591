"""The generic sharded train loop (LM pretraining / mid-training / SFT).

`train` owns a stage directory: it resumes from the last checkpoint there
(params, optimizer, step, RNG and data iterator), trains to `cfg.steps`, logs
metrics, and saves every `save_every` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from m2 import parallel
from m2.model import ModelConfig, Transformer
from m2.train.checkpoint import Checkpointer, to_arrays
from m2.train.metrics import MetricsWriter, read_metrics
from m2.train.optimizer import OptimizerConfig, make_optimizer, schedule
from m2.train.state import (abstract_train_state, init_train_state, lm_loss, make_train_step,
                            split_microbatches)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 100
  batch_size: int = 8
  seq_len: int = 256
  log_every: int = 10
  save_every: int = 50
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  seed: int = 0
  eval_every: int = 0      # held-out loss every N steps (and at the start); 0: never
  eval_batches: int = 8    # the same first N batches of `eval_dataset` every time
  # Each step's batch runs as this many sequential micro-batches, their gradients
  # summed before the one update (`m2.train.state.make_train_step`): the same update
  # in 1/k of the activation memory. batch_size must divide by k x the data shards.
  microbatches: int = 1
  optimizer: OptimizerConfig = OptimizerConfig()

  def __post_init__(self):
    for f in ("steps", "batch_size", "seq_len", "log_every", "save_every", "keep_checkpoints",
              "eval_batches", "microbatches"):
      v = getattr(self, f)
      if not (isinstance(v, int) and v > 0):
        raise ValueError(f"TrainConfig.{f}: must be a positive int (got {v!r})")
    if not (isinstance(self.eval_every, int) and self.eval_every >= 0):
      raise ValueError(f"TrainConfig.eval_every: must be an int >= 0 (got {self.eval_every!r})")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: tuple[int, ...] = (1, -1, 1)
  axes: tuple[str, ...] = parallel.MESH_AXES
  rules: tuple[tuple[str, Any], ...] = parallel.DEFAULT_RULES
  # How the samplers shard the weights (e.g. `parallel.DECODE_RULES`); None: `rules`.
  # The policy's weights are resharded to them once per generation call.
  rollout_rules: tuple[tuple[str, Any], ...] | None = None

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"MeshConfig.shape {self.shape} must have one entry per axis {self.axes}")
    parallel.check_rules(self.rules, self.axes)
    if self.rollout_rules is not None:
      parallel.check_rules(self.rollout_rules, self.axes)

  @property
  def sampler_rules(self) -> tuple[tuple[str, Any], ...]:
    return self.rollout_rules or self.rules

  def make(self):
    return parallel.make_mesh(self.shape, self.axes)


@dataclasses.dataclass
class TrainResult:
  state: Any
  graphdef: nnx.GraphDef
  steps_run: int
  resumed_from: int | None
  final_metrics: dict[str, float]
  wall_s: float


def train(model_cfg: ModelConfig, cfg: TrainConfig, mesh_cfg: MeshConfig, dataset,
          workdir: str, *, loss_fn=lm_loss, init_params: nnx.State | None = None,
          meta: dict | None = None, eval_dataset=None,
          on_step: Callable[[int, dict], None] | None = None,
          make_model: Callable[[], nnx.Module] | None = None) -> TrainResult:
  """Trains from `dataset` (a grain IterDataset of numpy batches) in `workdir`.

  On several hosts, each process's `dataset` yields its own
  `batch_size // jax.process_count()` rows.

  `init_params` seeds a fresh run (e.g. the previous stage's weights or an HF
  import); a run with checkpoints in `workdir` always resumes from them.
  `make_model` builds another module to train than `Transformer(model_cfg)`
  (e.g. an EAGLE draft head; `loss_fn` then takes that module).

  With `eval_dataset` (batches like `dataset`'s, never trained on) and
  `cfg.eval_every`, the token-weighted `loss_fn` over its first
  `cfg.eval_batches` batches is logged as `eval_loss` at step 0, every
  `eval_every` steps and at the end.
  """
  start = time.time()
  mesh = mesh_cfg.make()
  rules = mesh_cfg.rules
  data_parallel = parallel.batch_shards(mesh, rules)
  if cfg.batch_size % (data_parallel * cfg.microbatches):
    raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by the "
                     f"data-parallel size {data_parallel} of mesh {dict(mesh.shape)} times "
                     f"microbatches={cfg.microbatches}")
  tx = make_optimizer(cfg.optimizer)
  lr_schedule = schedule(cfg.optimizer)
  make_model = make_model or (lambda: Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed)))
  meta = {"model": dataclasses.asdict(model_cfg), **(meta or {})}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                      async_save=cfg.async_checkpoints)
  iterator = iter(dataset)

  resumed_from = ckpt.latest_step()
  graphdef = nnx.split(nnx.eval_shape(make_model))[0]
  if resumed_from is not None:
    abstract, shardings = abstract_train_state(make_model, tx, mesh, rules)
    state, data_state = ckpt.restore(abstract, resumed_from, meta=meta)
    if data_state.get("iterator"):
      iterator.set_state(data_state["iterator"])
    log.info("resuming %s from step %d", workdir, resumed_from)
  else:
    graphdef, state, shardings = init_train_state(make_model, tx, mesh, rules, cfg.seed)
    if init_params is not None:
      state = state.replace(params=_place(init_params, state.params, shardings.params))

  step_fn = make_train_step(graphdef, tx, loss_fn, mesh, shardings, rules, cfg.microbatches)
  batch_sharding = parallel.data_sharding(mesh, rules)
  evaluate = None
  if eval_dataset is not None and cfg.eval_every:
    evaluate = _make_eval(graphdef, loss_fn, mesh, rules, shardings.params, batch_sharding,
                          eval_dataset, cfg.eval_batches, cfg.microbatches)
  writer = MetricsWriter(workdir, resume_step=resumed_from)
  step = int(jax.device_get(state.step))
  if evaluate is not None and step == 0:
    writer.write(0, {"eval_loss": evaluate(state.params)})
  first = step
  final: dict[str, float] = {}
  # Shown also when stderr is not a terminal (`| tee run.log`, batch jobs): the bar is
  # the stage's progress report.
  bar = tqdm(total=cfg.steps, initial=step, desc=os.path.basename(workdir) or "train",
             dynamic_ncols=True, disable=False)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  last_log, eval_s = (time.time(), step), 0.0
  try:
    while step < cfg.steps:
      batch = next(iterator)
      rows = len(batch["inputs"]) * jax.process_count()
      if rows != cfg.batch_size:   # else tokens/s, and the schedule's meaning, are off
        raise ValueError(f"the dataset's batches have {rows} rows (all hosts); "
                         f"TrainConfig.batch_size is {cfg.batch_size}")
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
               for k, v in batch.items()}
      state, metrics = step_fn(state, batch)
      step += 1
      logged = {}
      if step % cfg.log_every == 0 or step == cfg.steps:
        logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
        logged["learning_rate"] = float(lr_schedule(step - 1))  # the rate this step used
      if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
        eval_start = time.time()
        logged["eval_loss"] = evaluate(state.params)
        eval_s += time.time() - eval_start
      if "loss" in logged:
        now = time.time()   # tokens/s counts training time only, not evaluation
        logged["tokens_per_s"] = (tokens_per_step * (step - last_log[1])
                                  / max(now - last_log[0] - eval_s, 1e-9))
        last_log, eval_s = (now, step), 0.0
      if logged:
        final.update(logged)
        writer.write(step, logged)
        bar.set_postfix({k: f"{v:.3f}" for k, v in logged.items() if k in ("loss", "eval_loss")})
        if on_step is not None:
          on_step(step, logged)
      if step % cfg.save_every == 0 or step == cfg.steps:
        ckpt.save(step, state, {"iterator": iterator.get_state()}, meta, force=True)
      bar.update(1)
  finally:
    bar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()
  if not final:
    final = _last_logged(workdir)
  return TrainResult(state=state, graphdef=graphdef, steps_run=step - first,
                     resumed_from=resumed_from, final_metrics=final,
                     wall_s=time.time() - start)


def _make_eval(graphdef, loss_fn, mesh, rules, param_shardings, batch_sharding, dataset,
               num_batches: int, microbatches: int = 1) -> Callable[[nnx.State], float]:
  """`evaluate(params) -> loss` over the first `num_batches` batches of `dataset`,
  weighted by the loss's "weight" (a token-mean loss stays a token mean); each
  batch runs as `microbatches` sequential pieces, as in training."""
  batches = []
  for batch in dataset:
    batches.append({k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                    for k, v in batch.items()})
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError("eval_dataset yielded no batches")
  if len(batches) < num_batches:
    log.warning("eval_dataset has %d batches, fewer than eval_batches=%d", len(batches),
                num_batches)

  def weighted(params, batch):
    loss, aux = loss_fn(nnx.merge(graphdef, params), batch)
    weight = aux.get("weight", 1.0)
    return jnp.stack([loss * weight, weight])

  def total(params, batch):
    if microbatches == 1:
      return weighted(params, batch)
    micro = split_microbatches(batch, microbatches, mesh, rules)
    return jax.lax.map(functools.partial(weighted, params), micro).sum(axis=0)

  jitted = jax.jit(total, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=parallel.replicated(mesh))

  def evaluate(params) -> float:
    with parallel.sharding_context(mesh, rules):
      sums = [jitted(params, b) for b in batches]
    loss, weight = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    return float(loss / max(weight, 1e-9))

  return evaluate


def _place(params: nnx.State, like: nnx.State, shardings) -> nnx.State:
  """Puts `params` on the run's shardings after checking they fit the model (`like`)."""
  got = jax.tree_util.tree_flatten_with_path(to_arrays(params))[0]
  want = jax.tree_util.tree_flatten_with_path(to_arrays(like))[0]
  if [p for p, _ in got] != [p for p, _ in want]:
    raise ValueError("initial params do not have this model's parameter tree: "
                     f"{sorted(map(jax.tree_util.keystr, {p for p, _ in got} ^ {p for p, _ in want}))}")
  wrong = [f"{jax.tree_util.keystr(p)}: got {tuple(a.shape)}, the model has {tuple(b.shape)}"
           for (p, a), (_, b) in zip(got, want) if tuple(a.shape) != tuple(b.shape)]
  if wrong:
    raise ValueError(f"initial params do not fit this model: {'; '.join(wrong[:8])}")
  return jax.tree.map(lambda s, p: jax.device_put(p, s), shardings, params)


def _last_logged(workdir: str) -> dict[str, float]:
  rows = read_metrics(workdir)
  return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def restore_params(workdir: str, model_cfg: ModelConfig, cfg: TrainConfig,
                   mesh_cfg: MeshConfig, tokenizer: str | None = None) -> nnx.State:
  """The parameters of the last checkpoint a `train` run left in `workdir`, refused
  when it was trained as another model or (if given) with another tokenizer. The
  next stage may quantize what this one trained dense."""
  mesh = mesh_cfg.make()
  tx = make_optimizer(cfg.optimizer)
  make_model = lambda: Transformer(model_cfg, rngs=nnx.Rngs(cfg.seed))  # noqa: E731
  abstract, _ = abstract_train_state(make_model, tx, mesh, mesh_cfg.rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    meta = {"model": dataclasses.asdict(model_cfg),
            **({"tokenizer": tokenizer} if tokenizer is not None else {})}
    state, _ = ckpt.restore(abstract, meta=meta, may_change=("model.quant",))
  finally:
    ckpt.close()
  return state.params
