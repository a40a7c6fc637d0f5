"""Building blocks shared by the model: initialisers, norms, MLP, patch embedding.

Parameters carry logical axis names (`out_sharding` metadata) so that training code can
map them onto a device mesh with rules; the model itself never sees a mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-5  # PyTorch's default, used throughout the official model


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """The exact GELU of PyTorch's nn.GELU(), x/2 * (1 + erf(x/sqrt(2))), not the tanh form.

  Written with `erf` as PyTorch does: `jax.nn.gelu(approximate=False)` goes through
  `erfc`, whose value and derivative compile to three times the work on CPU.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


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


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def normalize_last_axis(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                        epsilon: float) -> jnp.ndarray:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32.

  Two-pass variance, as PyTorch computes it. The derivative rule below is the textbook
  one: its transpose (the backward pass) is two row reductions and one elementwise
  pass, where differentiating the forward step by step gives XLA twice the passes.
  """
  return _normalize_and_stats(x, scale, bias, epsilon)[0]


def _normalize_and_stats(x, scale, bias, epsilon):
  x = x.astype(jnp.float32)
  mean = x.mean(axis=-1, keepdims=True)
  centred = x - mean
  inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
  x_hat = centred * inv_std
  return x_hat * scale + bias, x_hat, inv_std


@normalize_last_axis.defjvp
def _normalize_last_axis_jvp(epsilon, primals, tangents):
  x, scale, bias = primals
  dx, dscale, dbias = tangents
  y, x_hat, inv_std = _normalize_and_stats(x, scale, bias, epsilon)
  dx = dx.astype(jnp.float32)
  dx_hat = inv_std * (dx - dx.mean(axis=-1, keepdims=True)
                      - x_hat * jnp.mean(dx * x_hat, axis=-1, keepdims=True))
  return y, dx_hat * scale + x_hat * dscale + dbias


class LayerNorm(nnx.Module):
  """LayerNorm over the channel (last) axis with eps 1e-5 and two-pass variance, as
  PyTorch's; parameters `scale` and `bias` as in `nnx.LayerNorm`. Statistics are float32
  also for bfloat16 activations; the output has the activation dtype."""

  def __init__(self, features: int, *, dtype: Any, rngs: nnx.Rngs):
    del rngs  # deterministic init: ones and zeros
    self.epsilon = LAYER_NORM_EPS  # read at construction, so tests can change it
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32), **axes("norm"))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32), **axes("norm"))

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = normalize_last_axis(x, self.scale[...].astype(jnp.float32),
                            self.bias[...].astype(jnp.float32), self.epsilon)
    return y.astype(self.dtype or x.dtype)


def layer_norm(features: int, *, dtype: Any, rngs: nnx.Rngs) -> LayerNorm:
  """LayerNorm with eps 1e-5 and two-pass variance, as PyTorch computes it."""
  return LayerNorm(features, dtype=dtype, rngs=rngs)


class DropPath(nnx.Dropout):
  """Stochastic depth on [B, ...]: drops whole samples, scales survivors by 1/(1-rate).

  The same random draw as `nnx.Dropout(rate, broadcast_dims=(1, ..))` (same state, same
  masks), applied as a product with a per-sample factor [B, 1, ..] rather than a select
  over a broadcast mask, which XLA fuses into the surrounding (often transposing)
  gradient kernels at a lower per-element cost.
  """

  def __call__(self, inputs: jnp.ndarray, *, deterministic: bool | None = None,
               rate: jax.Array | None = None) -> jnp.ndarray:
    """`rate` (may be traced) overrides the built rate, for blocks run under `lax.scan`."""
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic or (rate is None and self.rate == 0.0):
      return inputs
    if rate is None and self.rate == 1.0:
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - (self.rate if rate is None else rate)
    shape = (inputs.shape[0],) + (1,) * (inputs.ndim - 1)
    keep = jax.random.bernoulli(self.rngs(), p=keep_prob, shape=shape)
    return inputs * (keep.astype(inputs.dtype) / jnp.asarray(keep_prob, inputs.dtype))


def drop_path(rate: float, rngs: nnx.Rngs) -> DropPath | None:
  """Stochastic depth on [B, H, W, C] (see `DropPath`), None when the rate is 0."""
  return DropPath(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None


def residual(x: jnp.ndarray, branch: jnp.ndarray, gamma: nnx.Param | None,
             path_drop: DropPath | None, drop_rate: jax.Array | None = None) -> jnp.ndarray:
  """x + DropPath(gamma * branch): a block's residual step, with optional layer scale
  `gamma` [C] and stochastic depth (`drop_rate` overrides its rate under `lax.scan`)."""
  if gamma is not None:
    branch = gamma[...].astype(branch.dtype) * branch
  if path_drop is not None:
    branch = path_drop(branch, rate=drop_rate)
  return x + branch


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, dim: int, hidden: int, drop: float, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, "embed", "mlp", dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, "mlp", "embed", dtype=dtype, rngs=rngs)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    hidden = self.fc1(x)
    if self.drop.rate == 0.0:
      # The backward pass keeps only the fc1 output and recomputes GELU from it (one
      # elementwise pass) instead of also storing GELU's output, a [tokens, 4C] array.
      dtype = self.fc2.dtype or hidden.dtype
      return jax.checkpoint(_gelu_linear)(hidden, self.fc2.kernel[...].astype(dtype),
                                          self.fc2.bias[...].astype(dtype))
    x = self.drop(gelu(hidden))
    return self.drop(self.fc2(x))


def _gelu_linear(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """GELU(x) @ kernel + bias (the second half of `Mlp` without dropout)."""
  return jnp.dot(gelu(x).astype(kernel.dtype), kernel) + bias


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
    self.patchify = kernel == stride and padding == 0  # non-overlapping patches
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
    x = self.embed_patches(x) if self.patchify else self.proj(x)
    if self.norm is not None:
      x = self.norm(x)
    return x

  def embed_patches(self, x: jnp.ndarray) -> jnp.ndarray:
    """The stride-k k x k convolution as a reshape and one matmul over k*k*C_in.

    Same parameters and result as `self.proj(x)`; on CPU the convolution's gradient with
    respect to its kernel is several times slower than this matmul's.
    """
    k = self.kernel_size
    batch, height, width, channels = x.shape
    rows, cols = height // k, width // k
    dtype = self.proj.dtype or x.dtype
    x = x[:, :rows * k, :cols * k].reshape(batch, rows, k, cols, k, channels)  # [B, h, k, w, k, C]
    y = jnp.einsum("bhiwjc,ijco->bhwo", x.astype(dtype), self.proj.kernel[...].astype(dtype))
    return y + self.proj.bias[...].astype(dtype)
