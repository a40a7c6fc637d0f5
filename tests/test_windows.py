"""The gather-free window geometry equals the official roll/unfold/index formulation."""

import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.models.focal import index_tables, windows


def official_ring(x, window, expand):
  """Reference: four cyclic rolls, window partition, fancy-indexed valid_ind_rolled."""
  parts = []
  for row_sign, col_sign in index_tables.RING_ROLL_SIGNS:
    rolled = np.roll(x, (row_sign * expand, col_sign * expand), axis=(1, 2))
    parts.append(np.asarray(windows.window_partition(jnp.asarray(rolled), window)))
  stacked = np.concatenate(parts, axis=3)  # [B, nWh, nWw, 4*ws*ws, C]
  return stacked[:, :, :, index_tables.valid_ind_rolled(window, expand)]


def official_unfold(x, focal_window, level):
  """Reference: zero-padded unfold with stride 2**level, then the official index trim."""
  stride = 2**level
  kernel = index_tables.unfold_kernel_size(focal_window, level)
  pad = kernel // 2
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows, cols = height // stride, width // stride
  out = np.zeros((batch, rows, cols, kernel * kernel, channels), x.dtype)
  for i in range(rows):
    for j in range(cols):
      patch = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
      out[:, i, j] = patch.reshape(batch, kernel * kernel, channels)
  if level > 0:
    out = out[:, :, :, index_tables.valid_ind_unfold(focal_window, level)]
  return out


def neighbourhoods(x, window, expand):
  """`windows.expand_windows` on a [B, H, W, C] map (one head): [B, nWh, nWw, side**2, C]."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, 1, channels)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6)  # [B, nWh, nWw, 1, ws, ws, C]
  return np.asarray(windows.expand_windows(jnp.asarray(x), window, expand))[:, :, :, 0]


@pytest.mark.parametrize("window,expand,size", [(7, 3, (14, 21)), (7, 2, (7, 14)), (5, 1, (10, 10)),
                                                (7, 3, (7, 7))])
def test_neighbourhood_holds_the_window_and_the_official_ring(window, expand, size):
  x = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
  ours = neighbourhoods(x, window, expand)
  assert ours.shape[3] == index_tables.neighbourhood_size(window, expand)
  ring = ours[:, :, :, index_tables.ring_slot_keys(window, expand)]
  np.testing.assert_array_equal(ring, official_ring(x, window, expand))
  own = ours[:, :, :, index_tables.neighbourhood_window_keys(window, expand)]
  np.testing.assert_array_equal(own, np.asarray(windows.window_partition(jnp.asarray(x), window)))
  assert not index_tables.neighbourhood_unused(window, expand).any()


def test_ring_has_132_tokens_with_12_repeats():
  assert index_tables.ring_size(7, 3) == 132
  slots = index_tables.ring_slot_keys(7, 3)
  assert len(slots) - len(np.unique(slots)) == 12
  first, *repeats = index_tables.ring_bias_selectors(7, 3)
  assert first.sum() == 132 - 12 and sum(r.sum() for r in repeats) == 12
  # every ring slot lands in exactly one selector column
  np.testing.assert_array_equal(sum(s.sum(axis=1) for s in (first, *repeats)), np.ones(132))


@pytest.mark.parametrize("focal_window,level,grid", [(7, 0, (4, 6)), (5, 0, (3, 3)), (3, 1, (4, 2)),
                                                     (7, 1, (2, 3)), (1, 0, (2, 2))])
def test_unfold_neighbourhood_matches_unfold(focal_window, level, grid):
  stride = 2**level
  x = np.random.default_rng(1).standard_normal((2, grid[0] * stride, grid[1] * stride, 4))
  x = x.astype(np.float32)
  ours = np.asarray(windows.unfold_neighbourhood(jnp.asarray(x), focal_window, level))
  assert ours.shape[3] == index_tables.pooled_keys_per_window(focal_window, level)
  np.testing.assert_array_equal(ours, official_unfold(x, focal_window, level))
  # The padding mask marks exactly the zero-padded positions.
  ones = official_unfold(np.ones((1, *x.shape[1:3], 1), np.float32), focal_window, level)[0, ..., 0]
  np.testing.assert_array_equal(index_tables.unfold_valid_mask(grid, focal_window, level), ones)


def test_partition_and_reverse_round_trip():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 14, 21, 3)).astype(np.float32))
  parts = windows.window_partition(x, 7)
  assert parts.shape == (2, 2, 3, 49, 3)
  np.testing.assert_array_equal(np.asarray(parts[0, 1, 2, 8]), np.asarray(x[0, 8, 15]))
  np.testing.assert_array_equal(np.asarray(windows.window_reverse(parts, 7)), np.asarray(x))


def test_relative_position_one_hot_reproduces_indexing():
  table = np.random.default_rng(3).standard_normal((13 * 13, 2)).astype(np.float32)
  index = index_tables.relative_position_index((7, 7), (7, 7))
  direct = table[index.reshape(-1)]
  np.testing.assert_array_equal(index_tables.one_hot_index((7, 7), (7, 7)) @ table, direct)
  assert index.shape == (49, 49) and index.max() == 168


def test_fit_centrally_trims_and_pads_like_official():
  x = jnp.arange(7.0).reshape(1, 7, 1, 1)
  trimmed = windows.fit_centrally(x, 4, 1)  # trim 3: one on top, two at the bottom
  np.testing.assert_array_equal(np.asarray(trimmed).ravel(), [1, 2, 3, 4])
  padded = windows.fit_centrally(x, 10, 1)  # pad 3: one on top, two at the bottom
  np.testing.assert_array_equal(np.asarray(padded).ravel(), [0, 0, 1, 2, 3, 4, 5, 6, 0, 0])


def test_shift_mask_blocks_wrapped_regions():
  mask = index_tables.shift_mask((14, 14), 7, 3)
  assert mask.shape == (2, 2, 49, 49)
  assert (mask[0, 0] == 0).all()  # the top-left window holds one region
  assert set(np.unique(mask[1, 1])) == {0.0, -100.0}
