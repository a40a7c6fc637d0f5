"""Tests of focal_jax.data: TFDS preparation, pipelines, augmentation, mixup, focal_digits.

Everything runs on data the tests make (tiny ImageNet tars in the real layout, TFDS mock
data, scikit-learn's digits); nothing is downloaded.
"""

from __future__ import annotations

import io
import math
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from focal_jax import data
from focal_jax.data import augment, mixup, randaugment
from focal_jax.data.augment import AugmentConfig

MEAN = np.array(data.IMAGENET_MEAN, np.float32)
STD = np.array(data.IMAGENET_STD, np.float32)
SMALL = AugmentConfig(image_size=32)


def _seed(value: int) -> tf.Tensor:
  return tf.constant([value, 17], tf.int64)


def _jpeg(image: np.ndarray) -> bytes:
  return tf.io.encode_jpeg(image, quality=95).numpy()


def _png(image: np.ndarray) -> bytes:
  return tf.io.encode_png(image).numpy()


def _add_bytes(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  archive.addfile(info, io.BytesIO(payload))


def _imagenet_labels() -> tuple[list[str], list[str]]:
  """TFDS's own label list (sorted wnids) and the labels of the validation images."""
  root = tfds.core.tfds_path("datasets/imagenet2012")
  wnids = (root / "labels.txt").read_text().split()
  val_labels = (root / "validation_labels.txt").read_text().split()
  return wnids, val_labels


# Solid colours, so the normalised output of an image is known exactly.
VAL_COLOURS = [(200, 30, 90), (10, 220, 140), (128, 128, 128), (255, 0, 60)]
TRAIN_CLASSES = 3  # first wnids of TFDS's list
TRAIN_PER_CLASS = 2


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> str:
  """A data_dir whose downloads/manual holds tiny ImageNet tars in the real layout."""
  data_dir = tmp_path_factory.mktemp("tfds")
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  wnids, _ = _imagenet_labels()
  rng = np.random.default_rng(0)
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for wnid in wnids[:TRAIN_CLASSES]:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as per_class:
        for k in range(TRAIN_PER_CLASS):
          shape = (int(rng.integers(40, 70)), int(rng.integers(40, 70)), 3)
          image = rng.integers(0, 256, shape, dtype=np.uint8)
          _add_bytes(per_class, f"{wnid}_{k + 1}.JPEG", _jpeg(image))
      _add_bytes(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for index, colour in enumerate(VAL_COLOURS):
      image = np.broadcast_to(np.array(colour, np.uint8), (48, 64, 3)).copy()
      _add_bytes(val, f"ILSVRC2012_val_{index + 1:08d}.JPEG", _jpeg(image))
  return str(data_dir)


# ----------------------------------------------------------------------------------------
# (1) the real imagenet2012 builder on a tiny tar pair, (2) the missing-tars error.
# ----------------------------------------------------------------------------------------


def test_imagenet2012_prepared_from_manual_tars_and_read(imagenet_dir):
  builder = data.get_builder("imagenet2012", imagenet_dir)
  assert builder.info.splits["train"].num_examples == TRAIN_CLASSES * TRAIN_PER_CLASS
  assert builder.info.splits["validation"].num_examples == len(VAL_COLOURS)
  assert data.num_classes(builder) == 1000
  wnids, val_labels = _imagenet_labels()

  batch = next(data.train_iterator(builder, split="train", global_batch_size=4,
                                   config=SMALL, seed=0, process_count=1, process_index=0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert set(batch["label"]) <= set(range(TRAIN_CLASSES))  # the first wnids are labels 0..2
  assert np.isfinite(batch["image"]).all()

  eval_ds, num_batches = data.create_eval_dataset(
      builder, split="validation", global_batch_size=4, config=SMALL,
      process_count=1, process_index=0)
  (batch,) = list(eval_ds.as_numpy_iterator())
  assert num_batches == 1 and batch["mask"].all()
  # label -> colour of the validation images (their labels are the first lines of TFDS's list)
  expected = {wnids.index(w): c for w, c in zip(val_labels, VAL_COLOURS, strict=False)}
  assert sorted(batch["label"]) == sorted(expected)
  for image, label in zip(batch["image"], batch["label"], strict=True):
    colour = np.array(expected[int(label)], np.float32)
    # A solid colour stays solid through resize and crop; JPEG moves it by a level or two.
    np.testing.assert_allclose(image, np.broadcast_to((colour / 255 - MEAN) / STD, image.shape),
                               atol=3 / 255 / STD.min())


def test_imagenet2012_missing_tars_raise_one_clear_error(tmp_path):
  with pytest.raises(data.ManualDownloadError) as error:
    data.get_builder("imagenet2012", str(tmp_path))
  message = str(error.value)
  manual_dir = str(tmp_path / "downloads" / "manual")
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert manual_dir in message
  # With only the val tar present the error still names the missing train tar.
  (tmp_path / "downloads" / "manual").mkdir(parents=True)
  (tmp_path / "downloads" / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"")
  with pytest.raises(data.ManualDownloadError, match="ILSVRC2012_img_train.tar not found"):
    data.get_builder("imagenet2012", str(tmp_path))


# ----------------------------------------------------------------------------------------
# (3) pipelines under tfds.testing.mock_data: loop, determinism, exact resume, sharding.
# ----------------------------------------------------------------------------------------


def test_train_pipeline_on_mock_data_is_deterministic_and_resumes_exactly():
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder("imagenet2012")
    kwargs = dict(split="train", global_batch_size=8, config=SMALL, seed=3,
                  process_index=0, process_count=1, shuffle_buffer=16)
    assert data.train_steps_per_epoch(builder, "train", 8, 1) == 3
    run = data.train_iterator(builder, **kwargs)
    batches = [next(run) for _ in range(7)]  # crosses two epoch boundaries
    for batch in batches:
      assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
      assert batch["label"].dtype == np.int32
      assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
    # An epoch is a permutation of the split; the next epoch is a different permutation.
    epoch0 = np.concatenate([b["label"] for b in batches[:3]])
    epoch1 = np.concatenate([b["label"] for b in batches[3:6]])
    assert sorted(epoch0) == sorted(epoch1)
    pairs = zip(batches[:3], batches[3:6], strict=True)
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in pairs)
    # A new pipeline resumed at step 4 gives batches 4, 5, 6 bit for bit.
    resumed = data.train_iterator(builder, start_step=4, **kwargs)
    for expected in batches[4:7]:
      got = next(resumed)
      np.testing.assert_array_equal(got["image"], expected["image"])
      np.testing.assert_array_equal(got["label"], expected["label"])
    other_seed = data.train_iterator(builder, **{**kwargs, "seed": 4})
    assert not np.array_equal(next(other_seed)["image"], batches[0]["image"])


def test_eval_pipeline_on_mock_data_pads_with_mask():
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    builder = tfds.builder("imagenet2012")
    ds, num_batches = data.create_eval_dataset(builder, split="validation", global_batch_size=4,
                                               config=SMALL, process_index=0, process_count=1)
    batches = list(ds.as_numpy_iterator())
  assert num_batches == len(batches) == 3
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 10 and not masks[10:].any()
  assert (batches[-1]["image"][~batches[-1]["mask"]] == 0).all()


def test_global_batch_must_split_over_processes():
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    data.local_batch_size(8, process_count=3)


# ----------------------------------------------------------------------------------------
# (4) augmentation.
# ----------------------------------------------------------------------------------------


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (1, height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
  return np.clip(tf.image.resize(coarse, (height, width)).numpy()[0], 0, 255).astype(np.uint8)


@pytest.mark.parametrize("encode", [_jpeg, _png])
def test_train_transform_shape_determinism_and_seed_dependence(encode):
  image_bytes = tf.constant(encode(_photo(50, 70)))
  transform = tf.function(lambda seed: augment.train_transform(image_bytes, seed, SMALL))
  first = transform(_seed(1)).numpy()
  assert first.shape == (32, 32, 3) and first.dtype == np.float32
  np.testing.assert_array_equal(first, transform(_seed(1)).numpy())
  assert not np.array_equal(first, transform(_seed(2)).numpy())


def test_pad_crop_is_a_shifted_window_of_the_zero_padded_image():
  image = _photo(32, 32)
  config = AugmentConfig(image_size=32, train_crop="pad_crop", hflip=0.0, randaugment=None,
                         reprob=0.0)
  out = augment.train_transform(tf.constant(_png(image)), _seed(0), config).numpy()
  raw = (out * STD + MEAN) * 255  # back to pixels
  padded = np.pad(image.astype(np.float32), [(4, 4), (4, 4), (0, 0)])
  matches = [(top, left) for top in range(9) for left in range(9)
             if np.allclose(padded[top:top + 32, left:left + 32], raw, atol=1e-3)]
  assert len(matches) == 1


def test_random_resized_crop_window_follows_timm_bounds():
  window_fn = tf.function(lambda seed, h, w: augment.random_resized_crop_window(seed, h, w))
  height, width = 300, 400
  for value in range(200):
    top, left, h, w = window_fn(_seed(value), height, width).numpy()
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert 0.08 * height * width * 0.9 <= h * w <= height * width
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # A 1x100 strip fits no attempt: the fallback is a centred crop with the aspect clamped.
  np.testing.assert_array_equal(window_fn(_seed(0), 1, 100).numpy(), [0, 49, 1, 1])


def test_eval_transform_is_short_side_resize_then_exact_centre_crop():
  image = _photo(300, 400)
  out = augment.eval_transform(tf.constant(_png(image)), AugmentConfig()).numpy()
  assert out.shape == (224, 224, 3)
  assert augment.eval_resize_size(AugmentConfig()) == 256
  # Short side 300 -> 256, long side int(256 * 400 / 300) = 341; crop offsets
  # round(16.0) = 16 and round(58.5) = 58 (half to even, like torchvision).
  resized = tf.image.resize(image.astype(np.float32), (256, 341), "bicubic", antialias=True)
  resized = np.round(np.clip(resized.numpy(), 0, 255))
  expected = (resized[16:240, 58:282] / 255 - MEAN) / STD
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_rand_augment_spec_and_output_range():
  aug = AugmentConfig().rand_augment()
  assert (aug.num_layers, aug.magnitude, aug.magnitude_std, aug.increasing) == (2, 9.0, 0.5, True)
  assert aug.op_names == randaugment.RAND_INCREASING_OPS and len(aug.op_names) == 15
  assert aug.fill == (124, 116, 104)
  with pytest.raises(ValueError, match="Unsupported RandAugment section"):
    randaugment.RandAugment.from_string("rand-m9-w0")
  image = tf.constant(_photo(32, 32).astype(np.float32))
  always = randaugment.RandAugment.from_string("rand-m9-mstd0.5-inc1", prob=1.0)
  run = tf.function(lambda seed: always(image, seed))
  changed = 0
  for value in range(40):
    out = run(_seed(value)).numpy()
    assert out.min() >= 0 and out.max() <= 255 and np.array_equal(out, np.round(out))
    changed += not np.array_equal(out, image.numpy())
  assert changed >= 35
  np.testing.assert_array_equal(run(_seed(5)).numpy(), run(_seed(5)).numpy())


def test_geometric_ops_follow_pil_conventions():
  image = tf.constant(_photo(16, 16).astype(np.float32))
  fill = (1.0, 2.0, 3.0)
  identity = randaugment.affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), fill)
  np.testing.assert_array_equal(identity.numpy(), image.numpy())
  # PIL rotates counter-clockwise about the centre: 90 degrees is np.rot90 on a square.
  np.testing.assert_array_equal(randaugment.rotate(image, 90.0, fill).numpy(),
                                np.rot90(image.numpy()))
  # TranslateX by +4 px samples x + 4: content moves left, the fill colour enters right.
  moved = randaugment.translate_x_rel(image, 0.25, fill).numpy()
  np.testing.assert_array_equal(moved[:, :12], image.numpy()[:, 4:])
  np.testing.assert_array_equal(moved[:, 12:], np.broadcast_to(fill, (16, 4, 3)))


def test_colour_ops_follow_pil_semantics():
  levels = np.arange(256, dtype=np.float32)
  values = tf.constant(np.broadcast_to(levels[:, None, None], (256, 2, 3)))
  np.testing.assert_array_equal(randaugment.invert(values).numpy(), 255 - values.numpy())
  solarized = randaugment.solarize(values, 128.0).numpy()[:, 0, 0]
  np.testing.assert_array_equal(solarized, np.where(np.arange(256) < 128, np.arange(256),
                                                    255 - np.arange(256)))
  posterized = randaugment.posterize(values, 2.0).numpy()[:, 0, 0]
  np.testing.assert_array_equal(posterized, np.arange(256) & 0b11000000)
  added = randaugment.solarize_add(values, 100.0).numpy()[:, 0, 0]
  np.testing.assert_array_equal(added, np.where(np.arange(256) < 128,
                                                np.minimum(np.arange(256) + 100, 255),
                                                np.arange(256)))
  # Equalize: a flat histogram is left alone; two equal levels go to 0 and 255.
  np.testing.assert_array_equal(randaugment.equalize(values).numpy(), values.numpy())
  two_levels = tf.constant(np.broadcast_to(np.repeat([10.0, 20.0], 510)[:, None, None],
                                           (1020, 1, 3)), tf.float32)
  assert set(np.unique(randaugment.equalize(two_levels).numpy())) == {0.0, 255.0}
  # AutoContrast stretches each channel's [min, max] to [0, 255].
  low_contrast = tf.constant(50.0 + np.floor(_photo(16, 16).astype(np.float32) / 5))
  stretched = randaugment.auto_contrast(low_contrast).numpy()
  np.testing.assert_array_equal(stretched.min(axis=(0, 1)), [0, 0, 0])
  assert set(stretched.max(axis=(0, 1))) <= {254.0, 255.0}  # PIL's float64 may lose a level
  # Enhancers: factor 1 is the identity; Brightness 0.5 halves (truncating).
  photo = tf.constant(_photo(16, 16).astype(np.float32))
  for op in (randaugment.color, randaugment.contrast, randaugment.sharpness):
    np.testing.assert_array_equal(op(photo, 1.0).numpy(), photo.numpy())
  np.testing.assert_array_equal(randaugment.brightness(photo, 0.5).numpy(),
                                np.floor(photo.numpy() * 0.5))


def test_ops_match_pillow_which_timm_runs():
  pytest.importorskip("PIL", reason="Pillow (timm's backend) is the reference here")
  from PIL import Image, ImageEnhance, ImageOps  # noqa: PLC0415

  array = _photo(24, 40, seed=3)
  array = np.clip(array.astype(int) + np.random.default_rng(1).integers(-9, 9, array.shape),
                  0, 255).astype(np.uint8)
  pil, x = Image.fromarray(array), tf.constant(array.astype(np.float32))
  exact = {
      "equalize": (ImageOps.equalize(pil), randaugment.equalize(x)),
      "autocontrast": (ImageOps.autocontrast(pil), randaugment.auto_contrast(x)),
      "posterize": (ImageOps.posterize(pil, 3), randaugment.posterize(x, 3.0)),
      "solarize": (ImageOps.solarize(pil, 90), randaugment.solarize(x, 90.0)),
  }
  for factor in (0.3, 1.6):
    exact[f"color{factor}"] = (ImageEnhance.Color(pil).enhance(factor),
                               randaugment.color(x, factor))
    exact[f"contrast{factor}"] = (ImageEnhance.Contrast(pil).enhance(factor),
                                  randaugment.contrast(x, factor))
    exact[f"sharpness{factor}"] = (ImageEnhance.Sharpness(pil).enhance(factor),
                                   randaugment.sharpness(x, factor))
  for name, (expected, got) in exact.items():
    np.testing.assert_array_equal(got.numpy(), np.asarray(expected), err_msg=name)
  fill = (124, 116, 104)
  expected = pil.rotate(17.0, resample=Image.BILINEAR, fillcolor=fill)
  diff = np.abs(randaugment.rotate(x, 17.0, fill).numpy() - np.asarray(expected))
  assert diff.max() <= 1 and diff.mean() < 0.05  # bilinear, incl. the fill boundary
  expected = pil.transform(pil.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0),
                           resample=Image.BILINEAR, fillcolor=fill)
  diff = np.abs(randaugment.shear_x(x, 0.2, fill).numpy() - np.asarray(expected))
  assert diff.max() <= 1 and diff.mean() < 0.05
  resized = np.asarray(pil.resize((17, 11), Image.BICUBIC))
  diff = np.abs(augment.resize_bicubic(array, (11, 17)).numpy() - resized)
  assert diff.max() <= 3 and diff.mean() < 0.5


def test_random_erasing_replaces_one_box_with_noise():
  image = tf.fill([64, 64, 3], 7.0)  # far from N(0, 1) noise, so the box is visible
  erase = tf.function(lambda seed, p: augment.random_erasing(image, seed, prob=p))
  out = erase(_seed(0), 1.0).numpy()
  changed = (out != 7.0).any(axis=-1)
  rows, cols = np.nonzero(changed)
  box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  assert box.all()  # the changed pixels form one filled rectangle
  assert 0.02 * 0.9 <= box.size / 64**2 <= 1 / 3 * 1.1
  noise = out[changed]
  assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2
  np.testing.assert_array_equal(erase(_seed(0), 0.0).numpy(), image.numpy())
  erased = sum((erase(_seed(v), 0.25).numpy() != 7.0).any() for v in range(200))
  assert 30 <= erased <= 70  # p = 0.25 of 200


# ----------------------------------------------------------------------------------------
# (4) mixup / cutmix.
# ----------------------------------------------------------------------------------------


def _batch(size: int = 8, hw: int = 16, classes: int = 10):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(size, hw, hw, 3)).astype(np.float32)
  labels = rng.permutation(classes)[:size].astype(np.int32)
  return images, labels


def test_label_smoothing_values_without_mixing():
  images, labels = _batch()
  config = mixup.MixupConfig(prob=0.0)
  mixed, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, 10, config)
  np.testing.assert_array_equal(np.asarray(mixed), images)
  expected = np.full((8, 10), 0.01, np.float32)
  expected[np.arange(8), labels] = 0.91  # 1 - 0.1 + 0.1 / 10
  np.testing.assert_allclose(np.asarray(targets), expected, rtol=1e-6)


def test_mixup_blends_with_the_flipped_batch_and_targets_sum_to_one():
  images, labels = _batch()
  config = mixup.MixupConfig(cutmix_alpha=0.0)
  params = mixup.sample_mix_params(jax.random.key(1), 16, 16, config)
  lam = float(params.lam)
  assert not bool(params.use_cutmix) and 0.0 < lam < 1.0
  mixed, targets = mixup.apply_mix(images, labels, params, 10, 0.1)
  np.testing.assert_allclose(np.asarray(mixed), lam * images + (1 - lam) * images[::-1],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
  smooth = np.asarray(mixup.smooth_one_hot(labels, 10, 0.1))
  np.testing.assert_allclose(np.asarray(targets), lam * smooth + (1 - lam) * smooth[::-1],
                             rtol=1e-6)


def test_cutmix_pastes_one_box_and_lam_is_the_kept_area():
  images, labels = _batch()
  config = mixup.MixupConfig(mixup_alpha=0.0)
  for seed in range(5):
    key = jax.random.key(seed)
    params = mixup.sample_mix_params(key, 16, 16, config)
    mixed, targets = mixup.mixup_cutmix(key, images, labels, 10, config)
    mixed = np.asarray(mixed)
    top, bottom, left, right = np.asarray(params.box)
    inside = np.zeros((16, 16), bool)
    inside[top:bottom, left:right] = True
    np.testing.assert_array_equal(mixed[:, inside], images[::-1][:, inside])
    np.testing.assert_array_equal(mixed[:, ~inside], images[:, ~inside])
    assert math.isclose(float(params.lam), 1 - inside.sum() / 256, rel_tol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


def test_mix_switch_and_lam_statistics_and_determinism():
  config = mixup.MixupConfig()
  sample = jax.jit(jax.vmap(lambda k: mixup.sample_mix_params(k, 32, 32, config)))
  params = sample(jax.random.split(jax.random.key(0), 2000))
  assert 0.45 < float(params.use_cutmix.mean()) < 0.55  # switch_prob 0.5
  lam = np.asarray(params.lam)
  assert lam.min() >= 0 and lam.max() <= 1
  assert 0.45 < lam[~np.asarray(params.use_cutmix)].mean() < 0.55  # Beta(0.8, 0.8): mean 0.5
  images, labels = _batch()
  a = mixup.mixup_cutmix(jax.random.key(3), images, labels, 10)
  b = mixup.mixup_cutmix(jax.random.key(3), images, labels, 10)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  with pytest.raises(ValueError, match="even batch size"):
    mixup.mixup_cutmix(jax.random.key(0), images[:7], labels[:7], 10)


# ----------------------------------------------------------------------------------------
# (5) the embedded dataset.
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_builder(tmp_path_factory):
  return data.get_builder("focal_digits", str(tmp_path_factory.mktemp("digits")))


def test_focal_digits_builds_with_expected_counts(digits_builder):
  splits = digits_builder.info.splits
  assert splits["train"].num_examples == 1433 and splits["test"].num_examples == 364
  assert data.num_classes(digits_builder) == 10
  examples = list(tfds.as_numpy(digits_builder.as_dataset(split="test")))
  assert np.bincount([e["label"] for e in examples], minlength=10).min() >= 35
  image = examples[0]["image"]
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert image.min() < 60 and image.max() == 255  # dark ink on white paper


def test_focal_digits_eval_shards_cover_the_split_once(digits_builder):
  labels, batches = [], []
  for index in range(2):
    ds, num_batches = data.create_eval_dataset(
        digits_builder, split="test", global_batch_size=100, config=SMALL,
        process_index=index, process_count=2)
    shard = list(ds.as_numpy_iterator())
    batches.append(num_batches)
    assert len(shard) == num_batches and shard[0]["image"].shape == (50, 32, 32, 3)
    labels.append(np.concatenate([b["label"][b["mask"]] for b in shard]))
  assert batches == [4, 4]  # 182 examples each -> 4 batches of 50, padded
  assert sum(len(x) for x in labels) == 364
  expected = [e["label"] for e in tfds.as_numpy(digits_builder.as_dataset(split="test"))]
  assert sorted(np.concatenate(labels)) == sorted(expected)


# ----------------------------------------------------------------------------------------
# (6) undecodable images: counted and skipped, not fatal; resuming stays exact.
# ----------------------------------------------------------------------------------------

CORRUPT_TRAIN_GOOD, CORRUPT_VAL_GOOD = 13, 4


def _garbage(rng: np.random.Generator) -> list[tuple[str, bytes]]:
  """Files that are not images: noise, a truncated JPEG, an empty file, text."""
  truncated = _jpeg(_photo(40, 48, seed=5))
  return [("noise", rng.bytes(300)), ("truncated", truncated[:len(truncated) // 3]),
          ("empty", b""), ("text", b"<html>Not found</html>")]


@pytest.fixture(scope="module")
def corrupt_imagenet_dir(tmp_path_factory) -> str:
  """ImageNet tars with garbage among the JPEGs: 13 good + 3 bad train images (class 0),
  4 good + 2 bad validation images."""
  data_dir = tmp_path_factory.mktemp("tfds_corrupt")
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  wnids, _ = _imagenet_labels()
  rng = np.random.default_rng(1)
  bad = _garbage(rng)
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as per_class:
      for k in range(CORRUPT_TRAIN_GOOD):
        _add_bytes(per_class, f"{wnids[0]}_{k + 1}.JPEG", _jpeg(_photo(36, 44, seed=k)))
      for k, (_, payload) in enumerate(bad[:3]):
        _add_bytes(per_class, f"{wnids[0]}_{100 + k}.JPEG", payload)
    _add_bytes(train, f"{wnids[0]}.tar", inner.getvalue())
  val_files = [_jpeg(_photo(40, 40, seed=20 + k)) for k in range(CORRUPT_VAL_GOOD)]
  val_files[1:1] = [bad[0][1], bad[3][1]]  # two bad ones among the good
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for index, payload in enumerate(val_files):
      _add_bytes(val, f"ILSVRC2012_val_{index + 1:08d}.JPEG", payload)
  return str(data_dir)


def test_undecodable_images_are_counted_and_skipped(corrupt_imagenet_dir):
  builder = data.get_builder("imagenet2012", corrupt_imagenet_dir)
  assert builder.info.splits["train"].num_examples == CORRUPT_TRAIN_GOOD + 3
  kwargs = dict(split="train", global_batch_size=4, config=SMALL, seed=0, process_index=0,
                process_count=1, shuffle_buffer=16, with_positions=True)
  records = data.records_per_epoch(builder, "train", 4, 1)
  assert records == 16  # every record is read each epoch
  run = data.train_iterator(builder, **kwargs)
  batches = [next(run) for _ in range(8)]  # 32 examples: two epochs of 13, and more
  for batch in batches:
    assert batch["image"].shape == (4, 32, 32, 3) and np.isfinite(batch["image"]).all()
  epochs = np.concatenate([b["epoch"] for b in batches])
  positions = np.concatenate([b["position"] for b in batches])
  for epoch in (0, 1):  # the same 3 records are skipped in each epoch, the other 13 read once
    seen = positions[epochs == epoch]
    assert len(seen) == len(set(seen)) == CORRUPT_TRAIN_GOOD
  linear = epochs * records + positions
  assert np.all(np.diff(linear) > 0)  # in stream order
  # Resuming at the record after batch 4 yields batches 5, 6, 7 bit for bit.
  last = batches[4]
  resumed = data.train_iterator(
      builder, start_position=(int(last["epoch"][-1]), int(last["position"][-1]) + 1), **kwargs)
  for expected in batches[5:8]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["position"], expected["position"])
  # Without positions the batches are the plain {"image", "label"} ones.
  plain = next(data.train_iterator(builder, **{**kwargs, "with_positions": False}))
  assert set(plain) == {"image", "label"}
  np.testing.assert_array_equal(plain["image"], batches[0]["image"])
  # Evaluation: the bad images are left out, every good one counted once, batches padded.
  ds, num_batches = data.create_eval_dataset(builder, split="validation", global_batch_size=4,
                                             config=SMALL, process_index=0, process_count=1)
  evaluated = list(ds.as_numpy_iterator())
  assert data.split_size(builder, "validation") == CORRUPT_VAL_GOOD + 2
  assert num_batches == len(evaluated) == 2
  assert sum(int(b["mask"].sum()) for b in evaluated) == CORRUPT_VAL_GOOD
  # A split in which nothing decodes is an error, not an endless search for an image.
  encoded = [e["image"] for e in tfds.as_numpy(builder.as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()}))]
  bad = next(i for i, payload in enumerate(encoded) if not payload.startswith(b"\xff\xd8\xff")
             or len(payload) < 1000)
  hopeless = data.train_iterator(builder, **{**kwargs, "split": f"train[{bad}:{bad + 1}]",
                                             "global_batch_size": 1})
  with pytest.raises(tf.errors.InvalidArgumentError, match="No image of a whole epoch"):
    next(hopeless)


def test_normalisation_constants_load_without_tensorflow():
  """Inference code and the notebooks take IMAGENET_MEAN / IMAGENET_STD from focal_jax.data
  without starting TensorFlow; the pipelines' names still load on first use."""
  import pathlib  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  root = pathlib.Path(__file__).parent.parent
  probe = ("import sys; from focal_jax.data import IMAGENET_MEAN, IMAGENET_STD; "
           "print(IMAGENET_MEAN, IMAGENET_STD, 'tensorflow' in sys.modules)")
  result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.split("\n")[0] == "(0.485, 0.456, 0.406) (0.229, 0.224, 0.225) False"
  assert data.get_builder is not None and data.AugmentConfig is AugmentConfig
  assert augment.IMAGENET_MEAN is data.IMAGENET_MEAN
  for notebook in sorted((root / "notebooks").glob("*.ipynb")):
    text = notebook.read_text()
    assert "0.485" not in text and "from focal_jax.data import IMAGENET_MEAN" in text, notebook.name
