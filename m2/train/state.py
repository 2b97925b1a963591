"""Train state and the jitted, sharded train step."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from m2 import parallel

LossFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator position."""

  step: jax.Array
  params: nnx.State
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, so checkpoints hold a plain array

  @classmethod
  def create(cls, params: nnx.State, tx: optax.GradientTransformation, seed: int = 0):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               rng=jax.random.PRNGKey(seed))


def init_train_state(make_model, tx, mesh: Mesh, rules=parallel.DEFAULT_RULES, seed: int = 0):
  """Builds (graphdef, TrainState, shardings) with every array born sharded."""
  def make():
    return TrainState.create(nnx.split(make_model())[1], tx, seed)

  graphdef = nnx.split(nnx.eval_shape(make_model))[0]
  shardings = parallel.state_shardings(jax.eval_shape(make), mesh, rules)
  with parallel.sharding_context(mesh, rules):
    state = jax.jit(make, out_shardings=shardings)()
  return graphdef, state, shardings


def abstract_train_state(make_model, tx, mesh: Mesh, rules=parallel.DEFAULT_RULES):
  """Shapes, dtypes and shardings of the train state, with nothing allocated."""
  def make():
    return TrainState.create(nnx.split(make_model())[1], tx)

  abstract = jax.eval_shape(make)
  shardings = parallel.state_shardings(abstract, mesh, rules)
  def with_sharding(a, s):
    value = a.get_value() if isinstance(a, nnx.Variable) else a
    value = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s)
    return a.replace(value) if isinstance(a, nnx.Variable) else value

  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  return jax.tree.map(with_sharding, abstract, shardings, is_leaf=is_var), shardings


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    mesh: Mesh, state_shardings, rules=parallel.DEFAULT_RULES,
                    microbatches: int = 1):
  """Returns `step(state, batch) -> (state, metrics)`, jitted with explicit shardings.

  The state is donated, so its buffers are reused for the updated state. With
  `microbatches` k > 1 the batch's rows run as k sequential micro-batches
  (`split_microbatches`) whose gradients are summed in fp32 before the one
  optimizer update: activation memory falls k-fold and the update is the
  full batch's (see `accumulate`).
  """
  def grads_of(params, batch):
    def loss(params):
      return loss_fn(nnx.merge(graphdef, params), batch)
    return jax.value_and_grad(loss, has_aux=True)(params)

  def step(state: TrainState, batch):
    if microbatches == 1:
      (value, aux), grads = grads_of(state.params, batch)
    else:
      (value, aux), grads = accumulate(functools.partial(grads_of, state.params),
                                       split_microbatches(batch, microbatches, mesh, rules))
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    aux.pop("weight", None)   # how micro-batches combine, not a metric
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads), **aux}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                        rng=jax.random.fold_in(state.rng, state.step))
    return new, metrics

  batch_sharding = parallel.data_sharding(mesh, rules)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=0)

  def run(state, batch):
    with parallel.sharding_context(mesh, rules):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def split_microbatches(batch: dict[str, jax.Array], k: int, mesh: Mesh,
                       rules=parallel.DEFAULT_RULES) -> dict[str, jax.Array]:
  """[B, ...] arrays -> [k, B / k, ...]; micro-batch i holds rows i, i + k, i + 2k, ...

  Strided, not contiguous: each device's rows split into k local groups, so every
  micro-batch is spread over all data shards and the split moves no data.
  """
  rows = next(iter(batch.values())).shape[0]
  shards = parallel.batch_shards(mesh, rules)
  if rows % (k * shards):
    raise ValueError(f"a batch of {rows} rows does not split into {k} micro-batches over "
                     f"{shards} data shards: rows must be a multiple of {k * shards}")
  def split(x):
    x = jnp.moveaxis(x.reshape(rows // k, k, *x.shape[1:]), 1, 0)
    return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return {name: split(x) for name, x in batch.items()}


def accumulate(grads_of, micro: dict[str, jax.Array]):
  """((loss, aux), grads) of a batch from its micro-batches `micro` ([k, ...] each).

  `grads_of(batch) -> ((loss, aux), grads)` must report `aux["weight"]`, what its
  loss is a mean over (tokens for a token mean, sequences for a sequence mean).
  Gradients and losses are then combined as sum(weight_i * x_i) / sum(weight_i),
  which is the full batch's value for any such mean. Metrics are combined the
  same way, except that `weight` and `tokens` add up and `*_max` / `*_min`
  take the max / min.
  """
  def body(carry, batch):
    (value, aux), grads = grads_of(batch)
    if "weight" not in aux:
      raise ValueError("microbatches > 1 needs the loss_fn to report aux['weight'], the "
                       "count its loss is a mean over (e.g. tokens)")
    w = aux["weight"].astype(jnp.float32)
    g_sum, totals = carry
    g_sum = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), g_sum, grads)
    totals = {k: _combine(k, totals[k], v.astype(jnp.float32), w)
              for k, v in {**aux, "loss": value}.items()}
    return (g_sum, totals), None

  first = jax.tree.map(lambda x: x[0], micro)
  (_, aux_shape), grads_shape = jax.eval_shape(grads_of, first)
  zeros = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), grads_shape)
  init = {k: jnp.asarray(_IDENTITY.get(_kind(k), 0.0), jnp.float32) for k in [*aux_shape, "loss"]}
  (g_sum, totals), _ = jax.lax.scan(body, (zeros, init), micro)
  total_weight = totals["weight"]
  scale = jnp.where(total_weight > 0, 1.0 / jnp.maximum(total_weight, 1e-30), 0.0)
  grads = jax.tree.map(lambda g: g * scale, g_sum)
  totals = {k: v * scale if _kind(k) == "mean" else v for k, v in totals.items()}
  return (totals.pop("loss"), totals), grads


_IDENTITY = {"max": -jnp.inf, "min": jnp.inf}


def _kind(name: str) -> str:
  if name in ("weight", "tokens"):
    return "sum"
  return next((k for k in ("max", "min") if name.endswith("_" + k)), "mean")


def _combine(name: str, total, value, weight):
  kind = _kind(name)
  if kind == "sum":
    return total + value
  if kind == "max":
    return jnp.maximum(total, value)
  if kind == "min":
    return jnp.minimum(total, value)
  return total + weight * value


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array]):
  """Token-mean next-token cross entropy over `loss_mask` (its `weight`: the tokens).

  batch: inputs, targets, positions, segments, loss_mask — all [B, T].
  """
  hidden, _ = model(batch["inputs"], batch["positions"], batch["segments"], return_hidden=True)
  nll = -model.target_logprobs(hidden, batch["targets"])[0]
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  loss = (nll * mask).sum() / tokens
  return loss, {"tokens": mask.sum(), "weight": mask.sum()}
