"""The output head fused with the log-softmax of the taken tokens.

Training never needs the full log-softmax, only log p(target) and the entropy
per token. Written as plain ops, autodiff of log_softmax + take_along_axis
makes XLA transpose the [tokens, vocab] gradient and scatter into it; on CPU
that was about 40 % of the tiny model's train step. The custom VJP here
computes d(logits) in one elementwise pass from the saved logits, then the two
matmuls, all on [tokens, ...] matrices.

The output embedding is either the tied table [V, E] (`w_axes="ve"`) or an LM
head [E, V] ("ev"); it is used in place, never transposed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from m2 import parallel


def logits(h, w, w_axes: str):
  """fp32 logits [..., V] of hidden states h [..., E] (batch first)."""
  out = jnp.einsum(f"...e,{w_axes}->...v", h, w.astype(h.dtype),
                   preferred_element_type=jnp.float32)
  return parallel.constrain(out, ("batch",) + ("length",) * (h.ndim - 2) + ("vocab",))


def _stats(out, targets):
  lse = jax.nn.logsumexp(out, axis=-1)
  logp = jnp.take_along_axis(out, targets[:, None], axis=-1)[:, 0] - lse
  entropy = lse - jnp.sum(jnp.exp(out - lse[:, None]) * out, axis=-1)
  return logp, entropy, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _target_logprobs(h, w, targets, w_axes):
  logp, entropy, _ = _stats(logits(h, w, w_axes), targets)
  return logp, entropy


def _fwd(h, w, targets, w_axes):
  h, w, targets = h.value, w.value, targets.value
  out = logits(h, w, w_axes)
  logp, entropy, lse = _stats(out, targets)
  return (logp, entropy), (h, w, targets, out, lse, entropy)


def _bwd(w_axes, res, cotangents):
  h, w, targets, out, lse, entropy = res
  d_logp, d_entropy = cotangents
  logp_all = out - lse[:, None]
  probs = jnp.exp(logp_all)
  onehot = targets[:, None] == jnp.arange(out.shape[-1])[None, :]
  # d log p_t / d l = onehot - p;  d H / d l = -p (log p + H). Entropy that is only
  # logged has a symbolic-zero cotangent: its term is skipped, not multiplied by 0.
  d_logits = jnp.zeros_like(out)
  if not isinstance(d_logp, SymbolicZero):
    d_logits = d_logp[:, None] * (onehot - probs)
  if not isinstance(d_entropy, SymbolicZero):
    d_logits = d_logits - d_entropy[:, None] * probs * (logp_all + entropy[:, None])
  d_logits = d_logits.astype(h.dtype)
  d_h = jnp.einsum(f"nv,{w_axes}->ne", d_logits, w.astype(h.dtype))
  d_w = jnp.einsum(f"nv,ne->{w_axes}", d_logits, h).astype(w.dtype)
  return d_h, d_w, None


_target_logprobs.defvjp(_fwd, _bwd, symbolic_zeros=True)


def target_logprobs(hidden: jax.Array, w: jax.Array, targets: jax.Array, w_axes: str):
  """log p(targets) and entropy of the softmax of the logits, both fp32 [B, T].

  hidden: [B, T, E] final hidden states; w: the output embedding, [V, E]
  (w_axes="ve", a tied embedding table) or [E, V] ("ev", an LM head);
  targets: [B, T] int token ids.
  """
  b, t, e = hidden.shape
  logp, entropy = _target_logprobs(hidden.reshape(b * t, e), w, targets.reshape(b * t), w_axes)
  return logp.reshape(b, t), entropy.reshape(b, t)
