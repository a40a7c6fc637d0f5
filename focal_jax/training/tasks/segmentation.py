"""Semantic segmentation as mmsegmentation trains and evaluates UPerNet (SPEC section 12).

Batches {"image": float32 [B, S, S, 3], "label": int32 [B, S, S]} (255 = ignore) from
`focal_jax.data.segmentation`. The model is `focal_jax.create_segmenter` (UPerHead + FCNHead
on stage 3, BatchNorm over the global batch). Loss: each head's logits resized bilinearly
(align_corners=False) to the label size, per-pixel cross-entropy, ignored pixels counting
zero; averaged over ALL pixels of the batch, ignored ones included, which is what
mmsegmentation's CrossEntropyLoss does by default (`avg_non_ignore=False`: F.cross_entropy
with reduction "none", then `.mean()`); decode head weight 1.0 + auxiliary head
`segmentation.auxiliary_loss_weight` (0.4); `segmentation.class_weight` weighs each pixel
by its label's class, as mmsegmentation's `class_weight`.

Evaluation: every image of the eval split once, at its test size (the data pipeline's),
through `focal_jax.segment` ("whole" or "slide", `eval_scales` ratios of the test-scale
image and `eval_flip` for the multi-scale column); predictions resized to the label's size;
per-class intersections, unions, predicted and labelled areas summed over the split; then
mIoU (mean of the classes whose IoU is defined, i.e. present in the labels or the
predictions), mAcc, aAcc in percent, as mmsegmentation's `mean_iou`. Per-class IoU and
accuracy go to `<workdir>/<prefix>_per_class.json`. Evaluation runs in one process.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from focal_jax import models, pretrained, storage
from focal_jax.models.batch_split import split_batch
from focal_jax.models.resize import resize_bilinear
from focal_jax.models.segmenter import create_segmenter
from focal_jax.segment import segment
from focal_jax.training import input
from focal_jax.training import train_state as ts
from focal_jax.training.config import SEGMENTER_OPTIONS
from focal_jax.training.tasks import StepHooks
from focal_jax.weights.segmenter_exports import segmenter_description

BATCH_KEYS = ("image", "label")
IGNORE_LABEL = 255
DECODE_LOSS_WEIGHT = 1.0
# mmsegmentation's paramwise_cfg.custom_keys with decay_mult 0 (Swin's and FocalNet's ADE20K
# configs): substrings of the official (mmsegmentation state_dict) parameter names.
NO_DECAY_SUBSTRINGS = ("absolute_pos_embed", "relative_position_bias_table", "norm")
build = create_segmenter


def _data():
  from focal_jax.data import segmentation  # noqa: PLC0415  (TensorFlow only when data is read)
  return segmentation


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> ts.ModelSpec:
  return ts.model_spec_from_config(config, num_classes, build)


def description(spec: ts.ModelSpec) -> dict[str, Any]:
  return segmenter_description(spec.name, spec.num_classes, spec.img_size, spec.json_overrides())


# The data: focal_jax.data.segmentation (ade20k from the manual zip, focal_digit_scenes).
def get_builder(config: ml_collections.ConfigDict, prepare: bool = True):
  return input.get_builder(config, prepare=prepare)


def num_classes(builder) -> int:
  return _data().num_classes(builder)


def steps_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  return input.steps_per_epoch(builder, config)


def records_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  return input.records_per_epoch(builder, config)


def augment_config(config: ml_collections.ConfigDict):
  """The dataset's mmsegmentation transforms with crop image_size and the run's
  `segmentation` knobs (rescale ratio, cat_max_ratio, flip, photometric distortion)."""
  seg = config.segmentation
  return _data().augment_config(
      config.dataset, config.image_size, ratio_range=tuple(float(r) for r in seg.ratio_range),
      cat_max_ratio=float(seg.cat_max_ratio), hflip=float(seg.hflip),
      photometric=bool(seg.photometric))


def train_batches(builder, config: ml_collections.ConfigDict, start_step: int,
                  start_position: tuple[int, int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Endless {"image", "label", "epoch", "position"} batches of this process (resumable as
  classification's: a pure function of seed and position)."""
  return _data().create_segmentation_train_dataset(
      builder, split=config.train_split, global_batch_size=config.batch_size,
      config=augment_config(config), seed=config.seed, start_step=start_step,
      start_position=start_position, shuffle_buffer=config.shuffle_buffer,
      threads=config.data_threads or None, with_positions=True).as_numpy_iterator()


def eval_examples(builder, config: ml_collections.ConfigDict) -> int:
  return input.eval_examples(builder, config)


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int,
                   batch_sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as ShapeDtypeStructs: crops [B, S, S, 3], labels [B, S, S]."""
  size = config.image_size
  return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32,
                                        sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((batch_size, size, size), jnp.int32,
                                        sharding=batch_sharding)}


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array,
                        class_weight: Sequence[float] | None = None) -> jax.Array:
  """mmsegmentation's CrossEntropyLoss: logits [B, h, w, K] resized bilinearly to labels
  [B, H, W]; -log softmax at the label, times `class_weight[label]` when given (its
  `class_weight`), 0 where the label is 255; the mean over all B*H*W pixels (ignored ones
  included, `avg_non_ignore=False`). Float32; one-hot products, no gather."""
  size = tuple(labels.shape[1:3])
  logits = logits.astype(jnp.float32)
  if tuple(logits.shape[1:3]) != size:
    logits = resize_bilinear(logits, size)  # [B, H, W, K]
  classes = jnp.arange(logits.shape[-1], dtype=labels.dtype)
  one_hot = (labels[..., None] == classes).astype(jnp.float32)  # all zero at 255
  picked = jnp.sum(one_hot * logits, axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, H, W]
  if class_weight is not None:
    nll = nll * (one_hot @ jnp.asarray(class_weight, jnp.float32))  # weight of the label
  return jnp.sum(jnp.where(labels != IGNORE_LABEL, nll, 0.0)) / labels.size


def class_weights(config: ml_collections.ConfigDict, num_classes: int) -> tuple[float, ...] | None:
  """`segmentation.class_weight` as a tuple (None when empty); raises if its length is not
  the number of classes."""
  weights = tuple(float(w) for w in config.segmentation.class_weight)
  if not weights:
    return None
  if len(weights) != num_classes:
    raise ValueError(f"segmentation.class_weight has {len(weights)} values; expected one per "
                     f"class of {config.dataset} ({num_classes}).")
  return weights


def train_hooks(config: ml_collections.ConfigDict, spec: ts.ModelSpec, mesh: Mesh) -> StepHooks:
  """Decode-head loss + auxiliary_loss_weight x auxiliary-head loss."""
  from focal_jax.training import sharding  # noqa: PLC0415

  batch_sharding = sharding.batch_sharding(mesh)
  aux_weight = config.segmentation.auxiliary_loss_weight
  weights = class_weights(config, spec.num_classes)

  def prepare(key, batch):
    del key  # the pipeline already augmented the crops
    return (jax.lax.with_sharding_constraint(batch["image"], batch_sharding),
            jax.lax.with_sharding_constraint(batch["label"], batch_sharding))

  def loss(model, inputs):
    images, labels = inputs
    with split_batch(batch_sharding):
      decode, auxiliary = model.forward_train(images)
    total = DECODE_LOSS_WEIGHT * pixel_cross_entropy(decode, labels, weights)
    if auxiliary is not None:
      total = total + aux_weight * pixel_cross_entropy(auxiliary, labels, weights)
    return total

  return StepHooks(prepare, loss)


def decays(name: str) -> bool:
  """mmsegmentation's substring rule: no decay where the name holds a NO_DECAY_SUBSTRINGS."""
  return not any(part in name for part in NO_DECAY_SUBSTRINGS)


def decay_mask(spec: ts.ModelSpec) -> Callable[[Any], Any]:
  """params -> bools: the substring rule (biases and the heads' BatchNorm, named `bn`,
  decay; every LayerNorm, `norm*`, does not). Applied to our dotted names: they hold these
  substrings exactly where the official (mmsegmentation state_dict) names do, for every
  parameter of the Focal and Focal-fast segmenters (tests/test_segmentation_training.py)."""
  del spec

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(pretrained.param_name(path)), params)

  return mask


def fit_focal_kernel(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A FocalNet classifier's depthwise kernel [k, k, 1, C] for the segmentation backbone's
  [K, K, 1, C] (released configs: K = 9 + 2l where ImageNet had 3 + 2l), as microsoft/
  FocalNet's segmentation `load_checkpoint` fits it: zero-padded around when K > k, its
  centre cut out when K < k. Other shapes pass unchanged (the caller's shape check)."""
  if kernel.ndim != 4 or len(shape) != 4 or kernel.shape[2:] != shape[2:]:
    return kernel
  have, want = kernel.shape[0], shape[0]
  if kernel.shape[1] != have or shape[1] != want or (want - have) % 2:
    return kernel
  if have < want:
    pad = (want - have) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad), (0, 0), (0, 0)))
  cut = (have - want) // 2
  return kernel[cut:have - cut, cut:have - cut]


def pretrained_params(spec: ts.ModelSpec, params_shardings: Any, source: str,
                      exclude: tuple[str, ...] = (),
                      read_checkpoint: ts.CheckpointReader = ts.read_export_only) -> Any:
  """A fresh segmenter whose backbone takes `source`'s parameters (an ImageNet
  classification export, .pth or .safetensors of the same variant and options): each
  `backbone.X` from the classifier's `X` where the shapes agree, unless a pattern of
  `exclude` matches `backbone.X` (FocalNet's focal kernels fitted by `fit_focal_kernel`, as
  officially). The heads and the per-stage norms keep their init.
  `read_checkpoint(source, abstract classifier)` reads it (exports only by default)."""
  options = {k: v for k, v in spec.overrides.items() if k not in SEGMENTER_OPTIONS}
  classifier = nnx.eval_shape(lambda: models.create_model(
      spec.name, num_classes=1000, img_size=spec.img_size, **options))
  loaded = read_checkpoint(source, classifier)
  patterns = [re.compile(p) for p in exclude]
  fresh = ts.init_params(spec, params_shardings)
  taken, kept = [], []

  def place(path, leaf):
    name = pretrained.param_name(path)
    value = loaded.get(name.removeprefix("backbone.")) if name.startswith("backbone.") else None
    if value is not None and ".focal_layers." in name:
      value = fit_focal_kernel(np.asarray(value), tuple(leaf.shape))
    if (value is None or tuple(value.shape) != tuple(leaf.shape)
        or any(p.search(name) for p in patterns)):
      if name.startswith("backbone."):
        kept.append(name)
      return leaf
    taken.append(name)
    value = value.astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  params = jax.tree_util.tree_map_with_path(place, fresh)
  if not taken:
    raise ValueError(f"{source} provides no parameter of the {spec.name} backbone: expected an "
                     "ImageNet classification checkpoint of the same variant and options.")
  logging.info("Backbone: %d parameter arrays from %s; %d keep their init: %s", len(taken),
               source, len(kept), ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
  return params


def intersect_and_union(prediction: np.ndarray, label: np.ndarray, num_classes: int
                        ) -> np.ndarray:
  """int64 [4, K]: per class intersection, union, predicted and labelled pixels of one
  image (pixels labelled 255 left out), as mmsegmentation's `intersect_and_union`."""
  valid = label != IGNORE_LABEL
  prediction, label = prediction[valid].astype(np.int64), label[valid].astype(np.int64)
  intersection = np.bincount(label[prediction == label], minlength=num_classes)[:num_classes]
  predicted = np.bincount(prediction, minlength=num_classes)[:num_classes]
  labelled = np.bincount(label, minlength=num_classes)[:num_classes]
  return np.stack([intersection, predicted + labelled - intersection, predicted, labelled])


def segmentation_metrics(totals: np.ndarray) -> dict[str, Any]:
  """mIoU, mAcc, aAcc (percent) and per-class IoU / accuracy (NaN: undefined, left out of
  the means) of summed `intersect_and_union` counts [4, K]."""
  intersection, union, _, labelled = totals.astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersection / union
    acc = intersection / labelled
  return {"mIoU": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
          "mAcc": 100.0 * float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
          "aAcc": 100.0 * float(intersection.sum() / max(labelled.sum(), 1.0)),
          "iou": iou, "acc": acc}


def evaluator(run) -> Callable[..., dict[str, Any]]:
  """`evaluate(params, stats, prefix="eval")` -> {prefix}/mIoU, mAcc, aAcc, examples."""
  config = run.config
  seg = config.segmentation
  spec = run.spec

  @functools.partial(jax.jit, static_argnums=4)
  def predict(params, stats, rest, image, output_size):
    """Class map [1, H, W] of one image [1, h, w, 3]: one compiled call per shape."""
    model = spec.merge(spec.eval_graphdef, params, stats, rest)
    return segment(model, image, mode=seg.eval_mode, crop=seg.slide_crop,
                   stride=seg.slide_stride, scales=tuple(seg.eval_scales),
                   flip=bool(seg.eval_flip), output_size=output_size)

  def evaluate_params(params: Any, stats: Any = None, prefix: str = "eval") -> dict[str, Any]:
    if jax.process_count() > 1:
      raise NotImplementedError(
          "Segmentation evaluation runs in one process (each image has its own size); "
          "evaluate the checkpoint with --config.mode=eval on one host.")
    data, _ = _data().create_segmentation_eval_dataset(
        run.builder, split=config.eval_split, config=augment_config(config),
        threads=config.data_threads or None)
    totals = np.zeros((4, run.num_classes), np.int64)
    examples = 0
    with jax.default_matmul_precision(config.matmul_precision):
      for index, element in enumerate(data.as_numpy_iterator()):
        if 0 <= config.eval_steps <= index:
          break
        if not element["mask"][0]:
          continue
        label = element["label"][0]  # [H, W]
        prediction = predict(params, stats, run.rest, element["image"], label.shape)
        totals += intersect_and_union(np.asarray(prediction)[0], label, run.num_classes)
        examples += 1
    if examples == 0:
      raise ValueError(f"The evaluation split {config.eval_split!r} yielded no images; check "
                       "eval_split, data_dir and manual_dir.")
    values = segmentation_metrics(totals)
    _write_per_class(run.workdir, prefix, values, run.builder)
    return {f"{prefix}/mIoU": values["mIoU"], f"{prefix}/mAcc": values["mAcc"],
            f"{prefix}/aAcc": values["aAcc"], f"{prefix}/examples": examples}

  return evaluate_params


def _write_per_class(workdir: str, prefix: str, values: dict[str, Any], builder) -> None:
  if jax.process_index() != 0:
    return
  names = getattr(builder, "CLASS_NAMES", None) or [str(i) for i in range(len(values["iou"]))]
  clean = lambda a: [None if not np.isfinite(v) else round(100.0 * float(v), 4) for v in a]  # noqa: E731
  text = json.dumps({"classes": list(names), "IoU": clean(values["iou"]),
                     "Acc": clean(values["acc"]), "mIoU": values["mIoU"], "mAcc": values["mAcc"],
                     "aAcc": values["aAcc"]}, indent=1)
  storage.write_text(os.path.join(workdir, f"{prefix}_per_class.json"), text)
