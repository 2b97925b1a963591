"""An EAGLE-style draft head (Li et al. 2024, arXiv 2401.15077) for `SpeculativeSampler`.

The head drafts from the target's own features: the final hidden states that
the target's LM head reads. At position t it takes (f_{t-1}, embed(x_t)), the
feature before the token and the token, through a projection and one decoder
layer, and predicts f_t; the target's LM head turns that into the distribution
of x_{t+1}. Later tokens of a round feed back the head's own predicted
features. It has no embedding table or LM head of its own: it reads the
target's, so it adds one layer plus a [2, E, E] projection to the target (or a
narrower layer between [2, E, W] and [W, E] projections: `width`). With
`draft_vocab` it drafts only among that many target tokens (EAGLE-3's reduced
draft vocabulary): each draft step then reads that many rows of the LM head,
not all V. Exactness is kept: the other tokens have draft probability 0, and
the rejection rule's residual gives them their target mass.

The layer is EAGLE's own: a decoder layer without its input norm, and no norm
after it. At the target's width that is the layout of vLLM's
`EagleLlamaForCausalLM`, so `export.draft` can write the head for vLLM.

Its KV cache shares the target cache's slot layout. A round drafts from
predicted features; `commit` then rewrites the drafted slots from the target's
real features, so the cache holds what a prefill of the accepted text would
(tests/sampling/eagle_test.py checks this).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m2.model import head
from m2.model.config import ModelConfig
from m2.model.modules import MLP, Attention, RMSNorm, param
from m2.sampling import cache_ops
from m2.sampling.forward import LayerCache
from m2.sampling.speculative import Drafter
from m2.sampling.sampler import check_param_tree


def layer_config(cfg: ModelConfig, width: int | None = None) -> ModelConfig:
  """The head's decoder layer: the target's, or narrower (`width`, a multiple of the
  head dim), with heads, kv heads and MLP scaled alike."""
  e = cfg.embed_dim
  width = width or e
  if width % cfg.head_dim or width > e:
    raise ValueError(f"EAGLE head width must be a multiple of head_dim={cfg.head_dim} and at "
                     f"most embed_dim={e} (got {width})")
  heads = width // cfg.head_dim
  kv_heads = max(1, cfg.num_kv_heads * heads // cfg.num_heads)
  while heads % kv_heads:
    kv_heads -= 1
  return cfg.replace(num_layers=1, embed_dim=width, num_heads=heads, num_kv_heads=kv_heads,
                     mlp_dim=cfg.mlp_dim * width // e)


class DraftVocab(nnx.Variable):
  """The target token ids an EagleHead drafts among (not trained)."""


class EagleHead(nnx.Module):
  """fc([embed(x_t), f_{t-1}]) -> a decoder layer without its input norm ->
  (projection back): the predicted feature f_t.

  cfg is the target's config. The layer has the target's width, as in EAGLE, or
  `width` (cheaper per draft token); then fc maps down to it and `up` maps back.
  draft_vocab > 0 holds that many target token ids to draft among (set them after
  training, e.g. the most frequent tokens of the target's samples).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, width: int | None = None,
               draft_vocab: int = 0):
    if not 0 <= draft_vocab <= cfg.vocab_size:
      raise ValueError(f"EAGLE draft_vocab must be in [0, vocab_size={cfg.vocab_size}] "
                       f"(got {draft_vocab})")
    self.cfg = cfg
    self.layer_cfg = lc = layer_config(cfg, width)
    e, w = cfg.embed_dim, lc.embed_dim
    self.fc = param(rngs, (2, e, w), (None, "embed", None), cfg.weight_dtype)
    self.attn = Attention(lc, rngs=rngs)
    self.mlp_norm = RMSNorm(w, lc.rms_norm_eps, lc)
    self.mlp = MLP(lc, rngs=rngs)
    self.up = param(rngs, (w, e), (None, "embed"), cfg.weight_dtype) if w != e else None
    self.draft_vocab = (DraftVocab(jnp.arange(draft_vocab, dtype=jnp.int32)) if draft_vocab
                        else None)

  def __call__(self, token_embeds, features, positions, segments, kv_cache=None,
               cache_segments=None, cache_index=None):
    """token_embeds, features: [B, T, E]. Returns (predicted features [B, T, E], kv)."""
    dt = self.cfg.compute_dtype
    fc = self.fc[...].astype(dt)
    x = (jnp.einsum("bte,ef->btf", token_embeds.astype(dt), fc[0])
         + jnp.einsum("bte,ef->btf", features.astype(dt), fc[1]))
    # No input norm, as in EAGLE-1 and vLLM's EAGLE layer: their weights load as is.
    h, kv = self.attn(x, positions, segments, kv_cache, cache_segments, cache_index)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    if self.up is not None:
      x = jnp.einsum("btf,fe->bte", x, self.up[...].astype(dt))
    return x, kv


def shift_features(features, segments, first):
  """f_{t-1} for each t of a chunk: features [B, T, E] moved one slot right.

  A chunk's first real token (after left padding) gets `first` [B, E], the
  feature before the chunk (zeros for a new conversation).
  """
  prev = jnp.concatenate([first[:, None], features[:, :-1]], axis=1)
  prev_real = jnp.concatenate([jnp.zeros_like(segments[:, :1]), segments[:, :-1]], axis=1) != 0
  return jnp.where(prev_real[..., None], prev, first[:, None].astype(prev.dtype))


@struct.dataclass
class EagleState:
  """cache: the head's one-layer cache; feature: [B, E] the target feature that
  predicted each row's pending token (what the next round drafts from)."""

  cache: LayerCache
  feature: jax.Array


@dataclasses.dataclass(frozen=True)
class _Context:
  head: EagleHead
  embed: jax.Array       # the target's [V, E] table
  out: jax.Array         # the target's output embedding (the draft vocabulary's rows)
  out_axes: str
  vocab: jax.Array | None  # the draft vocabulary's target ids; None: all

  def logits(self, features):
    """Draft logits [B, V] over the target's vocabulary; -inf off the draft vocabulary."""
    logits = head.logits(features, self.out, self.out_axes)
    if self.vocab is None:
      return logits
    full = jnp.full(logits.shape[:-1] + (self.embed.shape[0],), -jnp.inf, logits.dtype)
    return full.at[..., self.vocab].set(logits)


class EagleDrafter(Drafter):
  """Drafts with an `EagleHead` over the target's features, embedding and LM head."""

  def __init__(self, head_module: EagleHead):
    if not isinstance(head_module, EagleHead):
      raise TypeError(f"EagleDrafter needs an EagleHead, got {type(head_module).__name__}")
    self.cfg: ModelConfig = head_module.cfg
    self.layer_cfg: ModelConfig = head_module.layer_cfg
    self.vocab_size = self.cfg.vocab_size
    self.graphdef, abstract = nnx.split(head_module)
    self._abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)

  def check_target(self, cfg: ModelConfig) -> None:
    super().check_target(cfg)
    if cfg.embed_dim != self.cfg.embed_dim:
      raise ValueError(f"this EAGLE head reads the features of a target of width "
                       f"{self.cfg.embed_dim}; this target's is {cfg.embed_dim}")

  def check_params(self, params):
    if isinstance(params, nnx.Module):
      params = nnx.state(params)
    check_param_tree(params, self._abstract, "draft_params")
    return params

  def prepare(self, params, target):
    module = nnx.merge(self.graphdef, params)
    out, out_axes = target.output_embedding()
    vocab = None if module.draft_vocab is None else module.draft_vocab[...]
    if vocab is not None:  # gathered once per call, read by every draft step
      out = jnp.take(out, vocab, axis=out_axes.index("v"))
    return _Context(module, target.embed[...], out, out_axes, vocab)

  def init(self, batch, cache_length):
    cache = LayerCache.init(self.layer_cfg, batch, cache_length)
    return EagleState(cache, jnp.zeros((batch, self.cfg.embed_dim), self.cfg.compute_dtype))

  def _write(self, ctx: _Context, cache: LayerCache, tokens, positions, segments, features):
    """Runs the head on a chunk written at the cache index; returns (predictions, cache)."""
    cache_segments = jax.lax.dynamic_update_slice(cache.segments, segments.astype(jnp.int32),
                                                  (0, cache.index))
    embeds = jnp.take(ctx.embed, tokens, axis=0)
    pred, (k, v) = ctx.head(embeds, features, positions, segments, (cache.k[0], cache.v[0]),
                            cache_segments, cache.index)
    return pred, LayerCache(k=(k,), v=(v,), segments=cache_segments,
                            index=cache.index + tokens.shape[1])

  def prefill(self, ctx, state, tokens, positions, segments, hidden):
    features = shift_features(hidden, segments, state.feature)
    _, cache = self._write(ctx, state.cache, tokens, positions, segments, features)
    last_real = segments[:, -1] != 0
    return EagleState(cache, jnp.where(last_real[:, None], hidden[:, -1], state.feature))

  def propose(self, ctx, state, token, position, segment, num_tokens, sample):
    seg = segment[:, None]

    def step(carry, i):
      cache, tok, feat = carry
      pred, cache = self._write(ctx, cache, tok[:, None], (position + i)[:, None], seg,
                                feat[:, None])
      d, lq = sample(ctx.logits(pred[:, 0]), i)
      return (cache, d, pred[:, 0]), (d, lq)

    (cache, _, _), (drafts, logq) = jax.lax.scan(step, (state.cache, token, state.feature),
                                                 jnp.arange(num_tokens))
    # The drafted slots are rewritten from real features in `commit`: keep the index.
    return (state.replace(cache=cache.replace(index=state.cache.index)), drafts.T,
            jnp.swapaxes(logq, 0, 1))

  def commit(self, ctx, state, segments, index, hidden, kept, tokens, positions):
    active = kept > 0
    # `propose` wrote cur's slot from its real feature; d_1..d_k's came from predicted
    # ones. Rewrite those, unless no row kept a draft token.
    def rewrite(cache):
      chunk_segments = jnp.broadcast_to(active.astype(jnp.int32)[:, None], tokens[:, 1:].shape)
      return self._write(ctx, cache.replace(index=cache.index + 1), tokens[:, 1:],
                         positions[:, 1:], chunk_segments, hidden[:, :-1])[1]

    cache = jax.lax.cond(jnp.max(kept) > 1, rewrite, lambda cache: cache, state.cache)
    last = jnp.take_along_axis(hidden, jnp.maximum(kept - 1, 0)[:, None, None], axis=1)[:, 0]
    return EagleState(cache.replace(segments=segments, index=index),
                      jnp.where(active[:, None], last, state.feature))

  def relayout(self, state, segments, index, order=None):
    # A row cut back at a stop string keeps the feature of its old pending token; its
    # next round drafts from that (fewer acceptances once, the output stays exact).
    if order is None:
      cache = state.cache.replace(segments=segments, index=index)
    else:
      cache = cache_ops.reorder(state.cache, order, segments, index)
    return state.replace(cache=cache)


__all__ = ["EagleDrafter", "EagleHead", "EagleState", "layer_config", "shift_features"]
