"""One optimiser step: the task's inputs and loss (classification: mixup/cutmix and
soft-target cross-entropy), gradient accumulation, AdamW update, batch statistics and
parameter EMA, compiled once with fixed shardings and a donated state.
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

from focal_jax.training import optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.optim import ema_update
from focal_jax.training.tasks import get_task
from focal_jax.training.tasks.classification import (  # noqa: F401  (their former home)
    mix_groups, mixup_config, soft_cross_entropy)
from focal_jax.training.train_state import ModelSpec, TrainState


def make_train_step(config: ml_collections.ConfigDict, spec: ModelSpec,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: TrainState, rest_shardings: Any) -> Callable:
  """Returns jitted `step(state, batch, rest) -> (state, metrics)`; `state` is donated.

  batch: the task's (classification: {"image": float32 [B, H, W, 3], "label": int32 [B]}),
  global arrays sharded over the batch axes. With grad_accum_steps = A, example i belongs
  to micro-batch i % A, so each device holds an equal share of every micro-batch; gradients
  are averaged over the A micro-batches before clipping (the official code clips the
  running sum instead); batch statistics run through the micro-batches in order.
  """
  accum = config.grad_accum_steps
  micro = config.batch_size // accum
  task = get_task(config)
  hooks = task.train_hooks(config, spec, mesh)
  ema_decay = config.ema_decay
  precision = config.matmul_precision
  batch_sharding = sharding.batch_sharding(mesh)

  def loss_fn(params, stats, rest, inputs, key):
    model = spec.merge(spec.train_graphdef, params, stats, rest)
    nnx.reseed(model, dropout=key)
    loss = hooks.loss(model, inputs)
    new_stats = None if stats is None else nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    return loss, new_stats

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(params, stats, rest, batch, key):
    """-> (loss, batch statistics after this micro-batch, gradients)."""
    prepare_key, drop_key = jax.random.split(key)
    inputs = hooks.prepare(prepare_key, batch)
    (loss, stats), grads = grad_fn(params, stats, rest, inputs, drop_key)
    return loss, stats, grads

  def step(state: TrainState, batch: dict[str, jax.Array], rest: Any):
    # Products take their precision when traced, so the whole step (forward, backward,
    # update) is traced under the configured default.
    with jax.default_matmul_precision(precision):
      return precise_step(state, batch, rest)

  def precise_step(state: TrainState, batch: dict[str, jax.Array], rest: Any):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if accum == 1:
      loss, stats, grads = micro_step(state.params, state.batch_stats, rest, batch, key)
    else:
      # [B, ...] -> [A, B/A, ...] with micro-batch j = examples j, j+A, j+2A, ...
      micro_batches = jax.tree.map(
          lambda x: x.reshape(micro, accum, *x.shape[1:]).swapaxes(0, 1), batch)
      keys = jax.random.split(key, accum)

      def body(carry, xs):
        loss_sum, grad_sum, stats = carry
        loss, stats, grads = micro_step(state.params, stats, rest, *xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), stats), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads, stats), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zeros, state.batch_stats), (micro_batches, keys))
      loss = loss / accum
      grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema, batch_stats=stats)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    return new_state, metrics

  return jax.jit(
      step,
      in_shardings=(state_shardings, {key: batch_sharding for key in task.BATCH_KEYS},
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
    batch = get_task(config).abstract_batch(config, config.batch_size,
                                            sharding.batch_sharding(mesh))
    rest = ts.with_shardings(spec.abstract_rest, self.rest_shardings)
    return ts.with_shardings(self.abstract, self.shardings), batch, rest


def step_setup(config: ml_collections.ConfigDict, spec: ModelSpec, mesh: Mesh,
               steps_per_epoch: int, total_steps: int) -> StepSetup:
  """Schedule, optimiser and shardings of a run (needs no data: the step counts only set
  the schedule's constants)."""
  schedule = optim.schedule_fn(config, steps_per_epoch, total_steps)
  tx = optim.make_optimizer(config, schedule, get_task(config).decay_mask(spec))
  abstract, shardings = ts.state_shardings(tx, spec, mesh, config.ema_decay > 0)
  rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), spec.abstract_rest)
  return StepSetup(schedule, tx, abstract, shardings, rest_shardings)
