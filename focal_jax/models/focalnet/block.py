"""One FocalNet block: (pre- or post-) norm, focal modulation, MLP, with the residual steps,
layer scale and stochastic depth the Focal Transformer blocks use."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.focalnet.modulation import FocalModulation
from focal_jax.models.layers import Mlp, axes, drop_path, layer_norm, residual


class FocalNetBlock(nnx.Module):
  """x + DropPath(gamma_1 * modulation(norm1(x))), then x + DropPath(gamma_2 * mlp(norm2(x)))
  on [B, H, W, C]; with `use_postln` the norms follow the branch instead
  (x + DropPath(gamma_1 * norm1(modulation(x))), ...), as officially."""

  def __init__(self, dim: int, *, mlp_ratio: float, drop: float, drop_path_rate: float,
               focal_level: int, focal_window: int, use_layerscale: bool,
               layerscale_value: float, use_postln: bool, use_postln_in_modulation: bool,
               normalize_modulator: bool, dtype: Any, rngs: nnx.Rngs):
    self.use_postln = use_postln
    self.norm1 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.modulation = FocalModulation(
        dim, focal_window, focal_level, use_postln_in_modulation=use_postln_in_modulation,
        normalize_modulator=normalize_modulator, proj_drop=drop, dtype=dtype, rngs=rngs)
    self.drop_path = drop_path(drop_path_rate, rngs)
    self.norm2 = layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, dtype=dtype, rngs=rngs)
    if use_layerscale:
      self.gamma_1 = nnx.Param(layerscale_value * jnp.ones((dim,)), **axes("norm"))
      self.gamma_2 = nnx.Param(layerscale_value * jnp.ones((dim,)), **axes("norm"))
    else:
      self.gamma_1 = self.gamma_2 = None

  def static_options(self) -> tuple[bool, bool]:
    """What decides this block's program beyond its parameter shapes."""
    return self.use_postln, self.modulation.normalize_modulator

  def __call__(self, x: jnp.ndarray, drop_rate: jax.Array | None = None) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H, W, C]; `drop_rate` overrides the stochastic-depth rate."""
    if self.use_postln:
      x = residual(x, self.norm1(self.modulation(x)), self.gamma_1, self.drop_path, drop_rate)
      return residual(x, self.norm2(self.mlp(x)), self.gamma_2, self.drop_path, drop_rate)
    x = residual(x, self.modulation(self.norm1(x)), self.gamma_1, self.drop_path, drop_rate)
    return residual(x, self.mlp(self.norm2(x)), self.gamma_2, self.drop_path, drop_rate)
