"""tf.data input pipelines over TFDS datasets (`imagenet2012`, `focal_digits`, any image
classification dataset with `image` and `label` features).

Each process reads only its share of a split (`tfds.even_splits` by process index/count) and
yields NumPy batches of its local batch size (global batch / process count):
  {"image": float32 [B, S, S, 3] NHWC, normalised; "label": int32 [B]}  (+ "mask" for eval).

Training is one endless, deterministic pipeline that resumes exactly. Epoch `e` of process
`p` is a pure function of (seed, p, e): records are read in file order (TFDS shuffles
examples globally when it writes a dataset), shuffled through a buffer seeded with a key
derived from (seed, p, e), and the example at position `i` of that epoch is augmented with
the stateless seed (key, i). Each epoch ends at steps_per_epoch * B examples (the last
partial batch is dropped, like PyTorch's drop_last=True), so global step `s` is batch
s % steps_per_epoch of epoch s // steps_per_epoch. Resuming at step `s` starts the pipeline
at that epoch and skips the records before the batch, without decoding them (it reads at
most one epoch of records): the batches that follow are bit-identical to an uninterrupted
run's. Across epochs the order changes only as far as the shuffle buffer reaches, so give
ImageNet a large `shuffle_buffer` (memory: about 110 kB per buffered JPEG).

Undecodable images (corrupt, truncated, an unknown format) are skipped, never fatal: the
batch is filled from the records that follow. With `with_positions=True` every example
carries its (epoch, position) in the process's stream, so the caller counts the skipped
records and resumes exactly with `start_position` (the next record to read) even after
skips; without skips, `start_step` alone says the same. An epoch in which no image at all
decodes is an error (rather than an endless search for one).

`imagenet2012` is prepared from the two manual tar files on first use.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Imported to register `focal_digits`, `ade20k` and `focal_digit_scenes` with TFDS.
from focal_jax.data import ade20k, digit_scenes, digits  # noqa: F401
from focal_jax.data.augment import AugmentConfig, eval_transform, train_transform
from focal_jax.data.manual import ManualDownloadError

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


# ----------------------------------------------------------------------------------------
# Builders and preparation.
# ----------------------------------------------------------------------------------------


def _hide_accelerators_from_tf() -> None:
  """TF is only the input pipeline: keep it off GPUs so it never grabs JAX's memory."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # Already initialised; nothing we can change then.
    pass


def default_manual_dir(builder: tfds.core.DatasetBuilder) -> str:
  """TFDS's default manual directory: `<data_dir>/downloads/manual`."""
  return os.fspath(builder.data_dir_root / "downloads" / "manual")


def check_imagenet_manual_files(manual_dir: str) -> None:
  """Raises ManualDownloadError naming both ImageNet tars and where they belong."""
  missing = [f for f in IMAGENET_MANUAL_FILES
             if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if missing:
    raise ManualDownloadError(
        f"imagenet2012 is not prepared and cannot be built: {', '.join(missing)} not found "
        f"in {manual_dir}.\nExpected both {IMAGENET_MANUAL_FILES[0]} and "
        f"{IMAGENET_MANUAL_FILES[1]} in {manual_dir} (the manual directory, by default "
        "<data_dir>/downloads/manual). Download them from https://image-net.org/download-images "
        "(registration required), put them there (or pass manual_dir=...), and run again; "
        "the first run converts them to TFDS records (hours for the full dataset).")


def get_builder(name: str, data_dir: str | None = None, *, manual_dir: str | None = None,
                prepare: bool = True) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of `name`, prepared (built into `data_dir`) unless told not to.

  `imagenet2012` is built from `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in
  `manual_dir` (default `<data_dir>/downloads/manual`); `focal_digits` needs nothing. With
  several processes, process 0 prepares while the others wait; a process that still finds
  the dataset unprepared afterwards (data_dir not shared) prepares its own copy. Call it
  after `jax.distributed.initialize()`: it asks JAX for the process index and count.
  """
  _hide_accelerators_from_tf()
  builder = tfds.builder(name, data_dir=data_dir)
  if not prepare or builder.is_prepared():
    return builder
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_index() == 0:
      _prepare(builder, manual_dir)
    multihost_utils.sync_global_devices(f"focal_jax prepare {name}")
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      return builder
  _prepare(builder, manual_dir)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> None:
  """download_and_prepare; a failure for want of the ImageNet tars is a ManualDownloadError.

  The tars are looked for only when TFDS fails, so wherever preparation needs no files
  (e.g. under `tfds.testing.mock_data`, where it does nothing) nothing is asked for.
  """
  manual_dir = manual_dir or default_manual_dir(builder)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
  except Exception:
    if builder.name == "imagenet2012":
      check_imagenet_manual_files(manual_dir)  # raises the clear error when they are missing
    check_manual_dir = getattr(builder, "check_manual_dir", None)  # other manual datasets
    if check_manual_dir is not None:
      check_manual_dir(manual_dir)
    raise


# ----------------------------------------------------------------------------------------
# Splits and sizes.
# ----------------------------------------------------------------------------------------


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, {count}), got {index}.")
  return index, count


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the "
                     f"process count {count}; choose a multiple of {count}.")
  return global_batch_size // count


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples in a (sub)split; counts the dataset when the metadata cannot tell
  (e.g. under tfds.testing.mock_data)."""
  try:
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    size = 0
  if size > 0:
    return int(size)
  cardinality = int(builder.as_dataset(split=split).cardinality())
  if cardinality < 0:
    raise ValueError(f"Cannot determine the size of split {split!r} of {builder.name}.")
  return cardinality


def train_split_for_process(split: str, process_index: int, process_count: int) -> str:
  """Equal-sized shares (remainder dropped) so every process has the same epoch length."""
  return tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]


def train_steps_per_epoch(builder: tfds.core.DatasetBuilder, split: str, global_batch_size: int,
                          process_count: int | None = None) -> int:
  """Steps in one epoch: (examples per process) // (local batch size)."""
  _, count = _process(0, process_count)
  local = local_batch_size(global_batch_size, count)
  steps = split_size(builder, train_split_for_process(split, 0, count)) // local
  if steps == 0:
    raise ValueError(f"Split {split!r} of {builder.name} has fewer examples per process than "
                     f"the local batch size {local}; lower the batch size.")
  return steps


def _epoch_key(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
  """int64 key, a stable hash of (seed, process, epoch): seeds the shuffle and augmentation."""
  pair = tf.random.experimental.stateless_fold_in(  # [hash(seed, process), epoch]
      tf.constant([seed, process_index], tf.int64), tf.cast(epoch, tf.int64))
  key = tf.random.stateless_uniform([], pair, minval=None, maxval=None, dtype=tf.int64)
  return tf.bitwise.bitwise_and(key, np.iinfo(np.int64).max)  # non-negative


@functools.cache
def _traced_train_transform(config: AugmentConfig) -> Callable[..., tf.Tensor]:
  """train_transform traced once per config: later pipelines reuse the graph (~1 s each)."""
  return tf.function(lambda image_bytes, seed: train_transform(image_bytes, seed, config))


@functools.cache
def _traced_eval_transform(config: AugmentConfig) -> Callable[..., tf.Tensor]:
  return tf.function(lambda image_bytes: eval_transform(image_bytes, config))


def _options(threads: int | None) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


# ----------------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------------


def create_train_dataset(
    builder: tfds.core.DatasetBuilder, *, split: str = "train", global_batch_size: int,
    config: AugmentConfig = AugmentConfig(), seed: int = 0, start_step: int = 0,
    start_position: tuple[int, int] | None = None, shuffle_buffer: int = 10_000,
    process_index: int | None = None, process_count: int | None = None,
    threads: int | None = None, with_positions: bool = False,
) -> tf.data.Dataset:
  """Endless training batches of this process's share, starting at global step `start_step`
  (or at record `start_position = (epoch, record)` of this process's stream, which wins).

  Deterministic in (seed, process_index); a pipeline created with start_step=s yields exactly
  the batches s, s+1, ... of one created with start_step=0 (when no image was skipped before
  step s; `start_position` is exact either way). With `with_positions`, batches also hold
  "epoch" and "position" (int64 [B]): where each example sits in the stream.
  """
  _hide_accelerators_from_tf()
  index, count = _process(process_index, process_count)
  augment, end = _classification_augment(config)
  return train_stream(
      builder, split=split, global_batch_size=global_batch_size, augment=augment,
      end_example=end, seed=seed, start_step=start_step, start_position=start_position,
      shuffle_buffer=shuffle_buffer, process_index=index, process_count=count,
      threads=threads, with_positions=with_positions)


def train_batches_from_records(
    records: tf.data.Dataset, *, records_per_epoch: int, local_batch_size: int,
    config: AugmentConfig = AugmentConfig(), seed: int = 0, start_step: int = 0,
    start_position: tuple[int, int] | None = None, shuffle_buffer: int = 10_000,
    process_index: int = 0, threads: int | None = None, with_positions: bool = False,
    name: str = "the records",
) -> tf.data.Dataset:
  """The training pipeline of `create_train_dataset` over `records` ({"image": encoded
  bytes, "label"}, one process's share in file order): shuffled, augmented, batched.

  An epoch is the first `records_per_epoch` records; `name` says what they are in errors.
  """
  augment, end = _classification_augment(config)
  return stream_from_records(
      records, records_per_epoch=records_per_epoch, local_batch_size=local_batch_size,
      augment=augment, end_example=end, seed=seed, start_step=start_step,
      start_position=start_position, shuffle_buffer=shuffle_buffer,
      process_index=process_index, threads=threads, with_positions=with_positions, name=name)


def _classification_augment(config: AugmentConfig):
  """The classification task's `augment(record, seed)` and its epoch-end example."""
  transform = _traced_train_transform(config)
  size = config.image_size

  def augment(example, example_seed):
    return {"image": transform(example["image"], example_seed),
            "label": tf.cast(example["label"], tf.int32)}

  end = {"image": tf.zeros([size, size, 3], tf.float32), "label": tf.constant(0, tf.int32)}
  return augment, end


def train_stream(
    builder: tfds.core.DatasetBuilder, *, split: str, global_batch_size: int,
    augment: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]],
    end_example: dict[str, tf.Tensor], seed: int, start_step: int = 0,
    start_position: tuple[int, int] | None = None, shuffle_buffer: int,
    process_index: int, process_count: int, threads: int | None = None,
    with_positions: bool = False,
) -> tf.data.Dataset:
  """The deterministic, resumable training stream that every task's pipeline batches: this
  process's share of `split`, read in file order, through `stream_from_records`."""
  index, count = process_index, process_count
  local = local_batch_size(global_batch_size, count)
  steps = train_steps_per_epoch(builder, split, global_batch_size, count)
  # Records in file order (TFDS shuffled them globally when it wrote the files).
  records = builder.as_dataset(
      split=train_split_for_process(split, index, count), shuffle_files=False,
      decoders=skip_image_decoding(builder.info.features),
      read_config=tfds.ReadConfig(try_autocache=False))
  return stream_from_records(
      records, records_per_epoch=steps * local,  # the share's last partial batch is dropped
      local_batch_size=local, augment=augment, end_example=end_example, seed=seed,
      start_step=start_step, start_position=start_position, shuffle_buffer=shuffle_buffer,
      process_index=index, threads=threads, with_positions=with_positions,
      name=f"split {split!r} of {builder.name}")


def stream_from_records(
    records: tf.data.Dataset, *, records_per_epoch: int, local_batch_size: int,
    augment: Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]],
    end_example: dict[str, tf.Tensor], seed: int, start_step: int = 0,
    start_position: tuple[int, int] | None = None, shuffle_buffer: int,
    process_index: int, threads: int | None = None, with_positions: bool = False,
    name: str = "the records",
) -> tf.data.Dataset:
  """Shuffled, augmented, batched epochs of `records` (one process's share in file order).

  `augment(record, seed)` turns one undecoded record (images left encoded) into an example
  dict; `seed` (int64 [2]) is (epoch key, position in the epoch). `end_example` is a dict of
  the same structure (any values): it marks an epoch's end internally and never reaches the
  caller. Records whose `augment` fails are skipped. An epoch is the first
  `records_per_epoch` records; `name` says what they are in errors.
  """
  index, local = process_index, local_batch_size
  steps = records_per_epoch // local
  if start_position is None:
    start_epoch, within = divmod(start_step, steps)
    start_position = (start_epoch, within * local)
  start_epoch, start_record = normalize_position(start_position, records_per_epoch)

  def _augment(key, epoch, position, example):
    example_seed = tf.stack([key, position])
    return {**augment(example, example_seed), "epoch": epoch, "position": position,
            "records": tf.constant(0, tf.int64)}

  def _epoch(epoch):  # augmented examples of one epoch (skipped ones left out), then a marker
    key = _epoch_key(seed, index, epoch)
    first = tf.where(epoch == start_epoch, tf.constant(start_record, tf.int64), 0)
    shuffled = records.shuffle(shuffle_buffer, seed=key, reshuffle_each_iteration=False)
    shuffled = shuffled.take(records_per_epoch).enumerate().skip(first)  # skips never decode
    examples = shuffled.map(lambda position, example: _augment(key, epoch, position, example),
                            num_parallel_calls=tf.data.AUTOTUNE)
    end = {**end_example, "epoch": epoch, "position": tf.constant(-1, tf.int64),
           "records": records_per_epoch - first}  # records this epoch read
    return examples.ignore_errors().concatenate(tf.data.Dataset.from_tensors(end))

  def _check(decoded, example):  # decoded: examples of the epoch so far
    is_end = example["position"] < 0
    nothing = is_end & (decoded == 0) & (example["records"] == records_per_epoch)
    check = tf.debugging.Assert(tf.logical_not(nothing), [
        f"No image of a whole epoch of {name} (process {index}) "
        "could be decoded; check the dataset files and their image format. Epoch:",
        example["epoch"]])
    with tf.control_dependencies([check]):
      return tf.where(is_end, tf.constant(0, tf.int64), decoded + 1), example

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(_epoch)
  ds = ds.scan(tf.constant(0, tf.int64), _check).filter(lambda ex: ex["position"] >= 0)
  kept = set(end_example) | ({"epoch", "position"} if with_positions else set())
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k in kept})
  ds = ds.batch(local, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads))


def skip_image_decoding(features: tfds.features.FeaturesDict) -> dict:
  """Decoders that leave every image feature encoded (the transforms decode, or skip)."""
  return {name: tfds.decode.SkipDecoding() for name, feature in features.items()
          if isinstance(feature, tfds.features.Image)}


def normalize_position(position: tuple[int, int], records_per_epoch: int) -> tuple[int, int]:
  """(epoch, record) with record < records_per_epoch: the end of an epoch is the next one's start."""
  epoch, record = (int(v) for v in position)
  extra, record = divmod(record, records_per_epoch)
  return epoch + extra, record


def records_per_epoch(builder: tfds.core.DatasetBuilder, split: str, global_batch_size: int,
                      process_count: int | None = None) -> int:
  """Records one process reads per epoch of training (its share, whole local batches)."""
  count = jax.process_count() if process_count is None else process_count
  return (train_steps_per_epoch(builder, split, global_batch_size, count)
          * local_batch_size(global_batch_size, count))


def train_iterator(builder: tfds.core.DatasetBuilder, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """NumPy batches of `create_train_dataset(builder, **kwargs)`."""
  return create_train_dataset(builder, **kwargs).as_numpy_iterator()


def create_eval_dataset(
    builder: tfds.core.DatasetBuilder, *, split: str = "validation", global_batch_size: int,
    config: AugmentConfig = AugmentConfig(), process_index: int | None = None,
    process_count: int | None = None, threads: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """This process's share of an eval split, in order, padded; returns (dataset, num_batches).

  Every process yields the same number of batches (so collective steps line up); padding
  examples are zero images with label 0 and "mask" False. Real examples have mask True;
  undecodable images are skipped (compare the masks' sum with `split_size`).
  """
  _hide_accelerators_from_tf()
  index, count = _process(process_index, process_count)
  local = local_batch_size(global_batch_size, count)
  shares = tfds.even_splits(split, n=count, drop_remainder=False)
  largest = split_size(builder, shares[0])  # even_splits puts the remainder first
  num_batches = math.ceil(largest / local)
  ds = builder.as_dataset(split=shares[index], shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})

  transform = _traced_eval_transform(config)

  def _preprocess(example):
    return {"image": transform(example["image"]),
            "label": tf.cast(example["label"], tf.int32), "mask": tf.constant(True)}

  # Undecodable images are left out (the caller sees fewer examples than the split holds);
  # the padding then fills in for them too.
  ds = ds.map(_preprocess, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  size = config.image_size
  pad = {"image": tf.zeros([size, size, 3], tf.float32), "label": tf.constant(0, tf.int32),
         "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * local)
  ds = ds.batch(local, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads)), num_batches


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  """Classes of a classification dataset (ClassLabel) or of a segmentation one (its builder's
  NUM_CLASSES; the ignore label 255 not counted)."""
  label = builder.info.features["label"]
  if isinstance(label, tfds.features.ClassLabel):
    return label.num_classes
  count = getattr(builder, "NUM_CLASSES", None)
  if count is None:
    raise ValueError(f"{builder.name}'s label is neither a class label nor a class map of a "
                     "known segmentation dataset; cannot tell its number of classes.")
  return int(count)
