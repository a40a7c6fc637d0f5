"""Static key sets of Focal-fast attention, exactly as the official constructor builds them.

Every query window of a Focal-fast block attends to a fixed set of keys: at level 0 the
`K0 = min(top_k, H*W)` stage pixels nearest to the window's centre pixel, at level 1 the
`K1 = min(top_k, nWh*nWw)` nearest pooled windows. The official code picks them with
`torch.topk(-distance, K)` on the CPU. Distances tie a lot on a grid, and torch breaks the
ties neither by index nor stably; `torch_topk.topk_indices` replays its algorithms, so the
sets (and their order, which fixes the layout of the official buffers) are the official
ones. "Lowest index first" (`np.argsort(kind="stable")`, `jax.lax.top_k`) gives different
sets.

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
import math

import numpy as np

from focal_jax.models.focal_fast.torch_topk import topk_indices

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
