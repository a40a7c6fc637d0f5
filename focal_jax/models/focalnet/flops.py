"""FocalNet's official `flops()` count (multiply-accumulates), its approximations kept."""

from __future__ import annotations

from typing import Any

from focal_jax.models.config import to_pair
from focal_jax.models.focalnet.model import FocalNet


def official_macs(model: FocalNet, img_size: Any = None) -> float:
  """The official `FocalNet.flops()` for this model at `img_size` (default: the built size).

  As officially, patch embeddings count `patch_size**2` (2 for downsamples) multiplies per
  output, also where `use_conv_embed` makes the kernel 7x7 or 3x3.
  """
  config = model.config
  size = to_pair(img_size) if img_size is not None else config.img_size
  height, width = config.stage_resolution(0, size)
  macs = height * width * config.embed_dim * config.in_chans * config.patch_size**2
  if model.patch_embed.norm is not None:
    macs += height * width * config.embed_dim
  for stage, layer in enumerate(model.layers):
    dim = config.stage_dim(stage)
    rows, cols = config.stage_resolution(stage, size)
    tokens = rows * cols
    for block in layer.blocks:
      macs += 2 * dim * tokens  # norm1, norm2
      macs += block.modulation.modulator_macs(tokens)
      macs += 2 * tokens * dim * dim * config.mlp_ratio
    if layer.downsample is not None:
      out_tokens = (rows // 2) * (cols // 2)
      macs += out_tokens * 2 * dim * dim * 4 + out_tokens * 2 * dim  # conv, LayerNorm
  macs += config.num_features * height * width // 2**config.num_layers  # final norm
  macs += config.num_features * config.num_classes
  return macs
