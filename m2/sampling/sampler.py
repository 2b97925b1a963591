"""The in-framework sampler: batched prefill, then a jitted decode loop over the KV cache.

One `Sampler` serves every role that generates (policy, patient simulator,
rubric generator, grader). It holds the model's graph definition only and
takes the parameters on every call, so RL swaps weights without recompiling:

    sampler = Sampler(model)                      # or Sampler.for_config(cfg)
    out = sampler.generate(params, [[1, 5, 9], [1, 7]],
                           SamplingParams(temperature=1.0, max_new_tokens=64))
    out.tokens, out.logprobs, out.finish_reasons
    # the next turn of the same conversations, without recomputing the cache:
    out2 = sampler.generate(params, [patient_turn_a, patient_turn_b], state=out.state)

A call is one jit: prefill of the left-padded prompts, then a
`lax.while_loop` that feeds one token per step and stops as soon as every row
is done. The cache is created inside (or donated, when continuing), so it is
updated in place. Recompiles are bounded by bucketing: the batch is padded to
a power of two (times the mesh's data-parallel size), the prompt chunk to a
power of two (multiples of 512 above 512), the cache to a multiple of 64; the
number of new tokens is a traced loop bound. Which sampling transforms are
compiled (`processing.Features`) is static, so an all-greedy batch pays
nothing for top-k/top-p. On CPU the layers run unrolled over per-layer
weights and caches (`forward.py` says why); elsewhere through the model's scan.

Stop strings need a detokenizer (`tokenizer=`, with `.decode(ids) -> str`).
They are checked on the host between chunks of `stop_check_every` decode
steps: matching text on device would need the tokenizer's byte-level merges
in JAX, and at most one chunk of tokens is wasted. Stop token ids are checked
on device, every step. The kept tokens end with the stop token, or with the
token that completed the stop string.

Cache layout: the batch shares the cache's write index (as in
`m2.model.KVCache`), so rows that finish early, or rows cut at a stop string,
leave empty slots (segment 0) that attention skips; RoPE uses per-row positions,
so holes do not shift anything. Slots fill from the front, and a step reads the
cache only as deep as the write index, rounded up to 256, 512, 1024, ... slots
(`m2.model.modules.cache_reads`): a cache sized for `max_new_tokens` costs about
what the text written so far does (a 2048-slot cache holding 160 tokens decodes
1.4x faster at batch 1 and 2.2x at 16 than reading it whole, on a 2-core CPU).
Continuing a conversation appends the next turn after the last written slot; the
last generated token of a row is not in the cache yet ("pending") and is fed
first. When the cache is too short for the next turn the holes are squeezed out
(`compact`); when that is not enough, the call fails before running and says how
much is needed: the way out is a new batch with the whole history as its prompt,
which recomputes it (experiments/bench/decode.py measures what continuing
saves).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from m2 import parallel
from m2.model.config import ModelConfig
from m2.model.transformer import Transformer
from m2.sampling import cache_ops, processing
from m2.sampling.forward import make_forward
from m2.sampling.processing import Features, RowParams

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"
_MIN_CHUNK = 16
_CACHE_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is sampled.

  temperature: 0 is greedy; otherwise logits / temperature.
  top_k:       keep the k most likely tokens (0: off).
  top_p:       nucleus sampling mass (1: off).
  max_new_tokens: tokens to generate at most (the stop token counts).
  stop_token_ids: end the row when one of these is generated (kept in the output).
  stop_strings: end the row when its generated text contains one of these;
               needs the Sampler's `tokenizer`.
  seed:        the row's random stream; None draws one from the Sampler's
               generator (so that rows of a GRPO group differ). A fixed seed
               gives the same tokens whatever batch the row is in.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 256
  stop_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  seed: int | None = None

  def __post_init__(self):
    if isinstance(self.stop_token_ids, int):   # one id, as stop_strings takes one string
      object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    if isinstance(self.stop_strings, str):
      object.__setattr__(self, "stop_strings", (self.stop_strings,))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"SamplingParams.{field}: {msg} (got {getattr(self, field)!r})")

    check(self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
    check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an int >= 0")
    check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
    check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
          "max_new_tokens", "must be an int >= 1")
    check(all(isinstance(s, str) and s for s in self.stop_strings), "stop_strings",
          "must be non-empty strings")
    check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**32),
          "seed", "must be None or an int in [0, 2**32)")


@struct.dataclass
class SamplerState:
  """A batch of conversations on device; what the next `generate` call appends to.

  cache:          the KV cache: a `KVCache`, or a `LayerCache` with unrolled layers
                  (donated by the next call: use each state once).
  slot_positions: [B, S] RoPE position of the token in each slot, -1 if empty.
  pending:        [B] the last generated token of each row, not yet in the cache.
  has_pending:    [B] whether the row has a pending token.
  next_position:  [B] the position the pending (or next) token gets.
  draft:          the drafter's state under speculative decoding, else None.
  num_rows:       conversations in the batch (the rest is bucket padding); static,
                  so jitted code sees it as 0 (it must not key a recompile).
  """

  cache: Any
  slot_positions: jax.Array
  pending: jax.Array
  has_pending: jax.Array
  next_position: jax.Array
  draft: Any = None
  num_rows: int = struct.field(pytree_node=False, default=0)


@struct.dataclass
class _Loop:
  """Everything the decode loop carries."""

  state: SamplerState
  rows: RowParams
  max_new: jax.Array          # [B]; 0 for rows that sit this call out
  stop_ids: jax.Array         # [B, M]; -1 pads
  done: jax.Array             # [B] bool
  stop_token: jax.Array       # [B] the stop token that ended the row, -1 if none
  num_tokens: jax.Array       # [B] tokens generated so far
  tokens: jax.Array           # [B, N]
  logprobs: jax.Array         # [B, N] under the sampling distribution
  policy_logprobs: jax.Array  # [B, N] under the model at temperature 1
  step: jax.Array             # decode steps (speculative: rounds) run so far
  stats: dict[str, jax.Array]  # [B] counters (speculative decoding)


@dataclasses.dataclass
class SamplerOutput:
  """Generated tokens of the real rows, padded to the longest.

  tokens:          [n, L] int32; entries past `lengths` are the pad id.
  logprobs:        [n, L] float32 log-prob of each token under the distribution
                   it was sampled from (after temperature, top-k, top-p; 0.0 for
                   greedy rows, a point mass). The behaviour policy for
                   importance ratios when sampling with modified distributions.
  policy_logprobs: [n, L] float32 log-prob under the unmodified model at
                   temperature 1 (what a GRPO trainer recomputes from logits).
  lengths:         [n] tokens generated per row.
  finish_reasons:  "stop" (stop token or string) or "length" (max_new_tokens).
  stop_reasons:    the stop token id or stop string that ended the row, else None.
  state:           continue the conversations from here (see `generate`); None
                   when the call ran in parts (`max_rows`).
  stats:           counters of the call (prefill tokens, decode steps, ...).
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  policy_logprobs: np.ndarray
  lengths: np.ndarray
  finish_reasons: list[str]
  stop_reasons: list[int | str | None]
  state: SamplerState | None
  stats: dict[str, Any]

  def token_lists(self) -> list[list[int]]:
    return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths)]


# Counters that add up over the parts of a call (the rest, sizes, take the max).
_ADDITIVE_STATS = ("rows", "prefill_tokens", "decode_steps", "compactions")


def length_bucket(n: int, minimum: int = _MIN_CHUNK) -> int:
  """Powers of two up to 512, then multiples of 512."""
  if n <= 512:
    return max(minimum, 1 << max(n - 1, 0).bit_length())
  return -(-n // 512) * 512


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _warn_if_replicated(mesh, rules, cfg: ModelConfig) -> None:
  """Mesh axes that split neither the rows nor the kv heads repeat all of the work."""
  rows = parallel.logical_to_spec(("batch",), rules)[0]
  heads = parallel.logical_to_spec(("kv_heads",), rules, (cfg.num_kv_heads,), mesh)[0]
  used = {a for entry in (rows, heads) for a in jax.tree.leaves(entry)}
  idle = {a: n for a, n in mesh.shape.items() if n > 1 and a not in used}
  if idle:
    log.warning("the sampler's rules split neither the rows nor the %d kv heads over mesh "
                "axes %s: every device there generates the same rows in full", cfg.num_kv_heads,
                idle)


class Sampler:
  """Generates from any m2 `Transformer`; parameters are passed per call.

  model:    a Transformer, or its abstract version (`nnx.eval_shape`); only its
            structure is kept.
  mesh:     run sharded: parameters by their logical axes, the batch over the
            rules' `batch` axes, the cache over `batch` and `kv_heads`.
  rules:    the logical -> mesh axis table for all of that (`parallel.DECODE_RULES`
            splits weights by heads instead of gathering them); parameters laid out
            otherwise (e.g. by training) are resharded once per `generate` call.
  tokenizer: object with `.decode(ids) -> str` (or a callable), for stop strings.
  pad_id:   token id used for padding (never attended to).
  seed:     seeds the generator that draws per-row seeds when a request has none.
  stop_check_every: decode steps between host checks of stop strings.
  max_cache_length: the largest cache a call may allocate
            (default: the model's max_position_embeddings).
  layers:   "scan" (the model's own forward), "unrolled" (per-layer weights and
            cache, see `forward.py`), or "auto": unrolled on CPU, scan elsewhere.
  max_rows: a new batch of more rows runs as consecutive calls of at most this
            many (0: all at once), which bounds the KV cache: an RL rollout of
            1,024 rows x 3k tokens of Qwen2.5-32B would need 768 GiB of it.
  """

  def __init__(self, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None,
               rules: parallel.Rules = parallel.DEFAULT_RULES, tokenizer=None, pad_id: int = 0,
               seed: int = 0, stop_check_every: int = 32, max_cache_length: int | None = None,
               layers: str = "auto", max_rows: int = 0):
    if not isinstance(model, nnx.Module) or not isinstance(getattr(model, "cfg", None),
                                                           ModelConfig):
      raise TypeError(f"Sampler needs an m2 Transformer (or its nnx.eval_shape), got "
                      f"{type(model).__name__}")
    self.cfg: ModelConfig = model.cfg
    self.graphdef, abstract = nnx.split(model)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
    self.forward = make_forward(self.graphdef, self.cfg, layers)
    self.mesh, self.rules = mesh, tuple(rules)
    self.data_shards = parallel.batch_shards(mesh, rules) if mesh is not None else 1
    if mesh is not None:
      _warn_if_replicated(mesh, self.rules, self.cfg)
    self._decode = (tokenizer.decode if hasattr(tokenizer, "decode") else tokenizer)
    if not 0 <= pad_id < self.cfg.vocab_size:
      raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {self.cfg.vocab_size})")
    self.pad_id = pad_id
    self._seeds = np.random.default_rng(seed)
    if stop_check_every < 1:
      raise ValueError(f"stop_check_every must be >= 1 (got {stop_check_every})")
    self.stop_check_every = stop_check_every
    self.max_cache_length = max_cache_length or self.cfg.max_position_embeddings
    if not (isinstance(max_rows, int) and max_rows >= 0):
      raise ValueError(f"max_rows must be an int >= 0 (got {max_rows!r})")
    self.max_rows = max_rows
    self._init_jit = jax.jit(self._init_state, static_argnums=(0, 1))
    self._start_jit = jax.jit(self._start, static_argnames=("features",),
                              donate_argnames=("state",))
    self._resume_jit = jax.jit(self._resume, static_argnames=("features",),
                               donate_argnames=("loop",))
    self._compact_jit = jax.jit(self._compact, donate_argnums=0)
    self._cut_jit = jax.jit(self._cut, donate_argnums=0)

  @classmethod
  def for_config(cls, cfg: ModelConfig, **kw) -> "Sampler":
    return cls(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), **kw)

  @property
  def num_compiles(self) -> int:
    """Compiled variants of the generation loop so far (bucketing keeps this small)."""
    return self._start_jit._cache_size()

  # --- the public call --------------------------------------------------------------

  def generate(self, params, prompts: Sequence[Sequence[int] | None],
               sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
               state: SamplerState | None = None,
               cache_length: int | None = None) -> SamplerOutput:
    """Generates a continuation of every prompt.

    params:   the model's parameters (nnx.State, or the model itself).
    prompts:  token ids per row. With `state`, the next turn of each
              conversation (may be empty: just keep generating); None leaves
              a row out of this call, unchanged.
    sampling: one SamplingParams for all rows, or one per row.
    state:    continue these conversations (`out.state` of the last call);
              the state is consumed. A batch over `max_rows` runs in parts and
              returns no state to continue.
    cache_length: slots to allocate for a new batch (default: prompt bucket +
              max_new_tokens, rounded up to 64). Size it for the whole
              conversation when you plan to continue.
    """
    params = self._check_params(params)
    if state is None and self.max_rows and len(prompts) > self.max_rows:
      return self._generate_in_parts(params, prompts, sampling, cache_length)
    return self._generate(params, prompts, sampling, state, cache_length)

  def _generate_in_parts(self, params, prompts, sampling, cache_length) -> SamplerOutput:
    """Consecutive calls of at most `max_rows` rows, joined as one output."""
    per_row = self._check_requests(len(prompts), sampling)
    parts = [self._generate(params, prompts[i:i + self.max_rows], per_row[i:i + self.max_rows],
                            None, cache_length)
             for i in range(0, len(prompts), self.max_rows)]
    width = max(p.tokens.shape[1] for p in parts)
    pad = lambda a, value: np.pad(a, ((0, 0), (0, width - a.shape[1])),  # noqa: E731
                                  constant_values=value)
    stats = {k: (sum if k in _ADDITIVE_STATS else max)(p.stats[k] for p in parts)
             for k in parts[0].stats}
    return SamplerOutput(
        tokens=np.concatenate([pad(p.tokens, self.pad_id) for p in parts]),
        logprobs=np.concatenate([pad(p.logprobs, 0.0) for p in parts]),
        policy_logprobs=np.concatenate([pad(p.policy_logprobs, 0.0) for p in parts]),
        lengths=np.concatenate([p.lengths for p in parts]),
        finish_reasons=[r for p in parts for r in p.finish_reasons],
        stop_reasons=[r for p in parts for r in p.stop_reasons],
        state=None, stats={**stats, "parts": len(parts)})

  def compact(self, state: SamplerState) -> SamplerState:
    """Squeezes the empty slots out of every row of the cache (consumes `state`)."""
    self._check_state(state)
    with self._context():
      return self._compact_jit(state.replace(num_rows=0)).replace(num_rows=state.num_rows)

  # --- hooks that speculative decoding overrides ------------------------------------

  speculative = False
  extra_slots = 0  # cache slots a decode step needs beyond the tokens it keeps
  _stat_names: tuple[str, ...] = ()  # per-row int32 counters the loop carries

  def _init_draft(self, batch: int, length: int):
    return None

  def _prepare(self, params):
    """Inside jit, once per call before the loop: what the steps below get as `ctx`."""
    return self.forward.prepare(params)

  def _prefill(self, ctx, state: SamplerState, tokens, positions, segments):
    """Writes the chunk into the cache; returns (state, logits of each row's last token)."""
    hidden, cache = self.forward(ctx, tokens, positions, segments, state.cache)
    return state.replace(cache=cache), self.forward.logits(ctx, hidden[:, -1:])[:, 0]

  def _can_continue(self, loop: _Loop):
    return jnp.bool_(True)

  def _step(self, ctx, loop: _Loop, features: Features) -> _Loop:
    """Feeds each row's pending token and samples the next one."""
    st = loop.state
    active = ~loop.done
    segments = active.astype(jnp.int32)[:, None]
    positions = st.next_position[:, None]
    hidden, cache = self.forward(ctx, st.pending[:, None], positions, segments, st.cache)
    logits = self.forward.logits(ctx, hidden)
    slot_positions = cache_ops.record_positions(st.slot_positions, positions, segments,
                                                st.cache.index)
    st = st.replace(cache=cache, slot_positions=slot_positions,
                    next_position=st.next_position + active)
    loop = loop.replace(state=st)
    tokens, lp, plp, _ = processing.sample(logits[:, 0], loop.rows, features, st.next_position)
    loop, _ = _emit(loop, tokens[:, None], lp[:, None], plp[:, None], active.astype(jnp.int32))
    return loop

  def _stats(self, stats: dict[str, np.ndarray]) -> dict[str, Any]:
    return {}

  # --- jitted pieces ---------------------------------------------------------------

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return parallel.sharding_context(self.mesh, self.rules)

  def _init_state(self, batch: int, length: int) -> SamplerState:
    cache = self.forward.init_cache(batch, length)
    zeros = jnp.zeros((batch,), jnp.int32)
    return SamplerState(cache=cache, slot_positions=jnp.full((batch, length), -1, jnp.int32),
                        pending=zeros, has_pending=jnp.zeros((batch,), jnp.bool_),
                        next_position=zeros, draft=self._init_draft(batch, length))

  def _start(self, params, state: SamplerState, tokens, segments, rows: RowParams, max_new,
             stop_ids, step_limit, *, features: Features) -> _Loop:
    """Prefill of the chunk, the first sampled token, then the decode loop."""
    ctx = self._prepare(params)
    active = max_new > 0
    positions = state.next_position[:, None] + jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    index = state.cache.index
    state, logits = self._prefill(ctx, state, tokens, positions, segments)
    state = state.replace(
        slot_positions=cache_ops.record_positions(state.slot_positions, positions, segments,
                                                  index),
        next_position=state.next_position + jnp.sum(segments, axis=1),
        has_pending=state.has_pending | active)
    b, n = tokens.shape[0], state.cache.max_length - tokens.shape[1]

    def buffer(dtype):
      return parallel.constrain(jnp.zeros((b, n), dtype), ("batch", None))

    loop = _Loop(state=state, rows=rows, max_new=max_new, stop_ids=stop_ids, done=~active,
                 stop_token=jnp.full((b,), -1, jnp.int32), num_tokens=jnp.zeros((b,), jnp.int32),
                 tokens=buffer(jnp.int32), logprobs=buffer(jnp.float32),
                 policy_logprobs=buffer(jnp.float32), step=jnp.zeros((), jnp.int32),
                 stats={k: jnp.zeros((b,), jnp.int32) for k in self._stat_names})
    first, lp, plp, _ = processing.sample(logits, rows, features, state.next_position)
    loop, _ = _emit(loop, first[:, None], lp[:, None], plp[:, None], active.astype(jnp.int32))
    return self._decode_loop(ctx, loop, step_limit, features)

  def _resume(self, params, loop: _Loop, step_limit, *, features: Features) -> _Loop:
    return self._decode_loop(self._prepare(params), loop, step_limit, features)

  def _decode_loop(self, ctx, loop: _Loop, step_limit, features: Features) -> _Loop:
    def cond(loop):
      return (loop.step < step_limit) & jnp.any(~loop.done) & self._can_continue(loop)

    def body(loop):
      loop = self._step(ctx, loop, features)
      return loop.replace(step=loop.step + 1)

    return jax.lax.while_loop(cond, body, loop)

  def _compact(self, state: SamplerState) -> SamplerState:
    cache, slot_positions, order = cache_ops.compact(state.cache, state.slot_positions)
    return state.replace(cache=cache, slot_positions=slot_positions,
                         draft=self._relayout_draft(state.draft, cache, order))

  def _relayout_draft(self, draft, cache, order=None):
    return draft

  def _cut(self, loop: _Loop, rows, keep) -> _Loop:
    """Ends `rows` after their first `keep` tokens (a stop string matched)."""
    st = loop.state
    first_position = st.next_position - loop.num_tokens + 1
    pending_position = first_position + keep - 1
    # The new last token becomes pending: drop it and everything after it.
    keep_below = jnp.where(rows, pending_position, jnp.iinfo(jnp.int32).max)
    cache, slot_positions = cache_ops.drop_from(st.cache, st.slot_positions, keep_below)
    last = jnp.take_along_axis(loop.tokens, jnp.maximum(keep - 1, 0)[:, None], axis=1)[:, 0]
    st = st.replace(cache=cache, slot_positions=slot_positions,
                    pending=jnp.where(rows, last, st.pending),
                    next_position=jnp.where(rows, pending_position, st.next_position),
                    draft=self._relayout_draft(st.draft, cache))
    return loop.replace(state=st, num_tokens=jnp.where(rows, keep, loop.num_tokens),
                        done=loop.done | rows,
                        stop_token=jnp.where(rows, -1, loop.stop_token))

  # --- host side ---------------------------------------------------------------------

  def _check_params(self, params):
    if isinstance(params, nnx.Module):
      params = nnx.state(params)
    check_param_tree(params, self._abstract, "params")
    if self.mesh is not None:
      params = jax.device_put(params, parallel.state_shardings(params, self.mesh, self.rules))
    with self._context():
      return self.forward.load(params)

  def _check_state(self, state: SamplerState):
    if not isinstance(state, SamplerState):
      raise TypeError(f"state must be a SamplerState (out.state), got {type(state).__name__}")
    if jax.tree.leaves(state.cache.k)[0].is_deleted():
      raise ValueError("this SamplerState was already used (its cache is donated to the call "
                       "that consumed it); continue from the state that call returned")
    if (state.draft is None) == self.speculative:
      raise ValueError("this SamplerState was made by a different kind of sampler "
                       "(speculative vs plain)")
    # Another model's cache would run silently: extra layers dropped, missing ones aliased.
    with self._context():
      own = jax.eval_shape(lambda: self._init_state(state.cache.batch, state.cache.max_length))
    layout = lambda tree: (jax.tree.structure(tree.replace(num_rows=0)),  # noqa: E731
                           [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])
    if layout(state) != layout(own):
      raise ValueError("this SamplerState was made by a Sampler for another model (layers, "
                       "kv heads, head_dim, dtype, layer layout or drafter); continue a "
                       "conversation with the sampler that started it")

  def _requests(self, n: int, sampling) -> list[SamplingParams]:
    if sampling is None:
      sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
      return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n or not all(isinstance(s, SamplingParams) for s in sampling):
      raise ValueError(f"sampling must be one SamplingParams or a list of {n} (one per "
                       f"prompt), got {len(sampling)} entries")
    return sampling

  def _check_tokens(self, prompts, allow_empty: bool) -> list[list[int] | None]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
      raise TypeError("prompts must be a list of token-id lists (one per row)")
    if not prompts:
      raise ValueError("prompts is empty")
    vocab = self.cfg.vocab_size
    out = []
    for i, p in enumerate(prompts):
      if p is None:
        if not allow_empty:
          raise ValueError(f"prompt {i} is None; a new batch needs a prompt for every row")
        out.append(None)
        continue
      if isinstance(p, str):
        raise TypeError(f"prompt {i} is a string; tokenize it first (prompts are token ids)")
      ids = np.asarray(p)
      if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"prompt {i} must be a flat list of int token ids")
      if ids.size == 0 and not allow_empty:
        raise ValueError(f"prompt {i} is empty")
      if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise ValueError(f"prompt {i} has token id {bad}, outside the model's vocabulary "
                         f"[0, {vocab})")
      out.append(ids.astype(np.int64).tolist())
    return out

  def _generate(self, params, prompts, sampling, state, cache_length) -> SamplerOutput:
    """Host side of a call: validate, pack, run (in chunks if needed), unpack."""
    prompts = self._check_tokens(prompts, allow_empty=state is not None)
    n = len(prompts)
    requests = self._check_requests(n, sampling)
    active = [p is not None for p in prompts]
    max_new = max((r.max_new_tokens for r, a in zip(requests, active) if a), default=0)
    if not max_new:
      raise ValueError("every row is None: nothing to generate")
    if state is None:
      state, chunks, chunk_len = self._new_batch(prompts, max_new, cache_length)
      compactions = 0
    else:
      state, chunks, chunk_len, compactions = self._next_turn(state, prompts, max_new,
                                                              cache_length)
    batch, length = state.cache.batch, state.cache.max_length

    tokens = np.full((batch, chunk_len), self.pad_id, np.int32)
    segments = np.zeros((batch, chunk_len), np.int32)
    for i, c in enumerate(chunks):
      if c:  # left padding: every row's last token sits in the last column
        tokens[i, chunk_len - len(c):] = c
        segments[i, chunk_len - len(c):] = 1
    rows, max_new_arr, stop_ids, features, has_strings = self._pack_requests(
        requests, active, batch)
    host = dict(tokens=tokens, segments=segments, rows=rows, max_new=max_new_arr,
                stop_ids=stop_ids)
    if self.mesh is not None:
      host = {k: jax.tree.map(lambda a: jax.device_put(
          a, parallel.data_sharding(self.mesh, self.rules, a.ndim)), v) for k, v in host.items()}

    # One jit runs the whole generation, unless stop strings need a look between
    # chunks or (speculative decoding) the cache must be compacted midway.
    chunked = any(has_strings)
    limit = self.stop_check_every if chunked else max_new
    cut_strings: dict[int, str] = {}
    settled: set[int] = set()  # rows whose final text was already checked
    with self._context():
      loop = self._start_jit(params, state.replace(num_rows=0), host["tokens"],
                             host["segments"], host["rows"], host["max_new"], host["stop_ids"],
                             np.int32(limit), features=features)
      while True:
        if chunked:
          loop = self._check_stop_strings(loop, requests, has_strings, cut_strings, settled)
        done, step, index = jax.device_get((loop.done, loop.step, loop.state.cache.index))
        if done.all():
          break
        if index + self.extra_slots > length:
          loop = loop.replace(state=self._compact_jit(loop.state))
          compactions += 1
          if int(loop.state.cache.index) + self.extra_slots > length:
            raise RuntimeError("the cache is full even after compaction; this is a bug in "
                               "the cache sizing of Sampler.generate")
        limit = step + self.stop_check_every if chunked else max_new
        loop = self._resume_jit(params, loop, np.int32(limit), features=features)
    return self._output(loop, n, chunks, cut_strings, compactions, chunk_len)

  def _new_batch(self, prompts, max_new: int, cache_length: int | None):
    """An empty state for a new batch: (state, chunks, chunk length)."""
    n = len(prompts)
    batch = _round_up(1 << (n - 1).bit_length(), self.data_shards)
    longest = max(map(len, prompts))
    chunk_len = length_bucket(longest)
    need = chunk_len + max_new + self.extra_slots
    length = cache_length or _round_up(need, _CACHE_MULTIPLE)
    draft = f" plus {self.extra_slots} draft slots" if self.extra_slots else ""
    if length < need:
      raise ValueError(f"cache_length={length} is too short: the longest prompt ({longest} "
                       f"tokens, padded to {chunk_len}) plus max_new_tokens={max_new}{draft} "
                       f"needs {need}")
    if length > self.max_cache_length:
      raise ValueError(f"a cache of {length} slots (prompt padded to {chunk_len} + "
                       f"max_new_tokens={max_new}{draft}) exceeds max_cache_length="
                       f"{self.max_cache_length}")
    with self._context():
      state = self._init_jit(batch, length)
    return state, prompts, chunk_len

  def _next_turn(self, state: SamplerState, prompts, max_new: int, cache_length: int | None):
    """The next turn of a conversation: (state, chunks, chunk length, compactions).

    Each row's chunk is its pending token followed by the new turn.
    """
    self._check_state(state)
    if cache_length is not None and cache_length != state.cache.max_length:
      raise ValueError(f"cache_length={cache_length} differs from the conversation's cache "
                       f"({state.cache.max_length}); a cache cannot grow")
    if len(prompts) != state.num_rows:
      raise ValueError(f"the conversation has {state.num_rows} rows; got {len(prompts)} "
                       f"prompts (use None for rows that sit this turn out)")
    length = state.cache.max_length
    pending, has_pending, index = jax.device_get(
        (state.pending, state.has_pending, state.cache.index))
    chunks = [None if p is None else ([int(pending[i])] if has_pending[i] else []) + p
              for i, p in enumerate(prompts)]
    for i, c in enumerate(chunks):
      if c is not None and not c:
        raise ValueError(f"prompt {i} is empty and the row has no generated token to "
                         f"continue from")
    longest = max(len(c) for c in chunks if c is not None)
    chunk_len = length_bucket(longest)
    need = chunk_len + max_new + self.extra_slots
    compactions = 0
    if index + need > length:  # squeeze out the holes first
      with self._context():
        state = self._compact_jit(state.replace(num_rows=0)).replace(num_rows=state.num_rows)
      compactions = 1
      index = int(state.cache.index)
      if index + need > length:
        raise ValueError(
            f"conversation cache is full: {index} of {length} slots hold the conversation "
            f"(after compaction), and this turn needs {need} more (turn of {longest} tokens "
            f"padded to {chunk_len}, max_new_tokens={max_new}"
            f"{f', {self.extra_slots} draft slots' if self.extra_slots else ''}). Start a new "
            f"batch with a larger cache_length and the whole history as the prompt (this "
            f"recomputes it), or lower max_new_tokens")
    return state, chunks, chunk_len, compactions

  def _check_requests(self, n: int, sampling) -> list[SamplingParams]:
    requests = self._requests(n, sampling)
    vocab = self.cfg.vocab_size
    for i, r in enumerate(requests):
      if any(not 0 <= t < vocab for t in r.stop_token_ids):
        raise ValueError(f"request {i}: stop_token_ids {r.stop_token_ids} are not all in the "
                         f"vocabulary [0, {vocab})")
      if r.stop_strings and self._decode is None:
        raise ValueError(f"request {i} has stop_strings but the Sampler has no tokenizer "
                         f"to decode with (Sampler(..., tokenizer=...))")
    return requests

  def _pack_requests(self, requests, active, batch):
    vocab = self.cfg.vocab_size
    b = lambda values, dtype: np.asarray(  # noqa: E731
        list(values) + [0] * (batch - len(requests)), dtype)
    seeds = [r.seed if r.seed is not None else int(self._seeds.integers(2**32))
             for r in requests]
    top_k = [r.top_k if 0 < r.top_k < vocab else 0 for r in requests]
    rows = RowParams(temperature=b((r.temperature for r in requests), np.float32),
                     top_k=b(top_k, np.int32),
                     top_p=np.asarray([r.top_p for r in requests] + [1.0] * (batch - len(requests)),
                                      np.float32),
                     seed=b(seeds, np.uint32))
    max_new = b((r.max_new_tokens if a else 0 for r, a in zip(requests, active)), np.int32)
    width = max(4, 1 << (max(len(r.stop_token_ids) for r in requests) - 1).bit_length())
    stop_ids = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(requests):
      stop_ids[i, :len(r.stop_token_ids)] = r.stop_token_ids
    sampled = [r for r, a in zip(requests, active) if a and r.temperature > 0]
    features = Features(
        sample=bool(sampled),
        top_k=(1 << (max(r.top_k for r in sampled) - 1).bit_length())
        if any(0 < r.top_k < vocab for r in sampled) else 0,
        top_p=any(r.top_p < 1 for r in sampled))
    if features.top_k:
      features = dataclasses.replace(features, top_k=min(features.top_k, vocab))
    has_strings = [bool(r.stop_strings) and a for r, a in zip(requests, active)]
    return rows, max_new, stop_ids, features, has_strings

  def _check_stop_strings(self, loop: _Loop, requests, has_strings, cut_strings,
                          settled) -> _Loop:
    """Finds rows whose new text contains a stop string and cuts them there."""
    num_tokens, tokens, done = jax.device_get((loop.num_tokens, loop.tokens, loop.done))
    cuts = np.zeros(loop.done.shape, bool)
    keep = np.asarray(num_tokens).copy()
    for i, request in enumerate(requests):
      if not has_strings[i] or i in cut_strings or i in settled or not num_tokens[i]:
        continue
      if done[i]:
        settled.add(i)
      ids = tokens[i, :num_tokens[i]].tolist()
      match = _first_match(self._decode, ids, request.stop_strings)
      if match is not None:
        keep[i], cut_strings[i] = match
        cuts[i] = True
    if cuts.any():
      loop = self._cut_jit(loop, jnp.asarray(cuts), jnp.asarray(keep, jnp.int32))
    return loop

  def _output(self, loop: _Loop, n, chunks, cut_strings, compactions, chunk_len):
    host = jax.device_get(dict(tokens=loop.tokens, logprobs=loop.logprobs,
                               policy_logprobs=loop.policy_logprobs, lengths=loop.num_tokens,
                               stop_token=loop.stop_token, step=loop.step,
                               index=loop.state.cache.index, stats=loop.stats))
    lengths = np.asarray(host["lengths"][:n])
    width = int(lengths.max(initial=0))
    tokens = np.where(np.arange(width) < lengths[:, None], host["tokens"][:n, :width],
                      self.pad_id).astype(np.int32)
    mask = np.arange(width) < lengths[:, None]
    finish, reasons = [], []
    for i in range(n):
      if i in cut_strings:
        finish.append(FINISH_STOP)
        reasons.append(cut_strings[i])
      elif host["stop_token"][i] >= 0:
        finish.append(FINISH_STOP)
        reasons.append(int(host["stop_token"][i]))
      else:
        finish.append(FINISH_LENGTH)
        reasons.append(None)
    stats = {"rows": n, "prefill_tokens": sum(len(c) for c in chunks if c),
             "prefill_length": chunk_len, "decode_steps": int(host["step"]),
             "cache_index": int(host["index"]), "cache_length": loop.state.cache.max_length,
             "compactions": compactions,
             **self._stats({k: np.asarray(v[:n]) for k, v in host["stats"].items()})}
    return SamplerOutput(
        tokens=tokens,
        logprobs=np.where(mask, host["logprobs"][:n, :width], 0.0).astype(np.float32),
        policy_logprobs=np.where(mask, host["policy_logprobs"][:n, :width], 0.0).astype(
            np.float32),
        lengths=lengths, finish_reasons=finish, stop_reasons=reasons,
        state=loop.state.replace(num_rows=n),
        stats=stats)


def check_param_tree(params, abstract, what: str) -> None:
  """Fails with the differing entries unless `params` has the tree and shapes of `abstract`."""
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  if [p for p, _ in got] != [p for p, _ in want]:
    names = lambda t: {jax.tree_util.keystr(p) for p, _ in t}  # noqa: E731
    raise ValueError(f"{what} do not fit the model; differing entries: "
                     f"{sorted(names(got) ^ names(want))[:10]}")
  bad = [(jax.tree_util.keystr(p), tuple(g.shape), tuple(w.shape))
         for (p, g), (_, w) in zip(got, want) if tuple(g.shape) != tuple(w.shape)]
  if bad:
    raise ValueError(f"{what} do not fit the model: {bad[:5]} (name, got, want)")


def _emit(loop: _Loop, tokens, logprobs, policy_logprobs, count):
  """Appends up to count[r] of tokens[r] (J per row) to each row's output.

  A row keeps tokens up to and including its first stop token, and no more
  than max_new in total; the last kept token becomes the row's pending token.
  Returns (loop, kept [B]).
  """
  b, j = tokens.shape
  col = jnp.arange(j)
  room = loop.max_new - loop.num_tokens
  is_stop = jnp.any(tokens[..., None] == loop.stop_ids[:, None, :], axis=-1)
  is_stop &= col < jnp.minimum(count, room)[:, None]
  any_stop = jnp.any(is_stop, axis=1)
  first_stop = jnp.argmax(is_stop, axis=1)
  kept = jnp.maximum(jnp.minimum(count, room), 0)
  kept = jnp.where(any_stop, first_stop + 1, kept)
  out_cols = jnp.where(col < kept[:, None], loop.num_tokens[:, None] + col,
                       loop.tokens.shape[1])  # out of range: dropped
  write = lambda buf, x: buf.at[jnp.arange(b)[:, None], out_cols].set(x, mode="drop")  # noqa: E731
  last = jnp.take_along_axis(tokens, jnp.maximum(kept - 1, 0)[:, None], axis=1)[:, 0]
  num_tokens = loop.num_tokens + kept
  state = loop.state.replace(pending=jnp.where(kept > 0, last, loop.state.pending))
  loop = loop.replace(
      state=state, tokens=write(loop.tokens, tokens), logprobs=write(loop.logprobs, logprobs),
      policy_logprobs=write(loop.policy_logprobs, policy_logprobs), num_tokens=num_tokens,
      done=loop.done | any_stop | (num_tokens >= loop.max_new),
      stop_token=jnp.where(any_stop, last, loop.stop_token))
  return loop, kept


def _first_match(decode: Callable[[list[int]], str], ids: list[int],
                 stop_strings: Sequence[str]) -> tuple[int, str] | None:
  """(tokens to keep, matched string) for the shortest prefix whose text has a stop string."""
  text = decode(ids)
  if not any(s in text for s in stop_strings):
    return None
  # Containment is monotone in the prefix length: binary search the shortest.
  keep = bisect.bisect_left(range(1, len(ids) + 1), True,
                            key=lambda k: any(s in decode(ids[:k]) for s in stop_strings)) + 1
  prefix = decode(ids[:keep])
  matched = min((s for s in stop_strings if s in prefix), key=prefix.index)
  return keep, matched


__all__ = ["FINISH_LENGTH", "FINISH_STOP", "Sampler", "SamplerOutput", "SamplerState",
           "SamplingParams", "length_bucket"]
