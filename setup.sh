#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs focal_jax with everything its tests need.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  # pyenv installs that are not the active version
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python3; do
    if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  echo "focal_jax needs Python 3.12 or newer (jax 0.12 and flax 0.12.12 require it); none found." >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The dependencies pyproject.toml declares, at the exact versions in constraints.txt (the
# ones the tests ran with): `all` (every extra that runs on any machine), `tpu` (libtpu, which
# also compiles for TPU slices on a host without them) and `test` (the test and lint tools).
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[all,tpu,test]"
# The `gpu-plan` extra (XLA's CUDA compiler, for `python -m focal_jax.aot --topology h100:8`),
# installed apart in .venv/gpu-plan: only the process that plans a GPU run loads it
# (focal_jax.cuda_compiler); where jax looks for plugins, it would make every `import jax` on
# a host without a GPU print a traceback.
.venv/bin/python -m pip install --quiet --upgrade --no-deps --target .venv/gpu-plan \
  -c constraints.txt $(.venv/bin/python -c 'import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu-plan"]))')
echo "focal_jax is installed in .venv ($(.venv/bin/python --version))"
