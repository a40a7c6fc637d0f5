"""Tests of the segmentation input side: the ade20k builder on a tiny zip in the real layout
(and the broken zips it must name), mmseg's transforms, the pipelines' shapes, ignore
labels, determinism and exact resume, and the focal_digit_scenes demo dataset."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from focal_jax import data
from focal_jax.data import ade20k, digit_scenes, seg_augment, segmentation
from focal_jax.data.seg_augment import IGNORE_LABEL, SegAugmentConfig

SMALL = SegAugmentConfig(crop_size=32)  # resize scale (128, 32)
MEAN = np.array(seg_augment.MMSEG_MEAN, np.float32)
STD = np.array(seg_augment.MMSEG_STD, np.float32)
ROOT = ade20k.ROOT
# (height, width) of the tiny zip's images: 3 training, 2 validation.
TRAIN_SIZES = [(40, 56), (48, 32), (36, 36)]
VAL_SIZES = [(30, 50), (44, 40)]


def _photo(height: int, width: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (1, 1, 3))
  ramp = np.linspace(0, 80, width)[None, :, None]
  return np.clip(base + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)


def _annotation(height: int, width: int, seed: int) -> np.ndarray:
  """uint8 class map: vertical bands of classes 0 ("other") to 150, as the benchmark's PNGs."""
  rng = np.random.default_rng(100 + seed)
  classes = np.concatenate([[0, 150], rng.integers(1, 151, 3)])
  return classes[(np.arange(width) * len(classes)) // width][None, :].repeat(height, 0).astype(
      np.uint8)


def _png(array: np.ndarray) -> bytes:
  return tf.io.encode_png(array[..., None] if array.ndim == 2 else array).numpy()


def _write_zip(path, members: dict[str, bytes]) -> None:
  with zipfile.ZipFile(path, "w") as archive:
    for name, payload in members.items():
      archive.writestr(name, payload)


def _members(train_sizes=TRAIN_SIZES, val_sizes=VAL_SIZES) -> dict[str, bytes]:
  members = {}
  for folder, prefix, sizes in (("training", "train", train_sizes),
                                ("validation", "val", val_sizes)):
    for k, (h, w) in enumerate(sizes):
      stem = f"ADE_{prefix}_{k + 1:08d}"
      seed = k + (0 if prefix == "train" else 50)
      members[f"{ROOT}/images/{folder}/{stem}.jpg"] = tf.io.encode_jpeg(
          _photo(h, w, seed), quality=95).numpy()
      members[f"{ROOT}/annotations/{folder}/{stem}.png"] = _png(_annotation(h, w, seed))
  return members


def _data_dir_with_zip(tmp_path, members: dict[str, bytes] | None = None, payload=None):
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  if payload is not None:
    (manual / ade20k.MANUAL_FILE).write_bytes(payload)
  elif members is not None:
    _write_zip(manual / ade20k.MANUAL_FILE, members)
  return str(tmp_path)


@pytest.fixture(scope="module")
def ade_builder(tmp_path_factory):
  return data.get_builder("ade20k", _data_dir_with_zip(tmp_path_factory.mktemp("ade"), _members()))


# ----------------------------------------------------------------------------------------
# (1) The ade20k builder on a tiny zip in the benchmark's layout, and its errors.
# ----------------------------------------------------------------------------------------


def test_ade20k_builder_reads_the_zip_and_reduces_the_labels(ade_builder):
  splits = ade_builder.info.splits
  assert splits["train"].num_examples == 3 and splits["validation"].num_examples == 2
  assert segmentation.num_classes(ade_builder) == 150
  members = _members()
  examples = {e["file_name"].decode(): e for e in tfds.as_numpy(ade_builder.as_dataset(
      split="validation", decoders={"image": tfds.decode.SkipDecoding()}))}
  for k, (h, w) in enumerate(VAL_SIZES):
    stem = f"ADE_val_{k + 1:08d}"
    example = examples[f"{stem}.jpg"]
    assert example["image"] == members[f"{ROOT}/images/validation/{stem}.jpg"]  # not re-encoded
    raw = _annotation(h, w, k + 50)
    expected = np.where(raw == 0, 255, raw.astype(int) - 1)
    np.testing.assert_array_equal(example["label"][..., 0], expected)
    assert example["label"].shape == (h, w, 1) and {149, 255} <= set(np.unique(expected))


def _prepare_error(tmp_path, **zip_kwargs) -> str:
  data_dir = _data_dir_with_zip(tmp_path, **zip_kwargs)
  with pytest.raises(ade20k.Ade20kError) as error:
    data.get_builder("ade20k", data_dir)
  return str(error.value)


def test_ade20k_missing_zip_is_one_clear_error(tmp_path):
  data_dir = _data_dir_with_zip(tmp_path)
  with pytest.raises(data.ManualDownloadError, match="ADEChallengeData2016.zip not found at") as e:
    data.get_builder("ade20k", data_dir)
  assert str(tmp_path / "downloads" / "manual") in str(e.value)


def test_ade20k_truncated_or_foreign_zips_are_named(tmp_path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, payload in _members().items():
      archive.writestr(name, payload)
  whole = buffer.getvalue()
  message = _prepare_error(tmp_path / "truncated", payload=whole[:len(whole) // 2])
  assert "ADEChallengeData2016.zip is not a readable zip file" in message
  # Another dataset's zip under the benchmark's name (the full ADE20K release's layout).
  foreign = {"ADE20K_2021_17_01/images/ADE/training/a.jpg": b"x"}
  message = _prepare_error(tmp_path / "foreign", members=foreign)
  assert "does not hold the ADE20K benchmark layout" in message
  assert "ADE20K_2021_17_01/" in message


def test_ade20k_image_without_annotation_is_named(tmp_path):
  members = _members()
  del members[f"{ROOT}/annotations/training/ADE_train_00000002.png"]
  message = _prepare_error(tmp_path, members=members)
  assert f"{ROOT}/images/training/ADE_train_00000002.jpg has no annotation" in message


def test_ade20k_annotation_of_another_size_is_named(tmp_path):
  members = _members()
  members[f"{ROOT}/annotations/validation/ADE_val_00000001.png"] = _png(_annotation(31, 50, 0))
  message = _prepare_error(tmp_path, members=members)
  assert "ADE_val_00000001.png is 50x31" in message and "ADE_val_00000001.jpg is 50x30" in message


def test_ade20k_annotation_with_foreign_values_is_named(tmp_path):
  members = _members()
  members[f"{ROOT}/annotations/training/ADE_train_00000003.png"] = _png(
      np.full((36, 36), 151, np.uint8))
  message = _prepare_error(tmp_path / "values", members=members)
  assert "ADE_train_00000003.png holds the value 151" in message
  # A colour picture where the class map belongs (e.g. the full ADE20K's RGB-coded masks).
  members[f"{ROOT}/annotations/training/ADE_train_00000003.png"] = _png(_photo(36, 36, 0))
  message = _prepare_error(tmp_path / "colour", members=members)
  assert "ADE_train_00000003.png has bit depth 8 and colour type 2" in message


# ----------------------------------------------------------------------------------------
# (2) mmseg's transforms.
# ----------------------------------------------------------------------------------------


def test_rescale_size_is_mmcv_imrescale():
  # factor = min(2048 / long, 512 / short); each side int(x * factor + 0.5).
  for (h, w), expected in {(375, 500): (512, 683), (512, 2048): (512, 2048),
                           (100, 1000): (205, 2048), (683, 512): (683, 512)}.items():
    size = seg_augment.rescale_size(h, w, 2048, 512).numpy()
    np.testing.assert_array_equal(size, expected)


def test_label_resize_is_nearest_and_image_resize_rounds():
  label = tf.constant(np.arange(12, dtype=np.int32).reshape(3, 4))
  up = seg_augment.resize_label(label, [6, 8]).numpy()
  np.testing.assert_array_equal(up, np.repeat(np.repeat(label.numpy(), 2, 0), 2, 1))
  down = seg_augment.resize_label(tf.constant(np.arange(36).reshape(6, 6)), [3, 3]).numpy()
  np.testing.assert_array_equal(down, np.arange(36).reshape(6, 6)[::2, ::2])  # floor(dst * 2)
  image = seg_augment.resize_image(tf.constant(_photo(10, 14, 0)), [7, 9]).numpy()
  assert image.shape == (7, 9, 3) and (image == np.round(image)).all()


def _expected_window(label: np.ndarray, seed: tf.Tensor, crop: int) -> tuple[int, int]:
  """mmseg's rule in NumPy: the first of 10 windows passing cat_max_ratio 0.75, else the 11th."""
  offsets = seg_augment.crop_offsets(seed, *label.shape, crop, 11).numpy()
  for top, left in offsets[:10]:
    counts = np.bincount(label[top:top + crop, left:left + crop].ravel(), minlength=256)
    counts[IGNORE_LABEL] = 0
    if (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75:
      return int(top), int(left)
  return tuple(int(v) for v in offsets[10])


def test_crop_takes_the_first_window_without_a_dominant_class():
  rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  image = tf.constant(np.stack([rows, cols, rows * 0], -1), tf.float32)  # pixel = its position
  config = SegAugmentConfig(crop_size=32)
  # Columns 40-63 are class 2, the rest class 1: a window passes only when left > 16.
  two_classes = np.where(cols >= 40, 2, 1).astype(np.int32)
  # Class 1 and ignore only: no window passes (ignored pixels do not count), the 11th is used.
  one_class = np.where(cols < 20, 1, IGNORE_LABEL).astype(np.int32)
  passed = 0
  for label in (two_classes, one_class):
    for value in range(6):
      seed = tf.constant([value, 1], tf.int64)
      crop_image, crop_label = seg_augment.random_crop(image, tf.constant(label), seed, config)
      top, left = _expected_window(label, seed, 32)
      assert crop_image.shape == (32, 32, 3)
      assert (crop_image[0, 0, 0].numpy(), crop_image[0, 0, 1].numpy()) == (top, left)
      np.testing.assert_array_equal(crop_label, label[top:top + 32, left:left + 32])
      counts = np.bincount(crop_label.numpy().ravel(), minlength=3)[:3]
      passed += counts.max() < 0.75 * counts.sum()
  assert passed == 6  # every two-class map found a window; no one-class map did
  # A map smaller than the crop is returned whole.
  _, small = seg_augment.random_crop(tf.zeros([20, 40, 3]), tf.zeros([20, 40], tf.int32),
                                     tf.constant([0, 1], tf.int64), config)
  assert small.shape == (20, 32)


def test_cv2_hsv_conventions_and_photometric_range():
  colours = tf.constant([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0]],
                        tf.float32)
  hsv = seg_augment.rgb_to_hsv_uint8(colours).numpy()
  np.testing.assert_array_equal(hsv, [[0, 255, 255], [60, 255, 255], [120, 255, 255],
                                      [0, 0, 128], [0, 0, 0]])
  image = tf.constant(_photo(16, 16, 3), tf.float32)
  back = seg_augment.hsv_uint8_to_rgb(seg_augment.rgb_to_hsv_uint8(image)).numpy()
  # 8-bit HSV (hue in steps of 2 degrees) loses up to ~255 / 60 per channel, as OpenCV does.
  assert np.abs(back - image.numpy()).max() <= 5
  outputs = [seg_augment.photometric_distortion(image, tf.constant([s, 0], tf.int64),
                                                SegAugmentConfig()).numpy() for s in range(8)]
  for out in outputs:
    assert out.min() >= 0 and out.max() <= 255 and (out == np.floor(out)).all()
  assert sum(not np.array_equal(out, image.numpy()) for out in outputs) >= 6


def _encoded(h, w, seed):
  return (tf.constant(tf.io.encode_jpeg(_photo(h, w, seed)).numpy()),
          tf.constant(_png(_annotation(h, w, seed))))


def test_train_transform_pads_with_ignore_and_is_a_function_of_the_seed():
  image_bytes, label_bytes = _encoded(20, 24, 1)  # small: the resized map is often < 32
  config = SegAugmentConfig(crop_size=32, photometric=False, hflip=0.0)
  padded = 0
  for seed in range(6):
    image, label = seg_augment.train_transform(image_bytes, label_bytes,
                                               tf.constant([seed, 0], tf.int64), config)
    image, label = image.numpy(), label.numpy()
    assert image.shape == (32, 32, 3) and label.shape == (32, 32) and label.dtype == np.int32
    pad = (label == IGNORE_LABEL) & (image == 0).all(-1)
    padded += pad.sum()
    raw_ink = set(np.unique(_annotation(20, 24, 1)))
    assert set(np.unique(label)) <= raw_ink | {IGNORE_LABEL}
    inside = ~pad
    pixels = image[inside] * STD + MEAN  # back on 0-255: integers
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  assert padded > 0
  again, _ = seg_augment.train_transform(image_bytes, label_bytes,
                                         tf.constant([5, 0], tf.int64), config)
  np.testing.assert_array_equal(again.numpy(), image)


# ----------------------------------------------------------------------------------------
# (3) Pipelines: shapes, ignore labels, determinism, resume, eval per image and shards.
# ----------------------------------------------------------------------------------------


def test_train_pipeline_is_deterministic_and_resumes_exactly(ade_builder):
  kwargs = dict(split="train", global_batch_size=2, config=SMALL, seed=3, process_index=0,
                process_count=1, shuffle_buffer=8, with_positions=True)
  run = data.create_segmentation_train_dataset(ade_builder, **kwargs).as_numpy_iterator()
  batches = [next(run) for _ in range(4)]  # 1 step per epoch (3 records, batch 2)
  for batch in batches:
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == np.int32
    labels = np.unique(batch["label"])
    assert ((labels >= 0) & (labels < 150) | (labels == IGNORE_LABEL)).all()
  np.testing.assert_array_equal([b["epoch"][0] for b in batches], [0, 1, 2, 3])
  resumed = data.create_segmentation_train_dataset(ade_builder, start_step=2, **kwargs)
  for expected, got in zip(batches[2:], resumed.as_numpy_iterator(), strict=False):
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])
  other = data.create_segmentation_train_dataset(ade_builder, **{**kwargs, "seed": 4})
  assert not np.array_equal(next(other.as_numpy_iterator())["image"], batches[0]["image"])


def test_eval_yields_each_image_once_at_the_test_scale_with_its_original_label(ade_builder):
  elements = []
  for index in range(2):
    ds, count = data.create_segmentation_eval_dataset(
        ade_builder, split="validation", config=SMALL, process_index=index, process_count=2)
    elements.append(list(ds.as_numpy_iterator()))
    assert count == len(elements[-1]) == 1
  elements = [e for shard in elements for e in shard]
  assert all(e["mask"].tolist() == [True] for e in elements)
  shapes = sorted((e["label"].shape[1:], e["image"].shape[1:3]) for e in elements)
  # Test scale (128, 32): factor min(128 / long, 32 / short).
  assert shapes == [((30, 50), (32, 53)), ((44, 40), (35, 32))]
  for e in elements:
    assert e["label"].dtype == np.int32 and IGNORE_LABEL in e["label"]
  # Three processes for two images: the third gets a masked filler.
  ds, count = data.create_segmentation_eval_dataset(
      ade_builder, split="validation", config=SMALL, process_index=2, process_count=3)
  (filler,) = list(ds.as_numpy_iterator())
  assert count == 1 and filler["mask"].tolist() == [False]
  assert (filler["label"] == IGNORE_LABEL).all() and filler["image"].shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------------------
# (4) The demo dataset.
# ----------------------------------------------------------------------------------------


def test_digit_scenes_are_deterministic_and_labelled_by_ink():
  rng = np.random.default_rng(0)
  bars = np.zeros((2, 8, 8))
  bars[:, 2:6, 3:5] = 1.0  # a bar of full ink
  inks = digit_scenes.enlarged_inks(bars)
  image, label = digit_scenes.make_scene(rng, inks, np.array([3, 7], np.uint8))
  again = digit_scenes.make_scene(np.random.default_rng(0), inks, np.array([3, 7], np.uint8))
  np.testing.assert_array_equal(image, again[0])
  assert image.shape == (64, 64, 3) and label.shape == (64, 64)
  assert set(np.unique(label)) <= {3, 7, digit_scenes.BACKGROUND} and (label != 10).any()
  ink, paper = image[label != 10].mean(), image[label == 10].mean()
  assert ink < paper - 60


def test_focal_digit_scenes_builds_and_trains(tmp_path):
  builder = data.get_builder("focal_digit_scenes", str(tmp_path))
  assert builder.info.splits["train"].num_examples == 1200
  assert builder.info.splits["test"].num_examples == 300
  assert segmentation.num_classes(builder) == 11
  labels = np.stack([e["label"][..., 0] for e in tfds.as_numpy(builder.as_dataset(split="test"))])
  counts = np.bincount(labels.ravel(), minlength=11)
  assert counts.shape == (11,) and counts.min() > 0 and counts.argmax() == 10
  batch = next(data.create_segmentation_input(
      "focal_digit_scenes", batch_size=4, train=True, data_dir=str(tmp_path), shard=(0, 1)))
  assert batch["image"].shape == (4, 64, 64, 3) and batch["label"].shape == (4, 64, 64)
  element = next(data.create_segmentation_input(
      "focal_digit_scenes", batch_size=4, train=False, data_dir=str(tmp_path), shard=(0, 1)))
  assert element["image"].shape == (1, 64, 64, 3) and element["label"].shape == (1, 64, 64)
