"""Pooled focal levels attended over the whole pooled grid, for TPU programs.

A query window's keys from pooled level k are the (focal_window + 2**k - 1)**2 pooled
tokens around it, zero-padded at the border of the pooled map. Cutting them out per
window writes every pooled key and value once per window that sees it (49 times in
stage 1 of Focal-T), and XLA:TPU moves those copies through memory several times in
the forward and backward passes. When the pooled grid is small (8 x 8 tokens in stage 1
of Focal-T at 224, 4 x 4 and 2 x 2 later), every window can instead attend to the whole
grid, [B, nH, grid, hd], shared by all windows: the position bias moves from the
window's neighbourhood slots to the grid tokens through a constant one-hot product, and
grid tokens outside the neighbourhood get a -1e9 mask (exactly zero weight). The
ring and the grid enter one softmax through separate products (`attend_groups`), with a
shared maximum and normaliser, so no key set is concatenated either.

The zero-padded neighbourhood slots of the official code (mask -100) are dropped; their
weight, exp(-100) relative to the others, is below float32 resolution, but summation
order differs from the unfolded path, so the model uses this only for TPU programs
(`lax.platform_dependent`); CPU and GPU programs keep the unfolded key set.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.models.focal import index_tables

# A level attends over its whole grid while the grid has at most this many times the
# keys of a window's neighbourhood; beyond it (large inputs) it is cut per window.
MAX_GRID_PER_KEYS = 2.0
NO_WEIGHT = -1e9  # additive mask whose weight underflows to exactly zero


def grid_size(num_windows: tuple[int, int], level: int) -> int:
  """Tokens in the level-`level` pooled grid of a map of `num_windows` windows."""
  return num_windows[0] * 2**level * num_windows[1] * 2**level


def use_grid(num_windows: tuple[int, int], focal_window: int, level: int) -> bool:
  """Whether attending over the whole grid moves fewer keys than cutting neighbourhoods."""
  keys = index_tables.pooled_keys_per_window(focal_window, level)
  return grid_size(num_windows, level) <= MAX_GRID_PER_KEYS * keys


@functools.lru_cache(maxsize=None)
def grid_selector(num_windows: tuple[int, int], focal_window: int, level: int) -> np.ndarray:
  """One-hot float32 [nWh, nWw, keys, grid]: the grid token behind each neighbourhood slot
  of each window (a zero row for a zero-padded slot), as `windows.unfold_neighbourhood`
  lays the slots out."""
  stride = 2**level
  kernel = index_tables.unfold_kernel_size(focal_window, level)
  pad = kernel // 2
  offsets = np.arange(stride - 1, kernel)  # the positions the official trim keeps
  rows = np.arange(num_windows[0])[:, None] * stride + offsets[None] - pad  # [nWh, k]
  cols = np.arange(num_windows[1])[:, None] * stride + offsets[None] - pad  # [nWw, k]
  height, width = num_windows[0] * stride, num_windows[1] * stride
  side = len(offsets)
  selector = np.zeros((*num_windows, side, side, height * width), np.float32)
  for a in range(num_windows[0]):
    for c in range(num_windows[1]):
      for i, row in enumerate(rows[a]):
        for j, col in enumerate(cols[c]):
          if 0 <= row < height and 0 <= col < width:
            selector[a, c, i, j, row * width + col] = 1.0
  return selector.reshape(*num_windows, side * side, height * width)


def grid_bias(slot_bias: jnp.ndarray, num_windows: tuple[int, int], focal_window: int,
              level: int) -> jnp.ndarray:
  """The bias of each grid token, [nWh, nWw, nH, Q, grid], from the bias of each
  neighbourhood slot, [nWh, nWw, nH, Q, keys]; -1e9 on tokens outside the neighbourhood."""
  selector = grid_selector(num_windows, focal_window, level)
  bias = jnp.einsum("xyhqk,xykg->xyhqg", slot_bias, selector,
                    precision=jax.lax.Precision.HIGHEST)  # copies entries exactly
  outside = np.where(selector.any(axis=2), 0.0, NO_WEIGHT).astype(np.float32)  # [nWh, nWw, grid]
  return bias + outside[:, :, None, None, :]


def _logits(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  # k: [B, nWh, nWw, nH, K, hd] (per window) or [B, nH, K, hd] (shared by all windows)
  if k.ndim == q.ndim:
    return jnp.einsum("...qd,...kd->...qk", q, k)
  return jnp.einsum("bxyhqd,bhkd->bxyhqk", q, k)


def _weighted(w: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  if v.ndim == w.ndim:
    return jnp.einsum("...qk,...kd->...qd", w, v)
  return jnp.einsum("bxyhqk,bhkd->bxyhqd", w, v)


def _contract_queries(a: jnp.ndarray, w: jnp.ndarray, k_ndim: int) -> jnp.ndarray:
  """sum over queries (and windows, for a shared group) of a[.., q, d] w[.., q, k]."""
  if k_ndim == a.ndim:
    return jnp.einsum("...qd,...qk->...kd", a, w)
  return jnp.einsum("bxyhqd,bxyhqk->bhkd", a, w)


def _unbroadcast(x: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  axes_to_sum = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
  return x.sum(axis=axes_to_sum, keepdims=True)


def _forward(q, groups):
  wide = jnp.promote_types(q.dtype, jnp.float32)
  logits = [_logits(q, k).astype(wide) + bias for k, _, bias in groups]
  top = jax.lax.stop_gradient(
      functools.reduce(jnp.maximum, [x.max(axis=-1, keepdims=True) for x in logits]))
  weights = [jnp.exp(x - top) for x in logits]
  total = sum(w.sum(axis=-1, keepdims=True) for w in weights)  # [.., Q, 1]
  v_dtype = groups[0][1].dtype
  out = sum(_weighted(w.astype(v.dtype), v) for w, (_, v, _) in zip(weights, groups))
  return (out / total).astype(v_dtype), weights, total


@jax.custom_vjp
def attend_groups(q: jnp.ndarray, groups: Sequence[tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]
                  ) -> jnp.ndarray:
  """softmax over the union of key groups of (q k^T + bias), times v: `attention.attend`
  for keys given in groups (k, v, bias) that are never concatenated.

  q: [B, nWh, nWw, nH, Q, hd]; per group k, v: [B, nWh, nWw, nH, K, hd] or, shared by all
  windows, [B, nH, K, hd]; bias broadcastable to [B, nWh, nWw, nH, Q, K], float32.
  Logits and softmax are float32 at least; the result has v's dtype.
  """
  return _forward(q, groups)[0]


def _attend_groups_forward(q, groups):
  out, weights, total = _forward(q, groups)
  probabilities = [(w / total).astype(v.dtype) for w, (_, v, _) in zip(weights, groups)]
  return out, (q, groups, probabilities, out)


def _attend_groups_backward(residuals, d_out):
  q, groups, probabilities, out = residuals
  wide = jnp.promote_types(d_out.dtype, jnp.float32)
  # d logits = p * (dp - sum_k p dp), and sum_k p_k dp_k = sum_d d_out_d out_d.
  row = (d_out.astype(wide) * out.astype(wide)).sum(axis=-1, keepdims=True)  # [.., Q, 1]
  d_q = None
  d_groups = []
  for (k, v, bias), p in zip(groups, probabilities):
    d_p = _logits(d_out, v).astype(wide)  # [.., Q, K]
    d_logits = p.astype(wide) * (d_p - row)
    d_bias = _unbroadcast(d_logits, bias.shape).astype(bias.dtype)
    d_logits = d_logits.astype(q.dtype)
    term = _weighted(d_logits, k)
    d_q = term if d_q is None else d_q + term
    d_k = _contract_queries(q, d_logits, k.ndim).astype(k.dtype)
    d_v = _contract_queries(d_out, p, v.ndim).astype(v.dtype)
    d_groups.append((d_k, d_v, d_bias))
  return d_q.astype(q.dtype), type(groups)(d_groups)


attend_groups.defvjp(_attend_groups_forward, _attend_groups_backward)
