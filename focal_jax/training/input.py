"""The loop's only contact with the input pipeline (focal_jax.data): builder, sizes, batches.

Batches are per process (NumPy); the loop turns them into global arrays.
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from focal_jax import data


def augment_config(config: ml_collections.ConfigDict) -> data.AugmentConfig:
  a = config.augment
  return data.AugmentConfig(
      image_size=config.image_size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
      hflip=a.hflip, randaugment=a.randaugment or None, reprob=a.reprob, remode=a.remode,
      recount=a.recount, crop_pct=a.crop_pct)


def get_builder(config: ml_collections.ConfigDict, prepare: bool = True):
  """The TFDS builder of config.dataset, prepared (built on first use) unless told not to
  (an unprepared builder still knows its features, e.g. the number of classes)."""
  return data.get_builder(config.dataset, config.data_dir or None,
                          manual_dir=config.manual_dir or None, prepare=prepare)


def num_classes(builder) -> int:
  return data.num_classes(builder)


def steps_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  return data.train_steps_per_epoch(builder, config.train_split, config.batch_size)


def records_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  """Training records each process reads per epoch."""
  return data.records_per_epoch(builder, config.train_split, config.batch_size)


def train_batches(builder, config: ml_collections.ConfigDict, start_step: int,
                  start_position: tuple[int, int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless {"image", "label", "epoch", "position"} batches of this process, from global
  step `start_step` on, or from record `start_position = (epoch, record)` of this process's
  stream when given (batches are a pure function of seed and position, so a resumed run
  sees the same data; "epoch" and "position" say where each example came from)."""
  return data.train_iterator(
      builder, split=config.train_split, global_batch_size=config.batch_size,
      config=augment_config(config), seed=config.seed, start_step=start_step,
      start_position=start_position, shuffle_buffer=config.shuffle_buffer,
      threads=config.data_threads or None, with_positions=True)


def eval_batches(builder, config: ml_collections.ConfigDict, global_batch_size: int
                 ) -> tuple[Iterator[dict[str, np.ndarray]], int]:
  """({"image", "label", "mask"} batches of this process's share, padded; number of batches)."""
  ds, num_batches = data.create_eval_dataset(
      builder, split=config.eval_split, global_batch_size=global_batch_size,
      config=augment_config(config), threads=config.data_threads or None)
  return ds.as_numpy_iterator(), num_batches


def eval_examples(builder, config: ml_collections.ConfigDict) -> int:
  """Examples in the eval split (the evaluation counts fewer when some do not decode)."""
  return data.split_size(builder, config.eval_split)
