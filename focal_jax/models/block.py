"""One Focal Transformer block: norm, focal attention over pooled levels, MLP."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.focal import index_tables, windows
from focal_jax.models.focal.attention import FocalWindowAttention
from focal_jax.models.focal_fast.attention import FocalFastAttention
from focal_jax.models.layers import (Mlp, axes, conv, dense, drop_path, layer_norm,
                                     residual)


def block_geometry(resolution: tuple[int, int], window_size: int, expand_size: int,
                   shift_size: int) -> tuple[int, int, int]:
  """(window, expand, shift) of a block built for `resolution` (the official fallback).

  A stage whose token grid is no larger than the window attends within one window of
  side min(resolution), without ring and without shift.
  """
  if min(resolution) <= window_size:
    return min(resolution), 0, 0
  return window_size, expand_size, shift_size


class FocalTransformerBlock(nnx.Module):
  """x + DropPath(attn(norm1(x))), then x + DropPath(mlp(norm2(x))), on [B, H, W, C].

  The window, ring and shift are fixed when the block is built (from the resolution it is
  built for); at call time any grid size works: the map is padded to whole windows.
  `version` 2 swaps the attention for Focal-fast's (`focal_fast.attention`); everything else is
  shared. Focal-fast has no ring (`expand_size` 0) and takes whole windows only.
  """

  def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, *,
               window_size: int, expand_size: int, shift_size: int, mlp_ratio: float,
               qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float,
               drop_path_rate: float, pool_method: str, focal_level: int, focal_window: int,
               use_layerscale: bool, layerscale_value: float, dtype: Any, rngs: nnx.Rngs,
               version: int = 1, focal_topK: int = 64):
    if version == 2:
      expand_size = 0  # Focal-fast has no ring: expand_sizes have no effect, as officially
    self.window_size, self.expand_size, self.shift_size = block_geometry(
        resolution, window_size, expand_size, shift_size)
    self.pool_method = pool_method
    self.pooled_levels = focal_level - 1 if pool_method != "none" else 0

    pool_layers = []
    for level in range(self.pooled_levels if pool_method in ("fc", "conv") else 0):
      side = self.pool_window(level)
      if pool_method == "fc":  # Linear over the side*side tokens of a sub-window
        pool_layers.append(dense(side * side, 1, None, None, dtype=dtype, rngs=rngs))
      else:  # depthwise conv with kernel = stride = side
        pool_layers.append(conv(dim, dim, side, side, 0, groups=dim, dtype=dtype, rngs=rngs))
    self.pool_layers = nnx.List(pool_layers)

    self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
    if version == 2:
      self.attn = FocalFastAttention(
          dim, num_heads, window_size=self.window_size, resolution=resolution,
          focal_level=focal_level, top_k=focal_topK, qkv_bias=qkv_bias, qk_scale=qk_scale,
          attn_drop=attn_drop, proj_drop=drop, dtype=dtype, rngs=rngs)
    else:
      self.attn = FocalWindowAttention(
          dim, num_heads, window_size=self.window_size, expand_size=self.expand_size,
          focal_window=focal_window, focal_level=focal_level, pool_method=pool_method,
          qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
          dtype=dtype, rngs=rngs)
    self.drop_path = drop_path(drop_path_rate, rngs)
    self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, dtype=dtype, rngs=rngs)
    if use_layerscale:
      self.gamma_1 = nnx.Param(layerscale_value * jnp.ones((dim,)), **axes("norm"))
      self.gamma_2 = nnx.Param(layerscale_value * jnp.ones((dim,)), **axes("norm"))
    else:
      self.gamma_1 = self.gamma_2 = None

  def pool_window(self, level: int) -> int:
    """Side of the sub-windows pooled into one token at pooled level `level`."""
    return math.floor(self.window_size / 2**level)

  def pool(self, x: jnp.ndarray, level: int) -> jnp.ndarray:
    """Pools [B, H, W, C] (H, W whole windows) into [B, nWh * 2**level, nWw * 2**level, C]."""
    batch, height, width, dim = x.shape
    side = self.pool_window(level)
    rows = height // self.window_size * 2**level
    cols = width // self.window_size * 2**level
    x = windows.fit_centrally(x, rows * side, cols * side)
    if self.pool_method == "conv":
      return self.pool_layers[level](x)
    x = x.reshape(batch, rows, side, cols, side, dim)  # [B, gh, s, gw, s, C]
    if self.pool_method == "mean":
      return x.mean(axis=(2, 4))
    if self.pool_method == "max":
      return x.max(axis=(2, 4))
    fc = self.pool_layers[level]  # "fc": a learned weighted sum of the side*side tokens
    weights = fc.kernel[...].reshape(side, side).astype(x.dtype)
    return jnp.einsum("bxiyjc,ij->bxyc", x, weights) + fc.bias[...].astype(x.dtype)

  def static_options(self) -> tuple[int, int, int]:
    """What decides this block's program beyond its parameter shapes."""
    return self.window_size, self.expand_size, self.shift_size

  def _residual(self, x: jnp.ndarray, branch: jnp.ndarray, gamma: nnx.Param | None,
                drop_rate: jax.Array | None) -> jnp.ndarray:
    return residual(x, branch, gamma, self.drop_path, drop_rate)

  def __call__(self, x: jnp.ndarray, drop_rate: jax.Array | None = None) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H, W, C]. `drop_rate` overrides the stochastic-depth rate (a
    traced value when the stage runs its blocks under `lax.scan`)."""
    _, height, width, _ = x.shape
    ws, shift = self.window_size, self.shift_size
    padded_h, padded_w = -(-height // ws) * ws, -(-width // ws) * ws
    y = windows.pad_bottom_right(self.norm1(x), padded_h, padded_w)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    pooled = [self.pool(y, level) for level in range(self.pooled_levels)]
    mask = index_tables.shift_mask((padded_h, padded_w), ws, shift) if shift else None
    y = self.attn(y, pooled, mask)  # Focal-fast ignores the mask, as officially
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :height, :width]
    x = self._residual(x, y, self.gamma_1, drop_rate)
    return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2, drop_rate)


def stage_block_options(index: int, window_size: int, expand_size: int, expand_layer: str,
                        use_shift: bool) -> tuple[int, int]:
  """(expand_size, shift_size) of block `index` in a stage, as the official BasicLayer sets."""
  skip_parity = {"even": 0, "odd": 1, "all": None}[expand_layer]
  expand = 0 if skip_parity is not None and index % 2 == skip_parity else expand_size
  shift = window_size // 2 if use_shift and index % 2 == 1 else 0
  return expand, shift

