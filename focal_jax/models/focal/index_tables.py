"""Static index tables of focal attention, as NumPy constants.

Everything here depends only on static shapes (window size, expand size, focal window,
feature-map size), so it is computed once at trace time in NumPy and enters the XLA
program as a constant. Tables that the official implementation applies by fancy
indexing are turned into one-hot matrices so that the model applies them with a matmul
instead of a gather.
"""

from __future__ import annotations

import functools

import numpy as np

MASK_VALUE = -100.0  # the official additive mask value (not -inf)


@functools.lru_cache(maxsize=None)
def relative_position_index(q_window: tuple[int, int], k_window: tuple[int, int]) -> np.ndarray:
  """Index into a relative-position table for every (query, key) pair of two windows.

  Query and key windows are both anchored at the top-left corner. Returns int64
  [qh*qw, kh*kw] with values in [0, (qh+kh-1)*(qw+kw-1)).
  """
  qh, qw = q_window
  kh, kw = k_window
  q_rows, q_cols = np.meshgrid(np.arange(qh), np.arange(qw), indexing="ij")
  k_rows, k_cols = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
  d_rows = q_rows.reshape(-1, 1) - k_rows.reshape(1, -1) + (kh - 1)  # [Nq, Nk]
  d_cols = q_cols.reshape(-1, 1) - k_cols.reshape(1, -1) + (kw - 1)
  return (d_rows * (qw + kw - 1) + d_cols).astype(np.int64)


@functools.lru_cache(maxsize=None)
def one_hot_index(q_window: tuple[int, int], k_window: tuple[int, int]) -> np.ndarray:
  """`relative_position_index` as a float32 one-hot matrix [Nq*Nk, table_size]."""
  index = relative_position_index(q_window, k_window).reshape(-1)
  table_size = (q_window[0] + k_window[0] - 1) * (q_window[1] + k_window[1] - 1)
  return np.eye(table_size, dtype=np.float32)[index]


# The four cyclic rolls of the expanded ring, in the official order (top-left,
# top-right, bottom-left, bottom-right). Each entry is the (row, column) sign of the roll.
RING_ROLL_SIGNS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def ring_keep_mask(window: int, expand: int) -> np.ndarray:
  """Which tokens of each rolled window belong to the ring: bool [4, window, window].

  A rolled window also contains tokens of the query window itself; the ring keeps only
  the ones outside it (4 * (window**2 - (window - expand)**2) tokens in all).
  """
  keep = np.ones((4, window, window), dtype=bool)
  inner = slice(None, window - expand), slice(expand, None)
  for r, (row_sign, col_sign) in enumerate(RING_ROLL_SIGNS):
    rows = inner[0] if row_sign < 0 else inner[1]
    cols = inner[0] if col_sign < 0 else inner[1]
    keep[r, rows, cols] = False
  return keep


def ring_size(window: int, expand: int) -> int:
  """Number of ring keys per query window (132 for window 7, expand 3)."""
  return 4 * (window * window - (window - expand) ** 2) if expand > 0 else 0


def unfold_kernel_size(focal_window: int, level: int) -> int:
  """Kernel of the official unfold over the level-`level` pooled map."""
  return 2 * (focal_window // 2) + 2**level + (2**level - 1)


def pooled_keys_per_window(focal_window: int, level: int) -> int:
  """Keys a query window takes from pooled level `level` (kernel side minus the trim)."""
  return (focal_window + 2**level - 1) ** 2


@functools.lru_cache(maxsize=None)
def unfold_valid_mask(num_windows: tuple[int, int], focal_window: int, level: int) -> np.ndarray:
  """1 where the unfolded neighbourhood of a window lies inside the pooled map.

  Mirrors an unfold of a ones map with zero padding, stride 2**level, keeping the
  kernel positions the official code keeps at `level`. Returns float32
  [nWh, nWw, keys] with keys = pooled_keys_per_window(focal_window, level).
  """
  stride = 2**level
  kernel = unfold_kernel_size(focal_window, level)
  pad = kernel // 2
  first = stride - 1  # the official code drops the first stride-1 rows/cols at level > 0
  rows = np.arange(num_windows[0])[:, None] * stride + np.arange(first, kernel)[None] - pad
  cols = np.arange(num_windows[1])[:, None] * stride + np.arange(first, kernel)[None] - pad
  valid_rows = (rows >= 0) & (rows < num_windows[0] * stride)  # [nWh, k]
  valid_cols = (cols >= 0) & (cols < num_windows[1] * stride)  # [nWw, k]
  valid = valid_rows[:, None, :, None] & valid_cols[None, :, None, :]  # [nWh, nWw, k, k]
  return valid.reshape(num_windows[0], num_windows[1], -1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def shift_mask(size: tuple[int, int], window: int, shift: int) -> np.ndarray:
  """The Swin-style additive mask for a cyclically shifted map: [nWh, nWw, N, N]."""
  height, width = size
  region = np.zeros((height, width), dtype=np.float32)
  bands = lambda n: (slice(0, n - window), slice(n - window, n - shift), slice(n - shift, n))
  label = 0
  for rows in bands(height):
    for cols in bands(width):
      region[rows, cols] = label
      label += 1
  # [nWh, ws, nWw, ws] -> [nWh, nWw, ws*ws]
  windows = region.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(height // window, width // window, -1)
  differs = windows[..., None, :] != windows[..., :, None]
  return np.where(differs, MASK_VALUE, 0.0).astype(np.float32)


# Buffers the official implementation registers; the converter writes them so that an
# exported checkpoint loads into the official model with strict=True.
def valid_ind_rolled(window: int, expand: int) -> np.ndarray:
  """Official `valid_ind_rolled` buffer: flat indices of the ring tokens (int64)."""
  return np.flatnonzero(ring_keep_mask(window, expand).reshape(-1)).astype(np.int64)


def valid_ind_unfold(focal_window: int, level: int) -> np.ndarray:
  """Official `valid_ind_unfold_{level}` buffer (level > 0), int64."""
  kernel = unfold_kernel_size(focal_window, level)
  keep = np.zeros((kernel, kernel), dtype=bool)
  keep[2**level - 1:, 2**level - 1:] = True
  return np.flatnonzero(keep.reshape(-1)).astype(np.int64)


# The expanded neighbourhood of a window: the window and the ring around it.
#
# The official ring keys of a window all lie in its (window + 2*expand)**2 neighbourhood,
# and 12 of the 132 (window 7, expand 3) repeat a token with a second learned bias. A
# repeated key k with biases b1, b2 contributes exp(q.k + b1) + exp(q.k + b2) =
# exp(q.k + logaddexp(b1, b2)) to the softmax, so attending once to every token of the
# neighbourhood, with merged biases, gives the official output exactly. The model lists
# the neighbourhood row-major (origin `expand` rows above and columns left of the window).


def neighbourhood_size(window: int, expand: int) -> int:
  """Tokens in the expanded neighbourhood of a window (169 for window 7, expand 3)."""
  return (window + 2 * expand) ** 2


@functools.lru_cache(maxsize=None)
def neighbourhood_window_keys(window: int, expand: int) -> np.ndarray:
  """Neighbourhood index of each token of the window itself, row-major. int64 [window**2]."""
  side = window + 2 * expand
  rows, cols = np.meshgrid(np.arange(window) + expand, np.arange(window) + expand, indexing="ij")
  return (rows * side + cols).ravel().astype(np.int64)


@functools.lru_cache(maxsize=None)
def ring_slot_keys(window: int, expand: int) -> np.ndarray:
  """Neighbourhood index of each official ring key, in the official order. int64 [ring]."""
  local_r, local_c = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  keep = ring_keep_mask(window, expand)
  side = window + 2 * expand
  keys = []
  for r, (row_sign, col_sign) in enumerate(RING_ROLL_SIGNS):
    # jnp.roll(x, s)[i] = x[i - s]: the rolled window holds x[i*ws + p - sign*expand].
    rows = local_r[keep[r]] - row_sign * expand + expand
    cols = local_c[keep[r]] - col_sign * expand + expand
    keys.append(rows * side + cols)
  return np.concatenate(keys).astype(np.int64)


@functools.lru_cache(maxsize=None)
def window_key_selector(window: int, expand: int) -> np.ndarray:
  """One-hot [window**2, neighbourhood]: the window's own tokens in the neighbourhood."""
  selector = np.zeros((window * window, neighbourhood_size(window, expand)), np.float32)
  selector[np.arange(window * window), neighbourhood_window_keys(window, expand)] = 1.0
  return selector


@functools.lru_cache(maxsize=None)
def ring_bias_selectors(window: int, expand: int) -> tuple[np.ndarray, ...]:
  """One-hot maps [ring, neighbourhood] from the official ring slots to their tokens.

  Selector d picks, for every neighbourhood token, the d-th ring slot that holds it (a
  zero column where there is none); the first selector covers every ring token once,
  later ones only the repeats. The window's own tokens are no ring slots.
  """
  slots_of = [[] for _ in range(neighbourhood_size(window, expand))]
  for slot, key in enumerate(ring_slot_keys(window, expand)):
    slots_of[key].append(slot)
  depth = max(len(s) for s in slots_of)
  selectors = np.zeros((depth, ring_size(window, expand), len(slots_of)), np.float32)
  for key, slots in enumerate(slots_of):
    for d, slot in enumerate(slots):
      selectors[d, slot, key] = 1.0
  return tuple(selectors)


@functools.lru_cache(maxsize=None)
def neighbourhood_unused(window: int, expand: int) -> np.ndarray:
  """Neighbourhood tokens that are neither in the window nor in the official ring: bool.

  None for expand <= window / 2 (every official configuration); these tokens get no
  attention (an additive mask of -1e9, which underflows to exactly zero weight).
  """
  used = np.zeros(neighbourhood_size(window, expand), bool)
  used[neighbourhood_window_keys(window, expand)] = True
  if expand > 0:
    used[ring_slot_keys(window, expand)] = True
  return ~used
