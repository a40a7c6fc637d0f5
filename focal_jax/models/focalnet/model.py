"""FocalNet: the Focal Transformer's stem, stages, downsampling and head around focal
modulation blocks (`FocalNet` reuses `FocalTransformer`, swapping the stage's blocks)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from focal_jax.models.config import check_image_size
from focal_jax.models.focal_transformer import FocalStage, FocalTransformer
from focal_jax.models.focalnet.block import FocalNetBlock
from focal_jax.models.focalnet.config import FocalNetConfig, make_focalnet_config


class FocalNetStage(FocalStage):
  """A stage (the official `BasicLayer`): FocalNet blocks, then the shared downsample."""

  @staticmethod
  def build_blocks(config: FocalNetConfig, stage: int, drop_path_rates: list[float],
                   rngs: nnx.Rngs) -> list[nnx.Module]:
    return [FocalNetBlock(
        config.stage_dim(stage), mlp_ratio=config.mlp_ratio, drop=config.drop_rate,
        drop_path_rate=rate, focal_level=config.focal_levels[stage],
        focal_window=config.focal_windows[stage], use_layerscale=config.use_layerscale,
        layerscale_value=config.layerscale_value, use_postln=config.use_postln,
        use_postln_in_modulation=config.use_postln_in_modulation,
        normalize_modulator=config.normalize_modulator, dtype=config.dtype, rngs=rngs)
        for rate in drop_path_rates]


class FocalNet(FocalTransformer):
  """Focal Modulation Network (Yang et al., 2022) for NHWC images.

  Same interface as `FocalTransformer`: `model(images)` gives logits, `forward_features`
  the stage maps. Parameter names mirror the official PyTorch module tree. Any input whose
  sides are multiples of `config.size_multiple` works: no windows, no built-in grid.
  """

  stage_class = FocalNetStage

  def _check_input(self, images: jnp.ndarray) -> None:
    config = self.config
    if images.ndim != 4 or images.shape[-1] != config.in_chans:
      raise ValueError(
          f"Expected images of shape [batch, height, width, {config.in_chans}] (NHWC), got "
          f"{tuple(images.shape)}. Convert NCHW arrays with x.transpose(0, 2, 3, 1).")
    check_image_size(config, images.shape[1:3])


def create_focalnet(name: str | None = "focalnet_tiny_srf", num_classes: int = 1000,
                    img_size: Any = 224, seed: int = 0, **overrides: Any) -> FocalNet:
  """Builds a FocalNet variant (see `focalnet.VARIANTS`) with official-name overrides."""
  config = make_focalnet_config(name, num_classes=num_classes, img_size=img_size, **overrides)
  with nnx.use_eager_sharding(False):
    return FocalNet(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
