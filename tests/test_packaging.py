"""Packaging: the lint, the version lock against pyproject.toml, and the wheel installed into
an empty virtual environment with only the model (and safetensors) extra."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "constraints.txt")
# Console scripts whose module lives on a branch of its own until it is merged.
NOT_YET_SHIPPED = {"focal_jax.aot"}
# The tools that work with the base install (focal-jax-aot needs the train and tpu extras).
BASE_TOOLS = ("focal-jax-convert", "focal-jax-summary", "focal-jax-benchmark")


def _lock_script():
  spec = importlib.util.spec_from_file_location(
      "write_constraints", os.path.join(ROOT, "scripts", "write_constraints.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins(path: str = CONSTRAINTS) -> dict[str, str]:
  pins = {}
  with open(path) as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if line:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
  return pins


def _clean_env() -> dict[str, str]:
  """The environment without PYTHONPATH, so that only what is installed can be imported."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_ruff_check_passes():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", ROOT],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_constraints_pin_every_declared_dependency_inside_its_range():
  lock = _lock_script()
  extras = tuple(_pyproject()["project"]["optional-dependencies"])
  pins = _pins()
  for requirement in lock.declared_requirements(extras):
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
      continue  # another platform's package (tensorflow instead of tensorflow-cpu)
    name = canonicalize_name(requirement.name)
    assert name in pins, (f"{requirement} is declared in pyproject.toml but not pinned in "
                          "constraints.txt: install it and run scripts/write_constraints.py")
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {name}=={pins[name]}, outside the range {requirement} that "
        "pyproject.toml declares")


def test_constraints_are_what_this_environment_runs(tmp_path):
  """scripts/write_constraints.py, run here, writes the committed lock: the dependency
  closure of the extras setup.sh installs, at the installed versions. A stale lock (a
  dependency added, removed or upgraded without relocking) fails here."""
  with open(os.path.join(ROOT, "setup.sh")) as f:
    extras = f.read().split('-e ".[', 1)[1].split("]", 1)[0]
  output = tmp_path / "constraints.txt"
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "write_constraints.py"),
                  "--extras", extras, "--output", str(output)], check=True, timeout=120)
  installed, pins = _pins(str(output)), _pins()
  assert pins == installed, {
      "pinned, installed differently or not at all":
          {k: (v, installed.get(k)) for k, v in pins.items() if installed.get(k) != v},
      "installed, not pinned": sorted(set(installed) - set(pins))}


def test_requirements_install_what_setup_sh_installs():
  """requirements.txt is setup.sh's install line: the same extras under constraints.txt, and
  no versions of its own (the ranges stay in pyproject.toml, the pins in constraints.txt)."""
  with open(os.path.join(ROOT, "setup.sh")) as f:
    setup_extras = f.read().split('-e ".[', 1)[1].split("]", 1)[0]
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert lines == ["-c constraints.txt", f"-e .[{setup_extras}]"], lines
  assert set(setup_extras.split(",")) <= set(_pyproject()["project"]["optional-dependencies"])


def test_console_scripts_point_at_main_functions():
  """Every declared command names a function; each tool also runs as `python -m` here."""
  scripts = _pyproject()["project"]["scripts"]
  assert set(scripts) == {*BASE_TOOLS, "focal-jax-aot"}
  for name, target in scripts.items():
    module_name, attr = target.split(":")
    if module_name in NOT_YET_SHIPPED and importlib.util.find_spec(module_name) is None:
      continue
    module = importlib.import_module(module_name)
    assert callable(getattr(module, attr)), f"{name} -> {target} is not a function"
    if name not in BASE_TOOLS:  # the base tools run from the wheel below
      run = subprocess.run([sys.executable, "-m", module_name.removesuffix(".__main__"), "--help"],
                           capture_output=True, text=True, timeout=300)
      assert run.returncode == 0 and "usage:" in run.stdout, f"{name}:\n{run.stdout}{run.stderr}"


SMOKE = textwrap.dedent("""
    import importlib.util, os, subprocess, sys
    import numpy as np
    from flax import nnx
    import focal_jax

    assert focal_jax.__file__.startswith(sys.prefix), focal_jax.__file__  # the wheel's copy
    absent = ("torch", "tensorflow", "tensorflow_datasets", "ml_collections", "sklearn",
              "matplotlib")
    assert all(importlib.util.find_spec(m) is None for m in absent), "the venv is not empty"

    tiny = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    model = focal_jax.create_model("focal_tiny", num_classes=5, img_size=64, seed=0, **tiny)
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))  # one compilation instead of one per eager op
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits = np.asarray(forward(model, x))
    assert logits.shape == (2, 5) and np.isfinite(logits).all(), logits

    from focal_jax import convert
    from focal_jax.weights import files
    state = convert.to_torch_state_dict(model)
    files.save_weights_file(state, "official.safetensors")
    back = convert.from_torch_state_dict(files.load_weights_file("official.safetensors"),
                                         "focal_tiny", img_size=64, **tiny)
    back.eval()
    np.testing.assert_allclose(np.asarray(forward(back, x)), logits, rtol=0, atol=1e-6)

    cli = os.path.join(os.path.dirname(sys.executable), "focal-jax-convert")
    sets = ["--set", "embed_dim=16", "--set", "depths=[1,1,1,1]", "--set", "num_heads=[1,2,2,4]"]
    subprocess.run([cli, "from-torch", "--model", "focal_tiny", "--checkpoint",
                    "official.safetensors", "--output", "export", "--img-size", "64", *sets],
                   check=True)
    subprocess.run([cli, "to-torch", "--checkpoint", "export", "--output", "back.safetensors"],
                   check=True)
    again = files.load_weights_file("back.safetensors")
    assert set(again) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    loaded = sorted(m for m in absent if m in sys.modules)
    assert not loaded, loaded
    print("smoke ok:", len(state), "tensors, logits", logits.shape)
""")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
  """An empty virtual environment holding the built wheel with the safetensors extra."""
  tmp = tmp_path_factory.mktemp("wheel")
  source = tmp / "src"  # a copy, so that building leaves no build/ or egg-info in the tree
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  shutil.copytree(os.path.join(ROOT, "focal_jax"), source / "focal_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  # The README's commands: python -m build --wheel, then pip install -c constraints.txt
  # (--no-compile: only the modules the smoke run imports get byte-compiled, half the CPU).
  subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp / "dist"),
                  str(source)], check=True, capture_output=True, env=_clean_env(), timeout=300)
  (wheel,) = (tmp / "dist").glob("focal_jax-*.whl")
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
  python = str(venv / "bin" / "python")
  install = subprocess.run(
      [python, "-m", "pip", "install", "--quiet", "--no-compile", "-c", CONSTRAINTS,
       f"{wheel}[safetensors]"],
      capture_output=True, text=True, env=_clean_env(), timeout=900)
  assert install.returncode == 0, install.stdout + install.stderr
  return venv, tmp


def test_wheel_in_an_empty_venv_builds_runs_and_converts(wheel_venv):
  venv, tmp = wheel_venv
  work = tmp / "smoke"
  work.mkdir()
  (work / "smoke.py").write_text(SMOKE)
  result = subprocess.run([str(venv / "bin" / "python"), "smoke.py"], cwd=work,
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "smoke ok:" in result.stdout


def test_wheel_console_scripts_answer(wheel_venv):
  venv, tmp = wheel_venv
  bin_dir = venv / "bin"
  assert (bin_dir / "focal-jax-aot").exists()  # installed; it runs with the train, tpu extras
  runs = {name: subprocess.Popen([str(bin_dir / name), "--help"], cwd=tmp, env=_clean_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for name in BASE_TOOLS}
  summary = subprocess.run([str(bin_dir / "focal-jax-summary"), "--model", "focal_tiny"], cwd=tmp,
                           capture_output=True, text=True, env=_clean_env(), timeout=300)
  for name, run in runs.items():
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0 and "usage:" in out, f"{name} --help:\n{out}"
  assert summary.returncode == 0, summary.stderr
  assert "parameters: 28,880,380" in summary.stdout, summary.stdout
  assert "python -m focal_jax.convert" in subprocess.run(
      [str(bin_dir / "python"), "-m", "focal_jax.convert", "--help"], cwd=tmp, env=_clean_env(),
      capture_output=True, text=True, timeout=300).stdout
