"""Segmentation transforms of mmsegmentation's ADE20K 512x512 recipe (SPEC 12), in TensorFlow.

Training (mmseg `_base_/datasets/ade20k.py`, in its order):
  decode -> Resize(scale (2048, 512) x ratio ~ U(0.5, 2.0), keep ratio; bilinear image,
  nearest label) -> RandomCrop(512, cat_max_ratio 0.75) -> RandomFlip(0.5) ->
  PhotoMetricDistortion -> Normalize(mean, std on 0-255 RGB) -> Pad(512, image 0, label 255).
Evaluation: resize the image to the test scale (2048, 512) keeping the ratio (bilinear),
normalise; the label stays at the original size.

Labels are as the dataset stores them: 0..C-1 and 255 = ignore (ADE20K's reduce_zero_label
is done by its builder). Images stay float32 holding integers 0..255 until normalised, as
mmseg's uint8 images do (OpenCV rounds after a resize; `astype(uint8)` truncates after the
photometric ops). Every random draw comes from a stateless seed, so an example's
augmentation is a pure function of (record, seed). Against OpenCV 5.1 (cv2.resize,
cv2.cvtColor on uint8): bilinear resizes within 1 grey level (87% of values exact), nearest
label resizes identical, RGB->HSV within 1 (99% exact), HSV->RGB within 1.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from focal_jax.data.augment import decode

MMSEG_MEAN = (123.675, 116.28, 103.53)  # RGB, on 0-255
MMSEG_STD = (58.395, 57.12, 57.375)
IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class SegAugmentConfig:
  """Knobs of the segmentation transforms; defaults are mmseg's ADE20K 512x512 recipe."""

  crop_size: int = 512
  # (long, short) side limits of the resize; None = (4 * crop_size, crop_size), i.e.
  # (2048, 512) for crops of 512. Also the test scale.
  scale: tuple[int, int] | None = None
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75  # >= 1 disables the check
  crop_tries: int = 10
  hflip: float = 0.5
  photometric: bool = True
  brightness_delta: float = 32.0
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18
  mean: tuple[float, float, float] = MMSEG_MEAN
  std: tuple[float, float, float] = MMSEG_STD

  @property
  def resize_scale(self) -> tuple[int, int]:
    return tuple(self.scale) if self.scale else (4 * self.crop_size, self.crop_size)


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed: tf.Tensor, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed, low, high, dtype=tf.float64)


def _coin(seed: tf.Tensor) -> tf.Tensor:
  """numpy `random.randint(2)`: True with probability 1/2."""
  return _uniform(seed) < 0.5


# ----------------------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------------------


def rescale_size(height: tf.Tensor, width: tf.Tensor, long_side: tf.Tensor,
                 short_side: tf.Tensor) -> tf.Tensor:
  """mmcv `imrescale` to (long, short): int32 [2] = (h, w) scaled by
  min(long / max(h, w), short / min(h, w)), each side int(x * factor + 0.5)."""
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  long_side = tf.cast(long_side, tf.float64)
  short_side = tf.cast(short_side, tf.float64)
  factor = tf.minimum(long_side / tf.maximum(h, w), short_side / tf.minimum(h, w))
  return tf.cast(tf.floor(tf.stack([h, w]) * factor + 0.5), tf.int32)


def resize_image(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """OpenCV INTER_LINEAR (half-pixel centres, no antialiasing) -> float32 integers 0..255."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=False)
  return tf.round(tf.clip_by_value(resized, 0.0, 255.0))


def resize_label(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """OpenCV INTER_NEAREST on [H, W]: source index floor(dst * src / dst_size)."""
  resized = tf.raw_ops.ResizeNearestNeighbor(
      images=label[None, :, :, None], size=size, align_corners=False, half_pixel_centers=False)
  return resized[0, :, :, 0]


def random_rescale(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                   config: SegAugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """mmseg `Resize(img_scale, ratio_range, keep_ratio=True)`: scale = int(scale * ratio)."""
  ratio = _uniform(seed, *config.ratio_range)
  long_side, short_side = (tf.floor(float(s) * ratio) for s in config.resize_scale)
  shape = tf.shape(image)
  size = rescale_size(shape[0], shape[1], long_side, short_side)
  return resize_image(image, size), resize_label(label, size)


def crop_offsets(seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor, crop_size: int,
                 count: int) -> tf.Tensor:
  """int32 [count, 2]: (top, left) ~ randint(0, margin + 1) per side, margin = max(side - crop, 0)."""
  margins = tf.maximum(tf.stack([height, width]) - crop_size, 0)  # [2]
  uniform = tf.random.stateless_uniform([count, 2], seed, dtype=tf.float64)
  return tf.cast(tf.floor(uniform * tf.cast(margins + 1, tf.float64)), tf.int32)


def category_ratio_ok(label_crop: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
  """mmseg's test: more than one non-ignored class, and the largest below cat_max_ratio."""
  counts = tf.math.bincount(tf.reshape(tf.cast(label_crop, tf.int32), [-1]), minlength=256,
                            maxlength=256)
  counts = tf.cast(tf.tensor_scatter_nd_update(counts, [[IGNORE_LABEL]], [0]), tf.float64)
  classes = tf.math.count_nonzero(counts)
  total = tf.reduce_sum(counts)
  return (classes > 1) & (tf.reduce_max(counts) < cat_max_ratio * total)


def random_crop(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                config: SegAugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """mmseg `RandomCrop(crop_size, cat_max_ratio)`: the first of up to `crop_tries` windows
  whose largest class covers less than cat_max_ratio of the labelled pixels (and that holds
  at least two classes); if none does, one more window drawn after them."""
  shape = tf.shape(image)
  crop = config.crop_size
  tries = config.crop_tries if config.cat_max_ratio < 1.0 else 0
  offsets = crop_offsets(seed, shape[0], shape[1], crop, tries + 1)  # [tries + 1, 2]
  crop_h = tf.minimum(shape[0], crop)
  crop_w = tf.minimum(shape[1], crop)

  def _label_crop(i):
    return tf.slice(label, [offsets[i, 0], offsets[i, 1]], [crop_h, crop_w])

  def _keep_looking(i, found):
    return (i < tries) & tf.logical_not(found)

  def _try(i, found):
    ok = category_ratio_ok(_label_crop(i), config.cat_max_ratio)
    return tf.where(ok, i, i + 1), ok

  chosen, _ = tf.while_loop(_keep_looking, _try, (tf.constant(0), tf.constant(False)))
  top, left = offsets[chosen, 0], offsets[chosen, 1]
  return (tf.slice(image, [top, left, 0], [crop_h, crop_w, 3]),
          tf.slice(label, [top, left], [crop_h, crop_w]))


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor,
                prob: float) -> tuple[tf.Tensor, tf.Tensor]:
  flip = tf.random.stateless_uniform([], seed) < prob
  return (tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image),
          tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label))


# ----------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion, OpenCV's 8-bit HSV).
# ----------------------------------------------------------------------------------------


def _convert(values: tf.Tensor, alpha=1.0, beta=0.0) -> tf.Tensor:
  """mmseg's `convert`: clip(x * alpha + beta, 0, 255).astype(uint8) (truncates)."""
  return tf.floor(tf.clip_by_value(values * tf.cast(alpha, tf.float32)
                                   + tf.cast(beta, tf.float32), 0.0, 255.0))


def rgb_to_hsv_uint8(image: tf.Tensor) -> tf.Tensor:
  """OpenCV RGB2HSV on 8-bit images: H in [0, 180) (degrees / 2), S and V in [0, 255]."""
  r, g, b = tf.unstack(image, axis=-1)
  v = tf.reduce_max(image, axis=-1)
  diff = v - tf.reduce_min(image, axis=-1)
  s = tf.where(v > 0, tf.floor(255.0 * diff / tf.maximum(v, 1.0) + 0.5), 0.0)
  numerator = tf.where(v == r, g - b, tf.where(v == g, b - r + 2.0 * diff, r - g + 4.0 * diff))
  h = tf.where(diff > 0, tf.floor(30.0 * numerator / tf.maximum(diff, 1.0) + 0.5), 0.0)
  h = tf.where(h < 0, h + 180.0, h)
  return tf.stack([h, s, v], axis=-1)


def hsv_uint8_to_rgb(hsv: tf.Tensor) -> tf.Tensor:
  """OpenCV HSV2RGB on 8-bit images: float conversion, rounded to integers 0..255."""
  h, s, v = tf.unstack(hsv, axis=-1)
  unit = tf.stack([tf.math.floormod(h, 180.0) / 180.0, s / 255.0, v / 255.0], axis=-1)
  return tf.round(tf.clip_by_value(tf.image.hsv_to_rgb(unit) * 255.0, 0.0, 255.0))


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor,
                           config: SegAugmentConfig) -> tf.Tensor:
  """mmseg PhotoMetricDistortion on integer-valued float RGB [H, W, 3].

  brightness (p 0.5, + U(-32, 32)); contrast (p 0.5, x U(0.5, 1.5)) either second
  (mode 1) or last (mode 0, p 0.5); saturation (p 0.5, S x U(0.5, 1.5)); hue (p 0.5,
  H + randint(-18, 18) mod 180). Each step clips to 0..255 and truncates.
  """
  (b_on, b_val, mode, c_on, c_val, s_on, s_val, h_on, h_val) = _split(seed, 9)
  delta = config.brightness_delta
  image = tf.where(_coin(b_on), _convert(image, beta=_uniform(b_val, -delta, delta)), image)
  contrast_first = _coin(mode)
  contrast_on = _coin(c_on)
  alpha = _uniform(c_val, *config.contrast_range)

  def _contrast(img, when):
    return tf.where(when & contrast_on, _convert(img, alpha=alpha), img)

  image = _contrast(image, contrast_first)

  def _saturate(img):
    hsv = rgb_to_hsv_uint8(img)
    saturation = _convert(hsv[..., 1], alpha=_uniform(s_val, *config.saturation_range))
    return hsv_uint8_to_rgb(tf.stack([hsv[..., 0], saturation, hsv[..., 2]], axis=-1))

  def _shift_hue(img):
    hsv = rgb_to_hsv_uint8(img)
    shift = tf.random.stateless_uniform([], h_val, -config.hue_delta, config.hue_delta,
                                        dtype=tf.int32)  # numpy randint: high exclusive
    hue = tf.math.floormod(hsv[..., 0] + tf.cast(shift, tf.float32), 180.0)
    return hsv_uint8_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))

  image = tf.cond(_coin(s_on), lambda: _saturate(image), lambda: image)
  image = tf.cond(_coin(h_on), lambda: _shift_hue(image), lambda: image)
  return _contrast(image, tf.logical_not(contrast_first))


# ----------------------------------------------------------------------------------------
# Full transforms.
# ----------------------------------------------------------------------------------------


def normalize(image: tf.Tensor, config: SegAugmentConfig) -> tf.Tensor:
  """(x - mean) / std on 0-255 RGB, float32."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(config.mean, tf.float32)) / tf.constant(config.std, tf.float32)


def decode_label(label_bytes: tf.Tensor) -> tf.Tensor:
  """An 8-bit single-channel PNG -> int32 [H, W]."""
  return tf.cast(tf.io.decode_png(label_bytes, channels=1)[..., 0], tf.int32)


def train_transform(image_bytes: tf.Tensor, label_bytes: tf.Tensor, seed: tf.Tensor,
                    config: SegAugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded image and label -> (float32 [S, S, 3] normalised, int32 [S, S], 255 = pad)."""
  resize_seed, crop_seed, flip_seed, photo_seed = _split(seed, 4)
  image = decode(image_bytes)  # uint8 [H, W, 3]
  label = decode_label(label_bytes)  # int32 [H, W]
  tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(label),
                            message="image and label sizes differ")
  image, label = random_rescale(image, label, resize_seed, config)
  image, label = random_crop(image, label, crop_seed, config)  # [<=S, <=S]
  if config.hflip > 0:
    image, label = random_flip(image, label, flip_seed, config.hflip)
  if config.photometric:
    image = photometric_distortion(image, photo_seed, config)
  image = normalize(image, config)
  size = config.crop_size
  shape = tf.shape(label)
  padding = [[0, size - shape[0]], [0, size - shape[1]]]
  image = tf.pad(image, padding + [[0, 0]])  # mmseg pads after Normalize: 0 in normalised units
  label = tf.pad(label, padding, constant_values=IGNORE_LABEL)
  return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label, [size, size])


def eval_transform(image_bytes: tf.Tensor, label_bytes: tf.Tensor,
                   config: SegAugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """(float32 [h, w, 3] at the test scale, normalised; int32 [H, W] at the original size)."""
  image = decode(image_bytes)
  label = decode_label(label_bytes)
  shape = tf.shape(image)
  long_side, short_side = config.resize_scale
  size = rescale_size(shape[0], shape[1], long_side, short_side)
  return normalize(resize_image(image, size), config), label
