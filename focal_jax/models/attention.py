"""Focal self-attention over windows: own window, expanded ring, pooled levels.

For every query window the keys are, in the official order:
  1. the window itself (window**2 tokens),
  2. the expanded ring from four cyclic rolls (`index_tables.ring_size` tokens),
  3. for each pooled level k, the unfolded neighbourhood of pooled sub-windows
     ((focal_window + 2**k - 1)**2 tokens).
All key groups are concatenated and attended to with one einsum. Relative-position
biases come from their tables through constant one-hot matmuls, and the static masks
(cyclic shift, unfold padding; additive -100) are NumPy constants.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from focal_jax.models import index_tables, windows
from focal_jax.models.layers import axes, dense, trunc_normal


class FocalWindowAttention(nnx.Module):
  """Multi-head focal attention for square windows of side `window_size`.

  Parameter names follow the official `WindowAttention`, so checkpoints map one to one.
  """

  def __init__(self, dim: int, num_heads: int, *, window_size: int, expand_size: int,
               focal_window: int, focal_level: int, pool_method: str, qkv_bias: bool,
               qk_scale: float | None, attn_drop: float, proj_drop: float, dtype: Any,
               rngs: nnx.Rngs):
    self.dim = dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.expand_size = expand_size if focal_level > 0 else 0
    self.focal_window = focal_window
    self.pooled_levels = focal_level - 1 if pool_method != "none" else 0
    self.scale = qk_scale or (dim // num_heads) ** -0.5
    self.dtype = dtype
    area = window_size * window_size

    self.relative_position_bias_table = nnx.Param(
        jnp.zeros(((2 * window_size - 1) ** 2, num_heads)), **axes(None, "heads"))
    if self.expand_size > 0:
      ring = index_tables.ring_size(window_size, self.expand_size)
      self.relative_position_bias_table_to_neighbors = nnx.Param(
          trunc_normal()(rngs.params(), (1, num_heads, area, ring)),
          **axes(None, "heads", None, None))
    tables = []
    for level in range(self.pooled_levels):
      side = window_size + focal_window + 2**level - 2
      tables.append(nnx.Param(trunc_normal()(rngs.params(), (num_heads, side * side)),
                              **axes("heads", None)))
    self.relative_position_bias_table_to_windows = nnx.List(tables)

    self.qkv = dense(dim, 3 * dim, "embed", "qkv", dtype=dtype, rngs=rngs, use_bias=qkv_bias)
    self.proj = dense(dim, dim, "qkv_out", "embed", dtype=dtype, rngs=rngs)
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

  @property
  def keys_per_query(self) -> int:
    """Number of keys each query attends to (e.g. 230 in stage 1 of Focal-T)."""
    keys = self.window_size**2 + index_tables.ring_size(self.window_size, self.expand_size)
    for level in range(self.pooled_levels):
      keys += index_tables.pooled_keys_per_window(self.focal_window, level)
    return keys

  def position_bias(self) -> jnp.ndarray:
    """Learned relative-position bias of every (query, key) pair: [nH, ws*ws, keys]."""
    ws, area, heads = self.window_size, self.window_size**2, self.num_heads
    exact = jax.lax.Precision.HIGHEST  # one-hot products must copy table entries exactly
    one_hot = index_tables.one_hot_index((ws, ws), (ws, ws))  # [area*area, table]
    table = self.relative_position_bias_table[...]
    parts = [jnp.dot(one_hot, table, precision=exact).reshape(area, area, heads).transpose(2, 0, 1)]
    if self.expand_size > 0:
      parts.append(self.relative_position_bias_table_to_neighbors[...][0])
    for level, table_k in enumerate(self.relative_position_bias_table_to_windows):
      side = self.focal_window + 2**level - 1
      one_hot = index_tables.one_hot_index((ws, ws), (side, side))  # [area*keys, table]
      bias = jnp.dot(one_hot, table_k[...].T, precision=exact)
      parts.append(bias.reshape(area, side * side, heads).transpose(2, 0, 1))
    return jnp.concatenate(parts, axis=-1)

  def static_mask(self, num_windows: tuple[int, int], shift_mask: np.ndarray | None) -> np.ndarray:
    """Additive -100 masks per window, [nWh, nWw, 1 or ws*ws, keys]."""
    area = self.window_size**2
    rows = area if shift_mask is not None else 1
    parts = [shift_mask if shift_mask is not None else np.zeros((*num_windows, 1, area), np.float32)]
    ring = index_tables.ring_size(self.window_size, self.expand_size)
    if ring:
      parts.append(np.zeros((*num_windows, rows, ring), np.float32))
    for level in range(self.pooled_levels):
      valid = index_tables.unfold_valid_mask(num_windows, self.focal_window, level)
      mask = np.where(valid > 0, 0.0, index_tables.MASK_VALUE).astype(np.float32)
      parts.append(np.broadcast_to(mask[:, :, None, :], (*num_windows, rows, mask.shape[-1])))
    return np.concatenate(parts, axis=-1)

  def __call__(self, x: jnp.ndarray, pooled: Sequence[jnp.ndarray],
               shift_mask: np.ndarray | None = None) -> jnp.ndarray:
    """Attends over windows of `x`.

    Args:
      x: [B, H, W, C] normalised, padded (H, W multiples of the window) and shifted map.
      pooled: per pooled level k, the pooled map [B, nWh * 2**k, nWw * 2**k, C].
      shift_mask: optional [nWh, nWw, ws*ws, ws*ws] additive mask of the cyclic shift.
    Returns:
      [B, H, W, C].
    """
    batch, height, width, dim = x.shape
    ws, heads = self.window_size, self.num_heads
    n_rows, n_cols = height // ws, width // ws
    qkv = self.qkv(x)  # [B, H, W, 3C]
    q, kv = qkv[..., :dim], qkv[..., dim:]
    q = windows.window_partition(q, ws)  # [B, nWh, nWw, ws*ws, C]
    key_groups = [windows.window_partition(kv, ws)]  # [B, nWh, nWw, ws*ws, 2C]
    if self.expand_size > 0:
      key_groups.append(windows.expand_ring(kv, ws, self.expand_size))  # [B, nWh, nWw, ring, 2C]
    for level, pooled_map in enumerate(pooled):
      kv_pooled = self.qkv(pooled_map)[..., dim:]  # [B, nWh*2**k, nWw*2**k, 2C]
      key_groups.append(windows.unfold_neighbourhood(kv_pooled, self.focal_window, level))
    kv = jnp.concatenate(key_groups, axis=3)  # [B, nWh, nWw, keys, 2C]
    kv = kv.reshape(*kv.shape[:4], 2, heads, dim // heads)  # [B, nWh, nWw, keys, 2, nH, hd]
    k, v = kv[:, :, :, :, 0], kv[:, :, :, :, 1]
    q = q.reshape(*q.shape[:4], heads, dim // heads) * jnp.asarray(self.scale, q.dtype)

    logits = jnp.einsum("bxyqhd,bxykhd->bxyhqk", q, k)  # [B, nWh, nWw, nH, ws*ws, keys]
    mask = self.static_mask((n_rows, n_cols), shift_mask)[:, :, None]  # [nWh, nWw, 1, *, keys]
    # Biases, masks and softmax in float32 at least, also for bfloat16 activations.
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logits = logits + (self.position_bias() + mask)
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    attn = self.attn_drop(attn)
    out = jnp.einsum("bxyhqk,bxykhd->bxyqhd", attn, v)  # [B, nWh, nWw, ws*ws, nH, hd]
    out = windows.window_reverse(out.reshape(batch, n_rows, n_cols, ws * ws, dim), ws)
    return self.proj_drop(self.proj(out))
