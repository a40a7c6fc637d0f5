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
  macs = official_trunk_macs(model, size)
  macs += config.num_features * height * width // 2**config.num_layers  # final norm
  macs += config.num_features * config.num_classes
  return macs


def official_trunk_macs(model: FocalNet, size: tuple[int, int]) -> float:
  """The official formula's stem and stages (no final norm or classifier)."""
  config = model.config
  height, width = config.stage_resolution(0, size)
  macs = height * width * config.embed_dim * config.in_chans * config.patch_size**2
  if model.patch_embed.norm is not None:
    macs += height * width * config.embed_dim
  return macs + sum(stage_macs(model, size))


def stage_macs(model: FocalNet, size: tuple[int, int]) -> list[float]:
  """The official formula per stage (blocks and the stage's downsample)."""
  config = model.config
  result = []
  for stage, layer in enumerate(model.layers):
    dim = config.stage_dim(stage)
    rows, cols = config.stage_resolution(stage, size)
    tokens = rows * cols
    macs = 0.0
    for block in layer.blocks:
      macs += 2 * dim * tokens  # norm1, norm2
      macs += block.modulation.modulator_macs(tokens)
      macs += 2 * tokens * dim * dim * config.mlp_ratio
    if layer.downsample is not None:
      out_tokens = (rows // 2) * (cols // 2)
      macs += out_tokens * 2 * dim * dim * 4 + out_tokens * 2 * dim  # conv, LayerNorm
    result.append(macs)
  return result


def mmcv_hook_macs(model: FocalNet, size: tuple[int, int]) -> float:
  """What mmcv's module hooks (mmsegmentation's `get_flops`) count in the stem and stages,
  without final norm: Linear in*out per token (no bias), Conv2d kernel*in/groups*out per
  output position plus its bias, LayerNorm 2 per element; GELU, the gating products and
  the global mean are no hooked modules and count nothing."""
  config = model.config
  height, width = config.stage_resolution(0, size)
  kernel = model.patch_embed.kernel_size
  macs = height * width * config.embed_dim * (config.in_chans * kernel * kernel + 1)
  if model.patch_embed.norm is not None:
    macs += 2 * height * width * config.embed_dim
  for stage, layer in enumerate(model.layers):
    dim = config.stage_dim(stage)
    rows, cols = config.stage_resolution(stage, size)
    tokens = rows * cols
    for block in layer.blocks:
      modulation = block.modulation
      macs += 2 * 2 * tokens * dim  # norm1, norm2
      macs += tokens * dim * (2 * dim + modulation.focal_level + 1)  # f
      macs += sum(tokens * k * k * dim for k in modulation.kernel_sizes)  # depthwise, no bias
      macs += tokens * (dim * dim + dim)  # h: 1x1 conv with bias
      macs += tokens * dim * dim  # proj
      macs += 2 * tokens * dim * int(dim * config.mlp_ratio)  # fc1, fc2
      if modulation.ln is not None:
        macs += 2 * tokens * dim
    if layer.downsample is not None:
      k = layer.downsample.kernel_size
      out = (rows // 2) * (cols // 2)
      macs += out * 2 * dim * (dim * k * k + 1) + 2 * out * 2 * dim  # conv with bias, norm
  return macs
