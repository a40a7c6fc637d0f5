"""UPerNet semantic segmentation with a Focal Transformer or FocalNet backbone
(mmsegmentation's `EncoderDecoder` with the `upernet_swin` / `upernet_focalnet` heads).

`seg(images)` gives the decode head's logits at stride 4; `seg.forward_train(images)` also
gives the auxiliary head's (stride 16) for the training loss, which belongs to the task.
Images of any height and width: they are zero-padded at the bottom and right to what the
backbone needs (multiples of 32 for the Focal Transformer; for Focal-fast, whole windows in
every stage, e.g. multiples of 224 with window 7; for FocalNet, multiples of 4, its backbone
padding each stage inside as officially) and the logits are cropped back to
ceil(H/4) x ceil(W/4), as mmsegmentation's backbones pad inside and `whole` inference keeps
the unpadded part. Train and evaluate with `seg.train()` / `seg.eval()` (dropout, drop path,
batch or running BatchNorm statistics).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from focal_jax.models.backbone import FocalBackbone, Path
from focal_jax.models.config import FocalConfig, make_config
from focal_jax.models.focalnet.backbone import FocalNetBackbone
from focal_jax.models.focalnet.config import (VARIANTS as FOCALNET_VARIANTS, FocalNetConfig,
                                              make_focalnet_segmentation_config)
from focal_jax.models.upernet import AUXILIARY_CHANNELS, DECODE_CHANNELS, FCNHead, UPerHead

AUXILIARY_STAGE = 2  # mmsegmentation's FCNHead in_index: stage 3 (stride 16)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


class Segmenter(nnx.Module):
  """Backbone (`backbone.`), UPerHead (`decode_head.`), FCNHead (`auxiliary_head.`), named
  as in mmsegmentation's checkpoints."""

  def __init__(self, config: FocalConfig | FocalNetConfig, num_classes: int, *,
               frozen_stages: int = -1, auxiliary_head: bool = True,
               decode_channels: int = DECODE_CHANNELS,
               auxiliary_channels: int = AUXILIARY_CHANNELS, rngs: nnx.Rngs):
    if num_classes < 1:
      raise ValueError(f"num_classes={num_classes}: a segmenter needs at least one class.")
    self.num_classes = num_classes
    backbone = FocalNetBackbone if isinstance(config, FocalNetConfig) else FocalBackbone
    self.backbone = backbone(config, out_indices=tuple(range(config.num_layers)),
                             frozen_stages=frozen_stages, rngs=rngs)
    widths = [config.stage_dim(i) for i in range(config.num_layers)]
    self.decode_head = UPerHead(widths, num_classes, channels=decode_channels,
                                dtype=config.dtype, rngs=rngs)
    self.auxiliary_head = (FCNHead(widths[AUXILIARY_STAGE], num_classes,
                                   channels=auxiliary_channels, dtype=config.dtype, rngs=rngs)
                           if auxiliary_head else None)

  @property
  def config(self) -> FocalConfig | FocalNetConfig:
    return self.backbone.config

  @property
  def size_multiple(self) -> int:
    """Input height and width are padded up to multiples of this."""
    config = self.config
    if isinstance(config, FocalNetConfig):
      return config.patch_size  # the FocalNet backbone pads each stage inside
    if config.version == 1:
      return config.size_multiple
    windows = [layer.blocks[0].window_size for layer in self.backbone.layers]
    return math.lcm(*(config.patch_size * 2**stage * w for stage, w in enumerate(windows)))

  def trainable_filter(self) -> Callable[[Path, Any], bool]:
    """NNX filter of the parameters to optimise (all but the frozen backbone stages)."""
    return self.backbone.trainable_filter(prefix=("backbone",))

  def _features(self, images: jnp.ndarray) -> tuple[list[jnp.ndarray], tuple[int, int]]:
    """Backbone maps of the padded images and the unpadded height and width."""
    if images.ndim != 4:
      raise ValueError(f"Expected images of shape [batch, height, width, channels] (NHWC), got "
                       f"{tuple(images.shape)}.")
    _, height, width, _ = images.shape
    unit = self.size_multiple
    pad_h, pad_w = _ceil_div(height, unit) * unit - height, _ceil_div(width, unit) * unit - width
    if pad_h or pad_w:
      images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return self.backbone(images), (height, width)

  @staticmethod
  def _crop(logits: jnp.ndarray, size: tuple[int, int], stride: int) -> jnp.ndarray:
    return logits[:, :_ceil_div(size[0], stride), :_ceil_div(size[1], stride)]

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Decode-head logits [B, ceil(H/4), ceil(W/4), num_classes] for NHWC images."""
    features, size = self._features(images)
    return self._crop(self.decode_head(features), size, 4)

  def forward_train(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """(decode logits [B, ceil(H/4), ceil(W/4), K], auxiliary logits [B, ceil(H/16),
    ceil(W/16), K] or None without auxiliary head), for the task's losses."""
    features, size = self._features(images)
    decode = self._crop(self.decode_head(features), size, 4)
    if self.auxiliary_head is None:
      return decode, None
    return decode, self._crop(self.auxiliary_head(features[AUXILIARY_STAGE]), size, 16)


def segmenter_config(backbone: str | None, img_size: Any = 512, **backbone_options: Any
                     ) -> FocalConfig | FocalNetConfig:
  """The backbone's config: variant `backbone` with official-name options, no classifier
  (FocalNet names start from the options of their released ADE20K UPerNet configs)."""
  if backbone_options.pop("num_classes", 0):
    raise ValueError("num_classes belongs to the segmenter (create_segmenter's argument), not "
                     "to the backbone options.")
  if backbone in FOCALNET_VARIANTS:
    return make_focalnet_segmentation_config(backbone, num_classes=0, img_size=img_size,
                                             **backbone_options)
  return make_config(backbone, num_classes=0, img_size=img_size, **backbone_options)


def create_segmenter(backbone: str | None = "focal_tiny", num_classes: int = 150,
                     img_size: Any = 512, *, frozen_stages: int = -1, auxiliary_head: bool = True,
                     decode_channels: int = DECODE_CHANNELS,
                     auxiliary_channels: int = AUXILIARY_CHANNELS, seed: int = 0,
                     **backbone_options: Any) -> Segmenter:
  """UPerNet with the Focal or FocalNet variant `backbone` (official-name `backbone_options`,
  e.g. drop_path_rate=0.3), built for crops of `img_size` (it decides the window of each
  Focal stage as the official constructor does; other sizes still run). FocalNet
  backbones take the options of FocalNet's released ADE20K configs (focal_windows 9, drop
  path 0.3) unless overridden. Heads are initialised as mmsegmentation's; the backbone as
  the classification model's. `decode_channels` / `auxiliary_channels`: the heads' widths
  (512 / 256 as mmsegmentation's UPerNet; smaller for quick experiments)."""
  config = segmenter_config(backbone, img_size, **backbone_options)
  with nnx.use_eager_sharding(False):
    return Segmenter(config, num_classes, frozen_stages=frozen_stages,
                     auxiliary_head=auxiliary_head, decode_channels=decode_channels,
                     auxiliary_channels=auxiliary_channels, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
