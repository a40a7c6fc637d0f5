"""Resuming a run: what a checkpoint carries besides the train state, and reading it back.

A checkpoint's metadata holds each process's data position (the next record to read), the
images it skipped, and the losses of the log interval the checkpoint cuts, so a resumed run
reads the same records and logs the same means as an uninterrupted one. `restore_latest`
restores the newest checkpoint that reads back, moving damaged ones aside; a checkpoint that
does not fit this config names the config's changes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from focal_jax.training import checkpoint, preflight
from focal_jax.training import train_state as ts
from focal_jax.training.run_state import Run

# Checkpoint metadata key: the training losses of the log interval the checkpoint cuts.
INTERVAL_LOSSES = "log_interval_losses"


class DataTracker:
  """This process's place in its training stream (the next record to read) and the
  undecodable images it has skipped, from the positions the batches carry."""

  def __init__(self, position: tuple[int, int], records_per_epoch: int, skipped: int = 0):
    self.records_per_epoch = records_per_epoch
    self.next_record = position[0] * records_per_epoch + position[1]  # over all epochs
    self.skipped = skipped

  @classmethod
  def from_meta(cls, meta: dict[str, Any], step: int, records_per_epoch: int,
                steps_per_epoch: int) -> DataTracker:
    """Where this process continues after checkpoint `step` (its `meta`)."""
    positions, skipped = meta.get("data_position"), meta.get("skipped_images")
    if positions is not None and len(positions) == jax.process_count():
      index = jax.process_index()
      return cls(tuple(positions[index]), records_per_epoch, int(skipped[index]))
    if positions is not None:
      logging.warning("The checkpoint was written by %d processes and this run has %d: each "
                      "process's data share changes, so the data continues from step %d's "
                      "nominal position.", len(positions), jax.process_count(), step)
    epoch, within = divmod(step, steps_per_epoch)
    return cls((epoch, within * (records_per_epoch // steps_per_epoch)), records_per_epoch)

  @property
  def position(self) -> tuple[int, int]:
    return divmod(self.next_record, self.records_per_epoch)

  def consume(self, batch: dict[str, np.ndarray]) -> None:
    linear = batch["epoch"].astype(np.int64) * self.records_per_epoch + batch["position"]
    last = int(linear[-1])
    skipped = last + 1 - self.next_record - len(linear)
    if skipped:
      self.skipped += skipped
      logging.warning("Skipped %d training image(s) that could not be decoded (epoch %d, before "
                      "record %d of this process's share); %d so far.", skipped,
                      last // self.records_per_epoch, last % self.records_per_epoch, self.skipped)
    self.next_record = last + 1


def gather_ints(values: list[int]) -> np.ndarray:
  """int64 [processes, len(values)]: every process's `values` (a collective)."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


def checkpoint_meta(run: Run, step: int, data: DataTracker, interval_losses: list[float]
                    ) -> dict[str, Any]:
  """The checkpoint's metadata (a collective: every process's data position); `interval_losses`:
  the losses of the steps since the last log step, so that a resumed run logs the same mean at
  the next one."""
  positions = gather_ints([*data.position, data.skipped])
  return {"step": step, "data_step": step, "model": run.description,
          INTERVAL_LOSSES: [float(loss) for loss in interval_losses],
          "data_position": positions[:, :2].tolist(), "skipped_images": positions[:, 2].tolist(),
          "ema": run.use_ema, "steps_per_epoch": run.steps_per_epoch,
          "total_steps": run.total_steps,
          "config": json.loads(run.config.to_json_best_effort())}


def saved_interval_losses(meta: dict[str, Any]) -> list[float]:
  """The losses of the log interval the checkpoint cut (none for a fresh run)."""
  return meta.get(INTERVAL_LOSSES, [])


def restore_latest(run: Run, ckpt: checkpoint.Checkpointer
                   ) -> tuple[ts.TrainState, dict[str, Any], int] | None:
  """(state, meta, step) of the newest checkpoint that reads back; None without one.

  A step that cannot be read (a missing or truncated file) is moved to
  `<workdir>/damaged_checkpoints/` with a warning, and the previous one is tried. A
  checkpoint of another model or setup is an error (never skipped: the older ones would
  not fit either).
  """
  target = ts.with_shardings(run.abstract, run.shardings)
  moved = []
  for step in reversed(ckpt.all_steps()):
    where = os.path.join(ckpt.directory, str(step))
    restored, problem = None, None
    try:
      meta = ckpt.read_meta(step)
    except Exception as error:  # noqa: BLE001  any read failure means a damaged step
      problem = error
    if problem is None:
      run.check_model(meta, where)
      run.check_setup(meta, where)
      check_state_fits(run, ckpt, step, meta, target)
      try:
        restored = ckpt.restore(step, target)
      except Exception as error:  # noqa: BLE001
        problem = error
    if preflight.all_processes_ok(problem is None):
      state, meta = restored
      checkpoint.log_restore(step, meta)
      if moved:
        logging.warning("Resumed from step %d, the newest complete checkpoint.", step)
      return state, meta, step
    reason = (f"{type(problem).__name__}: {problem}" if problem is not None
              else "another process could not read it")
    aside = ckpt.set_aside(step)
    logging.warning("Checkpoint %s cannot be read (%s). Moved it to %s; trying the one before.",
                    where, reason, aside)
    moved.append(aside)
  if moved:
    raise RuntimeError(
        f"No checkpoint in {ckpt.directory} can be read; the damaged ones are now in "
        f"{os.path.dirname(moved[0])}. Rerun to start from scratch, or put intact copies back.")
  return None


def check_state_fits(run: Run, ckpt: checkpoint.Checkpointer, step: int, meta: dict[str, Any],
                     target: Any) -> None:
  """The saved arrays (from their metadata) against the state this config builds."""
  try:
    saved = ckpt.state_shapes(step)
  except Exception:  # noqa: BLE001  unreadable metadata: restoring tells if the step is damaged
    return
  differences = checkpoint.state_differences(saved, target)
  if differences:
    changes = config_changes(meta.get("config") or {}, run.config)
    raise ValueError(
        f"The checkpoint in {ckpt.directory}/{step} does not fit the train state this config "
        f"builds: {'; '.join(differences)}. "
        + (f"This config differs from the checkpoint's in {changes}. " if changes else "")
        + "Resume with the settings it was written with (in its meta and in "
        f"{run.workdir}/config.json), or use another workdir.")


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict, limit: int = 6
                   ) -> str:
  """'ema_decay 0.0 -> 0.99, grad_clip_norm 5.0 -> 0.0': saved config against this one."""
  def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict) and f"{prefix}{key}" != "model.overrides":
        out.update(flatten(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value
    return out

  mine = flatten(json.loads(config.to_json_best_effort()))
  theirs = flatten(saved)
  changed = [f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in sorted(set(mine) & set(theirs))
             if mine[k] != theirs[k]]
  return ", ".join(changed[:limit]) + (f" (+{len(changed) - limit} more)"
                                       if len(changed) > limit else "")
