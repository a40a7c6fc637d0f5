"""Official-format weight files, `.pth` (PyTorch, optional) and `.safetensors`, at a local
path or a URL (`gs://...`): a remote file is copied to a temporary local file first (to
read) or last (to write), since both formats are read and written as local files."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np

from focal_jax import storage
from focal_jax.convert import files as formats


def load_weights_file(path: str) -> Mapping[str, Any]:
  """The state_dict of a `.safetensors` or `.pth` file (see `focal_jax.convert.files`)."""
  if not storage.is_remote(path):
    return formats.load_weights_file(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  with tempfile.TemporaryDirectory(prefix="focal_jax_weights_") as local_dir:
    return formats.load_weights_file(storage.download(path, local_dir))


def save_weights_file(state_dict: Mapping[str, np.ndarray], path: str,
                      meta: Mapping[str, Any] | None = None) -> None:
  """Writes `state_dict` as `.safetensors` or (any other name) as the official `.pth`
  (mmsegmentation's `{'meta', 'state_dict'}` when `meta` is given)."""
  if not storage.is_remote(path):
    formats.save_weights_file(state_dict, path, meta)
    return
  with tempfile.TemporaryDirectory(prefix="focal_jax_weights_") as local_dir:
    local = os.path.join(local_dir, os.path.basename(path))
    formats.save_weights_file(state_dict, local, meta)
    storage.upload(local, path)
