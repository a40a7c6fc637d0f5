"""`ade20k`: the ADE20K scene-parsing benchmark (SceneParsing 2016, 150 classes) as TFDS.

Prepared from the file people have, `ADEChallengeData2016.zip`, in the manual directory
(`--config.manual_dir`, by default `<data_dir>/downloads/manual`):
  ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png
20,210 training and 2,000 validation images. Splits `train` and `validation`.

Features: "image" (the original JPEG bytes, not re-encoded), "label" (8-bit PNG, [H, W, 1])
and "file_name". The label is stored already reduced as mmsegmentation's
`reduce_zero_label` does: the file's 0 ("other") becomes 255 (ignored), classes 1-150
become 0-149. (TFDS's own `scene_parse150` is the 2017 instance-annotation set, 100
categories: another benchmark.)

The zip is untrusted input: a missing or unreadable zip, one without this layout, an image
without its annotation (or the reverse), an annotation whose size differs from its image's,
or one with values above 150 stops the preparation with one error naming the file.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from focal_jax.data.manual import ManualDownloadError

MANUAL_FILE = "ADEChallengeData2016.zip"
ROOT = "ADEChallengeData2016"
NUM_CLASSES = 150
IGNORE_LABEL = 255
SPLITS = {"train": "training", "validation": "validation"}


class Ade20kError(ValueError):
  """The ADE20K zip (or a file in it) is not what the benchmark ships."""


class Ade20kMissingError(ManualDownloadError):
  """ADEChallengeData2016.zip is not in the manual directory."""


def reduce_zero_label(annotation: np.ndarray) -> np.ndarray:
  """uint8: 0 -> 255 (ignored), k -> k - 1 (mmsegmentation's reduce_zero_label)."""
  return np.where(annotation == 0, IGNORE_LABEL, annotation.astype(np.int32) - 1).astype(np.uint8)


def _open_zip(path: str) -> zipfile.ZipFile:
  if not os.path.exists(path):
    raise Ade20kMissingError(
        f"ade20k is not prepared and cannot be built: {MANUAL_FILE} not found at {path}. "
        "Download ADEChallengeData2016.zip (the SceneParsing benchmark, "
        "http://sceneparsing.csail.mit.edu), put it in the manual directory "
        "(--config.manual_dir, by default <data_dir>/downloads/manual) and run again.")
  try:
    archive = zipfile.ZipFile(path)
    damaged = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as error:
    raise Ade20kError(f"{path} is not a readable zip file (truncated or damaged download?): "
                      f"{error}") from error
  if damaged is not None:
    raise Ade20kError(f"{path}: the member {damaged} fails its CRC check (damaged download).")
  return archive


def _pairs(archive: zipfile.ZipFile, path: str, folder: str) -> list[tuple[str, str]]:
  """(image member, annotation member) of one split, sorted; checks that they pair up."""
  names = set(archive.namelist())
  image_dir = f"{ROOT}/images/{folder}/"
  label_dir = f"{ROOT}/annotations/{folder}/"
  images = {n[len(image_dir):-4] for n in names if n.startswith(image_dir) and n.endswith(".jpg")}
  labels = {n[len(label_dir):-4] for n in names if n.startswith(label_dir) and n.endswith(".png")}
  if not images and not labels:
    found = sorted({n.split("/")[0] + "/" for n in names})[:5]
    raise Ade20kError(
        f"{path} does not hold the ADE20K benchmark layout: no {image_dir}*.jpg and no "
        f"{label_dir}*.png (top-level entries found: {', '.join(found) or 'none'}). Expected "
        f"the SceneParsing {MANUAL_FILE} ({ROOT}/images/{{training,validation}}/*.jpg and "
        f"{ROOT}/annotations/{{training,validation}}/*.png).")
  for stem in sorted(images - labels):
    raise Ade20kError(f"{path}: the image {image_dir}{stem}.jpg has no annotation "
                      f"{label_dir}{stem}.png.")
  for stem in sorted(labels - images):
    raise Ade20kError(f"{path}: the annotation {label_dir}{stem}.png has no image "
                      f"{image_dir}{stem}.jpg.")
  return [(f"{image_dir}{stem}.jpg", f"{label_dir}{stem}.png") for stem in sorted(images)]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(payload: bytes) -> tuple[int, int, int, int] | None:
  """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
  if len(payload) < 26 or not payload.startswith(PNG_SIGNATURE) or payload[12:16] != b"IHDR":
    return None
  return (int.from_bytes(payload[16:20], "big"), int.from_bytes(payload[20:24], "big"),
          payload[24], payload[25])


def _read_pair(archive: zipfile.ZipFile, path: str, image_name: str,
               label_name: str) -> tuple[bytes, np.ndarray]:
  """(JPEG bytes, reduced uint8 label [H, W, 1]) after checking both files."""
  import tensorflow as tf  # noqa: PLC0415 (only needed when preparing)

  image_bytes = archive.read(image_name)
  if not tf.io.is_jpeg(image_bytes):
    raise Ade20kError(f"{path}: {image_name} is not a JPEG file.")
  try:
    height, width = (int(v) for v in tf.image.extract_jpeg_shape(image_bytes)[:2])
  except tf.errors.OpError as error:
    raise Ade20kError(f"{path}: {image_name} is not a readable JPEG: {error.message}") from error
  label_bytes = archive.read(label_name)
  header = _png_header(label_bytes)
  if header is None:
    raise Ade20kError(f"{path}: {label_name} is not a PNG file.")
  label_width, label_height, depth, colour_type = header
  if (depth, colour_type) != (8, 0):
    raise Ade20kError(f"{path}: {label_name} has bit depth {depth} and colour type "
                      f"{colour_type}, expected an 8-bit greyscale class map (values 0-150).")
  if (label_height, label_width) != (height, width):
    raise Ade20kError(
        f"{path}: {label_name} is {label_width}x{label_height} (width x height) but its "
        f"image {image_name} is {width}x{height}.")
  try:
    annotation = tf.io.decode_png(label_bytes, channels=1).numpy()[..., 0]  # uint8 [H, W]
  except tf.errors.OpError as error:
    raise Ade20kError(f"{path}: {label_name} is not a readable PNG: {error.message}") from error
  if annotation.max(initial=0) > NUM_CLASSES:
    raise Ade20kError(f"{path}: {label_name} holds the value {int(annotation.max())}, expected "
                      f"class values 0-{NUM_CLASSES} (0 = other).")
  return image_bytes, reduce_zero_label(annotation)[..., None]


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (150 classes) from ADEChallengeData2016.zip (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016.zip; labels reduced (0 -> 255, k -> k - 1)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put {MANUAL_FILE} (http://sceneparsing.csail.mit.edu) in the manual directory.")
  NUM_CLASSES = NUM_CLASSES

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        homepage="http://sceneparsing.csail.mit.edu",
    )

  @staticmethod
  def check_manual_dir(manual_dir: str) -> None:
    """Raises Ade20kMissingError unless the zip is in `manual_dir`."""
    _open_zip(os.path.join(manual_dir, MANUAL_FILE)).close()

  def _split_generators(self, dl_manager):
    path = os.path.join(os.fspath(dl_manager.manual_dir), MANUAL_FILE)
    archive = _open_zip(path)
    pairs = {split: _pairs(archive, path, folder) for split, folder in SPLITS.items()}
    archive.close()
    return {split: self._generate_examples(path, split_pairs)
            for split, split_pairs in pairs.items()}

  def _generate_examples(self, path, pairs):
    with zipfile.ZipFile(path) as archive:
      for image_name, label_name in pairs:
        image_bytes, label = _read_pair(archive, path, image_name, label_name)
        file_name = image_name.rsplit("/", 1)[-1]
        yield file_name, {"image": image_bytes, "label": label, "file_name": file_name}

