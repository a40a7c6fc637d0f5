"""Window geometry through reshapes and static slices only (no gather, no scatter).

All functions take NHWC maps whose spatial sizes are static; every index used here is a
Python integer, so XLA sees reshapes, transposes, slices, pads and concatenations.
"""

from __future__ import annotations

import jax.numpy as jnp

from focal_jax.models.focal import index_tables


def window_partition(x: jnp.ndarray, window: int) -> jnp.ndarray:
  """[B, H, W, C] -> [B, nWh, nWw, window*window, C] (H, W multiples of window)."""
  batch, height, width, channels = x.shape
  x = x.reshape(batch, height // window, window, width // window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, nWh, nWw, ws, ws, C]
  return x.reshape(batch, height // window, width // window, window * window, channels)


def window_reverse(windows: jnp.ndarray, window: int) -> jnp.ndarray:
  """[B, nWh, nWw, window*window, C] -> [B, nWh*window, nWw*window, C]."""
  batch, n_rows, n_cols, _, channels = windows.shape
  x = windows.reshape(batch, n_rows, n_cols, window, window, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, nWh, ws, nWw, ws, C]
  return x.reshape(batch, n_rows * window, n_cols * window, channels)


def pad_bottom_right(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Zero-pads [B, H, W, C] at the bottom and right to [B, height, width, C]."""
  _, h, w, _ = x.shape
  if (h, w) == (height, width):
    return x
  return jnp.pad(x, ((0, 0), (0, height - h), (0, width - w), (0, 0)))


def fit_centrally(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """Trims or zero-pads [B, H, W, C] around its centre to [B, height, width, C].

  Matches the official rule: the smaller half of the difference goes on top/left.
  """
  for axis, target in ((1, height), (2, width)):
    size = x.shape[axis]
    if size > target:
      start = (size - target) // 2
      x = _slice_axis(x, axis, start, start + target)
    elif size < target:
      before = (target - size) // 2
      pad = [(0, 0)] * x.ndim
      pad[axis] = (before, target - size - before)
      x = jnp.pad(x, pad)
  return x


def _slice_axis(x: jnp.ndarray, axis: int, start: int, stop: int, step: int = 1) -> jnp.ndarray:
  index = [slice(None)] * x.ndim
  index[axis] = slice(start, stop, step)
  return x[tuple(index)]


def unfold_neighbourhood(x: jnp.ndarray, focal_window: int, level: int) -> jnp.ndarray:
  """Neighbourhood of each window in a pooled map: [B, nWh*s, nWw*s, C] -> [B, nWh, nWw, K, C].

  Equivalent to the official zero-padded `nn.Unfold` (stride s = 2**level) followed by
  its fixed trim at level > 0: K = (focal_window + s - 1)**2 positions per window,
  row-major. Built from strided static slices along rows, then along columns.
  """
  stride = 2**level
  kernel = index_tables.unfold_kernel_size(focal_window, level)
  pad = kernel // 2
  batch, height, width, channels = x.shape
  n_rows, n_cols = height // stride, width // stride
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = range(stride - 1, kernel)  # the positions the official trim keeps
  rows = [_slice_axis(x, 1, a, a + stride * (n_rows - 1) + 1, stride) for a in offsets]
  x = jnp.stack(rows, axis=2)  # [B, nWh, k, W+2p, C]
  cols = [_slice_axis(x, 3, b, b + stride * (n_cols - 1) + 1, stride) for b in offsets]
  x = jnp.stack(cols, axis=4)  # [B, nWh, k, nWw, k, C]
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, nWh, nWw, k, k, C]
  return x.reshape(batch, n_rows, n_cols, -1, channels)


def expand_windows(x: jnp.ndarray, window: int, expand: int) -> jnp.ndarray:
  """The (window + 2*expand)**2 neighbourhood of every window, row-major, wrapping
  cyclically around the map as the official `torch.roll` does.

  x: windows with heads, [B, nWh, nWw, nH, ws, ws, hd] -> [B, nWh, nWw, nH, side**2, hd].
  Rows first: the last `expand` rows of the window above, the window, the first `expand`
  rows of the window below (a roll of the window grid by one); then columns likewise.
  """
  if expand == 0:
    return x.reshape(*x.shape[:4], window * window, x.shape[-1])
  if expand > window:
    raise NotImplementedError(f"expand_size {expand} > window_size {window} is not supported.")
  above = jnp.roll(x[:, :, :, :, window - expand:], 1, axis=1)  # [B, nWh, nWw, nH, e, ws, hd]
  below = jnp.roll(x[:, :, :, :, :expand], -1, axis=1)
  x = jnp.concatenate([above, x, below], axis=4)  # [B, nWh, nWw, nH, side, ws, hd]
  left = jnp.roll(x[:, :, :, :, :, window - expand:], 1, axis=2)
  right = jnp.roll(x[:, :, :, :, :, :expand], -1, axis=2)
  x = jnp.concatenate([left, x, right], axis=5)  # [B, nWh, nWw, nH, side, side, hd]
  return x.reshape(*x.shape[:4], -1, x.shape[-1])
