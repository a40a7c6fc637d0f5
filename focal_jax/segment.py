"""Full-resolution class maps from a Segmenter, as mmsegmentation's EncoderDecoder infers.

`whole`: the image in one pass; the stride-4 logits are resized bilinearly
(align_corners=False) to the image size. `slide`: overlapping crops (`crop`, `stride`; the
last row and column of crops are moved back inside the image), each crop's logits resized
to the crop, summed into place and divided by how many crops cover each pixel. Each
scale in `scales` resizes the image by that ratio first (rounded as mmcv rounds) and its
logits back to the output size; `flip` adds the horizontally flipped image's prediction,
flipped back. As in mmsegmentation, every pass is turned into a softmax and the softmaxes
are averaged (one pass: the same as the argmax of its logits). Resizing is static-matrix
bilinear (`models.resize`): no gather or scatter.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from focal_jax.models.resize import resize_bilinear
from focal_jax.models.segmenter import Segmenter

MODES = ("whole", "slide")


@nnx.jit
def _decode(model: Segmenter, images: jnp.ndarray) -> jnp.ndarray:
  return model(images)


_resize = jax.jit(resize_bilinear, static_argnums=1)


def crop_boxes(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
               ) -> list[tuple[int, int, int, int]]:
  """(top, left, bottom, right) of mmsegmentation's sliding-window crops."""
  (crop_h, crop_w), (stride_h, stride_w) = crop, stride
  rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
  cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
  boxes = []
  for r in range(rows):
    for c in range(cols):
      bottom, right = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
      boxes.append((max(bottom - crop_h, 0), max(right - crop_w, 0), bottom, right))
  return boxes


def _whole(model: Segmenter, images: jnp.ndarray) -> jnp.ndarray:
  """Logits [B, H, W, K] at the size of `images`."""
  return _resize(_decode(model, images), tuple(images.shape[1:3]))


def _slide(model: Segmenter, images: jnp.ndarray, crop: tuple[int, int],
           stride: tuple[int, int]) -> jnp.ndarray:
  _, height, width, _ = images.shape
  boxes = crop_boxes(height, width, crop, stride)
  count = np.zeros((height, width), np.float32)
  total = None
  for top, left, bottom, right in boxes:
    logits = _whole(model, images[:, top:bottom, left:right])  # [B, h, w, K]
    placed = jnp.pad(logits, ((0, 0), (top, height - bottom), (left, width - right), (0, 0)))
    total = placed if total is None else total + placed
    count[top:bottom, left:right] += 1
  return total / jnp.asarray(count)[None, :, :, None]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check(mode: str, images: jnp.ndarray, scales: Sequence[float]) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}.")
  if images.ndim != 4:
    raise ValueError(f"Expected images [batch, height, width, channels], got {tuple(images.shape)}.")
  if not scales or any(s <= 0 for s in scales):
    raise ValueError(f"scales={tuple(scales)}: expected positive resize ratios, e.g. (1.0,).")


def predict_probabilities(model: Segmenter, images: jnp.ndarray, mode: str = "whole",
                          crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341,
                          scales: Sequence[float] = (1.0,), flip: bool = False,
                          output_size: Sequence[int] | None = None) -> jnp.ndarray:
  """Class probabilities [B, H, W, K]: the mean softmax over scales and flips (see `segment`)."""
  _check(mode, images, scales)
  model = nnx.view(model, deterministic=True, use_running_average=True)
  images = jnp.asarray(images, jnp.float32)
  _, height, width, _ = images.shape
  out_size = (height, width) if output_size is None else _pair(output_size)
  total, passes = None, 0
  for scale in scales:
    size = (int(height * scale + 0.5), int(width * scale + 0.5))  # mmcv's rescale rounding
    scaled = images if size == (height, width) else _resize(images, size)
    for flipped in ((False, True) if flip else (False,)):
      view = scaled[:, :, ::-1] if flipped else scaled
      logits = (_whole(model, view) if mode == "whole" else
                _slide(model, view, _pair(crop), _pair(stride)))
      if flipped:
        logits = logits[:, :, ::-1]
      if tuple(logits.shape[1:3]) != out_size:
        logits = _resize(logits, out_size)
      p = jax.nn.softmax(logits, axis=-1)
      total, passes = (p if total is None else total + p), passes + 1
  return total / passes


def segment(model: Segmenter, images: jnp.ndarray, mode: str = "whole",
            crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341,
            scales: Sequence[float] = (1.0,), flip: bool = False,
            output_size: Sequence[int] | None = None) -> jnp.ndarray:
  """Class indices [B, H, W] (int32) for normalised NHWC images [B, H, W, C].

  `mode` "whole" or "slide" (`crop`, `stride`: one int or (height, width)); `scales`: resize
  ratios of the images; `flip`: add the flipped images' predictions. `output_size`
  (default the image size) is where logits are resized before the softmax, as
  mmsegmentation rescales them to the original image when its test pipeline resized it.
  The model runs with dropout off and BatchNorm's running statistics, whatever its mode.
  """
  probabilities = predict_probabilities(model, images, mode, crop, stride, scales, flip,
                                        output_size)
  return jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
