"""Image classification: {"image", "label": int32 [B]} batches, mixup/cutmix with label
smoothing, soft-target cross-entropy, top-1/top-5 evaluation (the official ImageNet recipe).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from focal_jax import models, weights
from focal_jax.data.mixup import MixupConfig, mixup_cutmix, smooth_one_hot
from focal_jax.models.batch_split import split_batch
from focal_jax.training import evaluate, input, optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import mixup_group_size
from focal_jax.training.tasks import StepHooks

BATCH_KEYS = ("image", "label")
build = models.create_model


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)): [B, K], [B, K] -> [B] (timm's
  SoftTargetCrossEntropy before the mean), in float32 whatever the logits' dtype. Soft
  (one-hot or mixed) targets: no gather, unlike integer labels."""
  return optax.losses.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def mixup_config(config: ml_collections.ConfigDict) -> MixupConfig:
  m = config.mixup
  return MixupConfig(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                     switch_prob=m.switch_prob, label_smoothing=m.label_smoothing)


def mix_groups(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
               config: MixupConfig, group_size: int) -> tuple[jax.Array, jax.Array]:
  """Mixup/CutMix per group of `group_size` consecutive examples, one draw per group
  (timm mixes each GPU's batch). images [B, H, W, C], labels [B] -> (images, targets [B, K])."""
  if not config.enabled:
    return images, smooth_one_hot(labels, num_classes, config.label_smoothing)
  batch = images.shape[0]
  groups = batch // group_size
  keys = jax.random.split(key, groups)
  grouped = images.reshape(groups, group_size, *images.shape[1:])  # [G, g, H, W, C]
  mixed, targets = jax.vmap(
      lambda k, x, y: mixup_cutmix(k, x, y, num_classes, config))(
          keys, grouped, labels.reshape(groups, group_size))
  return mixed.reshape(images.shape), targets.reshape(batch, num_classes)


def model_spec(config: ml_collections.ConfigDict, num_classes: int) -> ts.ModelSpec:
  return ts.model_spec_from_config(config, num_classes, build)


def description(spec: ts.ModelSpec) -> dict[str, Any]:
  return weights.model_description(spec.name, spec.num_classes, spec.img_size,
                                   spec.json_overrides())


# The data: focal_jax.training.input (TFDS image classification datasets).
def get_builder(config: ml_collections.ConfigDict, prepare: bool = True):
  return input.get_builder(config, prepare=prepare)


def num_classes(builder) -> int:
  return input.num_classes(builder)


def steps_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  return input.steps_per_epoch(builder, config)


def records_per_epoch(builder, config: ml_collections.ConfigDict) -> int:
  return input.records_per_epoch(builder, config)


def train_batches(builder, config: ml_collections.ConfigDict, start_step: int,
                  start_position: tuple[int, int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  return input.train_batches(builder, config, start_step, start_position)


def eval_examples(builder, config: ml_collections.ConfigDict) -> int:
  return input.eval_examples(builder, config)


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int,
                   batch_sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The train step's batch as ShapeDtypeStructs: images [B, S, S, 3], labels [B]."""
  size = config.image_size
  return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32,
                                        sharding=batch_sharding),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch_sharding)}


def train_hooks(config: ml_collections.ConfigDict, spec: ts.ModelSpec, mesh: Mesh) -> StepHooks:
  """Mixup/cutmix per group outside the gradient; the mean soft-target cross-entropy."""
  mix_cfg = mixup_config(config)
  group = mixup_group_size(config)
  batch_sharding = sharding.batch_sharding(mesh)

  def prepare(key, batch):
    images, targets = mix_groups(key, batch["image"], batch["label"], spec.num_classes,
                                 mix_cfg, group)
    # The model's input is split over the devices by example, whatever the groups: a group
    # that straddles devices, or parameters sharded by FSDP, would otherwise let XLA's
    # sharding propagation replicate the whole forward pass on every device.
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
    targets = jax.lax.with_sharding_constraint(targets, batch_sharding)
    return images, targets

  def loss(model, inputs):
    images, targets = inputs
    with split_batch(batch_sharding):
      logits = model(images)  # [b, K]
    return soft_cross_entropy(logits, targets).mean()

  return StepHooks(prepare, loss)


def decay_mask(spec: ts.ModelSpec) -> Callable[[Any], Any]:
  """The official rule of the model's family (optim.DECAY_RULES)."""
  return optim.weight_decay_mask_for(spec.name)


def pretrained_params(spec: ts.ModelSpec, params_shardings: Any, source: str,
                      exclude: tuple[str, ...] = (),
                      read_checkpoint: ts.CheckpointReader = ts.read_export_only) -> Any:
  return ts.pretrained_params(spec, params_shardings, source, exclude, read_checkpoint)


def evaluator(run) -> Callable[..., dict[str, Any]]:
  """`evaluate(params, stats, prefix="eval")` -> eval/top1, eval/top5, eval/loss,
  eval/examples (eval/skipped on a full pass) over the eval split."""
  config = run.config
  batch_size = evaluate.eval_batch_size(config.eval_batch_size or config.batch_size, run.mesh)
  eval_step = evaluate.make_eval_step(run.spec, run.mesh, run.shardings.params,
                                      run.rest_shardings, config.matmul_precision)

  def evaluate_params(params: Any, stats: Any = None, prefix: str = "eval") -> dict[str, Any]:
    del stats  # the classifier has none
    batches, _ = input.eval_batches(run.builder, config, batch_size)
    results = evaluate.evaluate(eval_step, params, run.rest, batches, run.mesh,
                                config.eval_steps)
    if config.eval_steps < 0:  # a full pass: images that did not decode were skipped
      skipped = input.eval_examples(run.builder, config) - results["eval/examples"]
      results["eval/skipped"] = skipped
      if skipped:
        logging.warning("%d image(s) of the eval split %r could not be decoded and were left "
                        "out of the evaluation.", skipped, config.eval_split)
    return {k.replace("eval/", f"{prefix}/"): v for k, v in results.items()}

  return evaluate_params
