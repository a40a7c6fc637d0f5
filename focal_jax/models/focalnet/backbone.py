"""FocalNet as a dense-prediction backbone, as microsoft/FocalNet's segmentation backbone
(`segmentation/mmseg/models/backbones/focalnet.py`) builds it: no classifier or final norm,
a LayerNorm `norm{i}` on each output stage map, `frozen_stages` as the Focal backbone's.

Unlike the Focal Transformer, the official FocalNet backbone pads inside: the stem pads the
image with zeros at the bottom and right to a multiple of the patch size, and each
downsampling pads an odd-sized stage map to even, so any image size runs and stage i has
ceil(H / 4 / 2**i) rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from focal_jax.models.backbone import FocalBackbone
from focal_jax.models.focalnet.model import FocalNet


def pad_bottom_right(x: jnp.ndarray, multiple: int) -> jnp.ndarray:
  """Zero-pads [B, H, W, C] at the bottom and right to multiples of `multiple`."""
  pad_h, pad_w = -x.shape[1] % multiple, -x.shape[2] % multiple
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x


class FocalNetBackbone(FocalBackbone, FocalNet):
  """Stage maps [B, ceil(H/s), ceil(W/s), C_i] (s = 4, 8, 16, 32) for `out_indices`, each
  normalised by its `norm{i}`; FocalNet's blocks and the Focal backbone's freezing."""

  def _prepare_input(self, images: jnp.ndarray) -> jnp.ndarray:
    config = self.config
    if images.ndim != 4 or images.shape[-1] != config.in_chans:
      raise ValueError(
          f"Expected images of shape [batch, height, width, {config.in_chans}] (NHWC), got "
          f"{tuple(images.shape)}. Convert NCHW arrays with x.transpose(0, 2, 3, 1).")
    return pad_bottom_right(images, config.patch_size)

  def _downsample(self, layer: nnx.Module, x: jnp.ndarray) -> jnp.ndarray:
    return layer.downsample(pad_bottom_right(x, 2))  # odd stage maps padded to even
