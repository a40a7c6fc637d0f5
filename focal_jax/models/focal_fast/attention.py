"""Focal-fast attention (the official `focal_transformer_v2.py`): nearest keys, MLP bias.

Every query window attends to the union of two key groups (SPEC section 9):
  0. the `focal_topK` pixels of the stage map nearest to the window's centre,
  1. the `focal_topK` nearest pooled windows (their k and v from the same `qkv` Linear),
with a position bias that an MLP per level (`coord2rpb_all`) computes from the (row,
column) coordinates of query minus key, evaluated every forward pass, so any grid of
whole windows works without rebuilding. The key sets are static per grid
(`key_sets`); `key_layout` turns each level into a rectangle of keys cut with static
slices (a zero-padded neighbourhood, or the whole axis) plus a constant mask of the
official set, so neither the forward pass nor its gradient contains a gather. The
products and the softmax are v1's (`attention.attend`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from focal_jax.models.focal_fast import key_layout
from focal_jax.models.focal.attention import attend, softmax_attention
from focal_jax.models.layers import dense


class CoordinateBias(nnx.Module):
  """Linear(2, head_dim) -> ReLU -> Linear(head_dim, heads): the official `coord2rpb`."""

  def __init__(self, head_dim: int, num_heads: int, *, rngs: nnx.Rngs):
    # float32 always: the bias is added to float32 logits, also for bfloat16 models.
    self.fc1 = dense(2, head_dim, None, None, dtype=jnp.float32, rngs=rngs)
    self.fc2 = dense(head_dim, num_heads, None, "heads", dtype=jnp.float32, rngs=rngs)

  def __call__(self, coords: jnp.ndarray) -> jnp.ndarray:
    """[..., 2] float32 (row, column) -> [..., heads]."""
    return self.fc2(jax.nn.relu(self.fc1(coords)))


def _slice(x: jnp.ndarray, axis: int, start: int, stop: int, step: int = 1) -> jnp.ndarray:
  index = [slice(None)] * x.ndim
  index[axis] = slice(start, stop, step)
  return x[tuple(index)]


def cut_keys(x: jnp.ndarray, axis: int, layout: key_layout.AxisLayout) -> jnp.ndarray:
  """Replaces the key axis `axis` of x by [windows, keys per window] (static slices only).

  A neighbourhood is cut from the map viewed as windows of `step` keys, [n, step]: one
  contiguous slice of the window axis per window shift (two or three), so that the
  backward pass, which pads each slice back to the map, stays a few passes over the map
  rather than one per key position.
  """
  if layout.dense:
    shape = (*x.shape[:axis], layout.windows, *x.shape[axis:])
    return jnp.broadcast_to(jnp.expand_dims(x, axis), shape)
  step, lo = layout.step, layout.lo
  hi = lo + layout.size - 1
  n_total = -(-x.shape[axis] // step)
  shifts = range(lo // step, hi // step + 1)  # window shifts the neighbourhood touches
  before = max(0, -(layout.first + shifts[0]))
  after = max(0, layout.first + layout.windows - 1 + shifts[-1] - (n_total - 1))
  pad = [(0, 0)] * x.ndim
  pad[axis] = (before * step, (after + n_total) * step - x.shape[axis])
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:axis], n_total + before + after, step, *x.shape[axis + 1:])
  pieces = []
  for shift in shifts:  # key positions step*(a + shift) + [start, stop)
    start, stop = max(0, lo - step * shift), min(step, hi - step * shift + 1)
    window = layout.first + shift + before
    piece = _slice(x, axis, window, window + layout.windows)
    pieces.append(_slice(piece, axis + 1, start, stop))
  return jnp.concatenate(pieces, axis=axis + 1)  # [.., windows, size, ..]


def expand_coordinates(table: jnp.ndarray, axis: int, coords: np.ndarray,
                       first: int) -> jnp.ndarray:
  """table[coords - first] along `axis` by static slices, for coords [A, ws, K] of the form
  ws*a + i - s*j - c (query pixel minus key coordinate; no `a` term when A is 1).

  Two rounds of slices, A + ws in all rather than one per query: a sub-table per window a,
  then, flipped (the coordinate falls as the key index j grows), a strided slice per i.
  Returns the table with `axis` replaced by [A, ws, K].
  """
  n_a, ws, n_k = coords.shape
  step = int(coords[0, 0, 0] - coords[0, 0, 1]) if n_k > 1 else 1
  a, i, j = np.meshgrid(np.arange(n_a), np.arange(ws), np.arange(n_k), indexing="ij")
  offset = int(coords[0, 0, 0])
  expected = (ws * a if n_a > 1 else 0) + i - step * j + offset
  assert np.array_equal(coords, expected), "coordinates are not query minus key"
  width = ws + step * (n_k - 1)  # coordinates one window's queries and keys span
  starts = [ws * w + offset - step * (n_k - 1) - first for w in range(n_a)]
  table = jnp.stack([_slice(table, axis, u, u + width) for u in starts], axis=axis)
  flipped = jnp.flip(table, axis + 1)  # [.., A, width, ..]
  span = step * (n_k - 1) + 1
  rows = [_slice(flipped, axis + 1, ws - 1 - q, ws - 1 - q + span, step) for q in range(ws)]
  return jnp.stack(rows, axis=axis + 1)  # [.., A, ws, K, ..]


class FocalFastAttention(nnx.Module):
  """Multi-head Focal-fast attention for square windows of side `window_size`.

  Parameter names follow the official Focal-fast `WindowAttention` (`qkv`, `proj`,
  `coord2rpb_all.{l}`), so checkpoints map one to one.
  """

  def __init__(self, dim: int, num_heads: int, *, window_size: int, resolution: tuple[int, int],
               focal_level: int, top_k: int, qkv_bias: bool, qk_scale: float | None,
               attn_drop: float, proj_drop: float, dtype: Any, rngs: nnx.Rngs):
    self.dim = dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.resolution = resolution
    self.focal_level = focal_level
    self.top_k = top_k
    self.pooled_levels = focal_level - 1
    head_dim = dim // num_heads
    self.scale = qk_scale or head_dim ** -0.5
    self.dtype = dtype
    self.qkv = dense(dim, 3 * dim, "embed", "qkv", dtype=dtype, rngs=rngs, use_bias=qkv_bias)
    self.proj = dense(dim, dim, "qkv_out", "embed", dtype=dtype, rngs=rngs)
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)
    self.coord2rpb_all = nnx.List(
        [CoordinateBias(head_dim, num_heads, rngs=rngs) for _ in range(focal_level)])

  def key_counts(self, grid: tuple[int, int] | None = None) -> list[int]:
    """Keys per query from each level (the official `topks`) for a stage grid."""
    rows, cols = grid or self.resolution
    counts = [min(self.top_k, rows * cols)]
    if self.focal_level > 1:
      counts.append(min(self.top_k, (rows // self.window_size) * (cols // self.window_size)))
    return counts

  @property
  def keys_per_query(self) -> int:
    """Keys per query as the official code counts them (e.g. 192 in stage 1 of Focal-fast-T)."""
    return sum(self.key_counts())

  def window_blocks(self, grid: tuple[int, int]) -> tuple[key_layout.WindowBlock, ...]:
    return key_layout.window_blocks(grid, self.window_size, self.top_k, self.focal_level)

  def position_bias(self, level: int, layout: key_layout.LevelLayout) -> jnp.ndarray:
    """The level's bias for every (window, query, key slot): [nWh or 1, nWw or 1, nH, ws*ws, keys]."""
    ws, heads = self.window_size, self.num_heads
    coords = [key_layout.query_minus_key(axis, ws, layout.stride, layout.centre)
              for axis in (layout.rows, layout.cols)]  # [A, ws, size] per axis
    lows = [int(c.min()) for c in coords]
    values = [np.arange(low, int(c.max()) + 1, dtype=np.float32) for low, c in zip(lows, coords)]
    grid = np.stack(np.meshgrid(*values, indexing="ij"), axis=-1)  # [Lr, Lc, 2]
    table = self.coord2rpb_all[level](jnp.asarray(grid))  # [Lr, Lc, nH], one MLP call per value
    table = expand_coordinates(table, 0, coords[0], lows[0])  # [A_r, ws, K_r, Lc, nH]
    table = expand_coordinates(table, 3, coords[1], lows[1])  # [A_r, ws, K_r, A_c, ws, K_c, nH]
    (a_r, _, k_r), (a_c, _, k_c) = coords[0].shape, coords[1].shape
    table = table.transpose(0, 3, 6, 1, 4, 2, 5)  # [A_r, A_c, nH, ws, ws, K_r, K_c]
    return table.reshape(a_r, a_c, heads, ws * ws, k_r * k_c)

  def __call__(self, x: jnp.ndarray, pooled: Sequence[jnp.ndarray],
               shift_mask: np.ndarray | None = None) -> jnp.ndarray:
    """Attends over windows of `x`.

    Args:
      x: [B, H, W, C] normalised (and, with use_shift, rolled) map of whole windows.
      pooled: the pooled map [B, nWh, nWw, C] when focal_level is 2.
      shift_mask: ignored: the official Focal-fast code builds the shift mask but never applies it.
    Returns:
      [B, H, W, C].
    """
    del shift_mask
    batch, height, width, dim = x.shape
    ws, heads = self.window_size, self.num_heads
    head_dim = dim // heads
    n_rows, n_cols = height // ws, width // ws
    qkv = self.qkv(x)  # [B, H, W, 3C]
    q = qkv[..., :dim].reshape(batch, n_rows, ws, n_cols, ws, heads, head_dim)
    q = q.transpose(0, 1, 3, 5, 2, 4, 6).reshape(batch, n_rows, n_cols, heads, ws * ws, head_dim)
    q = q * jnp.asarray(self.scale, q.dtype)
    maps = [qkv[..., dim:]] + [self.qkv(p)[..., dim:] for p in pooled]  # [B, h, w, 2C] each

    rows_out: dict[tuple[int, int], list[jnp.ndarray]] = {}
    for block in self.window_blocks((height, width)):
      (r0, r1), (c0, c1) = block.rows, block.cols
      out = self._attend_block(q[:, r0:r1, c0:c1], maps, block.levels)
      rows_out.setdefault(block.rows, []).append(out)  # blocks come row-major
    out = jnp.concatenate([jnp.concatenate(row, axis=2) for row in rows_out.values()], axis=1)
    out = out.reshape(batch, n_rows, n_cols, heads, ws, ws, head_dim)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, dim)
    return self.proj_drop(self.proj(out))

  def _attend_block(self, q: jnp.ndarray, maps: Sequence[jnp.ndarray],
                    layouts: tuple[key_layout.LevelLayout, ...]) -> jnp.ndarray:
    """Attention of the query windows q [B, n_r, n_c, nH, ws*ws, hd] of one window block
    over their keys of every level, cut from `maps` ([B, h, w, 2C] per level)."""
    batch, n_rows, n_cols, heads, _, head_dim = q.shape
    keys, values, biases = [], [], []
    for level, (kv, layout) in enumerate(zip(maps, layouts)):
      kv = cut_keys(cut_keys(kv, 1, layout.rows), 3, layout.cols)  # [B, n_r, Kr, n_c, Kc, 2C]
      kv = kv.transpose(0, 1, 3, 2, 4, 5).reshape(
          batch, n_rows, n_cols, layout.size, 2, heads, head_dim)
      kv = kv.transpose(4, 0, 1, 2, 5, 3, 6)  # [2, B, n_r, n_c, nH, keys, hd]
      keys.append(kv[0])
      values.append(kv[1])
      bias = self.position_bias(level, layout)
      biases.append(jnp.broadcast_to(bias, (n_rows, n_cols, *bias.shape[2:])))
    k = jnp.concatenate(keys, axis=4)  # [B, n_r, n_c, nH, keys, hd]
    v = jnp.concatenate(values, axis=4)
    bias = jnp.concatenate(biases, axis=-1) + key_layout.additive_mask(layouts)
    if self.attn_drop.rate == 0.0 or self.attn_drop.deterministic:
      return attend(q, k, v, bias)  # [B, n_r, n_c, nH, ws*ws, hd]
    return softmax_attention(q, k, v, bias, self.attn_drop)[0]  # differentiated by JAX
