"""`train_and_evaluate(config, workdir)`: the whole run, resumable by running it again.

    config checks -> model spec -> workdir checks -> checkpoint compatibility ->
    dataset -> mesh + shardings -> restore the newest readable checkpoint or init ->
    for each step: batch -> train step -> log / evaluate / checkpoint -> final save, export.

Everything that can be refused (config, workdir, a checkpoint of another model or setup)
is refused before the dataset is prepared or anything is compiled. Each step's loss and
gradient norm are read back two steps later (the device keeps working meanwhile); a
non-finite one stops the run naming its step, before anything non-finite is saved. SIGTERM
saves and stops; with several processes the stop is agreed through a one-flag all-reduce per
step, so every process saves the same step.

`config.mode = "eval"` evaluates a checkpoint (or an export) instead of training.

Beside it: `process` (distributed start, log filtering, SIGTERM), `run_state` (what a run
builds, and the checks that a checkpoint is of this model and setup), `resume` (restoring
the newest readable checkpoint, the data position and interval losses it carries).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from focal_jax import pretrained, storage, weights
from focal_jax.training import checkpoint, memory, metrics, preflight, process, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import mixup_group_size, validate_config
from focal_jax.training.resume import (DataTracker, checkpoint_meta, gather_ints,
                                       restore_latest, saved_interval_losses)
from focal_jax.training.run_state import Run
from focal_jax.training.train_step import make_train_step

CHECKPOINT_DIR = weights.CHECKPOINT_DIR
EXPORT_DIR = weights.EXPORT_DIR
# Steps dispatched but not yet read back (outside log, eval and save steps): enough to keep
# the device busy while the host fetches the next batch.
IN_FLIGHT = 2


@dataclasses.dataclass
class RunResult:
  """What a run ended with: the step, the state (None in eval mode) and the last eval."""

  step: int
  state: ts.TrainState | None
  eval_metrics: dict[str, Any]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       read_checkpoint: ts.CheckpointReader = ts.read_export_only) -> RunResult:
  """Trains (or, with config.mode='eval', evaluates) as `config` says, in `workdir`.

  `read_checkpoint` reads `config.init_from`: parameter exports by default; official weight
  files with `focal_jax.read_checkpoint_params` (what `main.py` passes), which knows the
  official names.

  Rerunning the same call resumes from the latest checkpoint in `<workdir>/checkpoints`
  (parameters, optimiser, EMA, step, RNG and data position) and ends where an uninterrupted
  run would.
  """
  validate_config(config)
  process.quiet_library_logs()
  process.maybe_initialize_distributed(config)
  workdir = storage.absolute(workdir)  # a local directory or a bucket (gs://...)
  run = Run(config, workdir)
  training = config.mode != "eval"
  preflight.check_workdir(workdir, run.checkpoint_bytes() if training else 0,
                          config.keep_checkpoints if training else 0)
  if not training:
    return _eval_mode(run)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
  try:
    run.check_latest_checkpoint(ckpt)
    if config.init_from and ckpt.latest_step() is None:
      pretrained.check_checkpoint_path(config.init_from)
    run.prepare()
  except BaseException:
    ckpt.close()
    raise
  return _train(run, ckpt, read_checkpoint)


def _train(run: Run, ckpt: checkpoint.Checkpointer,
           read_checkpoint: ts.CheckpointReader) -> RunResult:
  config, workdir = run.config, run.workdir
  writer = None
  try:
    restored = restore_latest(run, ckpt)
    if restored is None:
      params = None
      if config.init_from:  # fine-tuning: a fresh run starts from these weights
        params = run.task.pretrained_params(run.spec, run.shardings.params, config.init_from,
                                            tuple(config.init_from_exclude), read_checkpoint)
        logging.info("Initialised from %s.", config.init_from)
      state, meta, last_saved = ts.create_train_state(
          run.spec, run.tx, run.shardings, run.mesh, config.seed, params), {}, None
    else:
      state, meta, last_saved = restored
    start = int(jax.device_get(state.step))
    data = DataTracker.from_meta(meta, start, run.task.records_per_epoch(run.builder, config),
                                run.steps_per_epoch)
    writer = metrics.MetricWriter(workdir, resume_step=start)
    if jax.process_index() == 0:
      storage.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    step, state, last_eval = _steps(run, ckpt, writer, state, start, data, last_saved,
                                    saved_interval_losses(meta))
    ckpt.wait()
    if step >= run.total_steps and config.export_params:
      path = weights.export_params(os.path.join(workdir, EXPORT_DIR), run.variables(state),
                                   run.description)
      logging.info("Exported the parameters for inference / conversion to %s.", path)
  finally:  # an error still lets the save in flight finish: the last checkpoint stays whole
    if writer is not None:
      writer.close()
    ckpt.close()
  metrics.plot_curves(workdir)
  return RunResult(step=step, state=state, eval_metrics=last_eval)


def _steps(run: Run, ckpt: checkpoint.Checkpointer, writer: metrics.MetricWriter,
           state: ts.TrainState, start: int, data: DataTracker, last_saved: int | None,
           interval_losses: list[float]) -> tuple[int, ts.TrainState, dict[str, Any]]:
  """The training steps from `start`: -> (last step, state, last eval).

  `train/loss` at a log step is the mean loss of the steps since the previous log step.
  A checkpoint carries the losses of the interval it cuts (`interval_losses` on resume),
  so the mean is the one an uninterrupted run logs, wherever the run was stopped: a stop
  (SIGTERM) writes no record of its own, and SIGKILL loses nothing a checkpoint holds.
  """
  config = run.config
  train_step = make_train_step(config, run.spec, run.tx, run.schedule, run.mesh, run.shardings,
                               run.rest_shardings)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else run.steps_per_epoch
  last_eval: dict[str, Any] = {}
  step = start
  if start >= run.total_steps:
    logging.info("Checkpoint step %d already reaches num_train_steps=%d.", start, run.total_steps)
    return step, state, last_eval
  batches = run.task.train_batches(run.builder, config, start, data.position)
  # Several processes stop together: each step carries every process's SIGTERM flag.
  vote = sharding.any_process_flag(run.mesh) if jax.process_count() > 1 else None
  in_flight: collections.deque = collections.deque()  # (step, metrics, vote) not read back yet
  # Metrics read back since the last log step (only the loss of steps before a resume).
  settled: list[dict[str, float]] = [{"loss": float(loss)} for loss in interval_losses]

  def settle(keep: int) -> bool:
    """Reads back all but the newest `keep` steps; raises at a non-finite loss or gradient
    norm. Returns whether any process asked to stop in those steps."""
    stop_voted = False
    while len(in_flight) > keep:
      number, values, voted = in_flight.popleft()
      values = {k: float(v) for k, v in jax.device_get(values).items()}
      if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise FloatingPointError(
            f"Step {number}: the training loss is {values['loss']} and the gradient norm "
            f"{values['grad_norm']}; stopping before anything non-finite is saved. The last "
            f"checkpoint ({'step ' + str(last_saved) if last_saved else 'none yet'}) is intact "
            "and a rerun resumes from it: lower base_lr, keep grad_clip_norm > 0, or check the "
            f"data of step {number}.")
      settled.append(values)
      stop_voted |= voted is not None and bool(jax.device_get(voted))
    return stop_voted

  interval_start, interval_steps = time.time(), 0
  with process.StopRequest() as stop:
    while step < run.total_steps:
      local = next(batches)
      data.consume(local)
      batch = sharding.global_batch({key: local[key] for key in run.task.BATCH_KEYS}, run.mesh)
      if step == start:
        train_step = _fitting_step(run, train_step, state, batch)
      state, step_metrics = train_step(state, batch, run.rest)
      step += 1
      interval_steps += 1
      in_flight.append((step, step_metrics, vote(stop.requested) if vote else None))
      if step == start + 1:
        jax.block_until_ready(step_metrics)
        logging.info("First step (compilation included) took %.1f s.", time.time() - interval_start)
        interval_start, interval_steps = time.time(), 0
      is_last = step == run.total_steps
      log_now = step % config.log_every_steps == 0 or is_last
      eval_now = step % eval_every == 0 or is_last
      save_now = (config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0
                  ) or is_last
      stopping = vote is None and stop.requested  # one process: its own signal decides
      # Earlier steps are read back while the newest ones run; all of them before a save.
      if settle(0 if (log_now or eval_now or save_now or stopping) else IN_FLIGHT):
        stopping = True
        settle(0)
      if log_now:
        elapsed = time.time() - interval_start
        seconds_per_step = elapsed / max(interval_steps, 1)
        record = {"train/loss": sum(m["loss"] for m in settled) / len(settled),
                  "train/lr": settled[-1]["lr"], "train/grad_norm": settled[-1]["grad_norm"],
                  "train/img_per_sec": (config.batch_size / seconds_per_step
                                        if interval_steps else 0.0),
                  "train/epoch": step / run.steps_per_epoch,
                  "train/skipped_images": int(gather_ints([data.skipped]).sum())}
        settled.clear()
        writer.write(step, record)
        logging.info(metrics.progress_line(step, run.total_steps, record["train/loss"],
                                           record["train/lr"], record["train/img_per_sec"],
                                           seconds_per_step))
        interval_start, interval_steps = time.time(), 0
      if eval_now:
        last_eval = run.evaluate_all(state)
        writer.write(step, last_eval)
        logging.info("eval at step %d: %s", step, _format(last_eval))
        interval_start, interval_steps = time.time(), 0
      if save_now or stopping:
        ckpt.save(step, state, checkpoint_meta(run, step, data, [m["loss"] for m in settled]))
        last_saved = step
      if stopping:
        logging.warning("Stopped at step %d of %d after SIGTERM; rerun the same command to "
                        "continue.", step, run.total_steps)
        break
  return step, state, last_eval


def _fitting_step(run: Run, train_step: Any, state: ts.TrainState, batch: dict[str, jax.Array]
                  ) -> Any:
  """The train step compiled for the first batch, after checking that it fits in device
  memory (config.device_memory_bytes, or the device's capacity on an accelerator); raises
  memory.StepTooLarge, naming the largest batch that fits, when it does not. Unchecked (the
  jitted step as is) on the CPU unless a capacity is configured."""
  config = run.config
  capacity = config.device_memory_bytes or None
  if capacity is None:
    if jax.default_backend() == "cpu":
      return train_step
    capacity = memory.device_capacity(run.mesh.devices.flat[0])
    if capacity is None:
      logging.info("The devices do not report their memory; the train step is not checked.")
      return train_step

  def step_at_batch(batch_size: int):
    other = ml_collections.ConfigDict(config.to_dict())
    other.batch_size = batch_size
    step = make_train_step(other, run.spec, run.tx, run.schedule, run.mesh, run.shardings,
                           run.rest_shardings)
    return step, run.setup.abstract_arguments(other, run.spec, run.mesh)

  # Smaller batches keep whole micro-batches of whole mixup groups on every device.
  quantum = config.grad_accum_steps * math.lcm(sharding.batch_divisor(run.mesh),
                                               mixup_group_size(config))
  return memory.check_step_fits(train_step, (state, batch, run.rest), capacity,
                                config.batch_size, step_at_batch, quantum)


def _eval_mode(run: Run) -> RunResult:
  """Evaluates config.checkpoint_path: an export dir, a checkpoint step dir or a
  checkpoints dir (its latest step); default: the latest checkpoint of the workdir."""
  config, workdir = run.config, run.workdir
  path = storage.absolute(config.checkpoint_path or os.path.join(workdir, CHECKPOINT_DIR))
  if weights.is_export(path):
    description = weights.read_description(path)
    run.check_model({"model": description}, path)
    run.prepare()
    target = ts.with_shardings(
        ts.model_variables(run.abstract.params, run.abstract.batch_stats),
        ts.model_variables(run.shardings.params, run.shardings.batch_stats))
    params, stats = ts.split_variables(weights.load_exported_params(path, target),
                                       run.spec.abstract_stats)
    step, results = -1, run.evaluate(params, stats)
  else:
    directory, step = path, None
    if os.path.basename(path).isdigit() and not storage.isdir(os.path.join(path, "0")):
      directory, step = os.path.dirname(path), int(os.path.basename(path))
    if not storage.isdir(directory):
      raise FileNotFoundError(
          f"No checkpoint at {path}: expected an export directory (with "
          f"{weights.MODEL_JSON}), a checkpoints directory or one step of it.")
    # Never clean up here: a run may be writing into this directory right now.
    ckpt = checkpoint.Checkpointer(directory, keep=0, async_save=False, cleanup=False)
    try:
      step = ckpt.latest_step() if step is None else step
      if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint; train first or point "
                                "checkpoint_path at one.")
      run.check_model(ckpt.read_meta(step), directory)
      run.prepare()
      state, _ = ckpt.restore(step, ts.with_shardings(run.abstract, run.shardings))
    finally:
      ckpt.close()
    results = run.evaluate_all(state)
  writer = metrics.MetricWriter(workdir)
  writer.write(step, {**results, "eval/checkpoint": path})
  writer.close()
  logging.info("eval of %s (step %d): %s", path, step, _format(results))
  return RunResult(step=step, state=None, eval_metrics=results)


def _format(results: dict[str, Any]) -> str:
  return "  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                   for k, v in results.items())
