"""Image transforms of the official Focal Transformer recipe (SPEC section 4), in TensorFlow.

Training (timm `create_transform(is_training=True)` order):
  decode + random resized crop (scale (0.08, 1), ratio (3/4, 4/3)) -> bicubic resize ->
  horizontal flip -> RandAugment "rand-m9-mstd0.5-inc1" -> [0, 1] -> normalise ->
  random erasing (p 0.25, "pixel" mode, 1 box).
Evaluation: resize the short side to int(size / crop_pct) (bicubic) -> centre crop -> normalise.

For images of 32 px (the official code's CIFAR branch, useful for `focal_digits`), set
train_crop="pad_crop" (RandomCrop(32, padding=4)) and crop_pct=1.0 (no eval resize).

Every random function takes a stateless seed (int [2] tensor), so an image's augmentation is
a pure function of (encoded bytes, seed): pipelines are reproducible and resumable.
Resizes use TF's antialiased Keys-cubic kernel, PIL's bicubic filter; they agree with Pillow
within 2-3 grey levels (most pixels exactly).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from focal_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from focal_jax.data.randaugment import RandAugment


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Knobs of the train and eval transforms; defaults are the official ImageNet recipe."""

  image_size: int = 224
  # Training. train_crop "random_resized" is the ImageNet recipe; "pad_crop" is what the
  # official code does for images of 32 px or less (torchvision RandomCrop(size, padding=4)).
  train_crop: str = "random_resized"
  crop_padding: int = 4
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  hflip: float = 0.5
  randaugment: str | None = "rand-m9-mstd0.5-inc1"  # None or "" disables it
  reprob: float = 0.25
  remode: str = "pixel"  # "pixel" | "rand" | "const"
  recount: int = 1
  # Evaluation: resize short side to int(image_size / crop_pct), centre crop image_size.
  crop_pct: float = 0.875
  # Normalisation on [0, 1] pixels.
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def rand_augment(self) -> RandAugment | None:
    if not self.randaugment:
      return None
    fill = tuple(min(255, round(255 * m)) for m in self.mean)  # timm's img_mean
    return RandAugment.from_string(self.randaugment, fill=fill)


# ----------------------------------------------------------------------------------------
# Decoding and geometry.
# ----------------------------------------------------------------------------------------


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def random_resized_crop_window(
    seed: tf.Tensor, height: tf.Tensor, width: tf.Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> tf.Tensor:
  """timm `RandomResizedCropAndInterpolation.get_params`: int32 [4] = (top, left, h, w).

  Ten attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first that fits
  is placed uniformly; if none fits, a centre crop with the aspect clamped to `ratio`.
  """
  area_seed, ratio_seed, top_seed, left_seed = _split(seed, 4)
  h_img = tf.cast(height, tf.float32)
  w_img = tf.cast(width, tf.float32)
  target_area = h_img * w_img * tf.random.stateless_uniform(
      [attempts], area_seed, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
  # tf.round is round-half-to-even, like Python's round().
  w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)  # [attempts]
  h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h_try, w_try = h[first], w[first]
  # randint(0, n) inclusive, from one uniform per coordinate.
  top = tf.cast(tf.floor(tf.random.stateless_uniform([], top_seed) *
                         tf.cast(height - h_try + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(tf.random.stateless_uniform([], left_seed) *
                          tf.cast(width - w_try + 1, tf.float32)), tf.int32)
  # Fallback: whole image, aspect clamped to [min(ratio), max(ratio)], centred.
  in_ratio = w_img / h_img
  lo, hi = min(ratio), max(ratio)
  w_fb = tf.where(in_ratio > hi, tf.cast(tf.round(h_img * hi), tf.int32), width)
  h_fb = tf.where(in_ratio < lo, tf.cast(tf.round(w_img / lo), tf.int32), height)
  fallback = tf.stack([(height - h_fb) // 2, (width - w_fb) // 2, h_fb, w_fb])
  return tf.where(tf.reduce_any(fits), tf.stack([top, left, h_try, w_try]), fallback)


def decode_shape(image_bytes: tf.Tensor) -> tf.Tensor:
  """int32 [2] = (height, width) of an encoded image; reads only the header for JPEG."""
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
      lambda: tf.shape(decode(image_bytes))[:2])


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any TF-decodable image (JPEG, PNG, GIF, BMP, WebP) -> uint8 [H, W, 3].

  JPEGs use libjpeg-turbo's default (fast) IDCT, 1.5x faster than PIL's accurate one and
  within a grey level or two of it.
  """
  return tf.cond(
      tf.io.is_jpeg(image_bytes),
      lambda: tf.image.decode_jpeg(image_bytes, channels=3),
      lambda: tf.ensure_shape(
          tf.io.decode_image(image_bytes, channels=3, expand_animations=False), [None, None, 3]))


def decode_and_crop(image_bytes: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """Decodes only the crop window (top, left, h, w) of a JPEG; others decode, then slice."""
  def _jpeg():
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def _other():
    return tf.slice(decode(image_bytes), [window[0], window[1], 0], [window[2], window[3], 3])

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image_bytes), _jpeg, _other), [None, None, 3])


def resize_bicubic(image: tf.Tensor, size: tf.Tensor | tuple[int, int]) -> tf.Tensor:
  """PIL-style bicubic resize (antialiased when shrinking) -> float32, integer values 0..255."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
  return tf.round(tf.clip_by_value(resized, 0.0, 255.0))


def resize_short_side(image: tf.Tensor, short_side: int) -> tf.Tensor:
  """torchvision `Resize(int)`: short side -> short_side, long side truncated proportionally."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  long = tf.maximum(h, w)
  new_long = tf.cast(tf.math.floordiv(short_side * long, short), tf.int32)
  size = tf.where(h <= w, tf.stack([short_side, new_long]), tf.stack([new_long, short_side]))
  return resize_bicubic(image, size)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision `CenterCrop`: offsets int(round((H - size) / 2)) (half to even)."""
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  return tf.slice(image, [top, left, 0], [size, size, -1])


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor, size: int, padding: int) -> tf.Tensor:
  """torchvision `RandomCrop(size, padding)`: zero-pad every side, crop size x size uniformly.

  An image that is not size x size is first resized to it (bicubic).
  """
  shape = tf.shape(image)
  image = tf.cond(
      (shape[0] == size) & (shape[1] == size),
      lambda: tf.cast(image, tf.float32),
      lambda: resize_bicubic(image, (size, size)))
  image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  offset = tf.random.stateless_uniform([2], seed, 0, 2 * padding + 1, dtype=tf.int32)
  return tf.slice(image, [offset[0], offset[1], 0], [size, size, 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  flip = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tf.Tensor:
  """[0, 255] -> ([0, 1] - mean) / std, float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ----------------------------------------------------------------------------------------
# Random erasing (timm RandomErasing, applied to the normalised image).
# ----------------------------------------------------------------------------------------


def random_erasing(
    image: tf.Tensor, seed: tf.Tensor, prob: float = 0.25, mode: str = "pixel",
    max_count: int = 1, min_area: float = 0.02, max_area: float = 1.0 / 3.0,
    min_aspect: float = 0.3, attempts: int = 10,
) -> tf.Tensor:
  """With probability `prob`, erases 1..max_count boxes of a normalised [H, W, C] image.

  Each box: up to 10 attempts of (area ~ U(min_area, max_area) * H * W / count, log aspect ~
  U(log min_aspect, -log min_aspect)); the first with h < H and w < W is placed uniformly and
  filled with N(0, 1) per pixel ("pixel"), per channel ("rand") or zeros ("const").
  """
  if mode not in ("pixel", "rand", "const"):
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}.")
  if prob <= 0.0:
    return image
  gate_seed, count_seed, *box_seeds = _split(seed, 2 + max_count)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  area = tf.cast(height * width, tf.float32)
  count = tf.random.stateless_uniform([], count_seed, 1, max_count + 1, dtype=tf.int32)

  def _erase(img):
    for index in range(max_count):
      area_seed, aspect_seed, top_seed, left_seed, fill_seed = _split(box_seeds[index], 5)
      target = tf.random.stateless_uniform([attempts], area_seed, min_area, max_area)
      target = target * area / tf.cast(count, tf.float32)
      aspect = tf.exp(tf.random.stateless_uniform(
          [attempts], aspect_seed, math.log(min_aspect), -math.log(min_aspect)))
      h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)  # [attempts]
      w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
      fits = (h < height) & (w < width)
      first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
      found = tf.reduce_any(fits)
      h = tf.where(found, h[first], 0)
      w = tf.where(found, w[first], 0)
      top = tf.cast(tf.floor(tf.random.stateless_uniform([], top_seed) *
                             tf.cast(height - h + 1, tf.float32)), tf.int32)
      left = tf.cast(tf.floor(tf.random.stateless_uniform([], left_seed) *
                              tf.cast(width - w + 1, tf.float32)), tf.int32)
      channels = tf.shape(img)[-1]
      if mode == "pixel":  # noise drawn for the box only
        fill = tf.random.stateless_normal([h, w, channels], fill_seed)
      elif mode == "rand":
        fill = tf.broadcast_to(tf.random.stateless_normal([1, 1, channels], fill_seed),
                               [h, w, channels])
      else:
        fill = tf.zeros([h, w, channels])
      padding = [[top, height - top - h], [left, width - left - w], [0, 0]]
      box = tf.pad(tf.ones([h, w, 1]), padding)  # [H, W, 1]: 1 inside the box
      box *= tf.cast(index < count, tf.float32)
      # img * 0 + fill and img + 0 are exact, unlike tf.where this is fast on CPU.
      img = img * (1.0 - box) + tf.pad(fill, padding) * box
    return img

  erase = tf.random.stateless_uniform([], gate_seed) < prob
  return tf.cond(erase, lambda: _erase(image), lambda: image)


# ----------------------------------------------------------------------------------------
# Full transforms.
# ----------------------------------------------------------------------------------------


def train_transform(image_bytes: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
  """Encoded image -> float32 [S, S, 3], normalised; the official training augmentation."""
  crop_seed, flip_seed, ra_seed, erase_seed = _split(seed, 4)
  if config.train_crop == "random_resized":
    shape = decode_shape(image_bytes)
    window = random_resized_crop_window(
        crop_seed, shape[0], shape[1], config.crop_scale, config.crop_ratio)
    image = decode_and_crop(image_bytes, window)  # uint8 [h, w, 3]
    image = resize_bicubic(image, (config.image_size, config.image_size))  # [S, S, 3]
  elif config.train_crop == "pad_crop":
    image = pad_and_random_crop(
        decode(image_bytes), crop_seed, config.image_size, config.crop_padding)
  else:
    raise ValueError(f"train_crop must be 'random_resized' or 'pad_crop', "
                     f"got {config.train_crop!r}.")
  if config.hflip > 0:
    image = random_flip(image, flip_seed, config.hflip)
  rand_augment = config.rand_augment()
  if rand_augment is not None:
    image = rand_augment(image, ra_seed)
  image = normalize(image, config.mean, config.std)
  image = random_erasing(image, erase_seed, config.reprob, config.remode, config.recount)
  return tf.ensure_shape(image, [config.image_size, config.image_size, 3])


def eval_resize_size(config: AugmentConfig) -> int:
  """Short side before the centre crop: int(224 / 0.875) = 256 at 224."""
  return int(config.image_size / config.crop_pct)


def eval_transform(image_bytes: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
  """Encoded image -> float32 [S, S, 3]: bicubic short-side resize, centre crop, normalise."""
  image = resize_short_side(decode(image_bytes), eval_resize_size(config))
  image = center_crop(image, config.image_size)
  image = normalize(image, config.mean, config.std)
  return tf.ensure_shape(image, [config.image_size, config.image_size, 3])
