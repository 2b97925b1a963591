"""Shared by the verifier tests: shipped cases and one tiny random model role."""

import functools

import jax
import pytest
from flax import nnx

from m2.data.loaders import load_agentclinic, load_mediq
from m2.data.tokenizers import ByteTokenizer
from m2.model import Transformer
from m2.model.config import ModelConfig
from m2.sampling import Sampler, SamplingParams
from m2.verifier.backend import ModelRole


@pytest.fixture(scope="session")
def agentclinic_cases():
  return load_agentclinic(splits=("medqa",))[0]


@pytest.fixture(scope="session")
def mediq_cases():
  return load_mediq(policy="skip", splits=("craft_md",))[0]


@functools.partial(jax.jit, static_argnums=0)
def _init_state(cfg, seed):
  return nnx.state(Transformer(cfg, rngs=nnx.Rngs(jax.random.key(seed))))


@pytest.fixture(scope="session")
def tiny_role():
  """A random 1-layer model over bytes: whatever it says is invented."""
  tok = ByteTokenizer()
  cfg = ModelConfig(vocab_size=tok.vocab_size, num_layers=1, embed_dim=32, num_heads=2,
                    num_kv_heads=1, head_dim=16, mlp_dim=64, max_position_embeddings=1024)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, _init_state(cfg, 0))
  sampler = Sampler(model)
  return ModelRole(sampler, nnx.state(model), tok, name="tiny",
                   sampling=SamplingParams(temperature=1.0, max_new_tokens=24),
                   max_prompt_tokens=128)
