"""Adaptive average pooling and bilinear resizing as static matrices (no gather, no scatter).

Both are separable: one [out, in] NumPy matrix per spatial axis, applied with `einsum`.
The matrices reproduce PyTorch exactly: `AdaptiveAvgPool2d` bins (start floor(i*in/out),
end ceil((i+1)*in/out), which overlap when out does not divide in) and
`F.interpolate(mode="bilinear", align_corners=False)` with an output size (source
coordinate (o + 0.5) * in / out - 0.5, clamped at 0), as mmsegmentation's `resize` calls it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in]: row i averages PyTorch's adaptive bin i."""
  matrix = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -(-((i + 1) * size_in) // size_out)  # ceil
    matrix[i, start:end] = 1.0 / (end - start)
  matrix.flags.writeable = False
  return matrix


@functools.lru_cache(maxsize=None)
def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in]: PyTorch's bilinear weights for align_corners=False."""
  matrix = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  for o in range(size_out):
    source = max((o + 0.5) * scale - 0.5, 0.0)
    low = min(int(source), size_in - 1)
    high = low + 1 if low < size_in - 1 else low
    weight_high = source - low
    matrix[o, low] += 1.0 - weight_high
    matrix[o, high] += weight_high
  matrix.flags.writeable = False
  return matrix


def _apply(x: jnp.ndarray, rows: np.ndarray, cols: np.ndarray) -> jnp.ndarray:
  """Applies [h', h] on axis 1 and [w', w] on axis 2 of [B, h, w, C]."""
  dtype = jnp.promote_types(x.dtype, jnp.float32) if x.dtype == jnp.float16 else x.dtype
  if rows.shape[0] != rows.shape[1] or not np.array_equal(rows, np.eye(rows.shape[0])):
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, dtype), x)  # [B, h', w, C]
  if cols.shape[0] != cols.shape[1] or not np.array_equal(cols, np.eye(cols.shape[0])):
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, dtype), x)  # [B, h', w', C]
  return x


def adaptive_avg_pool(x: jnp.ndarray, size: int | Sequence[int]) -> jnp.ndarray:
  """PyTorch's adaptive_avg_pool2d on NHWC [B, H, W, C] -> [B, h, w, C]."""
  out_h, out_w = (size, size) if isinstance(size, int) else size
  return _apply(x, adaptive_pool_matrix(x.shape[1], out_h), adaptive_pool_matrix(x.shape[2], out_w))


def resize_bilinear(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """PyTorch's F.interpolate(x, size, mode="bilinear", align_corners=False) on NHWC."""
  out_h, out_w = size
  return _apply(x, bilinear_matrix(x.shape[1], out_h), bilinear_matrix(x.shape[2], out_w))
