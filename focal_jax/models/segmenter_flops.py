"""FLOPs of the UPerNet segmenter as mmsegmentation reports them (multiply-accumulates).

mmsegmentation's `tools/get_flops.py` runs the decode path only (`forward_dummy`: backbone
and decode head, no auxiliary head) on one 2048x512 input and counts with mmcv's module
hooks: per output element, a conv counts kernel*in_channels MACs (+1 with a bias), a
BatchNorm or LayerNorm 2 per input element (affine), a ReLU or adaptive pool 1 per element;
`F.interpolate` and the products inside attention (not modules) count nothing. The
backbone is counted two ways: as those hooks see it (`"hooks"`: its Linear, conv and
LayerNorm layers) and by the official `flops()` formula (`"official"`, attention products
included), so either convention can be compared with a published figure.
"""

from __future__ import annotations

from typing import Any, Sequence

from focal_jax.models.config import to_pair
from focal_jax.models.flops import stage_macs
from focal_jax.models.focalnet import FocalNet
from focal_jax.models.focalnet import flops as focalnet_flops
from focal_jax.models.segmenter import Segmenter
from focal_jax.models.upernet import UPerHead


def _conv_module(in_channels: int, out_channels: int, kernel: int, positions: int) -> int:
  """Conv without bias, BatchNorm (2 per element), ReLU (1 per element) at `positions`."""
  return positions * (kernel * kernel * in_channels * out_channels + 3 * out_channels)


def decode_head_macs(head: UPerHead, grids: Sequence[tuple[int, int]], num_classes: int) -> int:
  """mmcv's count of the UPerHead on stage grids (h_i, w_i)."""
  channels = head.conv_seg.in_features
  widths = head.in_channels
  positions = [h * w for h, w in grids]
  macs = 0
  for module in head.psp_modules:
    macs += positions[-1] * widths[-1]  # adaptive pool: one per input element
    macs += _conv_module(widths[-1], channels, 1, module.scale**2)
  macs += _conv_module(widths[-1] + len(head.psp_modules) * channels, channels, 3, positions[-1])
  for i, width in enumerate(widths[:-1]):
    macs += _conv_module(width, channels, 1, positions[i])  # lateral
    macs += _conv_module(channels, channels, 3, positions[i])  # fpn conv
  macs += _conv_module(len(widths) * channels, channels, 3, positions[0])  # fpn_bottleneck
  macs += positions[0] * (channels * num_classes + num_classes)  # conv_seg with bias
  return macs


def auxiliary_head_macs(segmenter: Segmenter, grid: tuple[int, int]) -> int:
  head = segmenter.auxiliary_head
  conv = head.convs[0].conv
  positions = grid[0] * grid[1]
  return (_conv_module(conv.in_features, conv.out_features, 3, positions)
          + positions * (conv.out_features * segmenter.num_classes + segmenter.num_classes))


def backbone_hook_macs(segmenter: Segmenter, size: tuple[int, int]) -> int:
  """mmcv's hooks on the backbone: Linear (in*out per token), conv, LayerNorm (2 per
  element), the "fc" pooling Linear; attention products and GELU uncounted."""
  config, backbone = segmenter.config, segmenter.backbone
  if isinstance(backbone, FocalNet):
    return int(focalnet_flops.mmcv_hook_macs(backbone, size)) + _output_norm_macs(config, size)
  height, width = config.stage_resolution(0, size)
  kernel = backbone.patch_embed.kernel_size
  macs = height * width * config.embed_dim * (config.in_chans * kernel * kernel + 1)
  macs += 2 * height * width * config.embed_dim  # patch norm
  for stage, layer in enumerate(backbone.layers):
    dim = config.stage_dim(stage)
    rows, cols = config.stage_resolution(stage, size)
    tokens = rows * cols
    for block in layer.blocks:
      ws = block.window_size
      windows = -(-rows // ws) * -(-cols // ws)
      macs += 2 * 2 * tokens * dim  # norm1, norm2
      macs += windows * ws * ws * dim * 4 * dim  # qkv (3) and proj (1) on the window tokens
      for level in range(block.pooled_levels):
        side = block.pool_window(level)
        pooled = windows * 4**level  # pooled tokens of this level
        macs += pooled * dim * 3 * dim  # the pooled tokens through qkv
        if block.pool_method == "fc":
          macs += pooled * dim * side * side
      macs += 2 * tokens * dim * int(dim * config.mlp_ratio)  # fc1, fc2
    macs += 2 * tokens * dim  # norm{i}
    if layer.downsample is not None:
      k = layer.downsample.kernel_size
      out = (rows // 2) * (cols // 2)
      macs += out * 2 * dim * (dim * k * k + 1) + 2 * out * 2 * dim
  return macs


def _output_norm_macs(config: Any, size: tuple[int, int]) -> int:
  """The `norm{i}` LayerNorms on the stage maps: 2 per element."""
  return sum(2 * h * w * config.stage_dim(i)
             for i, (h, w) in enumerate(config.stage_resolution(i, size)
                                        for i in range(config.num_layers)))


def segmenter_macs(segmenter: Segmenter, img_size: Any = (2048, 512),
                   backbone: str = "hooks", auxiliary: bool = False) -> dict[str, float]:
  """{'backbone', 'decode_head', 'auxiliary_head', 'total'} MACs for one image of `img_size`
  (height, width). `backbone`: "hooks" (mmcv's module hooks) or "official" (the official
  `flops()` formula without classifier, plus the output norms)."""
  size = to_pair(img_size)
  config = segmenter.config
  grids = [config.stage_resolution(i, size) for i in range(config.num_layers)]
  if backbone == "hooks":
    backbone_macs = float(backbone_hook_macs(segmenter, size))
  elif backbone == "official" and isinstance(segmenter.backbone, FocalNet):
    backbone_macs = (focalnet_flops.official_trunk_macs(segmenter.backbone, size)
                     + _output_norm_macs(config, size))
  elif backbone == "official":
    height, width = grids[0]
    kernel = segmenter.backbone.patch_embed.kernel_size
    backbone_macs = height * width * config.embed_dim * (config.in_chans * kernel * kernel + 1)
    backbone_macs += sum(stage_macs(segmenter.backbone, size))
    backbone_macs += sum(2 * h * w * config.stage_dim(i) for i, (h, w) in enumerate(grids))
  else:
    raise ValueError(f"backbone={backbone!r}; expected 'hooks' or 'official'.")
  result = {"backbone": backbone_macs,
            "decode_head": float(decode_head_macs(segmenter.decode_head, grids,
                                                  segmenter.num_classes))}
  if auxiliary and segmenter.auxiliary_head is not None:
    result["auxiliary_head"] = float(auxiliary_head_macs(segmenter, grids[2]))
  result["total"] = sum(result.values())
  return result
