"""Static key sets of Focal-fast (v2) attention, exactly as the official constructor builds them.

Every query window of a Focal-fast block attends to a fixed set of keys: at level 0 the
`K0 = min(top_k, H*W)` stage pixels nearest to the window's centre pixel, at level 1 the
`K1 = min(top_k, nWh*nWw)` nearest pooled windows. The official code picks them with
`torch.topk(-distance, K)` on the CPU. Distances tie a lot on a grid, and torch breaks the
ties neither by index nor stably: its CPU top-k copies (value, index) pairs in index order
and runs libstdc++'s `std::nth_element` + `std::sort` (when 64*K > n) or
`std::partial_sort` (otherwise), comparing values only. `topk_indices` replays those
algorithms step by step, so the sets (and their order, which fixes the layout of the
official buffers) are the official ones. "Lowest index first" (`np.argsort(kind="stable")`,
`jax.lax.top_k`) gives different sets.

Grids: any grid of whole windows, square or not (the official constructor builds
non-square ones too when given a (height, width) img_size, e.g. 224x448; its sets equal
these). The window centre is (ws*a + ws//2, ws*b + ws//2); the official formula takes its
scale factor from the rows for both axes, which is the same on every grid of whole
windows. Grids that are not whole windows are refused (the official code fails on them);
a model that supports them pads first.

Everything is NumPy and cached per geometry; the returned arrays are read-only. Cost, once
per geometry, all four stages (measured on 2 shared cores under load): 0.15 s at 224,
0.8 s at 448, 7 s at 896 (stage 1 there runs the heap selection over 50,176 pixels for
each of 1,024 windows, about 4,400 heap replacements each).
"""

from __future__ import annotations

import functools
import heapq
import math

import numpy as np

# torch's CPU top-k switches from nth_element + sort to partial_sort when k * 64 <= n.
PARTIAL_SORT_FACTOR = 64
# libstdc++'s std::sort leaves ranges of at most this many elements to insertion sort.
_SORT_THRESHOLD = 16
# Heap-select scans the input in blocks of this many elements with NumPy, so that only the
# elements that beat the heap's top at the start of a block are looked at in Python.
_SCAN_BLOCK = 512


# --- libstdc++ algorithms over a list `a` of indices into the values `v` ------------------
# `a[i]` is the index of the (value, index) pair at position i; the comparator is torch's
# "greater" for largest=True: comp(x, y) = v[x] > v[y]. Ties compare false both ways.


def _adjust_heap(a: list, v: list, first: int, hole: int, length: int, value: int) -> None:
  """std::__adjust_heap followed by std::__push_heap on a[first:first+length]."""
  top = hole
  child = hole
  while child < (length - 1) // 2:
    child = 2 * (child + 1)
    if v[a[first + child]] > v[a[first + child - 1]]:
      child -= 1
    a[first + hole] = a[first + child]
    hole = child
  if length % 2 == 0 and child == (length - 2) // 2:
    child = 2 * (child + 1)
    a[first + hole] = a[first + child - 1]
    hole = child - 1
  # __push_heap(first, hole, top, value)
  parent = (hole - 1) // 2
  value_key = v[value]
  while hole > top and v[a[first + parent]] > value_key:
    a[first + hole] = a[first + parent]
    hole = parent
    parent = (hole - 1) // 2
  a[first + hole] = value


def _make_heap(a: list, v: list, first: int, last: int) -> None:
  length = last - first
  if length < 2:
    return
  parent = (length - 2) // 2
  while True:
    _adjust_heap(a, v, first, parent, length, a[first + parent])
    if parent == 0:
      return
    parent -= 1


def _pop_heap(a: list, v: list, first: int, last: int, result: int) -> None:
  """std::__pop_heap: the top goes to `result`, the element at `result` into the heap."""
  value = a[result]
  a[result] = a[first]
  _adjust_heap(a, v, first, 0, last - first, value)


def _sort_heap(a: list, v: list, first: int, last: int) -> None:
  while last - first > 1:
    last -= 1
    _pop_heap(a, v, first, last, last)


def _heap_select(a: list, v: list, first: int, middle: int, last: int) -> None:
  """std::__heap_select: a[first:middle] ends as a heap of the best elements."""
  _make_heap(a, v, first, middle)
  for i in range(middle, last):
    if v[a[i]] > v[a[first]]:
      _pop_heap(a, v, first, middle, i)


def _insertion_sort(a: list, v: list, first: int, last: int) -> None:
  """std::__insertion_sort (stable)."""
  if first == last:
    return
  for i in range(first + 1, last):
    value = a[i]
    key = v[value]
    if key > v[a[first]]:
      a[first + 1:i + 1] = a[first:i]
      a[first] = value
    else:
      j = i
      while key > v[a[j - 1]]:
        a[j] = a[j - 1]
        j -= 1
      a[j] = value


def _unguarded_linear_insert(a: list, v: list, last: int) -> None:
  value = a[last]
  key = v[value]
  j = last
  while key > v[a[j - 1]]:
    a[j] = a[j - 1]
    j -= 1
  a[j] = value


def _move_median_to_first(a: list, v: list, result: int, x: int, y: int, z: int) -> None:
  vx, vy, vz = v[a[x]], v[a[y]], v[a[z]]
  if vx > vy:
    if vy > vz:
      pick = y
    elif vx > vz:
      pick = z
    else:
      pick = x
  elif vx > vz:
    pick = x
  elif vy > vz:
    pick = z
  else:
    pick = y
  a[result], a[pick] = a[pick], a[result]


def _unguarded_partition_pivot(a: list, v: list, first: int, last: int) -> int:
  """Median of (first+1, mid, last-1) to `first`, then an unguarded Hoare partition."""
  mid = first + (last - first) // 2
  _move_median_to_first(a, v, first, first + 1, mid, last - 1)
  pivot = v[a[first]]
  lo, hi = first + 1, last
  while True:
    while v[a[lo]] > pivot:
      lo += 1
    hi -= 1
    while pivot > v[a[hi]]:
      hi -= 1
    if not lo < hi:
      return lo
    a[lo], a[hi] = a[hi], a[lo]
    lo += 1


def _log2_floor(n: int) -> int:
  return n.bit_length() - 1


def _introsort_loop(a: list, v: list, first: int, last: int, depth_limit: int) -> None:
  while last - first > _SORT_THRESHOLD:
    if depth_limit == 0:
      _heap_select(a, v, first, last, last)  # std::__partial_sort(first, last, last)
      _sort_heap(a, v, first, last)
      return
    depth_limit -= 1
    cut = _unguarded_partition_pivot(a, v, first, last)
    _introsort_loop(a, v, cut, last, depth_limit)
    last = cut


def _std_sort(a: list, v: list, first: int, last: int) -> None:
  """std::sort: introsort, then the final insertion sort."""
  if first == last:
    return
  _introsort_loop(a, v, first, last, 2 * _log2_floor(last - first))
  if last - first > _SORT_THRESHOLD:
    _insertion_sort(a, v, first, first + _SORT_THRESHOLD)
    for i in range(first + _SORT_THRESHOLD, last):
      _unguarded_linear_insert(a, v, i)
  else:
    _insertion_sort(a, v, first, last)


def _nth_element(a: list, v: list, first: int, nth: int, last: int) -> None:
  """std::nth_element: introselect."""
  if first == last or nth == last:
    return
  depth_limit = 2 * _log2_floor(last - first)
  while last - first > 3:
    if depth_limit == 0:
      _heap_select(a, v, first, nth + 1, last)
      a[first], a[nth] = a[nth], a[first]
      return
    depth_limit -= 1
    cut = _unguarded_partition_pivot(a, v, first, last)
    if cut <= nth:
      first = cut
    else:
      last = cut
  _insertion_sort(a, v, first, last)


class _Pair(float):
  """A (value, index) pair that compares by value only (float's own comparisons, so
  `heapq` runs them at C speed), as torch's comparator does."""

  __slots__ = ("index",)


def _pair(value: float, index: int) -> _Pair:
  pair = _Pair(value)
  pair.index = index
  return pair


def _partial_sort_scanned(scores: np.ndarray, k: int) -> list:
  """std::partial_sort(begin, begin+k, end) over (value, index) pairs in index order.

  heapq performs exactly libstdc++'s heap steps here (a min-heap under torch's "greater":
  the hole goes down to a leaf through the smaller child, the right one on ties, then the
  new element rises while strictly smaller than its parent), so `heapreplace` is
  `__pop_heap(first, middle, i)` and `heappop` is one step of `sort_heap`. The initial
  heap is built by `_make_heap`. The scan for elements that beat the top runs block-wise
  in NumPy: the top only grows, so an element that does not beat the top at the start of
  its block never enters.
  """
  n = scores.shape[0]
  values = scores[:k].tolist()
  order = list(range(k))
  _make_heap(order, values, 0, k)
  heap = [_pair(values[i], i) for i in order]
  replace, pair_of = heapq.heapreplace, _Pair
  top = float(heap[0])
  for start in range(k, n, _SCAN_BLOCK):
    block = scores[start:start + _SCAN_BLOCK]
    hits = (block > top).nonzero()[0]
    if hits.size == 0:
      continue
    for i, value in zip((hits + start).tolist(), block[hits].tolist()):
      if value > top:
        pair = pair_of(value)
        pair.index = i
        replace(heap, pair)
        top = float(heap[0])
  popped = [heapq.heappop(heap).index for _ in range(k)]  # sort_heap fills from the back
  return popped[::-1]


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest of `scores` in the order `torch.topk(largest=True,
  sorted=True)` returns them on the CPU, ties included.

  scores: 1-D, compared as float32 (NaN refused). Returns int64 [k].
  """
  scores = np.asarray(scores)
  if scores.ndim != 1:
    raise ValueError(f"topk_indices takes 1-D scores, got shape {scores.shape}.")
  scores = scores.astype(np.float32)
  n = scores.shape[0]
  if not 0 <= k <= n:
    raise ValueError(f"k={k} must lie in [0, {n}] for {n} scores.")
  if np.isnan(scores).any():
    raise ValueError("topk_indices: scores contain NaN; the replica covers finite and "
                     "infinite values only.")
  if k == 0:
    return np.zeros(0, dtype=np.int64)
  if k * PARTIAL_SORT_FACTOR <= n:
    order = _partial_sort_scanned(scores, k)
  else:
    v = scores.tolist()
    order = list(range(n))
    _nth_element(order, v, 0, k - 1, n)
    _std_sort(order, v, 0, k - 1)
    order = order[:k]
  return np.asarray(order, dtype=np.int64)


def selection_path(n: int, k: int) -> str:
  """Which torch CPU top-k algorithm a selection of k out of n goes through."""
  return "partial_sort" if k * PARTIAL_SORT_FACTOR <= n else "nth_element"


# --- Key sets of a Focal-fast block ---------------------------------------------------------


def _check_grid(grid_h: int, grid_w: int, window_size: int) -> tuple[int, int]:
  if window_size <= 0 or grid_h <= 0 or grid_w <= 0:
    raise ValueError(f"Grid {grid_h}x{grid_w} with window {window_size}: all must be positive.")
  if grid_h % window_size or grid_w % window_size:
    raise ValueError(
        f"Focal-fast key sets need a grid of whole windows: {grid_h}x{grid_w} is not a multiple "
        f"of window_size {window_size}. Pad the map to "
        f"{math.ceil(grid_h / window_size) * window_size}x"
        f"{math.ceil(grid_w / window_size) * window_size} first.")
  return grid_h // window_size, grid_w // window_size


def nearest_points(q_rows: np.ndarray, q_cols: np.ndarray, k_h: int, k_w: int,
                   top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """For each query point (row, col), the official top-k nearest points of a k_h x k_w grid
  (`get_topk_closest_indice` of the official code, for any query points).

  Returns indices int64 [nQ, K] (flattened r*k_w + c) and query-minus-key coordinates
  int64 [nQ, K, 2] (row, col), K = min(top_k, k_h*k_w).
  """
  k_rows = np.repeat(np.arange(k_h), k_w).astype(np.float32)  # [nK], row-major
  k_cols = np.tile(np.arange(k_w), k_h).astype(np.float32)
  k = min(top_k, k_h * k_w)
  q_rows, q_cols = q_rows.reshape(-1), q_cols.reshape(-1)
  indices = np.empty((q_rows.size, k), dtype=np.int64)
  for q, (r, c) in enumerate(zip(q_rows.tolist(), q_cols.tolist())):
    # As officially: float32 differences squared, float32 sqrt, negated, then top-k.
    scores = -np.sqrt((np.float32(r) - k_rows) ** 2 + (np.float32(c) - k_cols) ** 2)
    indices[q] = topk_indices(scores, k)
  coords = np.stack([q_rows[:, None] - indices // k_w, q_cols[:, None] - indices % k_w],
                    axis=-1).astype(np.int64)  # [nQ, K, 2]
  return indices, coords


@functools.lru_cache(maxsize=None)
def _pixel_sets(grid_h: int, grid_w: int, window_size: int, top_k: int):
  n_wh, n_ww = _check_grid(grid_h, grid_w, window_size)
  centre_r, centre_c = np.meshgrid(np.arange(n_wh) * window_size + window_size // 2,
                                   np.arange(n_ww) * window_size + window_size // 2, indexing="ij")
  indices, coords = nearest_points(centre_r, centre_c, grid_h, grid_w, top_k)
  indices.setflags(write=False)
  coords.setflags(write=False)
  return indices, coords


@functools.lru_cache(maxsize=None)
def _window_sets(n_wh: int, n_ww: int, top_k: int):
  if n_wh <= 0 or n_ww <= 0:
    raise ValueError(f"Window grid {n_wh}x{n_ww} must be positive.")
  rows, cols = np.meshgrid(np.arange(n_wh), np.arange(n_ww), indexing="ij")
  indices, coords = nearest_points(rows, cols, n_wh, n_ww, top_k)
  indices.setflags(write=False)
  coords.setflags(write=False)
  return indices, coords


def pixel_key_sets(grid_h: int, grid_w: int, window_size: int, top_k: int) -> np.ndarray:
  """Level-0 keys: for each window (row-major over the window grid), the flattened stage
  pixels r*grid_w + c of the K0 = min(top_k, grid_h*grid_w) pixels nearest to the window's
  centre pixel, in the official order (`topk_cloest_indice_0`). int64 [nWh*nWw, K0].

  `window_size` is the block's effective window (the official stage fallback, window =
  min(grid) when the grid is not larger than the window, is the caller's to apply).
  """
  return _pixel_sets(int(grid_h), int(grid_w), int(window_size), int(top_k))[0]


def window_key_sets(n_wh: int, n_ww: int, top_k: int) -> np.ndarray:
  """Level-1 keys: for each window, the flattened window-grid positions a*n_ww + b of the
  K1 = min(top_k, n_wh*n_ww) nearest windows, in the official order
  (`topk_cloest_indice_1`). int64 [nWh*nWw, K1]."""
  return _window_sets(int(n_wh), int(n_ww), int(top_k))[0]


def window_offsets(window_size: int) -> np.ndarray:
  """(row, col) offset of each pixel of a window from its centre pixel: the official
  `attn.window_coords` buffer, int64 [ws, ws, 2] (offsets -ws//2 .. ws - 1 - ws//2)."""
  r, c = np.meshgrid(np.arange(window_size) - window_size // 2,
                     np.arange(window_size) - window_size // 2, indexing="ij")
  return np.stack([r, c], axis=-1).astype(np.int64)


def key_coords(level: int, grid_h: int, grid_w: int, window_size: int, top_k: int) -> np.ndarray:
  """The official `topk_cloest_coords_{level}`: float32 [nW, ws*ws, K_level, 2], the (row,
  col) coordinates the position-bias MLP of that level takes, query minus key.

  level 0: q_pixel - k_pixel in stage pixels (the window's centre minus the key pixel,
  plus the query's offset from the centre).
  level 1: ws * (query window - key window) + the query's offset from its window centre.
  `grid_h, grid_w` are the stage grid in pixels at both levels (the window grid is
  grid / window_size). Queries are the window's pixels in row-major order.
  """
  n_wh, n_ww = _check_grid(int(grid_h), int(grid_w), int(window_size))
  if level == 0:
    coords = _pixel_sets(int(grid_h), int(grid_w), int(window_size), int(top_k))[1]
  elif level == 1:
    coords = _window_sets(n_wh, n_ww, int(top_k))[1] * window_size
  else:
    raise ValueError(f"Focal-fast has key levels 0 and 1; got level={level}.")
  offsets = window_offsets(window_size).reshape(1, -1, 1, 2)  # [1, ws*ws, 1, 2]
  return (coords[:, None, :, :] + offsets).astype(np.float32)  # [nW, ws*ws, K, 2]
