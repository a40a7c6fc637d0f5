"""`focal_digit_scenes`: a small semantic-segmentation dataset made from scikit-learn's digits.

Each scene is a 64x64 RGB canvas of tinted paper with 2-4 handwritten digits (the 8x8
scikit-learn digits of `focal_digits`, bicubically enlarged to 16-32 px) in random dark
inks, placed at random without overlapping. Every pixel is labelled: the digit's class 0-9
where its ink is (ink above half intensity), class 10 ("background") elsewhere, so all 11
classes count in the mIoU; no pixel is ignored. Nothing is downloaded and preparation
takes seconds, so a segmenter trains and evaluates on it on a CPU.

Splits: `train` (1,200 scenes) places only digits of `focal_digits`' train split, `test`
(300 scenes) only digits of its test split. Generated from fixed seeds: the same scenes on
every machine.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from focal_jax.data import digits

CANVAS = 64
NUM_CLASSES = 11  # digits 0-9 and background
BACKGROUND = 10
CLASS_NAMES = tuple(str(d) for d in range(10)) + ("background",)
SCENES = {"train": 1200, "test": 300}
SEEDS = {"train": 20_001, "test": 20_002}
DIGITS_PER_SCENE = (2, 4)
DIGIT_SIZE = (16, 32)
INK_THRESHOLD = 0.5


def enlarged_inks(inks: np.ndarray) -> dict[int, np.ndarray]:
  """{size: float [N, size, size] in [0, 1]}: every digit bicubically enlarged to each size."""
  import tensorflow as tf  # noqa: PLC0415 (TF only needed when building)

  return {size: np.clip(tf.image.resize(inks[..., None].astype(np.float32), (size, size),
                                        method="bicubic").numpy()[..., 0], 0.0, 1.0)
          for size in range(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1)}


def make_scene(rng: np.random.Generator, inks: dict[int, np.ndarray], labels: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """One scene: (uint8 [C, C, 3] image, uint8 [C, C] class map) from digits (inks by size,
  as `enlarged_inks` makes them, and labels)."""
  paper = rng.uniform(190, 255, size=3)
  image = np.broadcast_to(paper, (CANVAS, CANVAS, 3)).astype(np.float64)
  label = np.full((CANVAS, CANVAS), BACKGROUND, np.uint8)
  taken = np.zeros((CANVAS, CANVAS), bool)
  for _ in range(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1)):
    pick = rng.integers(len(labels))
    size = int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1))
    colour = rng.uniform(0, 110, size=3)
    for _ in range(20):  # a free place, else the digit is left out
      top, left = (int(v) for v in rng.integers(0, CANVAS - size + 1, size=2))
      if not taken[top:top + size, left:left + size].any():
        break
    else:
      continue
    taken[top:top + size, left:left + size] = True
    alpha = inks[size][pick][..., None]  # [s, s, 1]
    window = image[top:top + size, left:left + size]
    image[top:top + size, left:left + size] = window * (1 - alpha) + colour * alpha
    label[top:top + size, left:left + size][alpha[..., 0] > INK_THRESHOLD] = labels[pick]
  return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def scenes(split: str) -> tuple[np.ndarray, np.ndarray]:
  """All scenes of a split: (uint8 [N, C, C, 3], uint8 [N, C, C])."""
  from sklearn.datasets import load_digits  # noqa: PLC0415

  source = load_digits()
  inks = source.images.astype(np.float64) / 16.0  # [N, 8, 8], 1 = full ink
  labels = source.target.astype(np.uint8)
  in_test = digits.test_mask(source.target)
  keep = in_test if split == "test" else ~in_test
  rng = np.random.default_rng(SEEDS[split])
  enlarged = enlarged_inks(inks[keep])
  made = [make_scene(rng, enlarged, labels[keep]) for _ in range(SCENES[split])]
  return np.stack([m[0] for m in made]), np.stack([m[1] for m in made])


class FocalDigitScenes(tfds.core.GeneratorBasedBuilder):
  """Scenes of scikit-learn digits with per-pixel classes (0-9, 10 = background)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "64x64 scenes of 2-4 sklearn digits; 1,200 train, 300 test."}
  NUM_CLASSES = NUM_CLASSES

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3), encoding_format="png"),
            "label": tfds.features.Image(shape=(CANVAS, CANVAS, 1), encoding_format="png"),
        }),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The digits ship inside scikit-learn.
    return {split: self._generate_examples(split) for split in SCENES}

  def _generate_examples(self, split):
    images, labels = scenes(split)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield f"{split}_{index:04d}", {"image": image, "label": label[..., None]}
