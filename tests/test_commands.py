"""The README's commands, run as a user runs them (small settings), to their end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
from PIL import Image

from test_reliability import ROOT, _finish, _start
from test_training import compilation_cache, digits_dir  # noqa: F401  (fixtures)

from focal_jax import weights
from focal_jax.weights import files
from focal_jax.training import checkpoint, loop, metrics, resume, run_state
from focal_jax.training import train_state as ts
from focal_jax.training.config import load_config_file


def readme() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def _python(*args, cwd=ROOT, env=None, timeout=300) -> subprocess.CompletedProcess:
  """`python ARGS` in a fresh process on one CPU device; fails the test on a non-zero exit."""
  env = {k: v for k, v in (env or os.environ).items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, f"python {' '.join(args)}:\n{result.stderr[-3000:]}"
  return result


def _main(tmp_path, name, workdir, *flags, timeout=300):
  """`python main.py --config configs/demo.py --workdir WORKDIR FLAGS`: its output."""
  process = _start("configs/demo.py", workdir, tmp_path / f"{name}.log", *flags, devices=1)
  output = _finish(process, timeout=timeout)
  assert process.returncode == 0, f"{name} exited with {process.returncode}:\n{output[-3000:]}"
  return output


def demo_config(**changes):
  """configs/demo.py's config, with `changes`."""
  config = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config.update(changes)
  return config


def _demo_workdir(workdir, data_dir):
  """A demo workdir as training leaves it (a checkpoint, here of the freshly initialised
  state, and an export of its parameters) without compiling a training step: the demo's
  training itself runs end to end in CI."""
  run = run_state.Run(demo_config(data_dir=data_dir), workdir)
  run.prepare()
  state = ts.create_train_state(run.spec, run.tx, run.shardings, run.mesh, run.config.seed)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, loop.CHECKPOINT_DIR))
  ckpt.save(0, state, resume.checkpoint_meta(run, 0, resume.DataTracker((0, 0), 1), []))
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

  # Both conversion commands, as the README shows them: the workdir to the official format
  # (`to-torch --checkpoint WORKDIR`), and that file back into an export of the same
  # architecture, named as an official variant with its options.
  out = str(tmp_path / "out.pth")
  printed = _python("-m", "focal_jax.convert", "to-torch", "--checkpoint", workdir, "--output",
                    out).stdout
  assert re.fullmatch(r"wrote \d+ entries \([\d,]+ values\) of the model to " + re.escape(out)
                      + "\n", printed), printed
  assert set(files.load_weights_file(out)) >= {"patch_embed.proj.weight", "head.weight"}
  overrides = demo_config().model.overrides
  options = [arg for key, value in overrides.items()
             for arg in ("--set", f"{key}={list(value) if isinstance(value, tuple) else value}")]
  back = str(tmp_path / "back")
  printed = _python("-m", "focal_jax.convert", "from-torch", "--model", "focal_tiny",
                    "--checkpoint", out, "--output", back, "--img-size", "32", *options).stdout
  assert printed == f"wrote 1,430,199 parameters of focal_tiny to {back}\n"
  expected = {k: np.asarray(v) for k, v in
              files_flat(weights.load_exported_params(export)).items()}
  got = files_flat(weights.load_exported_params(back))
  assert got.keys() == expected.keys()
  assert all(np.array_equal(got[k], expected[k]) for k in expected)


def files_flat(tree):
  import jax  # noqa: PLC0415
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_imagenet_training_command_names_the_missing_tars(tmp_path):
  """`main.py --config configs/focal_base.py --workdir DIR --config.data_dir=DATA_DIR` where
  DATA_DIR holds no ImageNet: it stops with the error the README promises, naming both
  tars and where they go, before anything is compiled."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/focal_base.py", "--workdir",
       str(tmp_path / "run"), f"--config.data_dir={data_dir}"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert (f"ManualDownloadError: imagenet2012 is not prepared and cannot be built: "
          f"ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar not found in "
          f"{data_dir}/downloads/manual.") in result.stderr, result.stderr[-3000:]
  assert "First step" not in result.stderr


def test_summary_command_prints_the_readme_table():
  block = re.search(r"\$ python -m focal_jax.summary --model focal_tiny\n(.*?)```", readme(),
                    re.S).group(1)
  assert _python("-m", "focal_jax.summary", "--model", "focal_tiny").stdout == block


def test_notebook_install_cells_outside_a_clone(tmp_path):
  """Each notebook's first cell, run as on Colab: in a fresh environment (which sees this
  one's packages, so nothing is downloaded), from a directory outside any clone. Without
  FOCAL_JAX_SOURCE it stops saying what to set; with it (a path) it installs focal_jax."""
  env_dir = tmp_path / "env"
  subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
  python = str(env_dir / "bin" / "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, "installed_here.pth"), "w") as f:  # plain paths: no editable hooks
    f.write("\n".join(sorted({sysconfig.get_paths()["purelib"],
                              sysconfig.get_paths()["platlib"]})) + "\n")
  source = tmp_path / "focal_jax_source"  # a copy: building writes into the source tree
  source.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source)
  shutil.copytree(os.path.join(ROOT, "focal_jax"), source / "focal_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  outside = tmp_path / "colab"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items()
         if k not in ("FOCAL_JAX_OFFLINE", "FOCAL_JAX_SOURCE", "PYTHONPATH", "XLA_FLAGS")}
  for index, name in enumerate(sorted(os.listdir(os.path.join(ROOT, "notebooks")))):
    with open(os.path.join(ROOT, "notebooks", name)) as f:
      cell = next(c for c in json.load(f)["cells"] if c["cell_type"] == "code")
    script = tmp_path / f"install_{index}.py"
    script.write_text("".join(cell["source"]))
    if index == 0:
      refused = subprocess.run([python, str(script)], cwd=outside, env=env, capture_output=True,
                               text=True, timeout=300)
      assert refused.returncode != 0
      assert ("RuntimeError: This notebook is not inside a focal_jax clone, so it cannot tell "
              "where to install focal_jax from: set FOCAL_JAX_SOURCE") in refused.stderr
    installed = subprocess.run([python, str(script)], cwd=outside, capture_output=True, text=True,
                               env={**env, "FOCAL_JAX_SOURCE": str(source)}, timeout=300)
    assert installed.returncode == 0, f"{name}:\n{installed.stderr[-3000:]}"
  where = subprocess.run([python, "-c", "import focal_jax; print(focal_jax.__file__)"],
                         cwd=outside, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.strip() == os.path.join(site, "focal_jax", "__init__.py")


def test_make_figures_trains_the_demo_and_writes_every_figure(tmp_path, digits_dir):  # noqa: F811
  """`python scripts/make_figures.py`, the demos' training shortened to 2 steps
  (`--steps`, `--seg-steps`) and the figures written to a temporary directory (`--out`):
  each figure of docs/ is written as a 256-colour PNG of the committed figure's size, and
  the curve plots the run it trained."""
  out, workdir, seg_workdir = tmp_path / "docs", tmp_path / "run", tmp_path / "seg"
  printed = _python("scripts/make_figures.py", "--steps", "2", "--out", str(out), "--workdir",
                    str(workdir), "--data-dir", digits_dir, "--seg-steps", "2",
                    "--seg-workdir", str(seg_workdir), timeout=600).stdout
  assert f"training configs/demo.py for 2 steps in {workdir} ..." in printed
  assert f"wrote {out}/attention.png and {out}/receptive_fields.png" in printed
  assert f"training configs/demo_seg.py for 2 steps in {seg_workdir} ..." in printed
  assert f"wrote {out}/segmentation_demo.png" in printed
  assert [r["step"] for r in metrics.read_metrics(str(seg_workdir)) if "eval/mIoU" in r] == [2]
  assert printed.endswith(f"wrote {out}/training_curve.png\n"), printed[-1000:]
  records = metrics.read_metrics(str(workdir))
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
  assert [r["step"] for r in records if "eval/top1" in r] == [1, 2]
  for name in ("attention.png", "receptive_fields.png", "training_curve.png",
               "segmentation_demo.png"):
    path = out / name
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    with Image.open(path) as image:
      image.verify()  # chunks and checksums intact
    with Image.open(path) as image, Image.open(os.path.join(ROOT, "docs", name)) as committed:
      assert (image.format, image.mode) == ("PNG", "P"), name
      assert image.size == committed.size, name
      pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100, name  # drawn, not blank
    assert (pixels != 255).any(axis=1).mean() > 0.02, name
    assert 5_000 < path.stat().st_size < 1_000_000, name
