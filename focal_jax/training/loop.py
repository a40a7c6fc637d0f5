"""`train_and_evaluate(config, workdir)`: the whole run, resumable by running it again.

    config checks -> model spec -> workdir checks -> checkpoint compatibility ->
    dataset -> mesh + shardings -> restore the newest readable checkpoint or init ->
    for each step: batch -> train step -> log / evaluate / checkpoint -> final save, export.

Everything that can be refused (config, workdir, a checkpoint of another model or setup)
is refused before the dataset is prepared or anything is compiled. Each step's loss and
gradient norm are read back two steps later (the device keeps working meanwhile); a
non-finite one stops the run naming its step, before anything non-finite is saved. SIGTERM saves and
stops; with several processes the stop is agreed through a one-flag all-reduce per step,
so every process saves the same step. A checkpoint that cannot be read is moved aside and
the previous one restored.

`config.mode = "eval"` evaluates a checkpoint (or an export) instead of training.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from focal_jax import pretrained, storage, weights
from focal_jax.training import (checkpoint, evaluate, input, memory, metrics, preflight,
                                sharding)
from focal_jax.training import train_state as ts
from focal_jax.training.config import mixup_group_size, validate_config
from focal_jax.training.train_step import make_train_step, step_setup

CHECKPOINT_DIR = weights.CHECKPOINT_DIR
EXPORT_DIR = weights.EXPORT_DIR
# Steps dispatched but not yet read back (outside log, eval and save steps): enough to keep
# the device busy while the host fetches the next batch.
IN_FLIGHT = 2
# Checkpoint metadata key: the training losses of the log interval the checkpoint cuts.
INTERVAL_LOSSES = "log_interval_losses"


@dataclasses.dataclass
class RunResult:
  """What a run ended with: the step, the state (None in eval mode) and the last eval."""

  step: int
  state: ts.TrainState | None
  eval_metrics: dict[str, Any]


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize() when config.distributed.enabled (before any computation)."""
  d = config.distributed
  if not d.enabled or jax.distributed.is_initialized():
    return
  if d.cpu_collectives:  # CPU devices of several processes talk through gloo (or MPI)
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class _QuietLibraries(logging.Filter):
  """Drops the per-save / per-dataset INFO chatter of orbax and TFDS (they log through
  absl) so progress lines stay readable; their warnings and errors still show."""

  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def _quiet_library_logs() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())


class _StopRequest:
  """Turns SIGTERM (preemption) into a request to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step (with "
                    "several processes, after the step at which they all know).")
    self.requested = True

  def __exit__(self, *exc):
    if threading.current_thread() is threading.main_thread():
      # None: the previous handler was not Python's (e.g. set in C); the default is closest.
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None
                    else signal.SIG_DFL)


class _Run:
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
    self.builder = input.get_builder(config, prepare=False)
    self.num_classes = input.num_classes(self.builder)
    self.spec = ts.model_spec_from_config(config, self.num_classes)
    self.use_ema = config.ema_decay > 0
    self.description = weights.model_description(
        self.spec.name, self.num_classes, self.spec.img_size, self.spec.json_overrides())

  def prepare(self) -> None:
    """Prepares the dataset (first use) and builds schedule, optimiser, shardings, eval step."""
    config = self.config
    self.builder = input.get_builder(config)
    self.steps_per_epoch = input.steps_per_epoch(self.builder, config)
    if config.num_train_steps > 0:
      self.total_steps = int(config.num_train_steps)
    else:
      self.total_steps = max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
    self.setup = step_setup(config, self.spec, self.mesh, self.steps_per_epoch, self.total_steps)
    self.schedule, self.tx = self.setup.schedule, self.setup.tx
    self.abstract, self.shardings = self.setup.abstract, self.setup.shardings
    self.rest = ts.init_rest(self.spec, self.mesh)
    self.rest_shardings = self.setup.rest_shardings
    self.eval_batch_size = evaluate.eval_batch_size(config.eval_batch_size or config.batch_size,
                                                    self.mesh)
    self.eval_step = evaluate.make_eval_step(self.spec, self.mesh, self.shardings.params,
                                             self.rest_shardings, config.matmul_precision)
    logging.info("Model %s: %d classes, %d parameters; mesh %s; %d steps (%d per epoch).",
                 self.spec.name or "custom", self.num_classes, self.num_params(),
                 dict(self.mesh.shape), self.total_steps, self.steps_per_epoch)

  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in
               jax.tree.leaves(nnx.to_pure_dict(self.spec.abstract_params)))

  def checkpoint_bytes(self) -> int:
    """Bytes a checkpoint (parameters, two Adam moments, EMA) and the export take."""
    return 4 * self.num_params() * (4 + self.use_ema)  # float32

  def evaluate(self, params: Any) -> dict[str, Any]:
    batches, _ = input.eval_batches(self.builder, self.config, self.eval_batch_size)
    results = evaluate.evaluate(self.eval_step, params, self.rest, batches, self.mesh,
                                self.config.eval_steps)
    if self.config.eval_steps < 0:  # a full pass: images that did not decode were skipped
      skipped = input.eval_examples(self.builder, self.config) - results["eval/examples"]
      results["eval/skipped"] = skipped
      if skipped:
        logging.warning("%d image(s) of the eval split %r could not be decoded and were left "
                        "out of the evaluation.", skipped, self.config.eval_split)
    return results

  def evaluate_all(self, state: ts.TrainState) -> dict[str, Any]:
    results = self.evaluate(state.params)
    if state.ema_params is not None:
      ema = self.evaluate(state.ema_params)
      results.update({k.replace("eval/", "eval_ema/"): v for k, v in ema.items()})
    return results

  def check_model(self, meta: dict[str, Any], where: str) -> None:
    """A checkpoint of another model is an error, not a silent shape mismatch."""
    saved = meta.get("model")
    mine = self.description
    if saved is not None and (saved.get("model"), saved.get("num_classes"), saved.get("overrides")
                              ) != (mine["model"], mine["num_classes"], mine["overrides"]):
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

  def check_state_fits(self, ckpt: checkpoint.Checkpointer, step: int, meta: dict[str, Any],
                       target: Any) -> None:
    """The saved arrays (from their metadata) against the state this config builds."""
    try:
      saved = ckpt.state_shapes(step)
    except Exception:  # noqa: BLE001  unreadable metadata: restoring tells if the step is damaged
      return
    differences = checkpoint.state_differences(saved, target)
    if differences:
      changes = _config_changes(meta.get("config") or {}, self.config)
      raise ValueError(
          f"The checkpoint in {ckpt.directory}/{step} does not fit the train state this config "
          f"builds: {'; '.join(differences)}. "
          + (f"This config differs from the checkpoint's in {changes}. " if changes else "")
          + "Resume with the settings it was written with (in its meta and in "
          f"{self.workdir}/config.json), or use another workdir.")

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

  def meta(self, step: int, data: "_DataTracker", interval_losses: list[float]
           ) -> dict[str, Any]:
    """The checkpoint's metadata; `interval_losses`: the losses of the steps since the last
    log step, so that a resumed run logs the same mean at the next one."""
    positions = _gather_ints([*data.position, data.skipped])
    return {"step": step, "data_step": step, "model": self.description,
            INTERVAL_LOSSES: [float(loss) for loss in interval_losses],
            "data_position": positions[:, :2].tolist(), "skipped_images": positions[:, 2].tolist(),
            "ema": self.use_ema, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "config": json.loads(self.config.to_json_best_effort())}


def _config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict, limit: int = 6
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


def _gather_ints(values: list[int]) -> np.ndarray:
  """int64 [processes, len(values)]: every process's `values` (a collective)."""
  local = np.asarray(values, np.int64)
  if jax.process_count() == 1:
    return local[None]
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)


class _DataTracker:
  """This process's place in its training stream (the next record to read) and the
  undecodable images it has skipped, from the positions the batches carry."""

  def __init__(self, position: tuple[int, int], records_per_epoch: int, skipped: int = 0):
    self.records_per_epoch = records_per_epoch
    self.next_record = position[0] * records_per_epoch + position[1]  # over all epochs
    self.skipped = skipped

  @classmethod
  def from_meta(cls, meta: dict[str, Any], step: int, run: _Run) -> "_DataTracker":
    records = input.records_per_epoch(run.builder, run.config)
    positions, skipped = meta.get("data_position"), meta.get("skipped_images")
    if positions is not None and len(positions) == jax.process_count():
      index = jax.process_index()
      return cls(tuple(positions[index]), records, int(skipped[index]))
    if positions is not None:
      logging.warning("The checkpoint was written by %d processes and this run has %d: each "
                      "process's data share changes, so the data continues from step %d's "
                      "nominal position.", len(positions), jax.process_count(), step)
    epoch, within = divmod(step, run.steps_per_epoch)
    return cls((epoch, within * (records // run.steps_per_epoch)), records)

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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or, with config.mode='eval', evaluates) as `config` says, in `workdir`.

  Rerunning the same call resumes from the latest checkpoint in `<workdir>/checkpoints`
  (parameters, optimiser, EMA, step, RNG and data position) and ends where an uninterrupted
  run would.
  """
  validate_config(config)
  _quiet_library_logs()
  maybe_initialize_distributed(config)
  workdir = storage.absolute(workdir)  # a local directory or a bucket (gs://...)
  run = _Run(config, workdir)
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
  return _train(run, ckpt)


def _restore(run: _Run, ckpt: checkpoint.Checkpointer
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
      run.check_state_fits(ckpt, step, meta, target)
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


def _train(run: _Run, ckpt: checkpoint.Checkpointer) -> RunResult:
  config, workdir = run.config, run.workdir
  writer = None
  try:
    restored = _restore(run, ckpt)
    if restored is None:
      params = None
      if config.init_from:  # fine-tuning: a fresh run starts from these weights
        params = ts.pretrained_params(run.spec, run.shardings.params, config.init_from,
                                      tuple(config.init_from_exclude))
        logging.info("Initialised from %s.", config.init_from)
      state, meta, last_saved = ts.create_train_state(
          run.spec, run.tx, run.shardings, run.mesh, config.seed, params), {}, None
    else:
      state, meta, last_saved = restored
    start = int(jax.device_get(state.step))
    data = _DataTracker.from_meta(meta, start, run)
    writer = metrics.MetricWriter(workdir, resume_step=start)
    if jax.process_index() == 0:
      storage.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    step, state, last_eval = _steps(run, ckpt, writer, state, start, data, last_saved,
                                    meta.get(INTERVAL_LOSSES, []))
    ckpt.wait()
    if step >= run.total_steps and config.export_params:
      path = weights.export_params(os.path.join(workdir, EXPORT_DIR), state.params,
                                   run.description)
      logging.info("Exported the parameters for inference / conversion to %s.", path)
  finally:  # an error still lets the save in flight finish: the last checkpoint stays whole
    if writer is not None:
      writer.close()
    ckpt.close()
  metrics.plot_curves(workdir)
  return RunResult(step=step, state=state, eval_metrics=last_eval)


def _steps(run: _Run, ckpt: checkpoint.Checkpointer, writer: metrics.MetricWriter,
           state: ts.TrainState, start: int, data: _DataTracker, last_saved: int | None,
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
  batches = input.train_batches(run.builder, config, start, data.position)
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
  with _StopRequest() as stop:
    while step < run.total_steps:
      local = next(batches)
      data.consume(local)
      batch = sharding.global_batch({"image": local["image"], "label": local["label"]}, run.mesh)
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
                  "train/skipped_images": int(_gather_ints([data.skipped]).sum())}
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
        ckpt.save(step, state, run.meta(step, data, [m["loss"] for m in settled]))
        last_saved = step
      if stopping:
        logging.warning("Stopped at step %d of %d after SIGTERM; rerun the same command to "
                        "continue.", step, run.total_steps)
        break
  return step, state, last_eval


def _fitting_step(run: _Run, train_step: Any, state: ts.TrainState, batch: dict[str, jax.Array]
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


def _eval_mode(run: _Run) -> RunResult:
  """Evaluates config.checkpoint_path: an export dir, a checkpoint step dir or a
  checkpoints dir (its latest step); default: the latest checkpoint of the workdir."""
  config, workdir = run.config, run.workdir
  path = storage.absolute(config.checkpoint_path or os.path.join(workdir, CHECKPOINT_DIR))
  if weights.is_export(path):
    description = weights.read_description(path)
    run.check_model({"model": description}, path)
    run.prepare()
    target = ts.with_shardings(run.abstract.params, run.shardings.params)
    params = weights.load_exported_params(path, target)
    step, results = -1, run.evaluate(params)
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
