"""Static key layouts of Focal-fast attention, as NumPy constants (no gather needed).

Focal-fast gives every query window a fixed set of keys per level (`key_sets`): the
`focal_topK` pixels nearest to the window's centre (level 0) and the nearest pooled
windows (level 1). The sets are static per grid, so instead of gathering them this
module describes, per level and per axis, a rectangle of keys that every window can cut
from the key map with static slices, plus a mask of the official set inside it:

- "neighbourhood" along an axis: window a takes key positions step*a + lo ... step*a + hi
  (lo, hi: the extreme offsets of any window's set; the map is zero-padded where the
  range leaves it). The position bias then depends on the offset only, not on the window.
- "dense" along an axis: every window takes the whole axis (chosen when the axis is
  shorter than the neighbourhood span, e.g. the pooled level at 224).

Coordinates follow the official position-bias input: query pixel minus key position, in
pixels, where a level-0 key sits on its pixel and a level-1 key (a pooled window) at its
window's centre pixel (`stride * k + centre`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from focal_jax.models.focal_fast import key_sets


@dataclasses.dataclass(frozen=True)
class AxisLayout:
  """Keys along one axis (rows or columns) for query windows first .. first+windows-1."""

  first: int  # first query window along the axis
  windows: int  # query windows along the axis
  keys_in_map: int  # key positions along the axis (pixels, or pooled windows)
  step: int  # key positions per query window (the window size at level 0, else 1)
  dense: bool  # every window takes all `keys_in_map` positions
  lo: int  # neighbourhood: first key position of window a is step*a + lo
  size: int  # keys per window along the axis

  @property
  def pad(self) -> tuple[int, int]:
    """Zero padding of the key map so that every window's range lies inside it."""
    if self.dense:
      return 0, 0
    start = self.step * self.first + self.lo
    last = self.step * (self.first + self.windows - 1) + self.lo + self.size - 1
    return max(0, -start), max(0, last - (self.keys_in_map - 1))

  def key_positions(self) -> np.ndarray:
    """Key position (possibly outside the map) of every (window, slot): int [windows, size]."""
    if self.dense:
      return np.broadcast_to(np.arange(self.size), (self.windows, self.size))
    window = self.first + np.arange(self.windows)
    return self.step * window[:, None] + self.lo + np.arange(self.size)


def _axis_layout(first: int, windows: int, keys_in_map: int, step: int, positions: np.ndarray,
                 window_index: np.ndarray) -> AxisLayout:
  """The cheaper of dense and neighbourhood for key `positions` [nW, K] of windows `window_index`."""
  offsets = positions - step * window_index[:, None]
  lo, hi = int(offsets.min()), int(offsets.max())
  if keys_in_map <= hi - lo + 1:
    return AxisLayout(first, windows, keys_in_map, step, True, 0, keys_in_map)
  return AxisLayout(first, windows, keys_in_map, step, False, lo, hi - lo + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class LevelLayout:
  """Where one level's keys lie for every query window, and which of them are official."""

  rows: AxisLayout
  cols: AxisLayout
  stride: int  # pixels per key position (1 at level 0, the window size at level 1)
  centre: int  # pixel offset of a key position's coordinate (0, or window // 2)
  member: np.ndarray  # bool [nWh, nWw, rows.size * cols.size]: the official set
  num_keys: int  # keys per query in the official set (K_l)

  @property
  def size(self) -> int:
    return self.rows.size * self.cols.size


def _level_layout(sets: np.ndarray, grid: tuple[int, int], num_windows: tuple[int, int],
                  rows: tuple[int, int], cols: tuple[int, int], step: int, stride: int,
                  centre: int) -> LevelLayout:
  """The layout of the window block rows[0]:rows[1] x cols[0]:cols[1] at one level."""
  a, b = np.meshgrid(np.arange(*rows), np.arange(*cols), indexing="ij")
  a, b = a.reshape(-1), b.reshape(-1)  # the block's windows, row-major
  sets = sets[a * num_windows[1] + b]  # [n, K]
  key_rows, key_cols = sets // grid[1], sets % grid[1]
  row_axis = _axis_layout(rows[0], rows[1] - rows[0], grid[0], step, key_rows, a)
  col_axis = _axis_layout(cols[0], cols[1] - cols[0], grid[1], step, key_cols, b)
  slot_rows = key_rows - row_axis.key_positions()[a - rows[0], :1]  # slot along the axis
  slot_cols = key_cols - col_axis.key_positions()[b - cols[0], :1]
  member = np.zeros((len(a), row_axis.size * col_axis.size), bool)
  np.put_along_axis(member, slot_rows * col_axis.size + slot_cols, True, axis=1)
  return LevelLayout(row_axis, col_axis, stride, centre,
                     member.reshape(row_axis.windows, col_axis.windows, -1), sets.shape[1])


def _window_groups(n: int, grouped: bool) -> list[tuple[int, int]]:
  """[start, stop) ranges of query windows along an axis: first, interior, last."""
  if not grouped or n == 1:
    return [(0, n)]
  return [(0, 1), (1, n - 1), (n - 1, n)] if n >= 3 else [(0, 1), (1, 2)]


@dataclasses.dataclass(frozen=True, eq=False)
class WindowBlock:
  """A rectangle of query windows that shares one key layout per level."""

  rows: tuple[int, int]  # [start, stop) along the window rows
  cols: tuple[int, int]
  levels: tuple[LevelLayout, ...]


# Windows at the borders of the map take their keys from a box shifted inward, so one box
# for all windows (the window +-5 at 224) holds more keys than any of them needs. Cut
# separately, the first, interior and last window rows and columns (9 blocks) need the
# tight boxes: 13x13 inside the map, 11x15 along edges, 12x12 at corners, for 128 keys.
GROUP_BORDER_WINDOWS = True


def window_blocks(grid: tuple[int, int], window: int, top_k: int, focal_level: int,
                  grouped: bool | None = None) -> tuple[WindowBlock, ...]:
  """Key layouts of levels 0 .. focal_level-1 for a stage grid of whole `window`-sized
  windows, per block of windows (`GROUP_BORDER_WINDOWS`), row-major over the blocks."""
  grouped = GROUP_BORDER_WINDOWS if grouped is None else grouped
  return _window_blocks(tuple(grid), window, top_k, focal_level, grouped)


@functools.lru_cache(maxsize=None)
def _window_blocks(grid: tuple[int, int], window: int, top_k: int, focal_level: int,
                   grouped: bool) -> tuple[WindowBlock, ...]:
  num_windows = (grid[0] // window, grid[1] // window)
  pixel_sets = key_sets.pixel_key_sets(*grid, window, top_k)
  window_sets = key_sets.window_key_sets(*num_windows, top_k) if focal_level > 1 else None
  blocks = []
  for rows in _window_groups(num_windows[0], grouped):
    for cols in _window_groups(num_windows[1], grouped):
      levels = [_level_layout(pixel_sets, grid, num_windows, rows, cols, step=window, stride=1,
                              centre=0)]
      if window_sets is not None:
        levels.append(_level_layout(window_sets, num_windows, num_windows, rows, cols, step=1,
                                    stride=window, centre=window // 2))
      blocks.append(WindowBlock(rows, cols, tuple(levels)))
  return tuple(blocks)


def query_minus_key(axis: AxisLayout, window: int, stride: int, centre: int) -> np.ndarray:
  """Bias coordinate along the axis, query pixel minus key coordinate:
  int [windows or 1, window, size] (1 when it does not depend on the window)."""
  keys = stride * axis.key_positions() + centre  # [windows, size] pixel coordinates
  queries = window * (axis.first + np.arange(axis.windows))[:, None] + np.arange(window)
  coords = queries[:, :, None] - keys[:, None, :]
  return coords[:1] if not axis.dense else coords  # neighbourhoods: the same for every window


def additive_mask(layouts: tuple[LevelLayout, ...]) -> np.ndarray:
  """0 on the official keys, -1e9 (zero weight) elsewhere: float32 [nWh, nWw, 1, 1, keys]."""
  member = np.concatenate([layout.member for layout in layouts], axis=-1)
  return np.where(member, 0.0, -1e9).astype(np.float32)[:, :, None, None, :]
