"""`convert.to_torch_state_dict` / `convert.from_torch_state_dict`: one entry for both tasks.

Classification models map to the official Focal Transformer state_dict (`state_dict`),
segmenters to mmsegmentation's UPerNet layout (`segmentation`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from focal_jax.convert import segmentation, state_dict
from focal_jax.models.focal_transformer import FocalTransformer
from focal_jax.models.segmenter import Segmenter

TASKS = ("classification", "segmentation")


def to_torch_state_dict(model: FocalTransformer | Segmenter) -> dict[str, np.ndarray]:
  """Every state_dict key (buffers included) as NumPy arrays in PyTorch layouts: the
  official Focal Transformer's, or mmsegmentation's for a Segmenter (`backbone.`,
  `decode_head.`, `auxiliary_head.`, BatchNorm statistics included)."""
  if isinstance(model, Segmenter):
    return segmentation.segmentation_state_dict(model)
  return state_dict.to_torch_state_dict(model)


def from_torch_state_dict(weights: Mapping[str, Any], name: str | None = "focal_tiny",
                          img_size: Any = None, source: str | None = None,
                          task: str = "classification",
                          **overrides: Any) -> FocalTransformer | Segmenter:
  """Builds the variant `name` (official-name `overrides`) holding the given weights.

  classification (img_size 224 by default): the official state_dict or `{'model': ...}`;
  `num_classes` read from the head unless given. segmentation (img_size 512 by default):
  mmsegmentation's state_dict or `{'meta': ..., 'state_dict': ...}` into
  `create_segmenter(name, num_classes, img_size, **overrides)`; `num_classes` read from
  `decode_head.conv_seg` unless given. Raises StateDictMismatch (missing, unexpected,
  wrongly shaped keys) and InvalidWeights (values that cannot be used), naming `source`.
  """
  if task == "segmentation":
    return segmentation.from_segmentation_state_dict(
        weights, name, img_size=512 if img_size is None else img_size, source=source, **overrides)
  if task != "classification":
    raise ValueError(f"task={task!r}; expected one of {TASKS}.")
  return state_dict.from_torch_state_dict(weights, name, 224 if img_size is None else img_size,
                                          source, **overrides)
