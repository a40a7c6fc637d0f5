"""Building blocks shared by the model: initialisers, norms, MLP, patch embedding.

Parameters carry logical axis names (`out_sharding` metadata) so that training code can
map them onto a device mesh with rules; the model itself never sees a mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-5  # PyTorch's default, used throughout the official model


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """The exact (erf) GELU of PyTorch's nn.GELU(), not the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def trunc_normal(std: float = 0.02):
  """Normal(0, std) truncated at +-2 absolute, as timm's `trunc_normal_` defaults."""

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)

  return init


def torch_default_uniform(fan_in: int):
  """PyTorch's default Conv init for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def axes(*names: str | None) -> dict[str, Any]:
  """Logical-axis metadata for a parameter."""
  return {"out_sharding": tuple(names)}


def dense(in_features: int, out_features: int, in_axis: str | None, out_axis: str | None, *,
          dtype: Any, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  """A Linear layer with the official init (trunc-normal 0.02 weights, zero bias)."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_init=trunc_normal(),
      kernel_metadata=axes(in_axis, out_axis), bias_metadata=axes(out_axis), rngs=rngs)


def conv(in_features: int, out_features: int, kernel: int, stride: int, padding: int, *,
         groups: int = 1, dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  """A Conv2d with PyTorch's default init, NHWC, symmetric zero padding."""
  fan_in = in_features // groups * kernel * kernel
  return nnx.Conv(
      in_features, out_features, (kernel, kernel), strides=stride,
      padding=[(padding, padding), (padding, padding)], feature_group_count=groups,
      dtype=dtype, kernel_init=torch_default_uniform(fan_in), bias_init=torch_default_uniform(fan_in),
      kernel_metadata=axes(None, None, None, "embed"), bias_metadata=axes("embed"), rngs=rngs)


def layer_norm(features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with eps 1e-5 and two-pass variance, as PyTorch computes it."""
  return nnx.LayerNorm(
      features, epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
      scale_metadata=axes("norm"), bias_metadata=axes("norm"), rngs=rngs)


def drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
  """Stochastic depth on [B, H, W, C]: drops whole samples, scales survivors by 1/(1-rate)."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, dim: int, hidden: int, drop: float, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, "embed", "mlp", dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, "mlp", "embed", dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = gelu(self.fc1(x))
    x = self.drop(x)
    return self.drop(self.fc2(x))


class PatchEmbed(nnx.Module):
  """Patch embedding (the stem) and the downsampling between stages.

  Stem: Conv(patch, stride patch), or with `use_conv_embed` Conv(7x7, stride 4, pad 2).
  Downsample: Conv(2x2, stride 2), or with `use_conv_embed` Conv(3x3, stride 2, pad 1).
  Optional GroupNorm(1 group) before the conv (`use_pre_norm`, downsamples only, as
  officially), LayerNorm after.
  """

  def __init__(self, in_chans: int, embed_dim: int, *, patch_size: int, is_stem: bool,
               use_conv_embed: bool, use_norm: bool, use_pre_norm: bool, dtype: Any,
               rngs: nnx.Rngs):
    if use_conv_embed:
      kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
    else:
      kernel, stride, padding = patch_size, patch_size, 0
    self.kernel_size = kernel
    self.proj = conv(in_chans, embed_dim, kernel, stride, padding, dtype=dtype, rngs=rngs)
    self.pre_norm = (
        nnx.GroupNorm(in_chans, num_groups=1, epsilon=LAYER_NORM_EPS, use_fast_variance=False,
                      dtype=dtype, scale_metadata=axes("norm"), bias_metadata=axes("norm"),
                      rngs=rngs)
        if use_pre_norm and use_norm else None)
    self.norm = layer_norm(embed_dim, dtype=dtype, rngs=rngs) if use_norm else None

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W, C_in] -> [B, H/stride, W/stride, embed_dim]."""
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    x = self.proj(x)
    if self.norm is not None:
      x = self.norm(x)
    return x

