"""`focal_digits`: a small real-image dataset that ships with scikit-learn, served by TFDS.

The 1,797 handwritten digits of scikit-learn's `load_digits` (UCI "Optical Recognition of
Handwritten Digits", 8x8 pixels, 17 grey levels, 10 classes) are drawn as dark ink on white
paper, bicubically upsampled to 32x32 and stored as RGB PNGs. Nothing is downloaded, and
`download_and_prepare` takes a few seconds, so a tiny Focal Transformer can train and
evaluate on it anywhere, on CPU, in minutes.

Splits (deterministic, stratified, no RNG): within each class, every 5th sample in
scikit-learn's order (the 1st, 6th, 11th, ...) is `test`, the rest `train`: 364 test and
1,433 train images, 35-37 test images per class.

Builder configs: `focal_digits` (= `focal_digits/all`, the ten digits), and two halves for
transfer experiments, `focal_digits/0to4` and `focal_digits/5to9` (five classes each, the
labels 0-4 standing for the digits of the name; the same images and splits).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_EVERY = 5


def digit_images(image_size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """All digits as (uint8 [N, S, S, 3] dark ink on white, int64 [N] labels)."""
  import tensorflow as tf  # noqa: PLC0415 (TF only needed when building)
  from sklearn.datasets import load_digits  # noqa: PLC0415

  digits = load_digits()
  ink = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)  # [N, 8, 8, 1]
  ink = tf.image.resize(ink, (image_size, image_size), method="bicubic").numpy()
  paper = np.clip(np.round(255.0 - ink), 0, 255).astype(np.uint8)
  return np.repeat(paper, 3, axis=-1), digits.target.astype(np.int64)


def test_mask(labels: np.ndarray) -> np.ndarray:
  """bool [N]: True for every TEST_EVERY-th occurrence of each class, starting with the first."""
  rank_in_class = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank_in_class[members] = np.arange(len(members))
  return rank_in_class % TEST_EVERY == 0


class DigitsConfig(tfds.core.BuilderConfig):
  """Which digits a configuration holds; label i is the digit `digits[i]`."""

  def __init__(self, *, digits: tuple[int, ...], **kwargs):
    super().__init__(**kwargs)
    self.digits = tuple(digits)


class FocalDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits as a 32x32 RGB TFDS dataset (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, 32x32 RGB PNG, every 5th of each class is test."}
  BUILDER_CONFIGS = [
      DigitsConfig(name="all", description="The ten digits.", digits=tuple(range(NUM_CLASSES))),
      DigitsConfig(name="0to4", description="Digits 0-4 as labels 0-4.", digits=(0, 1, 2, 3, 4)),
      DigitsConfig(name="5to9", description="Digits 5-9 as labels 0-4.", digits=(5, 6, 7, 8, 9)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in self.builder_config.digits]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    images, labels = digit_images()
    is_test = test_mask(labels)
    digits = np.asarray(self.builder_config.digits)
    keep = np.isin(labels, digits)
    images, labels, is_test = images[keep], np.searchsorted(digits, labels[keep]), is_test[keep]
    return {
        "train": self._generate_examples(images[~is_test], labels[~is_test], "train"),
        "test": self._generate_examples(images[is_test], labels[is_test], "test"),
    }

  def _generate_examples(self, images, labels, split):
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield f"{split}_{index:04d}", {"image": image, "label": int(label)}
