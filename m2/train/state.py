"""Train state and the jitted, sharded train step."""

from __future__ import annotations

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
                    mesh: Mesh, state_shardings, rules=parallel.DEFAULT_RULES):
  """Returns `step(state, batch) -> (state, metrics)`, jitted with explicit shardings.

  The state is donated, so its buffers are reused for the updated state.
  """
  def step(state: TrainState, batch):
    def loss(params):
      return loss_fn(nnx.merge(graphdef, params), batch)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
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


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array]):
  """Token-mean next-token cross entropy over `loss_mask`.

  batch: inputs, targets, positions, segments, loss_mask — all [B, T].
  """
  hidden, _ = model(batch["inputs"], batch["positions"], batch["segments"], return_hidden=True)
  nll = -model.target_logprobs(hidden, batch["targets"])[0]
  mask = batch["loss_mask"].astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  loss = (nll * mask).sum() / tokens
  return loss, {"tokens": mask.sum()}
