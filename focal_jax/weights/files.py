"""Reading and writing official-format weight files: `.pth` (PyTorch) and `.safetensors`,
at a local path or a URL (`gs://...`).

Every file is untrusted. A `.pth` is a pickle, and a pickle can name any function for
the loader to import and call, so `.pth` files are read with `torch.load(weights_only=True)`
only: it builds tensors and plain containers and refuses any other name without
importing it. The one foreign class accepted is the yacs `CfgNode` that official training
checkpoints carry as their config, read as a plain `OrderedDict` (its code is never
imported). A file whose pickle names anything else is refused, naming those globals.
`.safetensors` holds raw arrays and a JSON header: nothing in it is executed.

A file that cannot be used (missing, empty, truncated, not a checkpoint, not a
state_dict) raises `WeightsFileError` naming the file and the problem. Both formats are
read and written as local files: a remote file is copied to a temporary local file first
(to read) or last (to write).
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from typing import Any, Mapping

import numpy as np

from focal_jax import storage
from focal_jax.weights.errors import UnsafeCheckpointError, WeightsFileError

# The official training loop pickles its yacs config; torch.load reads it as an OrderedDict.
YACS_CONFIG = (collections.OrderedDict, "yacs.config.CfgNode")

_RESAVE_HINT = (
    "If you trust where the file comes from, keep only its weights: in a Python you do not "
    "mind running the file's code in, `torch.save({{'model': torch.load({path!r}, "
    "weights_only=False)['model']}}, 'weights.pth')`, then convert weights.pth. Or ask for "
    "the weights as .safetensors.")


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  """Accepts a bare state_dict, the official `{'model': state_dict, ...}` wrapper or
  mmsegmentation's `{'meta': ..., 'state_dict': state_dict}`."""
  for wrapper in ("model", "state_dict"):
    if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
      return checkpoint[wrapper]
  return checkpoint


def _check_readable(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  if not os.path.isfile(path):
    raise WeightsFileError(f"{path} is a directory, not a weights file (.pth or .safetensors).")
  if os.path.getsize(path) == 0:
    raise WeightsFileError(f"{path} is empty (0 bytes): an interrupted download or copy? "
                           "Fetch or copy it again.")


def _first_line(error: BaseException) -> str:
  """'UnpicklingError: Unsupported operand 149': the error's kind and its telling line."""
  text = str(error).strip()
  found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # torch's refusals wrap it
  line = found.group(1) if found else (text.splitlines()[0] if text else "")
  return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__


def _why_unreadable(path: str, error: BaseException) -> str:
  """What is wrong with a file torch.load could not read, from what the file starts with."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):  # a zip archive: the format torch.save writes
    if not zipfile.is_zipfile(path):
      return ("it is truncated: a zip archive (the format torch.save writes) without its end, "
              "as an interrupted download or copy leaves it. Fetch or copy it again")
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
      shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
      return (f"it is a zip archive but not one torch.save wrote (no data.pkl; it holds "
              f"{shown or 'nothing'})")
    return "its zip archive is damaged. Fetch or copy it again"
  if head.startswith(b"\x80"):  # a pickle: torch's legacy format, or a plain pickle
    if isinstance(error, EOFError) or "EOF" in str(error):
      return ("it ends early (truncated?): an interrupted download or copy? Fetch or copy it "
              "again")
    return "it is a pickle but not one torch.save wrote"
  return f"it is not a PyTorch checkpoint (it starts with {head!r})"


def _unsafe_globals(path: str, error: BaseException) -> list[str]:
  """The globals of the file that weights_only refuses (called inside the safe_globals
  context): torch lists them for the zip format by reading the pickle's opcodes, without
  executing them; for the legacy format torch's error names the first one."""
  import torch  # noqa: PLC0415

  try:
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:  # noqa: BLE001  not a zip checkpoint: read torch's message instead
    return re.findall(r"GLOBAL (\S+) (?:was not an allowed|whose module)", str(error))


def load_torch_file(path: str) -> Mapping[str, Any]:
  """A `.pth` file's state_dict (bare, or from `{'model': state_dict, ...}`, e.g. an official
  training checkpoint). Raises as `load_torch_checkpoint` does, and WeightsFileError for a
  file that holds no state_dict."""
  return _state_dict_of(path, load_torch_checkpoint(path))


def load_torch_checkpoint(path: str) -> Any:
  """Everything a `.pth` file holds, e.g. an official training checkpoint's model,
  optimizer, lr_scheduler, max_accuracy, epoch and config (the yacs config as an
  OrderedDict).

  Read with `torch.load(weights_only=True)`, the yacs config admitted as an OrderedDict.
  Raises UnsafeCheckpointError (naming the globals) for anything else a pickle names, and
  WeightsFileError for a file that is empty, truncated or not a PyTorch checkpoint.
  """
  import torch  # noqa: PLC0415  optional dependency

  _check_readable(path)
  with torch.serialization.safe_globals([YACS_CONFIG]), warnings.catch_warnings():
    # A pickle of another protocol makes torch warn; whatever it holds is checked anyway.
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
      checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
      unsafe = _unsafe_globals(path, error)
      if not unsafe:
        raise WeightsFileError(f"{path} cannot be read as a PyTorch checkpoint: "
                               f"{_why_unreadable(path, error)} ({_first_line(error)}).") from None
      raise UnsafeCheckpointError(
          f"{path} is refused: its pickle names {', '.join(unsafe)}, which loading it would "
          "import and call (a .pth can run any code that way). Only tensors, plain "
          "containers and the official training config (yacs.config.CfgNode, read as a dict) "
          "are accepted. " + _RESAVE_HINT.format(path=path)) from None
    except Exception as error:  # noqa: BLE001  torch's readers raise many kinds
      raise WeightsFileError(f"{path} cannot be read as a PyTorch checkpoint: "
                             f"{_why_unreadable(path, error)} ({_first_line(error)}).") from None
  return checkpoint


def _state_dict_of(path: str, checkpoint: Any) -> Mapping[str, Any]:
  import torch  # noqa: PLC0415

  if not isinstance(checkpoint, Mapping):
    raise WeightsFileError(f"{path} holds a {type(checkpoint).__name__}, expected a state_dict "
                           "or a {'model': state_dict} dictionary.")
  state_dict = unwrap_state_dict(checkpoint)
  not_tensors = [f"{key!r} ({type(value).__name__})" for key, value in state_dict.items()
                 if not (isinstance(key, str) and isinstance(value, torch.Tensor))]
  if not_tensors:
    shown = ", ".join(not_tensors[:5]) + (f" and {len(not_tensors) - 5} more"
                                          if len(not_tensors) > 5 else "")
    raise WeightsFileError(f"{path} is not a state_dict: a state_dict maps names to tensors, "
                           f"but it holds {shown}.")
  return state_dict


def save_torch_file(state_dict: Mapping[str, np.ndarray], path: str,
                    meta: Mapping[str, Any] | None = None) -> None:
  """Writes `{'model': state_dict}` as the official code does, or with `meta` (plain values)
  mmsegmentation's `{'meta': meta, 'state_dict': state_dict}`; loads with weights_only=True."""
  import torch  # noqa: PLC0415  optional dependency

  tensors = {key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}
  checkpoint = {"model": tensors} if meta is None else {"meta": dict(meta), "state_dict": tensors}
  _atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` state_dict as NumPy arrays (no PyTorch needed); bfloat16 tensors come
  back as `ml_dtypes.bfloat16` arrays."""
  import ml_dtypes  # noqa: F401, PLC0415  registers bfloat16 with NumPy: safetensors needs it
  from safetensors import SafetensorError  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  _check_readable(path)
  try:
    return load_file(path)
  except SafetensorError as error:
    reason = str(error)
    if "not fully covered" in reason or "incomplete" in reason:
      what = "it is truncated (its header lists more bytes than the file holds)"
    else:
      what = "it is damaged or not a .safetensors file"
    raise WeightsFileError(f"{path} cannot be read as .safetensors: {what} "
                           f"({_first_line(error)}).") from None


def save_safetensors_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  import ml_dtypes  # noqa: F401, PLC0415  bfloat16 arrays, see load_safetensors_file
  from safetensors.numpy import save_file  # noqa: PLC0415

  arrays = {key: np.asarray(value, order="C") for key, value in state_dict.items()}  # 0-d stays 0-d
  _atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={"format": "pt"}))


def load_weights_file(path: str) -> Mapping[str, Any]:
  """The state_dict of a `.safetensors` file, or else of a PyTorch file (local or remote)."""
  if not storage.is_remote(path):
    return _load_local(path)
  if not storage.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  with tempfile.TemporaryDirectory(prefix="focal_jax_weights_") as local_dir:
    return _load_local(storage.download(path, local_dir))


def save_weights_file(state_dict: Mapping[str, np.ndarray], path: str,
                      meta: Mapping[str, Any] | None = None) -> None:
  """Writes `state_dict` as `.safetensors` or (any other name) as the official `.pth`
  (mmsegmentation's `{'meta', 'state_dict'}` when `meta` is given)."""
  if not storage.is_remote(path):
    _save_local(state_dict, path, meta)
    return
  with tempfile.TemporaryDirectory(prefix="focal_jax_weights_") as local_dir:
    local = os.path.join(local_dir, os.path.basename(path))
    _save_local(state_dict, local, meta)
    storage.upload(local, path)


def _load_local(path: str) -> Mapping[str, Any]:
  if path.endswith(".safetensors"):
    return load_safetensors_file(path)
  return load_torch_file(path)


def _save_local(state_dict: Mapping[str, np.ndarray], path: str,
                meta: Mapping[str, Any] | None = None) -> None:
  if path.endswith(".safetensors"):
    save_safetensors_file(state_dict, path)  # tensors only: `meta` is not kept
  else:
    save_torch_file(state_dict, path, meta)


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
