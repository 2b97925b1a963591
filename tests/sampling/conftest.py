"""Shared by the sampling tests: models built with one jitted init per shape."""

import functools

import jax
import pytest
from flax import nnx

from m2.model import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _init_state(cfg, seed):
  # A traced seed: one compile per config, not per seed.
  return nnx.state(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed))))


def init_model(cfg, seed=0) -> Transformer:
  """Transformer(cfg, rngs=nnx.Rngs(seed)), without eager op-by-op compiles."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, _init_state(cfg, seed))


@pytest.fixture(scope="session")
def make_transformer():
  return init_model
