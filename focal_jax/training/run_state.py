"""The run: what it builds once (model spec, mesh, data, shardings, optimiser, eval step)
and the checks that a checkpoint was written by the same model and setup.

`Run(config, workdir)` is cheap (no dataset preparation, no compilation), so a checkpoint of
another model or setup is refused before `prepare()` does the expensive part.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from focal_jax.training import checkpoint, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.tasks import get_task
from focal_jax.training.train_step import step_setup


class Run:
  """Everything a run builds once: model, mesh, data, shardings, optimiser, steps.

  The constructor is cheap (no dataset preparation, no compilation), so the checks that
  need the model run before `prepare()` does the expensive part.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    divisor = sharding.batch_divisor(self.mesh)
    if config.batch_size % divisor:
      raise ValueError(
          f"batch_size={config.batch_size} is not a multiple of the {divisor} devices the batch "
          f"is split over (mesh data x fsdp); use a multiple of {divisor}.")
    self.task = get_task(config)
    self.builder = self.task.get_builder(config, prepare=False)
    self.num_classes = self.task.num_classes(self.builder)
    self.spec = self.task.model_spec(config, self.num_classes)
    self.use_ema = config.ema_decay > 0
    self.description = self.task.description(self.spec)

  def prepare(self) -> None:
    """Prepares the dataset (first use) and builds schedule, optimiser, shardings, eval step."""
    config = self.config
    self.builder = self.task.get_builder(config)
    self.steps_per_epoch = self.task.steps_per_epoch(self.builder, config)
    if config.num_train_steps > 0:
      self.total_steps = int(config.num_train_steps)
    else:
      self.total_steps = max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
    self.setup = step_setup(config, self.spec, self.mesh, self.steps_per_epoch, self.total_steps)
    self.schedule, self.tx = self.setup.schedule, self.setup.tx
    self.abstract, self.shardings = self.setup.abstract, self.setup.shardings
    self.rest = ts.init_rest(self.spec, self.mesh)
    self.rest_shardings = self.setup.rest_shardings
    self.evaluator = self.task.evaluator(self)
    logging.info("Model %s: %d classes, %d parameters; mesh %s; %d steps (%d per epoch).",
                 self.spec.name or "custom", self.num_classes, self.num_params(),
                 dict(self.mesh.shape), self.total_steps, self.steps_per_epoch)

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in
               jax.tree.leaves(nnx.to_pure_dict(self.spec.abstract_params)))

  def checkpoint_bytes(self) -> int:
    """Bytes a checkpoint (parameters, two Adam moments, EMA) and the export take."""
    return 4 * self.num_params() * (4 + self.use_ema)  # float32

  def evaluate(self, params: Any, stats: Any = None, prefix: str = "eval") -> dict[str, Any]:
    """The task's evaluation of these parameters (and batch statistics)."""
    return self.evaluator(params, stats, prefix)

  def evaluate_all(self, state: ts.TrainState) -> dict[str, Any]:
    results = self.evaluate(state.params, state.batch_stats)
    if state.ema_params is not None:
      results.update(self.evaluate(state.ema_params, state.batch_stats, "eval_ema"))
    return results

  def variables(self, state: ts.TrainState) -> Any:
    """What an export holds: the parameters and the batch statistics (if any)."""
    return ts.model_variables(state.params, state.batch_stats)

  def check_model(self, meta: dict[str, Any], where: str) -> None:
    """A checkpoint of another model is an error, not a silent shape mismatch."""
    saved = meta.get("model")
    mine = self.description
    fields = lambda d: (d.get("task", "classification"), d.get("model"),  # noqa: E731
                        d.get("num_classes"), d.get("overrides"))
    if saved is not None and fields(saved) != fields(mine):
      raise ValueError(
          f"The checkpoint in {where} is of another model: {json.dumps(saved)}; this config "
          f"builds {json.dumps(mine)}. Use another workdir, or a config for that model.")

  def check_setup(self, meta: dict[str, Any], where: str) -> None:
    """Settings that change what the train state holds (EMA parameters, the clipping
    state) must match the checkpoint's."""
    saved = meta.get("config") or {}
    changed = []
    if "ema" in meta and bool(meta["ema"]) != self.use_ema:
      changed.append(f"ema_decay={saved.get('ema_decay', 'on' if meta['ema'] else 0.0)} (EMA "
                     f"{'on' if meta['ema'] else 'off'}), this config ema_decay="
                     f"{self.config.ema_decay}")
    clip = saved.get("grad_clip_norm")
    if clip is not None and (clip > 0) != (self.config.grad_clip_norm > 0):
      changed.append(f"grad_clip_norm={clip}, this config grad_clip_norm="
                     f"{self.config.grad_clip_norm}")
    if changed:
      raise ValueError(
          f"The checkpoint in {where} was written with {'; '.join(changed)}. Switching EMA or "
          "gradient clipping on or off changes the train state, so the run cannot resume from "
          "it: set these back to the checkpoint's values, or use another workdir.")

  def check_latest_checkpoint(self, ckpt: checkpoint.Checkpointer) -> None:
    """Refuses a workdir whose newest readable checkpoint is of another model or setup
    (before the dataset is prepared)."""
    for step in reversed(ckpt.all_steps()):
      try:
        meta = ckpt.read_meta(step)
      except Exception:  # noqa: BLE001  damaged: dealt with when restoring
        continue
      where = os.path.join(ckpt.directory, str(step))
      self.check_model(meta, where)
      self.check_setup(meta, where)
      return
