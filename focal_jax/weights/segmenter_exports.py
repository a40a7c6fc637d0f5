"""Parameter exports of UPerNet segmenters (the layout of `exports`, one more field).

model.json gains `"task": "segmentation"`; `params/` holds the segmenter's parameters and
its BatchNorm statistics (`mean`, `var`, `num_batches_tracked` beside each `scale`, `bias`),
a pure dict mirroring the model tree: without them the heads cannot evaluate.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from focal_jax.models.segmenter import Segmenter, create_segmenter
from focal_jax.weights.exports import (_int_keys, check_shapes, merge_with_fresh_rest, export_params, load_exported_params,
                                       overrides_from_json, read_description)
from focal_jax.weights.layout import EXPORT_FORMAT

TASK = "segmentation"
EXPORTED = (nnx.Param, nnx.BatchStat)


def segmenter_description(name: str | None, num_classes: int, img_size: Any,
                          overrides: dict[str, Any]) -> dict[str, Any]:
  """model.json of a segmenter export: how to rebuild it with `create_segmenter`."""
  size = list(img_size) if isinstance(img_size, (tuple, list)) else int(img_size)
  return {"format": EXPORT_FORMAT, "task": TASK, "model": name, "num_classes": int(num_classes),
          "img_size": size, "overrides": overrides}


def is_segmenter_description(description: dict[str, Any]) -> bool:
  return description.get("task") == TASK


def export_segmenter(directory: str, segmenter: Segmenter, description: dict[str, Any]) -> str:
  """Writes the parameters and BatchNorm statistics of `segmenter` with `description`."""
  return export_params(directory, nnx.to_pure_dict(nnx.state(segmenter, EXPORTED)), description)


def _build(description: dict[str, Any]) -> Segmenter:
  img_size = description["img_size"]
  return create_segmenter(description["model"], description["num_classes"],
                          tuple(img_size) if isinstance(img_size, list) else img_size,
                          **overrides_from_json(description["overrides"]))


def load_exported_segmenter(path: str, seed: int = 0) -> Segmenter:
  """The Segmenter of an export directory, parameters and statistics loaded (checked)."""
  description = read_description(path)
  if not is_segmenter_description(description):
    raise ValueError(f"{path} holds a classification model ({description.get('model')}), not a "
                     "segmenter; load it with focal_jax.weights.load_exported_model.")
  model = nnx.eval_shape(lambda: _build(description))
  graphdef, expected, rest = nnx.split(model, EXPORTED, ...)
  expected = nnx.to_pure_dict(expected)
  values = _int_keys(load_exported_params(path))
  check_shapes(values, expected, f"The export {path} does not fit the segmenter described "
               f"beside it ({description})")
  return merge_with_fresh_rest(graphdef, values, nnx.to_pure_dict(rest), seed)
