"""Exact speculative decoding (Leviathan et al. 2023, arXiv 2211.17192; Chen et al. 2023,
arXiv 2302.01318).

Each round, per row:
  1. the drafter proposes k tokens d_1..d_k, sampled from its distributions q_i;
  2. the target scores [cur, d_1..d_k] in one forward pass with the cache,
     giving its distributions p_1..p_{k+1};
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), left to right,
     until the first rejection; say n are accepted;
  4. one more token: from norm(max(0, p_{n+1} - q_{n+1})) after a rejection,
     or from p_{k+1} (the "bonus" token) when all k were accepted.
The tokens a row keeps are distributed exactly as if the target had sampled
them one at a time. p and q are the *sampling* distributions of the request
(temperature, top-k, top-p applied to both), so this holds for every request
option; greedy rows are point masses, and the rule reduces to "accept while
the draft equals the target's argmax" (an all-greedy batch runs just that,
without building the [B, k, V] distributions or drawing uniforms). Where p
and q are so close that the residual has mass below 1e-6 (a rejection that
rare almost never happens), the correction is drawn from p itself.

Batches: rows accept different numbers of tokens, but the cache has one write
index. Every row writes its k + 1 verified slots, the index then advances by
the largest count any row kept, and each row drops the slots it did not keep
(segment 0, see `cache_ops`). A batch of one therefore rolls back exactly;
larger batches leave holes, which `Sampler.generate` squeezes out when the
cache runs short. The cache is sized for prompt + max_new_tokens + k + 1.

The drafter is any `Drafter`: `ModelDrafter` wraps a small m2 Transformer
sharing the tokenizer; `m2.sampling.eagle.EagleDrafter` is an EAGLE-style head
(Li et al. 2024, arXiv 2401.15077; Baichuan-M2 ships an EAGLE-3 head) that
drafts from the target's final hidden states, which the interface hands over
at prefill and after each verification.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from m2 import parallel
from m2.model.config import ModelConfig
from m2.sampling import cache_ops, processing
from m2.sampling.forward import make_forward
from m2.sampling.processing import Features
from m2.sampling.sampler import Sampler, SamplerOutput, _emit, _Loop, check_param_tree

# Residual mass under which the correction token is drawn from p itself.
_MIN_RESIDUAL = 1e-6

# sample(logits [B, V], i) -> (tokens [B], sampling log-probs [B, V]) for draft token i;
# [B, 0] instead when every row is greedy (the acceptance rule then needs the tokens only).
SampleFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class Drafter(abc.ABC):
  """Proposes draft tokens. All methods run inside the sampler's jit.

  The drafter's state is any pytree. If it keeps a KV cache, that cache shares
  the target cache's slot layout: the same tokens go to the same slots, and
  `commit` / `relayout` hand over the target's validity after each change.
  """

  vocab_size: int

  def check_target(self, cfg: ModelConfig) -> None:
    """Raises unless this drafter can draft for a target of config `cfg`."""
    if self.vocab_size != cfg.vocab_size:
      raise ValueError(f"the draft vocabulary ({self.vocab_size}) differs from the "
                       f"target's ({cfg.vocab_size}); speculative decoding needs the "
                       f"same tokenizer")

  def check_params(self, params):
    """Validates the drafter's parameters on the host, before anything compiles."""
    return params

  def load(self, params) -> Any:
    """On the host, on the checked (and placed) parameters, before each call: what
    `prepare` gets."""
    return params

  def prepare(self, params, target: nnx.Module) -> Any:
    """Inside jit, once per call before the decode loop; the other methods get
    the result as `params`. target: the target Transformer with its weights
    (an EAGLE head reads its embedding and LM head)."""
    return params

  @abc.abstractmethod
  def init(self, batch: int, cache_length: int) -> Any:
    """The empty state for a batch (inside jit)."""

  @abc.abstractmethod
  def prefill(self, params, state, tokens, positions, segments, hidden) -> Any:
    """Reads a chunk [B, T] written at the target cache's index.

    hidden: the target's final hidden states of the chunk [B, T, E].
    """

  @abc.abstractmethod
  def propose(self, params, state, token, position, segment, num_tokens: int,
              sample: SampleFn) -> tuple[Any, jax.Array, jax.Array]:
    """Drafts `num_tokens` tokens after `token` [B] (at `position` [B]).

    The target then writes [token, drafts] at slots [index, index + k + 1).
    segment [B] is 0 for rows that are done. Returns (state, draft tokens
    [B, k], their sampling log-probs [B, k, V]), drawing each token with
    `sample(logits, i)`.
    """

  @abc.abstractmethod
  def commit(self, params, state, segments, index, hidden, kept, tokens, positions) -> Any:
    """After verification: adopt the target cache's segments [B, S] and index.

    tokens: the k + 1 verified tokens [cur, d_1..d_k], [B, k + 1], at positions
            [B, k + 1]; the target wrote them at the index `propose` started from.
    hidden: the target's final hidden states after each of them, [B, k + 1, E].
    kept:   [B] tokens each row kept this round (0 for finished rows). The row's
            cache now ends with cur, d_1..d_{kept-1}; its new pending token was
            predicted from hidden[:, kept - 1].
    """

  @abc.abstractmethod
  def relayout(self, state, segments, index, order=None) -> Any:
    """The target cache's slots changed outside a round: adopt its segments [B, S]
    and index. `order` [B, S] (from `cache_ops.compaction_order`) moves the slots
    when the cache was compacted; None when slots were only dropped."""


class ModelDrafter(Drafter):
  """A small m2 Transformer with the target's vocabulary as the draft model.

  It feeds [cur, d_1..d_k] into its own cache, one token at a time (the last
  only to write d_k's keys, without the LM head), so that its cache holds
  exactly the slots the target's does. `layers` as for `Sampler`.
  """

  def __init__(self, model: nnx.Module, *, layers: str = "auto"):
    if not isinstance(getattr(model, "cfg", None), ModelConfig):
      raise TypeError(f"ModelDrafter needs an m2 Transformer, got {type(model).__name__}")
    self.cfg: ModelConfig = model.cfg
    self.vocab_size = self.cfg.vocab_size
    self.graphdef, abstract = nnx.split(model)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    self.forward = make_forward(self.graphdef, self.cfg, layers)

  def check_params(self, params):
    if isinstance(params, nnx.Module):
      params = nnx.state(params)
    check_param_tree(params, self._abstract, "draft_params")
    return params

  def load(self, params):
    return self.forward.load(params)

  def prepare(self, params, target):
    return self.forward.prepare(params)

  def init(self, batch, cache_length):
    return self.forward.init_cache(batch, cache_length)

  def prefill(self, ctx, cache, tokens, positions, segments, hidden):
    return self.forward(ctx, tokens, positions, segments, cache)[1]

  def propose(self, ctx, cache, token, position, segment, num_tokens, sample):
    seg = segment[:, None]

    def step(carry, i):
      cache, x = carry
      h, cache = self.forward(ctx, x[:, None], (position + i)[:, None], seg, cache)
      d, lq = sample(self.forward.logits(ctx, h)[:, 0], i)
      return (cache, d), (d, lq)

    (cache, last), (drafts, logq) = jax.lax.scan(step, (cache, token), jnp.arange(num_tokens))
    # d_k's keys too (no LM head), so that a fully accepted round leaves no gap.
    cache = self.forward(ctx, last[:, None], (position + num_tokens)[:, None], seg, cache)[1]
    return cache, drafts.T, jnp.swapaxes(logq, 0, 1)

  def commit(self, ctx, cache, segments, index, hidden, kept, tokens, positions):
    return cache.replace(segments=segments, index=index)

  def relayout(self, cache, segments, index, order=None):
    if order is None:
      return cache.replace(segments=segments, index=index)
    return cache_ops.reorder(cache, order, segments, index)


class SpeculativeSampler(Sampler):
  """`Sampler` whose decode step is a speculative round; same options and outputs.

  target:     the target Transformer (or its nnx.eval_shape).
  drafter:    a `Drafter`, e.g. `ModelDrafter(draft_model)`.
  num_draft_tokens: k, tokens proposed per round.
  Other keyword arguments as for `Sampler`.

  `generate(params, prompts, sampling, draft_params=...)` returns a
  `SamplerOutput` whose `stats` add `acceptance_rate` (accepted / proposed
  draft tokens), `accepted_per_round` (mean n) and `tokens_per_round` (mean
  tokens a row gains per round, n + 1 before stop/length cuts; the
  "acceptance length" of the EAGLE papers).
  """

  speculative = True
  _stat_names = ("proposed", "accepted", "rounds", "round_tokens")

  def __init__(self, target: nnx.Module, drafter: Drafter, *, num_draft_tokens: int = 4, **kw):
    if kw.get("max_rows"):   # its acceptance statistics do not add up over parts
      raise ValueError("SpeculativeSampler does not run batches in parts: leave max_rows 0")
    super().__init__(target, **kw)
    if not isinstance(drafter, Drafter):
      raise TypeError(f"drafter must be a Drafter (e.g. ModelDrafter(model)), got "
                      f"{type(drafter).__name__}")
    drafter.check_target(self.cfg)
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 1):
      raise ValueError(f"num_draft_tokens must be an int >= 1 (got {num_draft_tokens!r})")
    self.drafter = drafter
    self.num_draft_tokens = num_draft_tokens
    self.extra_slots = num_draft_tokens + 1

  def generate(self, params, prompts, sampling=None, *, draft_params, state=None,
               cache_length=None) -> SamplerOutput:
    """As `Sampler.generate`, with the drafter's parameters."""
    draft_params = self.drafter.check_params(draft_params)
    if self.mesh is not None:
      draft_params = jax.device_put(
          draft_params, parallel.state_shardings(draft_params, self.mesh, self.rules))
    with self._context():
      draft_params = self.drafter.load(draft_params)
    return self._generate((self._check_params(params), draft_params), prompts, sampling,
                          state, cache_length)

  # --- hooks ----------------------------------------------------------------------

  def _init_draft(self, batch, length):
    return self.drafter.init(batch, length)

  def _prepare(self, params):
    target, draft = params
    target = self.forward.prepare(target)
    return target, self.drafter.prepare(draft, self.forward.module(target))

  def _prefill(self, ctx, state, tokens, positions, segments):
    target, draft = ctx
    hidden, cache = self.forward(target, tokens, positions, segments, state.cache)
    draft_state = self.drafter.prefill(draft, state.draft, tokens, positions, segments, hidden)
    return (state.replace(cache=cache, draft=draft_state),
            self.forward.logits(target, hidden[:, -1:])[:, 0])

  def _can_continue(self, loop):
    return loop.state.cache.index + self.extra_slots <= loop.state.cache.max_length

  def _relayout_draft(self, draft, cache, order=None):
    return self.drafter.relayout(draft, cache.segments, cache.index, order)

  def _stats(self, stats):
    proposed, accepted = int(stats["proposed"].sum()), int(stats["accepted"].sum())
    rounds = int(stats["rounds"].sum())
    return {"rounds": int(stats["rounds"].max(initial=0)), "proposed": proposed,
            "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else float("nan"),
            "accepted_per_round": accepted / rounds if rounds else float("nan"),
            "tokens_per_round": int(stats["round_tokens"].sum()) / rounds if rounds
            else float("nan")}

  def _accept(self, logits, drafts, logq, rows, features, pos):
    """The rejection rule; returns (accepted count n [B], tokens [B, k + 1] whose first
    n + 1 are kept, their sampling log-probs)."""
    k = self.num_draft_tokens
    seeds = rows.seed
    logp = processing.sampling_logprobs(logits, rows, features)
    # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), up to the first rejection.
    p_d = jnp.exp(processing.token_logprob(logp[:, :k], drafts))
    q_d = jnp.exp(processing.token_logprob(logq, drafts))
    u = processing.uniforms(seeds, pos[:, None] + 1 + jnp.arange(k), processing.ACCEPT)
    accepted = u * q_d < p_d  # = u < p/q, without dividing by a tiny q
    n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # [B]

    # The token after the accepted ones: residual after a rejection, else the bonus.
    p_next = jnp.exp(jnp.take_along_axis(logp, n[:, None, None], axis=1)[:, 0])
    q_next = jnp.exp(jnp.take_along_axis(logq, jnp.minimum(n, k - 1)[:, None, None],
                                         axis=1)[:, 0])
    residual = jnp.maximum(p_next - jnp.where((n < k)[:, None], q_next, 0.0), 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    dist = jnp.where(mass > _MIN_RESIDUAL, residual / jnp.maximum(mass, 1e-30), p_next)
    u_next = processing.uniforms(seeds, pos + n + 1, processing.SAMPLE)
    nxt = processing.draw(jnp.log(dist), u_next)
    j = jnp.arange(k + 1)
    emitted = jnp.where(j < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
    return n, emitted, processing.token_logprob(logp, emitted)  # the kept tokens' law is p

  def _step(self, ctx, loop: _Loop, features: Features) -> _Loop:
    """One round: draft k, verify k + 1 in one target pass, accept, correct."""
    target, draft = ctx
    k = self.num_draft_tokens
    st = loop.state
    rows = loop.rows
    active = ~loop.done
    seg = active.astype(jnp.int32)
    pos, index = st.next_position, st.cache.index
    seeds = rows.seed

    def sample_draft(logits, i):
      if not features.sample:  # all greedy: the rule below needs the tokens only
        return processing.argmax(logits), jnp.zeros(logits.shape[:1] + (0,), jnp.float32)
      logq = processing.sampling_logprobs(logits, rows, features)
      u = processing.uniforms(seeds, pos + 1 + i, processing.DRAFT)
      return processing.draw(logq, u), logq

    draft_state, drafts, logq = self.drafter.propose(draft, st.draft, st.pending, pos, seg, k,
                                                     sample_draft)

    # Verify: the target scores cur and the k drafts in one pass.
    fed = jnp.concatenate([st.pending[:, None], drafts], axis=1)  # [B, k + 1]
    positions = pos[:, None] + jnp.arange(k + 1)
    segments = jnp.broadcast_to(seg[:, None], fed.shape)
    hidden, cache = self.forward(target, fed, positions, segments, st.cache)
    logits = self.forward.logits(target, hidden)  # [B, k + 1, V]
    if features.sample:
      n, emitted, lp = self._accept(logits, drafts, logq, rows, features, pos)
    else:  # the exact rule on point masses: keep drafts while they equal the target's argmax
      emitted = processing.argmax(logits)  # [B, k + 1]
      n = jnp.sum(jnp.cumprod((drafts == emitted[:, :k]).astype(jnp.int32), axis=1), axis=1)
      lp = jnp.zeros(emitted.shape, jnp.float32)
    plp = processing.policy_logprobs(logits, emitted)
    loop, kept = _emit(loop.replace(state=st.replace(cache=cache)), emitted, lp, plp,
                       jnp.where(active, n + 1, 0))

    # Keep cur and the kept tokens but the last (now pending); move the index.
    slot_positions = cache_ops.record_positions(st.slot_positions, positions, segments, index)
    new_index = index + jnp.max(kept)
    cache, slot_positions = cache_ops.drop_from(loop.state.cache, slot_positions, pos + kept,
                                                new_index)
    draft_state = self.drafter.commit(draft, draft_state, cache.segments, new_index, hidden, kept,
                                      fed, positions)
    stats = loop.stats
    stats = {"proposed": stats["proposed"] + k * active,
             "accepted": stats["accepted"] + jnp.where(active, n, 0),
             "rounds": stats["rounds"] + active,
             "round_tokens": stats["round_tokens"] + kept}
    st = loop.state.replace(cache=cache, slot_positions=slot_positions, draft=draft_state,
                            next_position=pos + kept)
    return loop.replace(state=st, stats=stats)


__all__ = ["Drafter", "ModelDrafter", "SpeculativeSampler"]
