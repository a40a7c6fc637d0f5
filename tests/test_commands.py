"""The README's commands, run as a user runs them (small settings), to their end."""

from __future__ import annotations

import importlib.util
import os

from test_reliability import ROOT, _finish, _start
from test_training import compilation_cache, digits_dir  # noqa: F401  (fixtures)

from focal_jax import weights
from focal_jax.training import checkpoint, loop, metrics
from focal_jax.training import train_state as ts


def _main(tmp_path, name, workdir, *flags, timeout=300):
  """`python main.py --config configs/demo.py --workdir WORKDIR FLAGS`: its output."""
  process = _start("configs/demo.py", workdir, tmp_path / f"{name}.log", *flags, devices=1)
  output = _finish(process, timeout=timeout)
  assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{output[-3000:]}"
  return output


def demo_config(**changes):
  """configs/demo.py's config, with `changes`."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                            "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(changes)
  return config


def _demo_workdir(workdir, data_dir):
  """A demo workdir as training leaves it (a checkpoint, here of the freshly initialised
  state, and an export of its parameters) without compiling a training step: the demo's
  training itself runs end to end in CI."""
  run = loop._Run(demo_config(data_dir=data_dir), workdir)
  run.prepare()
  state = ts.create_train_state(run.spec, run.tx, run.shardings, run.mesh, run.config.seed)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR))
  ckpt.save(0, state, run.meta(0, loop._DataTracker((0, 0), 1), []))
  ckpt.close()
  return weights.export_params(os.path.join(workdir, loop.EXPORT_DIR), state.params,
                               run.description)


def test_demo_workdir_and_export_evaluate_to_their_end(tmp_path, digits_dir):  # noqa: F811
  """`main.py --config configs/demo.py --workdir W --config.mode=eval`, of the workdir and
  of an export (`--config.checkpoint_path=EXPORT`): both end and record the same top-1."""
  workdir = str(tmp_path / "demo")
  export = _demo_workdir(workdir, digits_dir)
  data = f"--config.data_dir={digits_dir}"
  output = _main(tmp_path, "eval_workdir", workdir, data, "--config.mode=eval")
  assert f"eval of {workdir}/checkpoints (step 0): eval/top1 " in output
  output = _main(tmp_path, "eval_export", str(tmp_path / "eval"), data, "--config.mode=eval",
                 f"--config.checkpoint_path={export}")
  assert f"eval of {export} (step -1): eval/top1 " in output
  evaluated = metrics.read_metrics(workdir)
  exported = metrics.read_metrics(str(tmp_path / "eval"))
  assert [r["step"] for r in evaluated] == [0] and [r["step"] for r in exported] == [-1]
  assert exported[0]["eval/checkpoint"] == export
  for key in ("eval/top1", "eval/top5", "eval/examples"):
    assert evaluated[0][key] == exported[0][key], key
  assert exported[0]["eval/examples"] == 364 and 0 <= exported[0]["eval/top1"] <= 100
  assert os.listdir(str(tmp_path / "eval" / metrics.TENSORBOARD_DIR))
