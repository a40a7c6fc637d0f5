"""Focal self-attention over windows: own window, expanded ring, pooled levels.

For every query window the keys are:
  1. the window's expanded neighbourhood, (window + 2*expand)**2 tokens: the window itself
     and the official ring around it, each ring token once (the official 132 ring keys
     repeat 12 tokens; a repeat's two biases merge exactly into one, see
     `index_tables.ring_bias_selectors`),
  2. for each pooled level k, the unfolded neighbourhood of pooled sub-windows
     ((focal_window + 2**k - 1)**2 tokens, zero-padded ones masked with -100).
All key groups are concatenated and attended to with one einsum per product, in a
window- and head-major layout ([B, nWh, nWw, nH, tokens, hd]) that is built once from the
qkv projection, so the products need no further transposes. Relative-position biases
come from their tables through constant one-hot matmuls, and the static masks (cyclic
shift, unfold padding; additive -100) are NumPy constants.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from focal_jax.models.focal import index_tables, windows
from focal_jax.models.layers import axes, dense, trunc_normal


def _unbroadcast(x: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """Sums `x` over the leading axes and the axes that `shape` broadcasts (size 1)."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  axes_to_sum = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return x.sum(axis=axes_to_sum, keepdims=True)


def _contract_queries(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """sum_q a[.., q, d] b[.., q, k] -> [.., k, d]: the key and value gradients.

  XLA:CPU runs a batched product that contracts the second-to-last axis of both operands
  as a slow loop (15-25 GFLOP/s here). Transposing the small operand a to [.., d, q] and
  computing [.., d, k] lets it call its matrix kernels instead; the optimisation barriers
  keep XLA from folding the two transposes back into the product. Other backends (TPU,
  GPU) contract any axis in their matrix units and get the plain product: there the
  barriers would only pin two transposes in memory. The choice is made per lowering
  platform, so a program compiled for a TPU from a CPU host gets the TPU form.
  """
  return jax.lax.platform_dependent(a, b, cpu=_contract_queries_pinned,
                                    default=_contract_queries_plain)


def _contract_queries_pinned(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  barrier = jax.lax.optimization_barrier
  a_t = barrier(jnp.swapaxes(a, -1, -2))  # [.., d, q]
  return jnp.swapaxes(barrier(jnp.matmul(a_t, b)), -1, -2)  # [.., d, k] -> [.., k, d]


def _contract_queries_plain(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  return jnp.einsum("...qd,...qk->...kd", a, b)


@jax.custom_vjp
def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T + bias) v over the key axis, with a backward pass laid out for XLA.

  q: [.., Q, D]; k, v: [.., K, D]; bias: broadcastable to [.., Q, K] (float32 or wider).
  Logits, softmax and bias are float32 at least (also for bfloat16 q, k, v); the result has
  v's dtype. The normalisation follows the product with v: sum_k e_k v_k / sum_k e_k
  divides [.., Q, D] instead of [.., Q, K].
  """
  return softmax_attention(q, k, v, bias)[0]


def softmax_attention(q, k, v, bias, drop_weights=None):
  """`attend`'s forward computation, differentiable by JAX: (output, e, sum_k e).

  `drop_weights` (attention dropout) applies to the unnormalised weights e_k; dropping
  e_k before the normalisation equals dropping the normalised weight.
  """
  logits = jnp.einsum("...qd,...kd->...qk", q, k)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) + bias
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  total = weights.sum(axis=-1, keepdims=True)  # [.., Q, 1]
  kept = weights.astype(v.dtype)
  if drop_weights is not None:
    kept = drop_weights(kept)
  out = (jnp.einsum("...qk,...kd->...qd", kept, v) / total).astype(v.dtype)
  return out, weights, total


def _attend_forward(q, k, v, bias):
  out, weights, total = softmax_attention(q, k, v, bias)
  probabilities = (weights / total).astype(v.dtype)  # [.., Q, K], kept for the backward pass
  return out, (q, k, v, bias, probabilities, out)


def _attend_backward(residuals, d_out):
  q, k, v, bias, probabilities, out = residuals
  wide = jnp.promote_types(d_out.dtype, jnp.float32)
  d_probabilities = jnp.einsum("...qd,...kd->...qk", d_out, v).astype(wide)
  # d logits = p * (dp - sum_k p dp), and sum_k p_k dp_k = sum_d d_out_d out_d.
  row = (d_out.astype(wide) * out.astype(wide)).sum(axis=-1, keepdims=True)  # [.., Q, 1]
  d_logits = probabilities.astype(wide) * (d_probabilities - row)  # [.., Q, K]
  d_bias = _unbroadcast(d_logits, bias.shape).astype(bias.dtype)
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("...qk,...kd->...qd", d_logits, k)
  d_k = _contract_queries(q, d_logits)
  d_v = _contract_queries(d_out, probabilities)
  return d_q, d_k.astype(k.dtype), d_v.astype(v.dtype), d_bias


attend.defvjp(_attend_forward, _attend_backward)


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
    """Keys per query as the official code counts them (e.g. 230 in stage 1 of Focal-T)."""
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
    own = jnp.dot(one_hot, table, precision=exact).reshape(area, area, heads).transpose(2, 0, 1)
    # The window and its ring: one bias per neighbourhood token, [nH, area, side**2].
    local = jnp.dot(own, index_tables.window_key_selector(ws, self.expand_size), precision=exact)
    if self.expand_size > 0:
      ring = self.relative_position_bias_table_to_neighbors[...][0]  # [nH, area, 132]
      selectors = index_tables.ring_bias_selectors(ws, self.expand_size)
      merged = jnp.dot(ring, selectors[0], precision=exact)
      for selector in selectors[1:]:  # repeated ring tokens: exp(b) sums, i.e. logaddexp
        repeat = jnp.dot(ring, selector, precision=exact)
        merged = jnp.where(selector.any(axis=0), jnp.logaddexp(merged, repeat), merged)
      local = local + merged  # the two never overlap
    parts = [local]
    for level, table_k in enumerate(self.relative_position_bias_table_to_windows):
      side = self.focal_window + 2**level - 1
      one_hot = index_tables.one_hot_index((ws, ws), (side, side))  # [area*keys, table]
      bias = jnp.dot(one_hot, table_k[...].T, precision=exact)
      parts.append(bias.reshape(area, side * side, heads).transpose(2, 0, 1))
    return jnp.concatenate(parts, axis=-1)

  def static_mask(self, num_windows: tuple[int, int], shift_mask: np.ndarray | None) -> np.ndarray:
    """Additive masks per window, [nWh, nWw, 1 or ws*ws, keys]: -100 as officially, and
    -1e9 (zero weight) on neighbourhood tokens outside the official ring."""
    ws, expand = self.window_size, self.expand_size
    area = ws * ws
    rows = area if shift_mask is not None else 1
    local = np.zeros((*num_windows, rows, index_tables.neighbourhood_size(ws, expand)), np.float32)
    if shift_mask is not None:
      local[..., index_tables.neighbourhood_window_keys(ws, expand)] = shift_mask
    local[..., index_tables.neighbourhood_unused(ws, expand)] = -1e9
    parts = [local]
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
    head_dim = dim // heads
    n_rows, n_cols = height // ws, width // ws
    qkv = self.qkv(x)  # [B, H, W, 3C]

    def windows_and_heads(part: int) -> jnp.ndarray:  # -> [B, nWh, nWw, nH, ws, ws, hd]
      # Slicing the channels before the transpose keeps the backward pass a plain
      # concatenation of the three gradients in the [B, H, W, 3C] layout.
      y = qkv[..., part * dim:(part + 1) * dim]
      y = y.reshape(batch, n_rows, ws, n_cols, ws, heads, head_dim)
      return y.transpose(0, 1, 3, 5, 2, 4, 6)

    q = windows_and_heads(0).reshape(batch, n_rows, n_cols, heads, ws * ws, head_dim)
    q = q * jnp.asarray(self.scale, q.dtype)
    keys = [windows.expand_windows(windows_and_heads(1), ws, self.expand_size)]  # [.., side**2, hd]
    values = [windows.expand_windows(windows_and_heads(2), ws, self.expand_size)]
    for level, pooled_map in enumerate(pooled):
      kv = self.qkv(pooled_map)[..., dim:]  # [B, nWh*2**k, nWw*2**k, 2C]
      kv = windows.unfold_neighbourhood(kv, self.focal_window, level)  # [B, nWh, nWw, K, 2C]
      kv = kv.reshape(*kv.shape[:4], 2, heads, head_dim).transpose(4, 0, 1, 2, 5, 3, 6)
      keys.append(kv[0])  # [B, nWh, nWw, nH, K, hd]
      values.append(kv[1])
    k = jnp.concatenate(keys, axis=4)  # [B, nWh, nWw, nH, keys, hd]
    v = jnp.concatenate(values, axis=4)

    mask = self.static_mask((n_rows, n_cols), shift_mask)[:, :, None]  # [nWh, nWw, 1, *, keys]
    bias = self.position_bias() + mask  # [nWh, nWw, nH, ws*ws or 1, keys], float32
    if self.attn_drop.rate == 0.0 or self.attn_drop.deterministic:
      out = attend(q, k, v, bias)  # [B, nWh, nWw, nH, ws*ws, hd]
    else:  # differentiated by JAX
      out = softmax_attention(q, k, v, bias, self.attn_drop)[0]
    out = out.reshape(batch, n_rows, n_cols, heads, ws, ws, head_dim)
    out = out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(batch, height, width, dim)
    return self.proj_drop(self.proj(out))
