"""`train_and_evaluate(config, workdir)`: the whole run, resumable by running it again.

    builder -> model spec -> mesh + shardings -> restore latest checkpoint or init ->
    for each step: batch -> train step -> log / evaluate / checkpoint -> final save, export.

`config.mode = "eval"` evaluates a checkpoint (or an export) instead of training.
"""

from __future__ import annotations

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

from focal_jax.training import checkpoint, evaluate, input, metrics, optim, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import validate_config
from focal_jax.training.train_step import make_train_step

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"


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
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Run:
  """Everything a run builds once: data, model, mesh, shardings, optimiser, steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    divisor = sharding.batch_divisor(self.mesh)
    if config.batch_size % divisor:
      raise ValueError(
          f"batch_size={config.batch_size} is not a multiple of the {divisor} devices the batch "
          f"is split over (mesh data x fsdp); use a multiple of {divisor}.")
    self.builder = input.get_builder(config)
    self.num_classes = input.num_classes(self.builder)
    self.spec = ts.model_spec_from_config(config, self.num_classes)
    self.steps_per_epoch = input.steps_per_epoch(self.builder, config)
    if config.num_train_steps > 0:
      self.total_steps = int(config.num_train_steps)
    else:
      self.total_steps = max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
    self.schedule = optim.schedule_fn(config, self.steps_per_epoch, self.total_steps)
    self.tx = optim.make_optimizer(config, self.schedule)
    self.use_ema = config.ema_decay > 0
    self.abstract, self.shardings = ts.state_shardings(self.tx, self.spec, self.mesh, self.use_ema)
    self.rest = ts.init_rest(self.spec, self.mesh)
    self.rest_shardings = jax.tree.map(lambda _: sharding.replicated(self.mesh), self.rest)
    self.eval_batch_size = evaluate.eval_batch_size(config.eval_batch_size or config.batch_size,
                                                    self.mesh)
    self.eval_step = evaluate.make_eval_step(self.spec, self.mesh, self.shardings.params,
                                             self.rest_shardings)
    self.description = checkpoint.model_description(
        self.spec.name, self.num_classes, self.spec.img_size, self.spec.json_overrides())

  def evaluate(self, params: Any) -> dict[str, Any]:
    batches, _ = input.eval_batches(self.builder, self.config, self.eval_batch_size)
    return evaluate.evaluate(self.eval_step, params, self.rest, batches, self.mesh,
                             self.config.eval_steps)

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

  def meta(self, step: int) -> dict[str, Any]:
    return {"step": step, "data_step": step, "model": self.description,
            "ema": self.use_ema, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "config": json.loads(self.config.to_json_best_effort())}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or, with config.mode='eval', evaluates) as `config` says, in `workdir`.

  Rerunning the same call resumes from the latest checkpoint in `<workdir>/checkpoints`
  (parameters, optimiser, EMA, step, RNG and data position) and ends where an uninterrupted
  run would.
  """
  validate_config(config)
  _quiet_library_logs()
  maybe_initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  run = _Run(config, workdir)
  logging.info("Model %s: %d classes, %d parameters; mesh %s; %d steps (%d per epoch).",
               run.spec.name or "custom", run.num_classes,
               sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract.params)),
               dict(run.mesh.shape), run.total_steps, run.steps_per_epoch)
  if config.mode == "eval":
    return _eval_mode(run)
  return _train(run)


def _train(run: _Run) -> RunResult:
  config, workdir = run.config, run.workdir
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    run.check_model(ckpt.read_meta(latest), ckpt.directory)
    state, meta = ckpt.restore(latest, ts.with_shardings(run.abstract, run.shardings))
    checkpoint.log_restore(latest, meta)
  else:
    state = ts.create_train_state(run.spec, run.tx, run.shardings, run.mesh, config.seed)
  start = int(jax.device_get(state.step))
  writer = metrics.MetricWriter(workdir, resume_step=start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  train_step = make_train_step(config, run.spec, run.tx, run.schedule, run.mesh, run.shardings,
                               run.rest_shardings)
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else run.steps_per_epoch
  last_eval: dict[str, Any] = {}
  last_saved = latest
  step = start
  if start >= run.total_steps:
    logging.info("Checkpoint step %d already reaches num_train_steps=%d.", start, run.total_steps)
  batches = input.train_batches(run.builder, config, start) if start < run.total_steps else iter(())
  pending: list[dict[str, jax.Array]] = []
  interval_start, interval_steps = time.time(), 0
  with _StopRequest() as stop:
    while step < run.total_steps:
      local = next(batches)
      batch = sharding.global_batch({"image": local["image"], "label": local["label"]}, run.mesh)
      state, step_metrics = train_step(state, batch, run.rest)
      step += 1
      interval_steps += 1
      pending.append(step_metrics)
      if step == start + 1:
        jax.block_until_ready(step_metrics)
        logging.info("First step (compilation included) took %.1f s.", time.time() - interval_start)
        interval_start, interval_steps = time.time(), 0
      is_last = step == run.total_steps
      if step % config.log_every_steps == 0 or is_last or stop.requested:
        fetched = jax.device_get(pending)
        pending = []
        elapsed = time.time() - interval_start
        seconds_per_step = elapsed / max(interval_steps, 1)
        record = {"train/loss": sum(float(m["loss"]) for m in fetched) / len(fetched),
                  "train/lr": float(fetched[-1]["lr"]),
                  "train/grad_norm": float(fetched[-1]["grad_norm"]),
                  "train/img_per_sec": (config.batch_size / seconds_per_step
                                        if interval_steps else 0.0),
                  "train/epoch": step / run.steps_per_epoch}
        if not math.isfinite(record["train/loss"]):
          raise FloatingPointError(
              f"The training loss is {record['train/loss']} at step {step}; stopping. The last "
              f"checkpoint ({last_saved}) is intact: lower base_lr or check the data.")
        writer.write(step, record)
        logging.info(metrics.progress_line(step, run.total_steps, record["train/loss"],
                                           record["train/lr"], record["train/img_per_sec"],
                                           seconds_per_step))
        interval_start, interval_steps = time.time(), 0
      if step % eval_every == 0 or is_last:
        last_eval = run.evaluate_all(state)
        writer.write(step, last_eval)
        logging.info("eval at step %d: %s", step, _format(last_eval))
        interval_start, interval_steps = time.time(), 0
      if (config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0
          ) or is_last or stop.requested:
        ckpt.save(step, state, run.meta(step))
        last_saved = step
      if stop.requested:
        break
  ckpt.wait()
  if step >= run.total_steps and config.export_params:
    path = checkpoint.export_params(os.path.join(workdir, EXPORT_DIR), state.params,
                                    run.description)
    logging.info("Exported the parameters for inference / conversion to %s.", path)
  writer.close()
  ckpt.close()
  metrics.plot_curves(workdir)
  return RunResult(step=step, state=state, eval_metrics=last_eval)


def _eval_mode(run: _Run) -> RunResult:
  """Evaluates config.checkpoint_path: an export dir, a checkpoint step dir or a
  checkpoints dir (its latest step); default: the latest checkpoint of the workdir."""
  config, workdir = run.config, run.workdir
  path = os.path.abspath(config.checkpoint_path or os.path.join(workdir, CHECKPOINT_DIR))
  if checkpoint.is_export(path):
    description = checkpoint.read_description(path)
    run.check_model({"model": description}, path)
    target = ts.with_shardings(run.abstract.params, run.shardings.params)
    params = checkpoint.load_exported_params(path, target)
    step, results = -1, run.evaluate(params)
  else:
    directory, step = path, None
    if os.path.basename(path).isdigit() and not os.path.isdir(os.path.join(path, "0")):
      directory, step = os.path.dirname(path), int(os.path.basename(path))
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"No checkpoint at {path}: expected an export directory (with "
          f"{checkpoint.MODEL_JSON}), a checkpoints directory or one step of it.")
    ckpt = checkpoint.Checkpointer(directory, keep=0, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint; train first or point "
                              "checkpoint_path at one.")
    run.check_model(ckpt.read_meta(step), directory)
    state, _ = ckpt.restore(step, ts.with_shardings(run.abstract, run.shardings))
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
