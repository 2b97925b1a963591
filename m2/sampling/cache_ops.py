"""Row-wise edits of a KV cache whose write index is shared by the batch.

The model writes every call's T tokens at slots [index, index + T) of every
row, and attention masks by each slot's segment id (0 = empty), never by slot
distance; RoPE uses per-row positions. So rows may carry holes: a finished
row's later slots, the draft tokens a row rejected in speculative decoding, or
tokens cut at a stop string. The sampler records the RoPE position of every
slot (`slot_positions`, -1 when empty) so that it can drop a row's tokens from
a position on, and `compact` squeezes the holes out when the cache fills.

The functions take a `KVCache` (k [L, B, K, D, S], v [L, B, K, S, D]) or a
`LayerCache` (tuples of [B, K, D, S] and [B, K, S, D]); both have `segments`
[B, S] and `index`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp



def record_positions(slot_positions: jax.Array, positions: jax.Array, segments: jax.Array,
                     index: jax.Array) -> jax.Array:
  """Notes the positions [B, T] of tokens just written at `index` (-1 for padding)."""
  written = jnp.where(segments != 0, positions, -1).astype(jnp.int32)
  return jax.lax.dynamic_update_slice(slot_positions, written, (0, index))


def drop_from(cache, slot_positions: jax.Array, keep_below: jax.Array,
              index: jax.Array | None = None):
  """Empties every slot of row r whose position is >= keep_below[r]; sets the index.

  Only segment ids and positions change: the K/V bytes stay and are
  overwritten when the index passes over them again.
  """
  drop = slot_positions >= keep_below[:, None]
  cache = cache.replace(segments=jnp.where(drop, 0, cache.segments),
                        index=cache.index if index is None else index)
  return cache, jnp.where(drop, -1, slot_positions)


def compaction_order(segments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row slot permutation that moves each row's valid slots to end at one index.

  Returns (order [B, S], new_index): slot s of the compacted row r is slot
  order[r, s] of the old one. Valid slots keep their order and end at
  new_index = the largest count of valid slots in a row; the rest are empty.
  """
  valid = segments != 0
  length = segments.shape[1]
  new_index = jnp.max(jnp.sum(valid, axis=1)).astype(jnp.int32)
  # Stable sort: empty slots first, then the valid ones in their old order ...
  order = jnp.argsort(valid.astype(jnp.int32), axis=1, stable=True)
  # ... rotated so that the valid block ends at new_index instead of at S.
  shift = (jnp.arange(length) + length - new_index) % length
  return jnp.take(order, shift, axis=1).astype(jnp.int32), new_index


def gather_slots(x: jax.Array, order: jax.Array, slot_axis: int, batch_axis: int) -> jax.Array:
  """x[..., b, ..., order[b, s], ...]: reorders the slot axis of every row."""
  shape = [1] * x.ndim
  shape[batch_axis], shape[slot_axis] = order.shape
  return jnp.take_along_axis(x, order.reshape(shape), axis=slot_axis % x.ndim)


def _gather_kv(cache, order):
  # Keys end in [B, K, D, S] and values in [B, K, S, D], stacked over layers or not.
  return cache.replace(k=jax.tree.map(lambda x: gather_slots(x, order, -1, -4), cache.k),
                       v=jax.tree.map(lambda x: gather_slots(x, order, -2, -4), cache.v))


def compact(cache, slot_positions: jax.Array):
  """Removes the holes of every row. Returns (cache, slot_positions, order)."""
  order, new_index = compaction_order(cache.segments)
  cache = _gather_kv(cache, order).replace(segments=gather_slots(cache.segments, order, 1, 0),
                                           index=new_index)
  return cache, gather_slots(slot_positions, order, 1, 0), order


def reorder(cache, order: jax.Array, segments: jax.Array, index: jax.Array):
  """Applies a `compaction_order` to another cache that shares the slot layout
  (a draft model's): `segments` and `index` are the compacted target's."""
  return _gather_kv(cache, order).replace(segments=segments, index=index)
