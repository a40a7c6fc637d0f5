"""RandAugment with timm semantics ("rand-m9-mstd0.5-inc1"), written in TensorFlow ops.

Semantics follow timm's `rand_augment_transform` as used by the official Focal Transformer
recipe: `num_layers` ops are drawn uniformly *with replacement* from the op list, each is
applied with probability 0.5, the magnitude is drawn from N(magnitude, magnitude_std) and
clipped to [0, magnitude_max]; signed ops flip their sign with probability 0.5; `inc1`
selects the op variants whose strength increases with the magnitude.

Images are float32 [H, W, 3] holding integer values in [0, 255] (what a uint8 PIL image
holds); every op returns integer values again, so the ops chain like PIL's. Colour ops copy
PIL's integer arithmetic (luma weights, truncating blends, equalize's LUT) and agree with
Pillow 13 bit for bit. Geometric ops use PIL's affine conventions (pixel-area coordinates,
rotation about the centre, edge clamping, fill colour = the dataset mean) but interpolate
bilinearly (TensorFlow has no bicubic warp): they agree with Pillow's bilinear within one
grey level; timm asks for bicubic, which differs from bilinear by a few levels on average.

All randomness is stateless: `RandAugment(image, seed)` is a pure function of its inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import tensorflow as tf

# timm's level denominator: magnitudes live on a 0..10 scale.
_LEVEL_DENOM = 10.0

# Fill colour of geometric ops: round(255 * ImageNet mean), as timm's create_transform sets.
DEFAULT_FILL = (124, 116, 104)

RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


# ----------------------------------------------------------------------------------------
# Pixel ops. `image`: float32 [H, W, 3], integer values in [0, 255].
# ----------------------------------------------------------------------------------------


def _to_uint8_values(x: tf.Tensor) -> tf.Tensor:
  """Truncates to integers in [0, 255], like PIL's (UINT8) casts after clipping."""
  return tf.floor(tf.clip_by_value(x, 0.0, 255.0))


def _select(condition: tf.Tensor, if_true: tf.Tensor, if_false: tf.Tensor) -> tf.Tensor:
  """Elementwise select by arithmetic: exact for integer-valued floats, and several times
  faster than tf.where on CPU inside tf.data."""
  return if_false + tf.cast(condition, tf.float32) * (if_true - if_false)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `Image.blend(degenerate, image, factor)`: extrapolates for factor > 1, truncates."""
  return _to_uint8_values(degenerate + factor * (image - degenerate))


def luma(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> "L" conversion (ITU-R 601-2, fixed point, rounded). [H, W, 3] -> [H, W]."""
  rgb = tf.cast(image, tf.int32)
  weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
  return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.float32)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255.0 - image


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, stretches [min, max] to [0, 255] (PIL `ImageOps.autocontrast`, cutoff 0).

  Computed like PIL, int(v * scale + offset) in float64, which can land one level below the
  exact quotient (e.g. the maximum may map to 254).
  """
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=[0, 1])  # [3]
  hi = tf.reduce_max(x, axis=[0, 1])
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  stretched = tf.cast(tf.clip_by_value(tf.floor(x * scale + offset), 0.0, 255.0), tf.float32)
  return _select(hi > lo, stretched, image)


def _equalize_lut(hist: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.equalize`'s lookup table for one channel's histogram: int32 [256]."""
  num_levels = tf.math.count_nonzero(hist)
  brightest = 255 - tf.argmax(tf.cast(tf.reverse(hist, [0]) > 0, tf.int32), output_type=tf.int32)
  step = (tf.reduce_sum(hist) - hist[brightest]) // 255
  safe_step = tf.maximum(step, 1)
  lut = tf.minimum((safe_step // 2 + tf.cumsum(hist, exclusive=True)) // safe_step, 255)
  return tf.where((num_levels > 1) & (step > 0), lut, tf.range(256))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation (PIL `ImageOps.equalize`)."""
  values = tf.cast(image, tf.int32)
  channels = []
  for c in range(3):
    hist = tf.math.bincount(values[..., c], minlength=256, maxlength=256, dtype=tf.int32)
    channels.append(tf.gather(_equalize_lut(hist), values[..., c]))
  return tf.cast(tf.stack(channels, axis=-1), tf.float32)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Keeps the `bits` most significant bits of every value (0 bits gives black)."""
  bits = tf.cast(bits, tf.int32)
  mask = tf.bitwise.bitwise_and(tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1), 255)
  kept = tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask)
  return tf.cond(bits >= 8, lambda: image, lambda: tf.cast(kept, tf.float32))


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """Inverts every value >= threshold."""
  return _select(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor, threshold: float = 128.0) -> tf.Tensor:
  """Adds `addition` (saturating) to every value below threshold."""
  added = tf.minimum(image + tf.cast(addition, tf.float32), 255.0)
  return _select(image < threshold, added, image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Color`: blend with the greyscale image."""
  grey = tf.repeat(luma(image)[..., None], 3, axis=-1)
  return _blend(grey, image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Contrast`: blend with a flat image of the rounded mean luma."""
  mean = tf.floor(tf.reduce_mean(luma(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Brightness`: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Sharpness`: blend with PIL's SMOOTH filter (borders unfiltered)."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])  # [3, 3, C, 1]
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0) + 0.5)  # [H-2, W-2, 3]
  inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])  # 1 inside, 0 on the border
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + (1.0 - inner) * image
  return _blend(degenerate, image, factor)


def affine(image: tf.Tensor, matrix: Sequence[tf.Tensor], fill: Sequence[float]) -> tf.Tensor:
  """PIL `Image.transform(AFFINE, (a, b, c, d, e, f))`: output (x, y) samples input
  (a x + b y + c, d x + e y + f) in pixel-area coordinates (pixel centres at +0.5).

  Like PIL, an output pixel whose sample point falls outside the input gets `fill`; inside,
  it is interpolated bilinearly with the edge pixels extended (PIL clamps at the border).
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # TF's warp indexes pixel centres at integers: shift PIL's offsets by half a pixel.
  c_index = 0.5 * a + 0.5 * b + c - 0.5
  f_index = 0.5 * d + 0.5 * e + f - 0.5
  transform = tf.stack([a, b, c_index, d, e, f_index, 0.0, 0.0])[None]  # [1, 8]
  shape = tf.shape(image)
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=shape[:2], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="NEAREST")[0]  # [H, W, 3]
  # Inside test in index coordinates: -0.5 <= x_in < W - 0.5 (PIL: 0 <= x_area < W).
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  ys = tf.range(height)[:, None]  # [H, 1]
  xs = tf.range(width)[None, :]  # [1, W]
  x_in = a * xs + b * ys + c_index  # [H, W]
  y_in = d * xs + e * ys + f_index
  inside = (x_in >= -0.5) & (x_in < width - 0.5) & (y_in >= -0.5) & (y_in < height - 0.5)
  inside = tf.cast(inside, tf.float32)[..., None]  # [H, W, 1]
  out = warped * inside + tf.constant(fill, tf.float32) * (1.0 - inside)
  # PIL truncates; the 1e-3 absorbs float32 error of values that are integers in exact math.
  return tf.floor(tf.clip_by_value(out + 1e-3, 0.0, 255.0))


def rotate(image: tf.Tensor, degrees: tf.Tensor, fill: Sequence[float]) -> tf.Tensor:
  """Counter-clockwise rotation about the image centre (PIL `Image.rotate`)."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  a, b = tf.cos(angle), tf.sin(angle)
  d, e = -tf.sin(angle), tf.cos(angle)
  cx, cy = width / 2.0, height / 2.0
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return affine(image, (a, b, c, d, e, f), fill)


def shear_x(image, factor, fill):
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(image, factor, fill):
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x_rel(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[1], tf.float32)
  return affine(image, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill)


def translate_y_rel(image, fraction, fill):
  pixels = fraction * tf.cast(tf.shape(image)[0], tf.float32)
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill)


# ----------------------------------------------------------------------------------------
# Magnitude -> op argument (timm's level functions). `level` is the clipped magnitude,
# `sign` is +-1 (timm's `_randomly_negate`).
# ----------------------------------------------------------------------------------------


def _fraction(level):
  return level / _LEVEL_DENOM


def _enhance_factor(level, sign, increasing):
  if increasing:  # 1.0 is "no change"; strength grows away from 1 in either direction.
    return tf.maximum(0.1, 1.0 + sign * _fraction(level) * 0.9)
  return _fraction(level) * 1.8 + 0.1


Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]  # (image, level, sign) -> image


def _make_op(name: str, aug: RandAugment) -> Op:
  """Returns fn(image, level, sign) -> image for a timm op name."""
  fill = aug.fill
  increasing = name.endswith("Increasing")
  base = name.removesuffix("Increasing")
  if base == "AutoContrast":
    return lambda im, level, sign: auto_contrast(im)
  if base == "Equalize":
    return lambda im, level, sign: equalize(im)
  if base == "Invert":
    return lambda im, level, sign: invert(im)
  if base == "Rotate":
    return lambda im, level, sign: rotate(im, sign * _fraction(level) * 30.0, fill)
  if base == "Posterize":
    def _posterize(im, level, sign):
      bits = tf.floor(_fraction(level) * 4.0)
      return posterize(im, 4.0 - bits if increasing else bits)
    return _posterize
  if base == "Solarize":
    def _solarize(im, level, sign):
      threshold = tf.floor(_fraction(level) * 256.0)
      return solarize(im, 256.0 - threshold if increasing else threshold)
    return _solarize
  if base == "SolarizeAdd":
    return lambda im, level, sign: solarize_add(im, tf.floor(_fraction(level) * 110.0))
  enhance = {"Color": color, "Contrast": contrast, "Brightness": brightness,
             "Sharpness": sharpness}
  if base in enhance:
    fn = enhance[base]
    return lambda im, level, sign: fn(im, _enhance_factor(level, sign, increasing))
  geometric = {"ShearX": (shear_x, 0.3), "ShearY": (shear_y, 0.3),
               "TranslateXRel": (translate_x_rel, aug.translate_pct),
               "TranslateYRel": (translate_y_rel, aug.translate_pct)}
  if base in geometric:
    fn, scale = geometric[base]
    return lambda im, level, sign: fn(im, sign * _fraction(level) * scale, fill)
  known = sorted(set(RAND_OPS + RAND_INCREASING_OPS))
  raise ValueError(f"Unknown RandAugment op {name!r}; known: {known}.")


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm RandAugment. Call as `aug(image, seed)`; image float32 [H, W, 3] in [0, 255]."""

  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.5  # math.inf samples uniformly in [0, magnitude]
  magnitude_max: float = _LEVEL_DENOM
  increasing: bool = True
  prob: float = 0.5  # per-op application probability (timm's rand_augment_ops)
  translate_pct: float = 0.45
  fill: tuple[int, int, int] = DEFAULT_FILL

  @classmethod
  def from_string(cls, spec: str, **overrides) -> RandAugment:
    """Parses timm's config string, e.g. "rand-m9-mstd0.5-inc1" ("n", "mmax" also known)."""
    parts = spec.split("-")
    if parts[0] != "rand":
      raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}.")
    kwargs = dict(magnitude=_LEVEL_DENOM, magnitude_std=0.0, increasing=False)
    for part in parts[1:]:
      match = re.fullmatch(r"([a-z]+)(\d.*)", part)
      if match is None:
        raise ValueError(f"Cannot parse section {part!r} of RandAugment spec {spec!r}.")
      key, value = match.groups()
      if key == "m":
        kwargs["magnitude"] = float(value)
      elif key == "n":
        kwargs["num_layers"] = int(value)
      elif key == "mstd":
        kwargs["magnitude_std"] = math.inf if float(value) > 100 else float(value)
      elif key == "mmax":
        kwargs["magnitude_max"] = float(value)
      elif key == "inc":
        kwargs["increasing"] = bool(int(value))
      else:
        raise ValueError(f"Unsupported RandAugment section {part!r} in {spec!r} "
                         "(supported: m, n, mstd, mmax, inc).")
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def op_names(self) -> tuple[str, ...]:
    return RAND_INCREASING_OPS if self.increasing else RAND_OPS

  def _sample_level(self, seed: tf.Tensor) -> tf.Tensor:
    if self.magnitude_std == math.inf:
      level = tf.random.stateless_uniform([], seed, 0.0, self.magnitude)
    elif self.magnitude_std > 0:
      level = self.magnitude + self.magnitude_std * tf.random.stateless_normal([], seed)
    else:
      level = tf.constant(self.magnitude, tf.float32)
    return tf.clip_by_value(level, 0.0, self.magnitude_max)

  def _layer(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """One layer: a uniformly drawn op, applied with probability `prob`."""
    ops = [_make_op(name, self) for name in self.op_names]
    op_seed, apply_seed, level_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    op_index = tf.random.stateless_uniform([], op_seed, 0, len(ops), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], apply_seed) <= self.prob
    level = self._sample_level(level_seed)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) > 0.5, -1.0, 1.0)
    branches = [functools.partial(op, image, level, sign) for op in ops]
    out = tf.cond(apply, lambda: tf.switch_case(op_index, branches), lambda: image)
    return tf.ensure_shape(out, image.shape)

  def __call__(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, self.num_layers)):
      image = self._layer(image, layer_seed)
    return image
