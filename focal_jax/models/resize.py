"""Adaptive average pooling and bilinear resizing as static matrices (no gather, no scatter).

Both are separable: one [out, in] NumPy matrix per spatial axis, applied with `einsum`;
an upsampling by a whole factor (every UPerNet upsampling of a power-of-two map and the
loss's logits to the label size) instead takes each output row's two weights of that
matrix times two shifted slices of the edge-padded input, which is the same sum without
the matrix product's zeros: on CPUs the dense product of a 128 -> 512 resize of 150-class
logits costs more than the slices by an order of magnitude.
The matrices reproduce PyTorch exactly: `AdaptiveAvgPool2d` bins (start floor(i*in/out),
end ceil((i+1)*in/out), which overlap when out does not divide in) and
`F.interpolate(mode="bilinear", align_corners=False)` with an output size (source
coordinate (o + 0.5) * in / out - 0.5, clamped at 0), as mmsegmentation's `resize` calls it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
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


@functools.lru_cache(maxsize=None)
def two_tap_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray] | None:
  """For an upsampling by a whole factor s = size_out / size_in: `bilinear_matrix`'s weights
  as [s, size_in] pairs (low, high), output row s*i + r = low[r, i] * x[i + r_shift - 1] +
  high[r, i] * x[i + r_shift] with r_shift = 0 for r < s/2, else 1 (x edge-padded by one on
  each side: the padding only ever meets a zero weight). None when the matrix is not of that
  form (no whole factor)."""
  if size_out % size_in or size_out == size_in:
    return None
  factor = size_out // size_in
  matrix = bilinear_matrix(size_in, size_out)
  low = np.zeros((factor, size_in), np.float64)
  high = np.zeros((factor, size_in), np.float64)
  for r in range(factor):
    shift = 0 if 2 * r + 1 < factor else 1
    for i in range(size_in):
      row = matrix[factor * i + r]
      first = i + shift - 1  # the input index of the low tap
      taps = {first: 0, first + 1: 1}
      if any(j not in taps for j in np.flatnonzero(row)):
        return None
      low[r, i] = row[first] if 0 <= first < size_in else 0.0
      high[r, i] = row[first + 1] if first + 1 < size_in else 0.0
  low.flags.writeable = high.flags.writeable = False
  return low, high


def _upsample_two_tap(x: jnp.ndarray, axis: int, weights: tuple[np.ndarray, np.ndarray],
                      dtype: jnp.dtype) -> jnp.ndarray:
  """Bilinear upsampling of `axis` (1 or 2 of [B, h, w, C]) by the whole factor of
  `weights` (two_tap_weights): [.., n, ..] -> [.., n * s, ..]."""
  low, high = weights
  factor, size = low.shape
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, size - 1, size, axis=axis)
  padded = jnp.concatenate([first, x, last], axis=axis)  # n + 2 along axis
  shape = [1] * x.ndim
  shape[axis] = size
  phases = []
  for r in range(factor):
    shift = 0 if 2 * r + 1 < factor else 1
    lower = jax.lax.slice_in_dim(padded, shift, shift + size, axis=axis)  # x[i + shift - 1]
    upper = jax.lax.slice_in_dim(padded, shift + 1, shift + 1 + size, axis=axis)
    phases.append(jnp.asarray(low[r], dtype).reshape(shape) * lower
                  + jnp.asarray(high[r], dtype).reshape(shape) * upper)
  stacked = jnp.stack(phases, axis=axis + 1)  # [.., n, s, ..]
  return stacked.reshape(*x.shape[:axis], size * factor, *x.shape[axis + 1:])


def _apply_axis(x: jnp.ndarray, axis: int, matrix: np.ndarray,
                weights: tuple[np.ndarray, np.ndarray] | None, dtype: jnp.dtype) -> jnp.ndarray:
  """[out, in] `matrix` on `axis` (1 or 2) of [B, h, w, C]; by slices where `weights`."""
  if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(matrix.shape[0])):
    return x
  if weights is not None:
    return _upsample_two_tap(x, axis, weights, dtype)
  spec = "oh,bhwc->bowc" if axis == 1 else "pw,bowc->bopc"
  return jnp.einsum(spec, jnp.asarray(matrix, dtype), x)


def _apply(x: jnp.ndarray, rows: np.ndarray, cols: np.ndarray,
           row_weights: tuple[np.ndarray, np.ndarray] | None = None,
           col_weights: tuple[np.ndarray, np.ndarray] | None = None) -> jnp.ndarray:
  """Applies [h', h] on axis 1 and [w', w] on axis 2 of [B, h, w, C]."""
  dtype = jnp.promote_types(x.dtype, jnp.float32) if x.dtype == jnp.float16 else x.dtype
  x = _apply_axis(x, 1, rows, row_weights, dtype)  # [B, h', w, C]
  return _apply_axis(x, 2, cols, col_weights, dtype)  # [B, h', w', C]


def adaptive_avg_pool(x: jnp.ndarray, size: int | Sequence[int]) -> jnp.ndarray:
  """PyTorch's adaptive_avg_pool2d on NHWC [B, H, W, C] -> [B, h, w, C]."""
  out_h, out_w = (size, size) if isinstance(size, int) else size
  return _apply(x, adaptive_pool_matrix(x.shape[1], out_h), adaptive_pool_matrix(x.shape[2], out_w))


def resize_bilinear(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """PyTorch's F.interpolate(x, size, mode="bilinear", align_corners=False) on NHWC."""
  out_h, out_w = size
  in_h, in_w = x.shape[1:3]
  return _apply(x, bilinear_matrix(in_h, out_h), bilinear_matrix(in_w, out_w),
                two_tap_weights(in_h, out_h), two_tap_weights(in_w, out_w))
