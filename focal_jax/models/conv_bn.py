"""Conv-BatchNorm-ReLU, the `ConvModule` that mmsegmentation's heads are built from.

`BatchNorm` is `nnx.BatchNorm` with PyTorch's semantics: momentum 0.1 (0.9 in Flax's
convention), eps 1e-5, normalisation by the biased batch variance, running variance updated
with the unbiased one, and PyTorch's `num_batches_tracked` counter. In training its
statistics are means over every axis but the channels, i.e. over the whole batch: under
`jit` with a batch sharded over devices that mean is global, which is what SyncBN computes.
`model.train()` / `model.eval()` switch between batch and running statistics.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.conv_same import conv_general_dilated_same
from focal_jax.models.layers import axes

BATCH_NORM_EPS = 1e-5
TORCH_MOMENTUM = 0.1  # PyTorch's: running = (1 - 0.1) * running + 0.1 * batch


def kaiming_normal_fan_out(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32
                           ) -> jax.Array:
  """mmcv's `kaiming_init` for conv layers followed by ReLU: N(0, 2 / fan_out), fan_out =
  out_channels * kh * kw; `shape` is the NNX kernel [kh, kw, in, out]."""
  fan_out = shape[-1] * math.prod(shape[:-2])
  return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` computing and tracking statistics as PyTorch's BatchNorm2d does."""

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    super().__init__(num_features, momentum=1.0 - TORCH_MOMENTUM, epsilon=BATCH_NORM_EPS,
                     use_fast_variance=False, scale_metadata=axes("norm"),
                     bias_metadata=axes("norm"), rngs=rngs)
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jnp.ndarray:
    """Normalises [..., C] over all axes but the last."""
    del mask
    use_running = self.use_running_average if use_running_average is None else use_running_average
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if use_running:
      mean, var = self.mean[...], self.var[...]
    else:
      axes_ = tuple(range(x.ndim - 1))
      mean = wide.mean(axis=axes_)
      var = jnp.mean(jnp.square(wide - mean), axis=axes_)  # two-pass, biased
      count = math.prod(x.shape[:-1])
      unbiased = var * (count / max(count - 1, 1))
      self.mean[...] = jax.lax.stop_gradient(
          self.momentum * self.mean[...] + (1.0 - self.momentum) * mean)
      self.var[...] = jax.lax.stop_gradient(
          self.momentum * self.var[...] + (1.0 - self.momentum) * unbiased)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    scale = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    y = (wide - mean) * scale + self.bias[...]
    return y.astype(x.dtype)


class ConvModule(nnx.Module):
  """Conv (no bias) -> BatchNorm -> ReLU with mmcv's init (kaiming fan_out; BN 1 and 0).

  The conv is `conv_same.conv2d_same` (XLA's forward; a kernel gradient that is fast on CPU).

  Children `conv` and `bn` carry mmsegmentation's names (`<name>.conv.weight`,
  `<name>.bn.running_mean`, ...).
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dtype: Any,
               rngs: nnx.Rngs):
    padding = kernel_size // 2
    self.conv = nnx.Conv(
        in_channels, out_channels, (kernel_size, kernel_size),
        padding=[(padding, padding), (padding, padding)], use_bias=False, dtype=dtype,
        kernel_init=kaiming_normal_fan_out, kernel_metadata=axes(None, None, None, "embed"),
        conv_general_dilated=conv_general_dilated_same, rngs=rngs)
    self.bn = BatchNorm(out_channels, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H, W, C_out]."""
    return jax.nn.relu(self.bn(self.conv(x)))
