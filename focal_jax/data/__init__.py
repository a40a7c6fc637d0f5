"""Input pipelines: TFDS datasets -> augmented, per-process NumPy batches; mixup/cutmix.

    builder = get_builder("imagenet2012", data_dir)        # or "focal_digits" (no download)
    batches = train_iterator(builder, global_batch_size=1024, config=AugmentConfig(), seed=0)
    eval_ds, n = create_eval_dataset(builder, split="validation", global_batch_size=1024)
    images, targets = mixup_cutmix(key, batch["image"], batch["label"], num_classes(builder))

Segmentation (`ade20k` from ADEChallengeData2016.zip, or `focal_digit_scenes`, no download):
    batches = create_segmentation_input("ade20k", batch_size=16, train=True, manual_dir=DIR)

`IMAGENET_MEAN` / `IMAGENET_STD` load with the package; the pipelines (and with them
TensorFlow) load on first use of one of their names, so code that only normalises images
(inference, the notebooks) does not start TensorFlow.
"""

from typing import TYPE_CHECKING

from focal_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
  from focal_jax.data.augment import (AugmentConfig, eval_transform, random_erasing,
                                      random_resized_crop_window, train_transform)
  from focal_jax.data.digits import FocalDigits
  from focal_jax.data.input_pipeline import (IMAGENET_MANUAL_FILES, ManualDownloadError,
                                             create_eval_dataset, create_train_dataset,
                                             get_builder, local_batch_size, num_classes,
                                             records_per_epoch, split_size, train_iterator,
                                             train_steps_per_epoch)
  from focal_jax.data.mixup import MixupConfig, mixup_cutmix
  from focal_jax.data.randaugment import RandAugment
  from focal_jax.data.seg_augment import SegAugmentConfig
  from focal_jax.data.segmentation import (SEGMENTATION_DATASETS,
                                           create_segmentation_eval_dataset,
                                           create_segmentation_input,
                                           create_segmentation_train_dataset)

_AUGMENT = {"AugmentConfig", "eval_transform", "random_erasing", "random_resized_crop_window",
            "train_transform"}
_INPUT_PIPELINE = {"IMAGENET_MANUAL_FILES", "ManualDownloadError", "create_eval_dataset",
                   "create_train_dataset", "get_builder", "local_batch_size", "num_classes",
                   "records_per_epoch", "split_size", "train_iterator", "train_steps_per_epoch"}
_MIXUP = {"MixupConfig", "mixup_cutmix"}
_SEGMENTATION = {"SEGMENTATION_DATASETS", "create_segmentation_eval_dataset",
                 "create_segmentation_input", "create_segmentation_train_dataset"}


def __getattr__(name: str):
  """The TensorFlow-backed names, imported when first asked for."""
  if name in _AUGMENT:
    from focal_jax.data import augment as module
  elif name in _INPUT_PIPELINE:
    from focal_jax.data import input_pipeline as module
  elif name in _MIXUP:
    from focal_jax.data import mixup as module
  elif name == "FocalDigits":
    from focal_jax.data import digits as module
  elif name == "RandAugment":
    from focal_jax.data import randaugment as module
  elif name in _SEGMENTATION:
    from focal_jax.data import segmentation as module
  elif name == "SegAugmentConfig":
    from focal_jax.data import seg_augment as module
  else:
    raise AttributeError(f"module 'focal_jax.data' has no attribute {name!r}")
  return getattr(module, name)


__all__ = [
    "IMAGENET_MANUAL_FILES", "IMAGENET_MEAN", "IMAGENET_STD", "AugmentConfig", "FocalDigits",
    "ManualDownloadError", "MixupConfig", "RandAugment", "SEGMENTATION_DATASETS",
    "SegAugmentConfig", "create_eval_dataset", "create_segmentation_eval_dataset",
    "create_segmentation_input", "create_segmentation_train_dataset", "create_train_dataset",
    "eval_transform", "get_builder", "local_batch_size", "mixup_cutmix", "num_classes",
    "random_erasing", "random_resized_crop_window", "records_per_epoch", "split_size",
    "train_iterator", "train_steps_per_epoch", "train_transform",
]
