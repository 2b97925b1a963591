"""Logits -> the distribution a request samples from, and drawing from it.

Pure functions over [B, ..., V] arrays with one row per request, so every row
of a batch can carry its own temperature, top-k, top-p and seed.

The sampling distribution of a row is built in this order (as in transformers
and vLLM):
  1. temperature: logits / T; T = 0 means greedy (a point mass on the argmax);
  2. top-k: keep the k largest logits (k = 0: off). Ties with the k-th value
     are kept too, so a row may keep slightly more than k tokens;
  3. top-p (nucleus): keep the smallest set of most likely tokens whose mass
     reaches p (p = 1: off); at least one token is always kept;
  4. renormalise.
`sampling_logprobs` returns log-probabilities of that distribution (-inf off
its support). `policy_logprobs` are the log-probabilities of the raw model at
temperature 1, which is what a GRPO trainer recomputes.

Randomness is counter based: the uniform for a row's token at RoPE position
`p` is drawn from fold_in(fold_in(key(seed), p), stream). A row's samples
therefore depend only on its seed and positions, not on the batch it shares,
the bucket it was padded to, or how the generation was chunked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

# Independent random streams for the draws made at one position.
SAMPLE, DRAFT, ACCEPT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Features:
  """What some row of the batch uses: static, so that unused work is not compiled.

  sample: some row has temperature > 0 (else every row is greedy).
  top_k:  static bound for `lax.top_k` (0: no row uses top-k).
  top_p:  some row has top_p < 1.
  """

  sample: bool = False
  top_k: int = 0
  top_p: bool = False


@struct.dataclass
class RowParams:
  """Per-row sampling knobs, [B] each."""

  temperature: jax.Array  # float32; 0 = greedy
  top_k: jax.Array        # int32; 0 = off
  top_p: jax.Array        # float32; 1 = off
  seed: jax.Array         # uint32


def argmax(x: jax.Array) -> jax.Array:
  """First index of the largest entry along the last axis, int32 (as jnp.argmax).

  A max, then a min over the indices that reach it: two plain reductions,
  which XLA:CPU vectorises, where jnp.argmax is one (value, index) reduction
  that it does not (about 3x slower on [16, 8192] logits).
  """
  n = x.shape[-1]
  top = jnp.max(x, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(x == top, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
  return jnp.minimum(first, n - 1)  # NaN rows: no entry equals the max


def sampling_logprobs(logits: jax.Array, rows: RowParams, features: Features) -> jax.Array:
  """Log-probs [B, ..., V] of each row's sampling distribution (-inf off its support).

  Greedy rows get a point mass: 0 at the argmax of `logits`, -inf elsewhere.
  """
  shape = logits.shape
  x = logits.reshape(shape[0], -1, shape[-1]).astype(jnp.float32)  # [B, T, V]
  greedy_mass = jnp.where(
      jax.nn.one_hot(argmax(x), shape[-1], dtype=jnp.bool_), 0.0, -jnp.inf)
  if not features.sample:
    return greedy_mass.reshape(shape)
  temperature = rows.temperature[:, None, None]
  greedy = temperature <= 0
  # Shift first, so the top logit is exactly 0 at any temperature: with gaps / T past
  # float32's integers (T ~1e-8), fusions would round x / T and its max apart.
  x = (x - jnp.max(x, axis=-1, keepdims=True)) / jnp.where(greedy, 1.0, temperature)
  if features.top_k:
    top = jax.lax.top_k(x, min(features.top_k, shape[-1]))[0]  # [B, T, K], descending
    k = jnp.clip(rows.top_k, 1, top.shape[-1])[:, None, None]
    kth = jnp.take_along_axis(top, jnp.broadcast_to(k - 1, top.shape[:-1] + (1,)), axis=-1)
    x = jnp.where((rows.top_k[:, None, None] > 0) & (x < kth), -jnp.inf, x)
  if features.top_p:
    desc = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < rows.top_p[:, None, None], axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(desc, jnp.maximum(kept, 1) - 1, axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  logp = jax.nn.log_softmax(x, axis=-1)
  return jnp.where(greedy, greedy_mass, logp).reshape(shape)


def uniforms(seeds: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
  """U[0, 1) per row (and per position): seeds [B], positions [B, ...]."""
  def one(seed, pos):
    key = jax.random.fold_in(jax.random.key(seed), pos)
    return jax.random.uniform(jax.random.fold_in(key, stream))

  per_row = jax.vmap(one)
  for _ in range(positions.ndim - 1):
    per_row = jax.vmap(per_row, in_axes=(None, 1), out_axes=1)
  return per_row(seeds, positions)


def draw(logp: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF sample from log-probs [..., V] with uniforms u [...] in [0, 1).

  One uniform per draw (not one Gumbel per vocabulary entry) keeps sampling
  cheap at large vocabularies. `1 - u` lies in (0, 1], so a token of zero
  probability is never drawn.
  """
  cdf = jnp.cumsum(jnp.exp(logp), axis=-1)
  target = (1.0 - u)[..., None] * cdf[..., -1:]
  token = jnp.sum(cdf < target, axis=-1)
  return jnp.minimum(token, logp.shape[-1] - 1).astype(jnp.int32)


def token_logprob(logp: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def policy_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits)[token]: the raw model at temperature 1."""
  logits = logits.astype(jnp.float32)
  return token_logprob(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)


def sample(logits: jax.Array, rows: RowParams, features: Features, positions: jax.Array,
           stream: int = SAMPLE):
  """One token per row from logits [B, V].

  Returns (tokens [B], sampling log-probs [B], policy log-probs [B], the
  sampling distribution's log-probs [B, V]).
  """
  if not features.sample:  # all greedy: skip building the distribution
    tokens = argmax(logits)
    return tokens, jnp.zeros(tokens.shape, jnp.float32), policy_logprobs(logits, tokens), None
  logp = sampling_logprobs(logits, rows, features)
  tokens = draw(logp, uniforms(rows.seed, positions, stream))
  return tokens, token_logprob(logp, tokens), policy_logprobs(logits, tokens), logp
