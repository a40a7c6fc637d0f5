"""Weights both ways between an NNX FocalTransformer and the official PyTorch state_dict."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from focal_jax.convert import focalnet_names, names
from focal_jax.convert.names import Entry
from focal_jax.models import FocalNet, FocalTransformer, create_model
from focal_jax.weights.errors import InvalidWeights, StateDictMismatch
from focal_jax.weights.files import unwrap_state_dict


def official_entries(model: FocalTransformer) -> list[Entry]:
  """The official state_dict entries of a model of either family."""
  if isinstance(model, FocalNet):
    return focalnet_names.official_entries(model)
  return names.official_entries(model)


def _official_layout(state_dict: Mapping[str, Any], model: FocalTransformer) -> Mapping[str, Any]:
  """FocalNet weights in timm's or transformers' layout, renamed to the official one."""
  if isinstance(model, FocalNet):
    return focalnet_names.to_official(state_dict, model)
  return state_dict


def _param_at(params: Any, path: tuple) -> nnx.Variable:
  node = params
  for part in path:
    node = node[part]
  return node


def to_torch_state_dict(model: FocalTransformer) -> dict[str, np.ndarray]:
  """Every official state_dict key (buffers included) as NumPy arrays, official layouts.

  Parameters are float32, index buffers int64, the shift mask float32, so the result
  loads into the official model (or `focal_jax.convert.reference`) with strict=True
  once each array is wrapped with `torch.from_numpy`.
  """
  params = nnx.state(model, nnx.Param)
  result = {}
  for entry in official_entries(model):
    if entry.buffer is not None:
      result[entry.key] = np.array(entry.buffer)
    else:
      value = np.asarray(jax.device_get(_param_at(params, entry.path)[...]), dtype=np.float32)
      result[entry.key] = np.ascontiguousarray(entry.to_torch(value))
  return result


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(value: Any) -> str:
  """'float32', 'bfloat16', 'int64', ... of a NumPy array or a torch.Tensor."""
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return type(value).__name__
  return str(dtype).removeprefix("torch.")


def _in(source: str | None) -> str:
  return f" in {source}" if source else ""


def check_state_dict(state_dict: Mapping[str, Any], entries: list[Entry], variant: str,
                     source: str | None = None) -> None:
  """Raises StateDictMismatch listing missing, unexpected, mis-shaped and altered keys
  (`source`: the file it came from, named in the message)."""
  expected = {e.key: e for e in entries}
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected]
  wrong_shape, wrong_buffer = [], []
  for key, entry in expected.items():
    if key not in state_dict:
      continue
    shape = tuple(np.shape(state_dict[key]))
    if entry.buffer is not None:
      if shape != entry.buffer.shape:
        wrong_shape.append(f"{key}: got {shape}, expected {entry.buffer.shape}")
      elif not np.array_equal(_to_numpy(state_dict[key]), entry.buffer):
        wrong_buffer.append(key)
  if not (missing or unexpected or wrong_shape or wrong_buffer):
    return
  lines = [f"The state_dict{_in(source)} does not match {variant}."]
  for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                      ("wrongly shaped keys", wrong_shape),
                      ("buffers whose values differ (another img_size or option?)", wrong_buffer)):
    if keys:
      shown = "\n    ".join(keys[:30]) + (f"\n    ... and {len(keys) - 30} more" if len(keys) > 30 else "")
      lines.append(f"  {len(keys)} {title}:\n    {shown}")
  lines.extend(_key_set_report(state_dict, expected, wrong_buffer))
  lines.append("Pass the variant, img_size and options the checkpoint was trained with "
               "(e.g. use_conv_embed=True, focal_levels=[3, 3, 3, 3]).")
  raise StateDictMismatch("\n".join(lines))


def _key_set_report(state_dict: Mapping[str, Any], expected: dict[str, Entry],
                    wrong_buffer: list[str]) -> list[str]:
  """Focal-fast key sets (`topk_cloest_indice_*`) that differ from the ones computed for
  this geometry: which blocks, and how. They are refused, not re-indexed."""
  lines = []
  for key in wrong_buffer:
    if ".topk_cloest_indice_" not in key:
      continue
    got, ours = _to_numpy(state_dict[key]), expected[key].buffer
    differ = int((np.sort(got, axis=1) != np.sort(ours, axis=1)).any(axis=1).sum())
    how = (f"other keys in {differ} of {len(ours)} windows" if differ else
           "the same keys in another order")
    lines.append(f"  {key.rsplit('.attn.', 1)[0]}: level-{key[-1]} key sets hold {how}.")
  if lines:
    lines.insert(0, "Focal-fast key sets differ from the official ones that focal_jax computes for "
                 "this grid (torch's CPU top-k, tie order included); they are not re-indexed:")
  return lines


def _check_param_shapes(state_dict: Mapping[str, Any], entries: list[Entry], params: Any,
                        variant: str, source: str | None = None) -> None:
  wrong = []
  for entry in entries:
    if entry.buffer is not None:
      continue
    target = _param_at(params, entry.path)[...].shape
    got = tuple(np.shape(state_dict[entry.key]))
    official = tuple(entry.to_torch(np.empty(target, np.float32)).shape)
    if got != official:
      wrong.append(f"{entry.key}: got {got}, expected {official}")
  if wrong:
    raise StateDictMismatch(
        f"The state_dict{_in(source)} does not match {variant}.\n  {len(wrong)} wrongly "
        "shaped keys:\n    "
        + "\n    ".join(wrong[:30]) + "\nPass the variant and options the checkpoint was trained with.")


def _float_values(state_dict: Mapping[str, Any], entries: list[Entry],
                  source: str | None) -> dict[str, np.ndarray]:
  """{key: float32 array} of the parameters; raises InvalidWeights naming the parameters
  that are not floating point (e.g. integers where weights belong) or hold NaN or Inf."""
  values, not_float, non_finite = {}, [], []
  for entry in entries:
    if entry.buffer is not None:
      continue
    raw = state_dict[entry.key]
    dtype = _dtype_name(raw)
    if dtype not in FLOAT_DTYPES:
      not_float.append(f"{entry.key}: {dtype}")
      continue
    value = _to_numpy(raw).astype(np.float32)
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    if bad:
      non_finite.append(f"{entry.key}: {bad} of {value.size} values are NaN or Inf")
    values[entry.key] = value
  lines = []
  for title, keys in ((f"parameter(s) not floating point (expected one of "
                       f"{', '.join(FLOAT_DTYPES)})", not_float),
                      ("parameter(s) with NaN or Inf values", non_finite)):
    if keys:
      shown = "\n    ".join(keys[:10]) + (f"\n    ... and {len(keys) - 10} more"
                                          if len(keys) > 10 else "")
      lines.append(f"  {len(keys)} {title}:\n    {shown}")
  if lines:
    raise InvalidWeights(
        f"The weights{_in(source)} cannot be used:\n" + "\n".join(lines)
        + "\nThe file is damaged or was saved from a broken run: use another copy or an "
        "earlier checkpoint.")
  return values


def load_state_dict(model: FocalTransformer, state_dict: Mapping[str, Any],
                    variant: str = "the model", source: str | None = None) -> FocalTransformer:
  """Copies an official state_dict into `model` in place (strict: every key must fit, and
  every parameter must be finite floating point). `source` names the file in errors."""
  state_dict = _official_layout(unwrap_state_dict(state_dict), model)
  entries = official_entries(model)
  check_state_dict(state_dict, entries, variant, source)
  params = nnx.state(model, nnx.Param)
  _check_param_shapes(state_dict, entries, params, variant, source)
  values = _float_values(state_dict, entries, source)  # everything checked before any copy
  for entry in entries:
    if entry.buffer is None:
      variable = _param_at(params, entry.path)
      variable[...] = np.ascontiguousarray(entry.from_torch(values[entry.key]))
  nnx.update(model, params)
  return model


def params_by_path(state_dict: Mapping[str, Any], model: FocalTransformer
                   ) -> tuple[dict[tuple, np.ndarray], list[str]]:
  """The parameters an official state_dict holds, in focal_jax layout, keyed by the path of
  `model`'s parameter they map to, whatever their shapes (the caller decides what fits);
  and the state_dict keys that are no parameter of `model`. Buffers are left out: the model
  computes its own. `model` may be abstract (`nnx.eval_shape`)."""
  state_dict = _official_layout(unwrap_state_dict(state_dict), model)
  entries = official_entries(model)
  buffers = {e.key for e in entries if e.buffer is not None}
  params = {}
  for entry in entries:
    if entry.buffer is None and entry.key in state_dict:
      value = _to_numpy(state_dict[entry.key]).astype(np.float32)
      params[entry.path] = np.ascontiguousarray(entry.from_torch(value))
  known = {e.key for e in entries}
  unexpected = [k for k in state_dict if k not in known and k not in buffers]
  return params, unexpected


# The classifier weight in the official layout (both families), timm's and transformers'.
HEAD_WEIGHT_KEYS = ("head.weight", "head.fc.weight", "classifier.weight")


def from_torch_state_dict(state_dict: Mapping[str, Any], name: str | None = "focal_tiny",
                          img_size: Any = 224, source: str | None = None,
                          **overrides: Any) -> FocalTransformer:
  """Builds the variant `name` (with official-name overrides) holding the given weights.

  `num_classes` is read from the head unless given. FocalNet weights may come in the
  official layout, timm's or transformers' (recognised by their keys). Raises StateDictMismatch, listing
  missing, unexpected and wrongly shaped keys, when the weights belong to another model,
  and InvalidWeights for parameters that are not finite floating point; `source` (the file
  the weights came from) is named in both.
  """
  state_dict = unwrap_state_dict(state_dict)
  if "num_classes" not in overrides:
    head = next((state_dict[k] for k in HEAD_WEIGHT_KEYS if k in state_dict), None)
    overrides["num_classes"] = int(np.shape(head)[0]) if head is not None else 0
  model = create_model(name, img_size=img_size, **overrides)
  label = name or "the configured model"
  return load_state_dict(model, state_dict, f"{label} (img_size={img_size}, options={overrides})",
                         source)
