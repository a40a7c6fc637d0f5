"""One optimiser step: mixup/cutmix, soft-target cross-entropy, gradient accumulation,
AdamW update and parameter EMA, compiled once with fixed shardings and a donated state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from focal_jax.data.mixup import MixupConfig, mixup_cutmix, smooth_one_hot
from focal_jax.models.batch_split import split_batch
from focal_jax.training import optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import mixup_group_size
from focal_jax.training.optim import ema_update
from focal_jax.training.train_state import ModelSpec, TrainState


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


def make_train_step(config: ml_collections.ConfigDict, spec: ModelSpec,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState, rest_shardings: Any) -> Callable:
  """Returns jitted `step(state, batch, rest) -> (state, metrics)`; `state` is donated.

  batch: {"image": float32 [B, H, W, 3], "label": int32 [B]}, global arrays sharded over the
  batch axes. With grad_accum_steps = A, example i belongs to micro-batch i % A, so each
  device holds an equal share of every micro-batch; gradients are averaged over the A
  micro-batches before clipping (the official code clips the running sum instead).
  """
  accum = config.grad_accum_steps
  micro = config.batch_size // accum
  mix_cfg = mixup_config(config)
  group = mixup_group_size(config)
  num_classes = spec.num_classes
  ema_decay = config.ema_decay
  precision = config.matmul_precision
  batch_sharding = sharding.batch_sharding(mesh)

  def loss_fn(params, rest, images, targets, key):
    model = nnx.merge(spec.train_graphdef, params, rest)
    nnx.reseed(model, dropout=key)
    with split_batch(batch_sharding):
      logits = model(images)  # [b, K]
    return soft_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def micro_step(params, rest, images, labels, key):
    mix_key, drop_key = jax.random.split(key)
    images, targets = mix_groups(mix_key, images, labels, num_classes, mix_cfg, group)
    # The model's input is split over the devices by example, whatever the groups: a group
    # that straddles devices, or parameters sharded by FSDP, would otherwise let XLA's
    # sharding propagation replicate the whole forward pass on every device.
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
    targets = jax.lax.with_sharding_constraint(targets, batch_sharding)
    return grad_fn(params, rest, images, targets, drop_key)

  def step(state: TrainState, batch: dict[str, jax.Array], rest: Any):
    # Products take their precision when traced, so the whole step (forward, backward,
    # update) is traced under the configured default.
    with jax.default_matmul_precision(precision):
      return precise_step(state, batch, rest)

  def precise_step(state: TrainState, batch: dict[str, jax.Array], rest: Any):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    images, labels = batch["image"], batch["label"]
    if accum == 1:
      loss, grads = micro_step(state.params, rest, images, labels, key)
    else:
      # [B, ...] -> [A, B/A, ...] with micro-batch j = examples j, j+A, j+2A, ...
      images = images.reshape(micro, accum, *images.shape[1:]).swapaxes(0, 1)
      labels = labels.reshape(micro, accum).swapaxes(0, 1)
      keys = jax.random.split(key, accum)

      def body(carry, xs):
        loss_sum, grad_sum = carry
        loss, grads = micro_step(state.params, rest, *xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                      (images, labels, keys))
      loss = loss / accum
      grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return new_state, metrics

  return jax.jit(
      step,
      in_shardings=(state_shardings, {"image": batch_sharding, "label": batch_sharding},
                    rest_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """What the train step of a run is built from: schedule, optimiser, the train state's
  shapes and shardings, and the shardings of the model's non-parameter state."""

  schedule: optax.Schedule
  tx: optax.GradientTransformation
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings
  rest_shardings: Any

  def train_step(self, config: ml_collections.ConfigDict, spec: ModelSpec, mesh: Mesh
                 ) -> Callable:
    return make_train_step(config, spec, self.tx, self.schedule, mesh, self.shardings,
                           self.rest_shardings)

  def abstract_arguments(self, config: ml_collections.ConfigDict, spec: ModelSpec, mesh: Mesh
                         ) -> tuple[Any, Any, Any]:
    """(state, batch, rest) as ShapeDtypeStructs with their shardings: what the train step
    is lowered with when no data or parameters exist (ahead-of-time compilation)."""
    size = config.image_size
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32,
                                           sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                           sharding=batch_sharding)}
    rest = ts.with_shardings(spec.abstract_rest, self.rest_shardings)
    return ts.with_shardings(self.abstract, self.shardings), batch, rest


def step_setup(config: ml_collections.ConfigDict, spec: ModelSpec, mesh: Mesh,
               steps_per_epoch: int, total_steps: int) -> StepSetup:
  """Schedule, optimiser and shardings of a run (needs no data: the step counts only set
  the schedule's constants)."""
  schedule = optim.schedule_fn(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config, schedule)
  abstract, shardings = ts.state_shardings(tx, spec, mesh, config.ema_decay > 0)
  rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), spec.abstract_rest)
  return StepSetup(schedule, tx, abstract, shardings, rest_shardings)
