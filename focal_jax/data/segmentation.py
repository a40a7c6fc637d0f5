"""Semantic-segmentation input pipelines over TFDS (`ade20k`, `focal_digit_scenes`).

Training batches, per process (local batch B = global batch / process count):
  {"image": float32 [B, S, S, 3], normalised with mmseg's mean/std on 0-255 RGB,
   "label": int32 [B, S, S], classes 0..C-1, 255 = ignore (incl. the crop's padding)}
  (+ "epoch", "position": int64 [B] with `with_positions`), S = crop size. The stream is the
  classification pipeline's (`input_pipeline.train_stream`): deterministic in (seed, process),
  example i of epoch e augmented with the stateless seed (key(seed, process, e), i), resumable
  exactly at a global step or at a record position, undecodable records skipped.

Evaluation as mmsegmentation: every image of the split once, each on its own (a batch of
one), the image resized to the test scale (long, short) = (4 S, S) keeping its ratio
((2048, 512) for S = 512), the label at the original size:
  {"image": float32 [1, h, w, 3], "label": int32 [1, H, W], "mask": bool [1]}
Each process reads its share (`tfds.even_splits`) and all yield the same number of
elements; the fillers that even them out have mask False, a zero image [1, S, S, 3] and an
all-ignore label [1, S, S]. Shapes differ from image to image (and between processes): run
the model per process on each element, resize its logits to the label's size (bilinear,
align_corners=False, as mmseg) and take the argmax there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from focal_jax.data import digit_scenes, input_pipeline, seg_augment
from focal_jax.data.input_pipeline import (
    _hide_accelerators_from_tf,
    _options,
    _process,
    skip_image_decoding,
    get_builder,
    split_size,
    train_stream,
)
from focal_jax.data.seg_augment import IGNORE_LABEL, SegAugmentConfig

# dataset -> (train split, eval split, default crop size)
SEGMENTATION_DATASETS = {
    "ade20k": ("train", "validation", 512),
    "focal_digit_scenes": ("train", "test", digit_scenes.CANVAS),
}


def num_classes(builder: tfds.core.DatasetBuilder) -> int:
  """Classes of a segmentation builder (255, the ignore label, not counted)."""
  if builder.name not in SEGMENTATION_DATASETS:
    raise ValueError(f"{builder.name} is not a segmentation dataset; expected one of "
                     f"{', '.join(SEGMENTATION_DATASETS)}.")
  return input_pipeline.num_classes(builder)


@functools.cache
def _traced_train_transform(config: SegAugmentConfig) -> Callable[..., tuple[tf.Tensor, ...]]:
  return tf.function(lambda image, label, seed: seg_augment.train_transform(
      image, label, seed, config))


@functools.cache
def _traced_eval_transform(config: SegAugmentConfig) -> Callable[..., tuple[tf.Tensor, ...]]:
  return tf.function(lambda image, label: seg_augment.eval_transform(image, label, config))


def create_segmentation_train_dataset(
    builder: tfds.core.DatasetBuilder, *, split: str = "train", global_batch_size: int,
    config: SegAugmentConfig = SegAugmentConfig(), seed: int = 0, start_step: int = 0,
    start_position: tuple[int, int] | None = None, shuffle_buffer: int = 1_000,
    process_index: int | None = None, process_count: int | None = None,
    threads: int | None = None, with_positions: bool = False,
) -> tf.data.Dataset:
  """Endless training batches of this process's share from global step `start_step` (or
  record `start_position = (epoch, record)`, which wins); as `create_train_dataset`."""
  _hide_accelerators_from_tf()
  index, count = _process(process_index, process_count)
  transform = _traced_train_transform(config)
  size = config.crop_size

  def _augment(record, example_seed):
    image, label = transform(record["image"], record["label"], example_seed)
    return {"image": image, "label": label}

  end = {"image": tf.zeros([size, size, 3], tf.float32),
         "label": tf.zeros([size, size], tf.int32)}
  return train_stream(
      builder, split=split, global_batch_size=global_batch_size, augment=_augment,
      end_example=end, seed=seed, start_step=start_step, start_position=start_position,
      shuffle_buffer=shuffle_buffer, process_index=index, process_count=count,
      threads=threads, with_positions=with_positions)


def create_segmentation_eval_dataset(
    builder: tfds.core.DatasetBuilder, *, split: str = "validation",
    config: SegAugmentConfig = SegAugmentConfig(), process_index: int | None = None,
    process_count: int | None = None, threads: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """This process's share of an eval split, one image per element, in order, evened out
  with masked fillers; returns (dataset, elements per process)."""
  _hide_accelerators_from_tf()
  index, count = _process(process_index, process_count)
  shares = tfds.even_splits(split, n=count, drop_remainder=False)
  largest = split_size(builder, shares[0])  # even_splits puts the remainder first
  size = config.crop_size
  filler = {"image": tf.zeros([1, size, size, 3], tf.float32),
            "label": tf.fill([1, size, size], tf.constant(IGNORE_LABEL, tf.int32)),
            "mask": tf.constant([False])}
  fillers = tf.data.Dataset.from_tensors(filler).repeat()
  if builder.info.splits[shares[index]].num_examples == 0:  # more processes than images
    return fillers.take(largest).with_options(_options(threads)), largest
  ds = builder.as_dataset(split=shares[index], shuffle_files=False,
                          decoders=skip_image_decoding(builder.info.features))
  transform = _traced_eval_transform(config)

  def _preprocess(record):
    image, label = transform(record["image"], record["label"])
    return {"image": image[None], "label": label[None], "mask": tf.constant([True])}

  # Undecodable images are left out (fewer real elements than the split holds); fillers
  # make up for them too.
  ds = ds.map(_preprocess, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  ds = ds.concatenate(fillers).take(largest)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options(threads)), largest


def augment_config(dataset: str, crop_size: int | None = None, **overrides) -> SegAugmentConfig:
  """The recipe's transforms for a dataset: mmseg's ADE20K pipeline with the dataset's crop
  (512 for ade20k, 64 for focal_digit_scenes) unless `crop_size` says otherwise."""
  if dataset not in SEGMENTATION_DATASETS:
    raise ValueError(f"Unknown segmentation dataset {dataset!r}; expected one of "
                     f"{', '.join(SEGMENTATION_DATASETS)}.")
  crop = crop_size or SEGMENTATION_DATASETS[dataset][2]
  return SegAugmentConfig(crop_size=crop, **overrides)


def create_segmentation_input(
    dataset: str, split: str | None = None, *, batch_size: int, train: bool,
    crop_size: int | None = None, data_dir: str | None = None, manual_dir: str | None = None,
    seed: int = 0, start_step: int = 0, start_position: tuple[int, int] | None = None,
    shard: tuple[int, int] | None = None, with_positions: bool = False,
    config: SegAugmentConfig | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """NumPy batches of a segmentation dataset, prepared on first use (`ade20k` from
  ADEChallengeData2016.zip in `manual_dir`).

  train=True: endless batches of `batch_size` (global; each process yields its share) from
  global step `start_step` or record `start_position`. train=False: the split's images one
  per element (`batch_size` unused); see the module docstring. `split` defaults to the
  dataset's train or eval split; `shard` = (process_index, process_count), default JAX's.
  """
  builder = get_builder(dataset, data_dir, manual_dir=manual_dir)
  train_split, eval_split, _ = SEGMENTATION_DATASETS[dataset]
  config = config or augment_config(dataset, crop_size)
  index, count = shard if shard is not None else (None, None)
  if train:
    return create_segmentation_train_dataset(
        builder, split=split or train_split, global_batch_size=batch_size, config=config,
        seed=seed, start_step=start_step, start_position=start_position, process_index=index,
        process_count=count, with_positions=with_positions).as_numpy_iterator()
  ds, _ = create_segmentation_eval_dataset(builder, split=split or eval_split, config=config,
                                           process_index=index, process_count=count)
  return ds.as_numpy_iterator()


__all__ = [
    "IGNORE_LABEL", "SEGMENTATION_DATASETS", "SegAugmentConfig", "augment_config",
    "create_segmentation_eval_dataset", "create_segmentation_input",
    "create_segmentation_train_dataset", "num_classes",
]
