"""Tasks: what differs between learning one label per image and one per pixel.

A task owns its model builder, its batch format and input pipeline, the loss, evaluation
and the abstract batch that ahead-of-time compilation lowers with; `config.task` picks
one. Everything else (checkpoints, resume, sharding, EMA, logging, the memory check) is
shared and asks the task:

    task = get_task(config)
    task.model_spec(config, num_classes)          # ModelSpec: builder, graphdefs, shapes
    task.description(spec)                        # model.json of exports and checkpoints
    task.get_builder / num_classes / steps_per_epoch / records_per_epoch /
        train_batches / eval_examples             # the data
    task.batch_keys, task.abstract_batch(config, batch_size, sharding)
    task.train_hooks(config, spec, mesh)          # StepHooks(prepare, loss) for the step
    task.decay_mask(spec)                         # params -> bools: where weight decay applies
    task.pretrained_params(spec, shardings, source, exclude, read_checkpoint)
    task.evaluator(run)                           # (params, stats, prefix) -> records
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from focal_jax.training.config import TASKS


@dataclasses.dataclass(frozen=True)
class StepHooks:
  """The task's part of a train step, for one micro-batch.

  prepare(key, batch) -> inputs: outside the gradient (e.g. mixup), with the step's key.
  loss(model, inputs) -> float32 []: the model (train mode, dropout reseeded) on inputs.
  """

  prepare: Callable[[Any, dict[str, Any]], Any]
  loss: Callable[[Any, Any], Any]


def get_task(config: ml_collections.ConfigDict | str):
  """The task module of `config.task` (or of a task name)."""
  name = config if isinstance(config, str) else config.get("task", "classification")
  if name == "classification":
    from focal_jax.training.tasks import classification  # noqa: PLC0415
    return classification
  if name == "segmentation":
    from focal_jax.training.tasks import segmentation  # noqa: PLC0415
    return segmentation
  raise ValueError(f"task={name!r}; expected one of {TASKS}.")


__all__ = ["StepHooks", "get_task"]
