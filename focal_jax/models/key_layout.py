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

from focal_jax.models import key_sets


@dataclasses.dataclass(frozen=True)
class AxisLayout:
  """Keys along one axis (rows or columns) for each of `windows` query windows."""

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
    last = self.step * (self.windows - 1) + self.lo + self.size - 1
    return max(0, -self.lo), max(0, last - (self.keys_in_map - 1))

  def key_positions(self) -> np.ndarray:
    """Key position (possibly outside the map) of every (window, slot): int [windows, size]."""
    if self.dense:
      return np.broadcast_to(np.arange(self.size), (self.windows, self.size))
    return self.step * np.arange(self.windows)[:, None] + self.lo + np.arange(self.size)


def _axis_layout(windows: int, keys_in_map: int, step: int, positions: np.ndarray,
                 window_index: np.ndarray) -> AxisLayout:
  """The cheaper of dense and neighbourhood for key `positions` [nW, K] of windows `window_index`."""
  offsets = positions - step * window_index[:, None]
  lo, hi = int(offsets.min()), int(offsets.max())
  if keys_in_map <= hi - lo + 1:
    return AxisLayout(windows, keys_in_map, step, True, 0, keys_in_map)
  return AxisLayout(windows, keys_in_map, step, False, lo, hi - lo + 1)


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
                  step: int, stride: int, centre: int) -> LevelLayout:
  n_wh, n_ww = num_windows
  window = np.arange(n_wh * n_ww)
  key_rows, key_cols = sets // grid[1], sets % grid[1]  # [nW, K] each
  rows = _axis_layout(n_wh, grid[0], step, key_rows, window // n_ww)
  cols = _axis_layout(n_ww, grid[1], step, key_cols, window % n_ww)
  slot_rows = key_rows - rows.key_positions()[window // n_ww, :1]  # slot along the axis
  slot_cols = key_cols - cols.key_positions()[window % n_ww, :1]
  member = np.zeros((n_wh * n_ww, rows.size * cols.size), bool)
  np.put_along_axis(member, slot_rows * cols.size + slot_cols, True, axis=1)
  return LevelLayout(rows, cols, stride, centre, member.reshape(n_wh, n_ww, -1), sets.shape[1])


@functools.lru_cache(maxsize=None)
def level_layouts(grid: tuple[int, int], window: int, top_k: int,
                  focal_level: int) -> tuple[LevelLayout, ...]:
  """Layouts of levels 0 .. focal_level-1 for a stage grid of whole `window`-sized windows."""
  num_windows = (grid[0] // window, grid[1] // window)
  layouts = [_level_layout(key_sets.pixel_key_sets(*grid, window, top_k), grid, num_windows,
                           step=window, stride=1, centre=0)]
  if focal_level > 1:
    layouts.append(_level_layout(key_sets.window_key_sets(*num_windows, top_k), num_windows,
                                 num_windows, step=1, stride=window, centre=window // 2))
  return tuple(layouts)


def query_minus_key(axis: AxisLayout, window: int, stride: int, centre: int) -> np.ndarray:
  """Bias coordinate along the axis, query pixel minus key coordinate:
  int [windows or 1, window, size] (1 when it does not depend on the window)."""
  keys = stride * axis.key_positions() + centre  # [windows, size] pixel coordinates
  queries = window * np.arange(axis.windows)[:, None] + np.arange(window)  # [windows, window]
  coords = queries[:, :, None] - keys[:, None, :]
  return coords[:1] if not axis.dense else coords  # neighbourhoods: the same for every window


def additive_mask(layouts: tuple[LevelLayout, ...]) -> np.ndarray:
  """0 on the official keys, -1e9 (zero weight) elsewhere: float32 [nWh, nWw, 1, 1, keys]."""
  member = np.concatenate([layout.member for layout in layouts], axis=-1)
  return np.where(member, 0.0, -1e9).astype(np.float32)[:, :, None, None, :]
