"""Row-wise cache edits on a hand-made cache: dropping positions and compaction."""

import jax.numpy as jnp
import numpy as np

from m2.model.cache import KVCache
from m2.sampling import cache_ops


def hand_cache():
  # 2 rows x 6 slots; row 0 has a hole at slot 1, row 1 only holds slot 2.
  segments = jnp.array([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], jnp.int32)
  positions = jnp.array([[0, -1, 1, 2, -1, -1], [-1, -1, 0, -1, -1, -1]], jnp.int32)
  v = jnp.arange(2 * 6, dtype=jnp.float32).reshape(1, 2, 1, 6, 1)  # value = row * 6 + slot
  k = -v.reshape(1, 2, 1, 1, 6)  # keys are slot-minor: [L, B, K, D, S]
  cache = KVCache(k=k, v=v, segments=segments, index=jnp.int32(4))
  return cache, positions


def test_compaction_moves_valid_slots_to_end_at_one_index_in_order():
  cache, positions = hand_cache()
  new, new_positions, order = cache_ops.compact(cache, positions)
  assert int(new.index) == 3  # the longest row holds 3 tokens
  np.testing.assert_array_equal(new.segments, [[1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(new_positions[:, :3], [[0, 1, 2], [-1, -1, 0]])
  np.testing.assert_array_equal(new.v[0, 0, 0, :3, 0], [0, 2, 3])  # row 0's slots 0, 2, 3
  np.testing.assert_array_equal(new.v[0, 1, 0, 2, 0], 6 + 2)      # row 1's slot 2
  np.testing.assert_array_equal(new.k, -new.v.reshape(new.k.shape))  # keys moved alike
  # Another cache in the same layout (a draft's) follows the same order.
  other = cache_ops.reorder(cache, order, new.segments, new.index)
  np.testing.assert_array_equal(other.k, new.k)
  np.testing.assert_array_equal(other.v, new.v)


def test_drop_from_empties_a_rows_later_positions_only():
  cache, positions = hand_cache()
  dropped, new_positions = cache_ops.drop_from(cache, positions, jnp.array([1, 5]),
                                               jnp.int32(2))
  np.testing.assert_array_equal(dropped.segments, [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(new_positions[0], [0, -1, -1, -1, -1, -1])
  assert int(dropped.index) == 2
  np.testing.assert_array_equal(dropped.k, cache.k)  # bytes stay; validity changes
