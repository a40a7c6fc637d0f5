"""A replica of torch's CPU `torch.topk(largest=True, sorted=True)`, ties included.

Why our own code: top-k is exact only up to how ties break, and on a grid of distances
almost everything ties. torch's CPU top-k copies (value, index) pairs in index order and
runs libstdc++'s `std::nth_element` + `std::sort` (when 64*k > n) or `std::partial_sort`
(otherwise), comparing values only, so ties break neither by index nor stably. NumPy's
sorts, `jax.lax.top_k` and "lowest index first" all pick other elements among equals.
`topk_indices` replays libstdc++'s introselect, heap select and introsort step by step,
so its indices (and their order) are the ones torch returns. The Focal-fast key sets
(`key_sets`) are built on it, because the official constructor picks them with
`torch.topk` and its buffers' layout follows that order.

Pure Python over lists plus NumPy for the block scan; cost is once per geometry.
"""

from __future__ import annotations

import heapq

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
