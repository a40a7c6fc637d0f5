"""Faults, and what the training loop does about them.

Bad input is refused before the dataset is prepared or anything is compiled; a damaged
newest checkpoint is set aside and the previous one restored; a non-finite loss stops the
run naming its step, with the last checkpoint intact; undecodable images are counted and
skipped; a run killed by SIGTERM or SIGKILL finishes when rerun, bit for bit as if never
stopped; two processes of 4 CPU devices each train like one process of 8.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from test_data import corrupt_imagenet_dir  # noqa: F401  (fixture)
from test_training import compilation_cache, digits_dir, flat, tiny_config  # noqa: F401

from focal_jax import data, storage, weights
from focal_jax.training import checkpoint, input, loop, metrics, preflight
from focal_jax.training import train_state as ts
from focal_jax.training.config import validate_config


def by_name(tree):
  """{'layers/0/attn/qkv/kernel': array}: list indices and '0' keys (an export) alike."""
  return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def digits_config(**changes):
  """The tiny model on focal_digits, one device (sharding is tested in test_training.py)."""
  defaults = {"dataset": "focal_digits", "eval_split": "test", "eval_batch_size": 16,
              "mesh.data": 1, "keep_checkpoints": 0}
  return tiny_config(**{**defaults, **changes})


@pytest.fixture
def nothing_expensive(monkeypatch):
  """Fails the test if the loop prepares a dataset or compiles a step."""
  def refuse(what):
    def fail(*args, **kwargs):
      raise AssertionError(f"{what} started before the bad input was refused")
    return fail

  monkeypatch.setattr(input.data, "get_builder", _unprepared_only(input.data.get_builder, refuse))
  monkeypatch.setattr(loop, "make_train_step", refuse("compiling the train step"))
  monkeypatch.setattr(ts, "init_params", refuse("initialising the parameters"))


def _unprepared_only(get_builder, refuse):
  def guarded(*args, prepare=True, **kwargs):
    if prepare:
      refuse("preparing the dataset")()
    return get_builder(*args, prepare=False, **kwargs)
  return guarded


# ----------------------------------------------------------------------------------------
# Bad input: a clear error before anything expensive starts.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"model.name": "focal_huge"}, r"Unknown model variant model.name='focal_huge'.*focal_tiny"),
    ({"model.overrides": dict(num_heads=(3, 2), embed_dim=16, depths=(1, 1),
                              focal_levels=(2, 2), window_size=2, focal_windows=(3, 1),
                              expand_sizes=(1, 1))},
     r"num_heads=3 does not divide the embedding width 16"),
    ({"image_size": 20}, r"Image size 20x20 is not supported: .* multiples of 8"),
    ({"mixup.group_size": 6}, r"mixup.group_size=6 must be even and divide the micro-batch 16"),
])
def test_bad_model_or_config_values_are_refused_at_once(tmp_path, changes, message,
                                                        nothing_expensive):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(digits_config(**changes), str(workdir))
  assert not workdir.exists()  # nothing was written


def test_unknown_config_key_is_refused_at_once(tmp_path, nothing_expensive):
  config = digits_config()
  config.augment.hfilp = 0.5
  with pytest.raises(ValueError, match=r"'augment.hfilp' \(did you mean 'augment.hflip'\?\)"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir_is_refused_at_once(tmp_path, nothing_expensive):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(preflight.WorkdirError, match=r"Cannot create the workdir .*a_file/run"):
    loop.train_and_evaluate(digits_config(), str(blocker / "run"))


def test_full_workdir_is_refused_at_once(tmp_path, monkeypatch, nothing_expensive):
  # A filesystem with 1 MiB free: too little for a checkpoint of even the tiny model.
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
  with pytest.raises(preflight.WorkdirError, match=r"has 1.0 MiB free, but one checkpoint"):
    loop.train_and_evaluate(digits_config(), str(tmp_path / "run"))


def test_workdir_that_fails_to_write_is_refused_at_once(tmp_path, monkeypatch, nothing_expensive):
  def no_space(path, mode="r", *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", path)

  monkeypatch.setattr(storage, "open", no_space, raising=False)  # every write of the workdir
  with pytest.raises(preflight.WorkdirError, match=r"No space left.*The filesystem is full"):
    loop.train_and_evaluate(digits_config(), str(tmp_path / "run"))


def _fake_checkpoint(workdir, meta, state=None):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR))
  ckpt.save(1, state if state is not None else {"x": np.zeros(2, np.float32)},
            {"step": 1, "data_step": 1, **meta})
  ckpt.close()


def _description(config, num_classes=10):
  spec = ts.model_spec_from_config(config, num_classes)
  return weights.model_description(spec.name, num_classes, spec.img_size,
                                      spec.json_overrides())


@pytest.mark.parametrize("saved, message", [
    ({"model": weights.model_description("focal_tiny", 10, 32, {})},
     r"is of another model: .*focal_tiny"),
    ({"ema": True, "config": {"ema_decay": 0.999}},
     r"written with ema_decay=0.999 \(EMA on\), this config ema_decay=0.0.*Switching EMA"),
    ({"ema": False, "config": {"grad_clip_norm": 0.0}},
     r"grad_clip_norm=0.0, this config grad_clip_norm=5.0"),
])
def test_checkpoint_of_another_model_or_setup_is_refused_before_the_data(
    tmp_path, saved, message, nothing_expensive):
  config = digits_config(data_dir=str(tmp_path / "tfds"))  # never prepared
  workdir = str(tmp_path / "run")
  _fake_checkpoint(workdir, {"model": _description(config), **saved})
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, workdir)
  assert not tfds.builder("focal_digits", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_checkpoint_whose_arrays_do_not_fit_is_refused_before_compiling(
    tmp_path, digits_dir, monkeypatch):
  """The last line of defence (no meta says what changed): the saved arrays against the
  state this config builds, instead of orbax's tree-structure error."""
  config = digits_config(data_dir=digits_dir)
  workdir = str(tmp_path / "run")
  _fake_checkpoint(workdir, {"model": _description(config), "config": {"seed": 7}},
                   state={"params": {"head": {"kernel": np.zeros((3, 3), np.float32)}}})
  monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
  with pytest.raises(ValueError, match=(
      r"does not fit the train state this config builds: \d+ array\(s\) this config needs are "
      r"not in it: .*; 1 array\(s\) of another shape, e.g. params/head/kernel: saved \(3, 3\), "
      r"this config \(32, 10\).*differs from the checkpoint's in seed 7 -> 0")):
    loop.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # left alone


# ----------------------------------------------------------------------------------------
# Damaged checkpoints and non-finite losses.
# ----------------------------------------------------------------------------------------


def _files(path):
  return sorted(os.path.relpath(p, path) for p in glob.glob(f"{path}/**", recursive=True)
                if os.path.isfile(p))


# orbax's reader of the truncated arrays reports its failure once more, from a closed loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_latest_checkpoints_are_set_aside_and_the_previous_one_restored(
    tmp_path, digits_dir, caplog):
  config = digits_config(data_dir=digits_dir, num_train_steps=3, checkpoint_every_steps=1)
  workdir = str(tmp_path / "run")
  full = loop.train_and_evaluate(config, workdir)
  directory = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  # Step 3: its arrays truncated; step 2: its meta file gone.
  for path in glob.glob(f"{directory}/3/state/d/*"):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  os.remove(f"{directory}/2/meta/metadata")
  damaged = {step: _files(f"{directory}/{step}") for step in ("2", "3")}
  with caplog.at_level(logging.WARNING):
    resumed = loop.train_and_evaluate(config, workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"{directory}/3 cannot be read (ValueError: " in w for w in warnings), warnings
  assert any(f"{directory}/2 cannot be read (FileNotFoundError: " in w for w in warnings)
  assert any("Resumed from step 1, the newest complete checkpoint." in w for w in warnings)
  # Nothing lost: the damaged steps were moved, file for file.
  aside = os.path.join(workdir, checkpoint.DAMAGED_DIR)
  assert {step: _files(f"{aside}/{step}") for step in ("2", "3")} == damaged
  # Steps 2 and 3 trained again, exactly as the first time.
  assert resumed.step == 3 and sorted(os.listdir(directory)) == ["1", "2", "3"]
  first, again = flat(full.state.params), flat(resumed.state.params)
  assert all(np.array_equal(first[k], again[k]) for k in first)
  # When no checkpoint reads back, the run stops instead of starting afresh.
  for step in ("1", "2", "3"):
    os.remove(f"{directory}/{step}/meta/metadata")
  with pytest.raises(RuntimeError, match=r"No checkpoint in .* can be read.*Rerun to start"):
    loop.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(aside)) == ["1", "2", "2-1", "3", "3-1"]


def _poison(monkeypatch, step):
  """The batch of `step` (1-based) gets a NaN pixel."""
  original = input.train_batches

  def train_batches(builder, config, start_step, start_position=None):
    for number, batch in enumerate(original(builder, config, start_step, start_position),
                                   start_step + 1):
      if number == step:
        batch = {**batch, "image": batch["image"].copy()}
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(input, "train_batches", train_batches)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, digits_dir, monkeypatch):
  # Saves at 4 and 8; step 5 goes wrong and is read back (loop.IN_FLIGHT = 2 steps late)
  # during step 7.
  config = digits_config(data_dir=digits_dir, num_train_steps=8, checkpoint_every_steps=4,
                         log_every_steps=100)
  workdir = str(tmp_path / "run")
  _poison(monkeypatch, 5)
  with pytest.raises(FloatingPointError, match=(
      r"Step 5: the training loss is nan and the gradient norm nan; stopping before anything "
      r"non-finite is saved. The last checkpoint \(step 4\) is intact")):
    loop.train_and_evaluate(config, workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
  model, _ = weights.load_workdir_model(workdir)
  params = jax.tree.leaves(jax.device_get(nnx.state(model, nnx.Param)))
  assert all(np.isfinite(p).all() for p in params)
  # A rerun without the bad data resumes from step 4 and finishes.
  monkeypatch.undo()
  assert loop.train_and_evaluate(config, workdir).step == 8


# ----------------------------------------------------------------------------------------
# Undecodable images through the loop.
# ----------------------------------------------------------------------------------------


def test_loop_counts_and_skips_undecodable_images(tmp_path, corrupt_imagenet_dir):  # noqa: F811
  """13 good + 3 bad training images, 4 good + 2 bad validation images (test_data.py)."""
  config = tiny_config(dataset="imagenet2012", data_dir=corrupt_imagenet_dir, batch_size=8,
                       num_train_steps=4, eval_batch_size=8, shuffle_buffer=16,
                       checkpoint_every_steps=2, log_every_steps=2, **{"mesh.data": 1})
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir)
  assert result.step == 4
  skipped = {r["step"]: r["train/skipped_images"] for r in metrics.read_metrics(workdir)
             if "train/loss" in r}
  # 16 records an epoch (2 steps of 8), 13 of which decode: 16 images skip 3 bad records of
  # epoch 0 (and up to 3 of epoch 1), 32 images 6 of epochs 0-1 (and up to 3 of epoch 2).
  assert set(skipped) == {2, 4} and 3 <= skipped[2] <= 6 and 6 <= skipped[4] <= 9
  assert result.eval_metrics["eval/examples"] == 4 and result.eval_metrics["eval/skipped"] == 2
  meta = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).read_meta(4)
  # The next record to read: 32 decoded + the skipped ones, i.e. record `skipped` of epoch 2.
  assert meta["skipped_images"] == [skipped[4]] and meta["data_position"] == [[2, skipped[4]]]


def test_validate_config_knows_the_distributed_keys():
  config = tiny_config(**{"distributed.cpu_collectives": "nccl"})
  with pytest.raises(ValueError, match=r"cpu_collectives='nccl'; expected one of"):
    validate_config(config)


# ----------------------------------------------------------------------------------------
# Killed runs, and two processes: main.py in subprocesses.
# ----------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_file(path, **changes) -> str:
  """A config file for main.py: tiny_config(**changes)."""
  path.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                  "from test_training import tiny_config\n\n\ndef get_config():\n"
                  f"  return tiny_config(**{changes!r})\n")
  return str(path)


def _start(config_file, workdir, log_path, *flags, devices=8, env=None, cache_dir=None):
  """main.py in a subprocess sharing this session's compilation cache (or `cache_dir`), with
  `env` added to this process's environment; output to log_path."""
  env = {**os.environ, **(env or {}),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                      "--xla_cpu_multi_thread_eigen=false",
         "JAX_COMPILATION_CACHE_DIR": cache_dir or jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  log = open(log_path, "w")  # noqa: SIM115  closed by _finish
  process = subprocess.Popen(
      [sys.executable, "main.py", "--config", config_file, "--workdir", workdir, *flags],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  process.log_path, process.log = log_path, log
  return process


def _finish(process, timeout=420) -> str:
  """Waits for the process (killing it after `timeout` s); returns its output."""
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  process.log.close()
  with open(process.log_path) as f:
    return f.read()


def _wait_for_checkpoint(workdir, step, processes, timeout=300):
  """Returns once <workdir>/checkpoints/<step> exists (orbax renames a save into place
  when it is complete)."""
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    exited = [p for p in processes if p.poll() is not None]
    if exited or time.time() > deadline:
      for p in processes:
        p.kill()
      logs = "\n".join(_finish(p)[-3000:] for p in processes)
      pytest.fail(f"checkpoint {step} never appeared; output:\n{logs}")
    time.sleep(0.02)


def _tensorboard_scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard's own loader sees <workdir>/tensorboard."""
  from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415
  loader = event_accumulator.EventAccumulator(os.path.join(workdir, metrics.TENSORBOARD_DIR),
                                              size_guidance={event_accumulator.SCALARS: 0})
  loader.Reload()
  return {tag: [(e.step, e.value) for e in loader.Scalars(tag)]
          for tag in loader.Tags()[event_accumulator.SCALARS]}


def _logged(workdir):
  """{tag: [(step, value), ...]} of metrics.jsonl, float32 as TensorBoard stores scalars;
  the throughput (a timing) left out."""
  tags = {}
  for record in metrics.read_metrics(workdir):
    for tag, value in record.items():
      if tag != "step" and isinstance(value, (int, float)):
        tags.setdefault(tag, []).append((record["step"], float(np.float32(value))))
  return tags


def test_sigkill_mid_run_then_rerun_ends_bit_identical(tmp_path, digits_dir):
  # Logs at 4, 8, 10 and checkpoints at 3, 6, 9, 10: every checkpoint a resume can start
  # from cuts a log interval.
  changes = {"dataset": "focal_digits", "data_dir": digits_dir, "eval_split": "test",
             "eval_batch_size": 16, "num_train_steps": 10, "checkpoint_every_steps": 3,
             "log_every_steps": 4, "keep_checkpoints": 2, "mesh.data": 1}
  config_file = _config_file(tmp_path / "tiny.py", **changes)
  reference = loop.train_and_evaluate(tiny_config(**changes), str(tmp_path / "reference"))
  workdir = str(tmp_path / "run")
  killed = _start(config_file, workdir, tmp_path / "killed.log")
  _wait_for_checkpoint(workdir, 3, [killed])
  killed.send_signal(signal.SIGKILL)
  output = _finish(killed)
  assert killed.returncode == -signal.SIGKILL, output[-3000:]
  saved = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), cleanup=False)
  assert 3 <= saved.latest_step() < 10, "the run ended before the kill"
  saved.close()
  assert not os.path.exists(os.path.join(workdir, loop.EXPORT_DIR))
  rerun = _start(config_file, workdir, tmp_path / "rerun.log")
  output = _finish(rerun)
  assert rerun.returncode == 0, output[-3000:]
  assert "Restored checkpoint step" in output
  # The rerun trained on from the newest checkpoint, with the same data, augmentation and
  # dropout draws: the final parameters equal the uninterrupted run's bit for bit.
  expected = by_name(reference.state.params)
  got = by_name(weights.load_exported_params(os.path.join(workdir, loop.EXPORT_DIR)))
  assert got.keys() == expected.keys()
  assert all(np.array_equal(got[k], expected[k]) for k in expected)
  # The logs: the interval cut by the checkpoint reports what the uninterrupted run did,
  # each step once, in metrics.jsonl and in TensorBoard's view of the event files (the
  # steps the killed run logged after its checkpoint were written again and purged).
  logged, expected_log = _logged(workdir), _logged(str(tmp_path / "reference"))
  assert [step for step, _ in logged["train/loss"]] == [4, 8, 10]
  assert [step for step, _ in logged["eval/top1"]] == [10]
  del logged["train/img_per_sec"], expected_log["train/img_per_sec"]
  assert logged == expected_log
  scalars = _tensorboard_scalars(workdir)
  assert [step for step, _ in scalars.pop("train/img_per_sec")] == [4, 8, 10]
  assert scalars == logged
  assert len(os.listdir(os.path.join(workdir, metrics.TENSORBOARD_DIR))) == 2  # two runs
  assert not [name for name in os.listdir(os.path.join(workdir, "checkpoints"))
              if not name.isdigit()]  # a save cut short leaves nothing behind


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(config_file, workdir, tmp_path, name):
  port = _free_port()
  return [_start(config_file, workdir, tmp_path / f"{name}{index}.log",
                 "--config.distributed.enabled=True",
                 f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                 "--config.distributed.num_processes=2",
                 f"--config.distributed.process_id={index}", devices=4)
          for index in range(2)]


def test_two_processes_train_like_one_and_stop_together(tmp_path, digits_dir, monkeypatch):
  """Two processes of 4 CPU devices (gloo collectives) against one process of 8 devices
  fed the same global batches; SIGTERM to one of the two stops both at the same step, and
  rerunning both finishes the run."""
  changes = {"dataset": "focal_digits", "data_dir": digits_dir, "eval_split": "test",
             "eval_batch_size": 16, "num_train_steps": 6, "checkpoint_every_steps": 1,
             "keep_checkpoints": 2, "mesh.data": 2, "mesh.fsdp": 4}
  config_file = _config_file(tmp_path / "tiny.py", **changes)
  workdir = str(tmp_path / "run")
  first = _two_processes(config_file, workdir, tmp_path, "first")
  _wait_for_checkpoint(workdir, 2, first)
  first[1].send_signal(signal.SIGTERM)  # only process 1 is told
  outputs = [_finish(p) for p in first]
  assert [p.returncode for p in first] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  stopped = [re.findall(r"Stopped at step (\d+) of 6", output) for output in outputs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
  assert 2 < int(stopped[0][0]) < 6
  rerun = _two_processes(config_file, workdir, tmp_path, "rerun")
  outputs = [_finish(p) for p in rerun]
  assert [p.returncode for p in rerun] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

  # The reference: one process, 8 devices, each global batch the two processes' halves.
  def both_halves(builder, config, start_step, start_position=None):
    halves = [data.train_iterator(
        builder, split=config.train_split, global_batch_size=config.batch_size,
        config=input.augment_config(config), seed=config.seed, start_step=start_step,
        shuffle_buffer=config.shuffle_buffer, threads=1, process_index=index, process_count=2)
        for index in range(2)]
    for step, batches in enumerate(zip(*halves), start_step):
      batch = {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}
      # Positions for the single process's bookkeeping: nothing skipped.
      linear = step * config.batch_size + np.arange(config.batch_size)
      yield {**batch, "epoch": np.zeros_like(linear), "position": linear}

  monkeypatch.setattr(input, "train_batches", both_halves)
  reference = loop.train_and_evaluate(tiny_config(**changes), str(tmp_path / "reference"))
  losses = {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir) if "train/loss" in r}
  expected = {r["step"]: r["train/loss"]
              for r in metrics.read_metrics(str(tmp_path / "reference")) if "train/loss" in r}
  # Equal up to the order in which the all-reduces add (gloo's ring against XLA's in-process
  # sum): measured, losses within 1 ulp (5 of 6 steps identical), parameters max |diff|
  # 7e-7 and mean 2.6e-10, 4,379 of 19,447 entries not bit-identical.
  assert losses.keys() == expected.keys() == set(range(1, 7))
  assert [losses[k] for k in sorted(losses)] == pytest.approx(
      [expected[k] for k in sorted(expected)], rel=1e-6)
  params = by_name(weights.load_exported_params(os.path.join(workdir, loop.EXPORT_DIR)))
  reference_params = by_name(reference.state.params)
  assert params.keys() == reference_params.keys()
  diffs = np.concatenate([np.abs(params[k] - reference_params[k]).ravel() for k in params])
  assert diffs.max() < 1e-5 and diffs.mean() < 1e-8, (diffs.max(), diffs.mean())
  # Evaluation: each process evaluated its half of the 364 test images; the totals are exact.
  evals = [r for r in metrics.read_metrics(workdir) if "eval/top1" in r]
  assert evals[-1]["eval/examples"] == reference.eval_metrics["eval/examples"] == 364
  assert evals[-1]["eval/top1"] == reference.eval_metrics["eval/top1"]
  assert evals[-1]["eval/loss"] == pytest.approx(reference.eval_metrics["eval/loss"], rel=1e-6)


@pytest.mark.parametrize("keep, kept", [(2, [3, 4]), (1, [4]), (0, [1, 2, 3, 4])])
def test_checkpointer_keeps_the_newest_steps(tmp_path, keep, kept):
  """`keep_checkpoints`: the newest `keep` steps stay after each save; 0 keeps every step."""
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), keep=keep, async_save=False)
  for step in range(1, 5):
    ckpt.save(step, {"w": jax.numpy.full((2,), step, jax.numpy.float32)}, {"data_step": step})
  ckpt.wait()
  assert ckpt.all_steps() == kept
  assert sorted(int(name) for name in os.listdir(directory) if name.isdigit()) == kept
  assert ckpt.read_meta(kept[0]) == {"data_step": kept[0]}
  ckpt.close()


def test_checkpoint_written_before_batch_stats_existed_restores(tmp_path):
  """A train state saved without the `batch_stats` field (focal_jax before the segmentation
  task) restores into today's TrainState, batch_stats None, every array and optax state as
  saved; a checkpoint that lacks a field this state fills is still refused."""
  import optax  # noqa: PLC0415

  params = {"w": jax.numpy.arange(3, dtype=jax.numpy.float32)}
  tx = optax.adamw(1e-3)
  opt_state = tx.update(params, tx.init(params), params)[1]
  old = {"step": jax.numpy.int32(7), "params": params, "opt_state": opt_state,
         "ema_params": None, "rng": jax.numpy.array([1, 2], jax.numpy.uint32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(7, old, {"step": 7})
  ckpt.wait()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        ts.TrainState(**old))
  assert target.batch_stats is None
  state, meta = ckpt.restore(7, target)
  assert isinstance(state, ts.TrainState) and state.batch_stats is None and meta == {"step": 7}
  assert int(state.step) == 7 and np.array_equal(state.params["w"], params["w"])
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_state)
  assert np.array_equal(state.opt_state[0].mu["w"], opt_state[0].mu["w"])
  with_stats = target.replace(batch_stats={"bn": {"mean": target.params["w"]}})
  with pytest.raises(ValueError):
    ckpt.restore(7, with_stats)
  ckpt.close()
