"""Segmenter weights both ways in mmsegmentation's layout (`segmentation_names`).

`convert.to_torch_state_dict(segmenter)` and `convert.from_torch_state_dict(sd, name,
task="segmentation", ...)` land here. A checkpoint is a bare state_dict or
mmsegmentation's `{"meta": ..., "state_dict": ...}`.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from focal_jax.convert.names import Entry
from focal_jax.convert.segmentation_names import is_counter, segmentation_entries
from focal_jax.convert.state_dict import (_check_param_shapes, _dtype_name, _float_values, _in,
                                          _param_at, _to_numpy, check_state_dict)
from focal_jax.models.segmenter import Segmenter, create_segmenter
from focal_jax.weights.errors import InvalidWeights
from focal_jax.weights.files import unwrap_state_dict

DEFAULT_NUM_CLASSES = 150  # ADE20K


def segmentation_state_dict(segmenter: Segmenter) -> dict[str, np.ndarray]:
  """Every mmsegmentation state_dict key (Focal buffers, BN running statistics and
  counters included) as NumPy arrays in PyTorch layouts."""
  state = nnx.state(segmenter)
  result = {}
  for entry in segmentation_entries(segmenter):
    if entry.buffer is not None:
      result[entry.key] = np.array(entry.buffer)
      continue
    value = np.asarray(jax.device_get(_param_at(state, entry.path)[...]))
    value = value if is_counter(entry) else value.astype(np.float32)
    result[entry.key] = np.array(entry.to_torch(value), order="C")
  return result


def checkpoint_meta(segmenter: Segmenter, name: str | None) -> dict[str, Any]:
  """The `meta` written beside the state_dict (plain values: loads with weights_only)."""
  config = segmenter.config
  return {"framework": "focal_jax", "task": "segmentation", "backbone": name,
          "num_classes": segmenter.num_classes, "img_size": list(config.img_size),
          "backbone_options": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in config.official_kwargs().items()
                               if k not in ("img_size", "num_classes")}}


def _check_counters(state_dict: Mapping[str, Any], entries: list[Entry], source: str | None
                    ) -> dict[str, np.ndarray]:
  values, wrong = {}, []
  for entry in entries:
    raw = state_dict[entry.key]
    dtype = _dtype_name(raw)
    value = _to_numpy(raw)
    if not dtype.startswith(("int", "uint")) or np.any(value < 0):
      wrong.append(f"{entry.key}: {dtype} {value.tolist() if value.size == 1 else value.shape}")
    values[entry.key] = value
  if wrong:
    raise InvalidWeights(f"The weights{_in(source)} cannot be used: BatchNorm counters must be "
                         "non-negative integers:\n    " + "\n    ".join(wrong[:10]))
  return values


def load_segmentation_state_dict(segmenter: Segmenter, state_dict: Mapping[str, Any],
                                 description: str = "the segmenter", source: str | None = None
                                 ) -> Segmenter:
  """Copies an mmsegmentation state_dict into `segmenter` in place (strict: every key,
  shape and Focal buffer must fit, every weight and statistic be finite)."""
  state_dict = unwrap_state_dict(state_dict)
  entries = segmentation_entries(segmenter)
  check_state_dict(state_dict, entries, description, source)
  state = nnx.state(segmenter)
  _check_param_shapes(state_dict, entries, state, description, source)
  counters = [e for e in entries if e.buffer is None and is_counter(e)]
  values = _float_values(state_dict, [e for e in entries if not is_counter(e)], source)
  values.update(_check_counters(state_dict, counters, source))
  for entry in entries:
    if entry.buffer is None:
      variable = _param_at(state, entry.path)
      variable[...] = np.array(entry.from_torch(values[entry.key]), order="C")  # 0-d stays 0-d
  nnx.update(segmenter, state)
  return segmenter


def from_segmentation_state_dict(state_dict: Mapping[str, Any], name: str | None = "focal_tiny",
                                 num_classes: int | None = None, img_size: Any = 512,
                                 source: str | None = None, **overrides: Any) -> Segmenter:
  """Builds `create_segmenter(name, num_classes, img_size, **overrides)` holding the weights
  (`num_classes` read from `decode_head.conv_seg.bias` unless given)."""
  state_dict = unwrap_state_dict(state_dict)
  if num_classes is None:
    bias = state_dict.get("decode_head.conv_seg.bias")
    num_classes = int(np.shape(bias)[0]) if bias is not None else DEFAULT_NUM_CLASSES
  auxiliary = any(key.startswith("auxiliary_head.") for key in state_dict)
  segmenter = create_segmenter(name, num_classes, img_size,
                               auxiliary_head=overrides.pop("auxiliary_head", auxiliary),
                               **overrides)
  description = (f"UPerNet {name or 'the configured backbone'} (num_classes={num_classes}, "
                 f"img_size={img_size}, options={overrides})")
  return load_segmentation_state_dict(segmenter, state_dict, description, source)
