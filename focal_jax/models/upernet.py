"""UPerNet decode head and FCN auxiliary head, as mmsegmentation's `upernet_swin` config
builds them (module names as mmsegmentation's, so weights convert by name).

UPerHead: pyramid pooling (adaptive average pools 1, 2, 3, 6 of the last stage, each a
1x1 ConvModule, upsampled back bilinearly) concatenated with that stage and fused by a 3x3
`bottleneck`; 1x1 `lateral_convs` on the other stages; a top-down path adding each level,
bilinearly upsampled, to the one below; 3x3 `fpn_convs`; all levels upsampled to stride 4,
concatenated and fused by the 3x3 `fpn_bottleneck`; dropout 0.1 of whole channels
(`Dropout2d`, as mmsegmentation's); 1x1 `conv_seg`.
FCNHead (auxiliary, on stage 3): one 3x3 ConvModule, dropout 0.1, 1x1 `conv_seg`.
Pooling and upsampling are static matrices (`models.resize`), no gather.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.conv_bn import ConvModule
from focal_jax.models.conv_same import conv_general_dilated_same
from focal_jax.models.layers import axes
from focal_jax.models.resize import adaptive_avg_pool, resize_bilinear

POOL_SCALES = (1, 2, 3, 6)
DECODE_CHANNELS = 512
AUXILIARY_CHANNELS = 256
DROPOUT = 0.1


def conv_seg(in_channels: int, num_classes: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  """The 1x1 classifier, initialised as mmsegmentation's: N(0, 0.01) weights, zero bias."""
  return nnx.Conv(in_channels, num_classes, (1, 1), dtype=dtype,
                  kernel_init=jax.nn.initializers.normal(0.01),
                  kernel_metadata=axes(None, None, None, "classes"),
                  bias_metadata=axes("classes"),
                  conv_general_dilated=conv_general_dilated_same, rngs=rngs)


class PoolingModule(nnx.Module):
  """One pyramid-pooling branch, `psp_modules.{i}` (mmsegmentation's Sequential(pool, conv):
  the ConvModule is its child `1`)."""

  def __init__(self, scale: int, in_channels: int, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.scale = scale
    self.conv_module = ConvModule(in_channels, channels, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C] -> pooled to scale x scale, conv, upsampled back: [B, H, W, channels]."""
    pooled = self.conv_module(adaptive_avg_pool(x, self.scale))  # [B, s, s, channels]
    return resize_bilinear(pooled, x.shape[1:3])


class UPerHead(nnx.Module):
  """mmsegmentation's UPerHead over four stage maps; logits at the first map's resolution."""

  def __init__(self, in_channels: Sequence[int], num_classes: int, *,
               channels: int = DECODE_CHANNELS, pool_scales: Sequence[int] = POOL_SCALES,
               dropout: float = DROPOUT, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_channels = tuple(in_channels)
    self.conv_seg = conv_seg(channels, num_classes, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d
    self.psp_modules = nnx.List([PoolingModule(s, in_channels[-1], channels, dtype=dtype, rngs=rngs)
                                 for s in pool_scales])
    self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3,
                                 dtype=dtype, rngs=rngs)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, dtype=dtype, rngs=rngs)
                                   for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, dtype=dtype, rngs=rngs)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, dtype=dtype,
                                     rngs=rngs)

  def pyramid_pooling(self, x: jnp.ndarray) -> jnp.ndarray:
    """The last stage with its pooled branches, fused: [B, h, w, C] -> [B, h, w, channels]."""
    branches = [x] + [module(x) for module in self.psp_modules]
    return self.bottleneck(jnp.concatenate(branches, axis=-1))

  def features(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """The fused map before dropout and classifier: [B, H/4, W/4, channels]."""
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
    laterals.append(self.pyramid_pooling(inputs[-1]))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse levels into finer ones
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    size = outputs[0].shape[1:3]
    outputs = [outputs[0]] + [resize_bilinear(x, size) for x in outputs[1:]]
    return self.fpn_bottleneck(jnp.concatenate(outputs, axis=-1))

  def __call__(self, inputs: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Four maps [B, H/s, W/s, C_i] (s = 4..32) -> logits [B, H/4, W/4, num_classes]."""
    return self.conv_seg(self.dropout(self.features(inputs)))


class FCNHead(nnx.Module):
  """mmsegmentation's FCNHead with one conv and no input concat (the auxiliary head)."""

  def __init__(self, in_channels: int, num_classes: int, *, channels: int = AUXILIARY_CHANNELS,
               dropout: float = DROPOUT, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.conv_seg = conv_seg(channels, num_classes, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d
    self.convs = nnx.List([ConvModule(in_channels, channels, 3, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, h, w, C] -> logits [B, h, w, num_classes]."""
    for conv in self.convs:
      x = conv(x)
    return self.conv_seg(self.dropout(x))
