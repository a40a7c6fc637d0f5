"""Focal modulation (Yang et al., "Focal Modulation Networks", NeurIPS 2022): the token mixer
of FocalNet, the one piece FocalNet does not share with the Focal Transformer.

One Linear `f` gives a query q, a context map and L + 1 gates; L depthwise convolutions
(kernel `focal_window + focal_factor * level`, each followed by GELU) grow the context level
by level, a global average adds level L + 1; the gated sum, through the 1x1 convolution `h`,
modulates q elementwise. Parameter names follow the official module.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from focal_jax.models import layers
from focal_jax.models.layers import axes, conv, dense, layer_norm, torch_default_uniform


def depthwise_conv(dim: int, kernel: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  """A bias-free depthwise Conv2d (kernel x kernel, 'same' zero padding kernel // 2), NHWC,
  with PyTorch's default init; it runs as one `lax.conv_general_dilated` with
  `feature_group_count=dim`."""
  pad = kernel // 2
  return nnx.Conv(dim, dim, (kernel, kernel), padding=[(pad, pad), (pad, pad)],
                  feature_group_count=dim, use_bias=False, dtype=dtype,
                  kernel_init=torch_default_uniform(kernel * kernel),
                  kernel_metadata=axes(None, None, None, "embed"), rngs=rngs)


class FocalModulation(nnx.Module):
  """[B, H, W, C] -> [B, H, W, C]: q * h(sum_l gate_l * ctx_l), then `proj`."""

  def __init__(self, dim: int, focal_window: int, focal_level: int, *, focal_factor: int = 2,
               use_postln_in_modulation: bool = False, normalize_modulator: bool = False,
               proj_drop: float = 0.0, dtype: Any, rngs: nnx.Rngs):
    self.dim, self.focal_level = dim, focal_level
    self.normalize_modulator = normalize_modulator
    self.kernel_sizes = tuple(focal_factor * level + focal_window for level in range(focal_level))
    self.f = dense(dim, 2 * dim + focal_level + 1, "embed", None, dtype=dtype, rngs=rngs)
    self.h = conv(dim, dim, 1, 1, 0, dtype=dtype, rngs=rngs)  # officially a 1x1 Conv2d
    self.focal_layers = nnx.List([depthwise_conv(dim, k, dtype=dtype, rngs=rngs)
                                  for k in self.kernel_sizes])
    self.proj = dense(dim, dim, None, "embed", dtype=dtype, rngs=rngs)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)
    self.ln = layer_norm(dim, dtype=dtype, rngs=rngs) if use_postln_in_modulation else None

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dim, levels = self.dim, self.focal_level
    projected = self.f(x)  # [B, H, W, 2C + L + 1]
    q, ctx, gates = (projected[..., :dim], projected[..., dim:2 * dim],
                     projected[..., 2 * dim:])
    ctx_all = jnp.zeros_like(ctx)
    for level, focal_conv in enumerate(self.focal_layers):
      ctx = layers.gelu(focal_conv(ctx))
      ctx_all = ctx_all + ctx * gates[..., level:level + 1]
    ctx_global = layers.gelu(ctx.mean(axis=(1, 2), keepdims=True))  # [B, 1, 1, C]
    ctx_all = ctx_all + ctx_global * gates[..., levels:]
    if self.normalize_modulator:
      ctx_all = ctx_all / (levels + 1)
    dtype = self.h.dtype or ctx_all.dtype
    kernel = self.h.kernel[...].reshape(dim, dim).astype(dtype)  # [1, 1, C, C] -> [C, C]
    modulator = jnp.dot(ctx_all.astype(dtype), kernel) + self.h.bias[...].astype(dtype)
    out = q * modulator
    if self.ln is not None:
      out = self.ln(out)
    return self.proj_drop(self.proj(out))

  def modulator_macs(self, tokens: int) -> float:
    """The official `FocalModulation.flops(N)` for N tokens."""
    dim = self.dim
    macs = tokens * dim * (2 * dim + self.focal_level + 1)  # f
    macs += sum(tokens * (k * k + 1) * dim for k in self.kernel_sizes)  # focal convs
    macs += tokens * dim  # global gating
    macs += tokens * dim * (dim + 1)  # h
    macs += tokens * dim * dim  # proj
    return macs
