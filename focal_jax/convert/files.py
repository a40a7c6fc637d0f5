"""Reading and writing official-format weight files: `.pth` (PyTorch) and `.safetensors`."""

from __future__ import annotations

import os
import pickle
import types
import warnings
from typing import Any, Mapping

import numpy as np

from focal_jax.convert.state_dict import unwrap_state_dict


class _Opaque(dict):
  """Stands in for any non-tensor object of a checkpoint (e.g. the pickled yacs config)."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__()

  def __setstate__(self, state: Any) -> None:
    self.__dict__["state"] = state


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("copyreg", "_reconstructor"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"),
    ("builtins", "bool"), ("builtins", "complex"), ("builtins", "slice"), ("builtins", "object"),
    ("_codecs", "encode"),
}


class _TensorsOnlyUnpickler(pickle.Unpickler):
  """Resolves torch and plain containers; every other class becomes an inert `_Opaque`.

  Nothing outside torch, numpy and the builtin containers is imported or executed, so a
  training checkpoint's optimizer, scheduler and config objects load as placeholders.
  """

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _SAFE_GLOBALS or module.split(".")[0] in ("torch", "numpy"):
      return super().find_class(module, name)
    return type(name, (_Opaque,), {"__module__": "focal_jax.convert.opaque"})


_TENSORS_ONLY_PICKLE = types.SimpleNamespace(
    Unpickler=_TensorsOnlyUnpickler, load=pickle.load, __name__="focal_jax_tensors_only_pickle")


def load_torch_file(path: str) -> Mapping[str, Any]:
  """A `.pth` file's state_dict (bare, or from the official `{'model': ...}` wrapper).

  PyTorch >= 2.6 loads with `weights_only=True`, which refuses the pickled yacs config
  that official training checkpoints carry. Such a file is then read again with a
  restricted unpickler that builds tensors and containers only and replaces every other
  object with an inert placeholder; a warning says so.
  """
  import torch  # optional dependency

  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    warnings.warn(
        f"{path} holds objects besides tensors ({str(error).splitlines()[0][:200]}); reading it "
        "with a restricted unpickler that keeps tensors and replaces other objects (such as the "
        "official training config) with placeholders. Only the weights are used.", stacklevel=2)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False,
                            pickle_module=_TENSORS_ONLY_PICKLE)
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a state_dict or a "
                     "{'model': state_dict} dictionary.")
  return unwrap_state_dict(checkpoint)


def save_torch_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """Writes `{'model': state_dict}` as the official code does (loads with weights_only=True)."""
  import torch  # optional dependency

  tensors = {key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}
  _atomic_write(path, lambda tmp: torch.save({"model": tensors}, tmp))


def load_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` state_dict as NumPy arrays (no PyTorch needed)."""
  from safetensors.numpy import load_file

  return load_file(path)


def save_safetensors_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file

  arrays = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
  _atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}))


def load_weights_file(path: str) -> Mapping[str, Any]:
  """Dispatches on the extension: `.safetensors`, else a PyTorch file."""
  if path.endswith(".safetensors"):
    return load_safetensors_file(path)
  return load_torch_file(path)


def save_weights_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  if path.endswith(".safetensors"):
    save_safetensors_file(state_dict, path)
  else:
    save_torch_file(state_dict, path)


def _atomic_write(path: str, write) -> None:
  """Writes to a temporary file beside `path`, then renames: an existing file is never lost."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"The output directory {directory!r} does not exist; create it first.")
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
