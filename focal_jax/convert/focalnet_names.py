"""FocalNet's names and layouts: the official state_dict (microsoft/FocalNet), timm's and
Hugging Face transformers' (`FocalNetForImageClassification`).

`official_entries(model)` lists every official key in the official order with the path of
its NNX parameter and the layout change; `layout_of(state_dict)` recognises the three
layouts by their keys; `to_official(state_dict, model)` and `from_official(state_dict,
layout, model)` rename and reshape between them. No PyTorch is needed here.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

import numpy as np

from focal_jax.convert.names import Entry, Path, _conv, _conv_from_torch, _conv_to_torch, _linear, _norm
from focal_jax.models.focalnet import FocalNet

OFFICIAL, TIMM, HUGGING_FACE = "official", "timm", "transformers"
LAYOUTS = (OFFICIAL, TIMM, HUGGING_FACE)
HF_PREFIX = "focalnet."  # FocalNetForImageClassification's backbone; absent in FocalNetModel files


def _patch_embed(key: str, path: Path, embed) -> Iterator[Entry]:
  yield from _conv(f"{key}.proj", (*path, "proj"))
  if embed.norm is not None:
    yield from _norm(f"{key}.norm", (*path, "norm"))


def _block(key: str, path: Path, block) -> Iterator[Entry]:
  # PyTorch lists a module's own parameters first, then its children in creation order.
  if block.gamma_1 is not None:
    yield Entry(f"{key}.gamma_1", (*path, "gamma_1"))
    yield Entry(f"{key}.gamma_2", (*path, "gamma_2"))
  yield from _norm(f"{key}.norm1", (*path, "norm1"))
  mod_key, mod_path = f"{key}.modulation", (*path, "modulation")
  yield from _linear(f"{mod_key}.f", (*mod_path, "f"))
  yield from _conv(f"{mod_key}.h", (*mod_path, "h"))
  yield from _linear(f"{mod_key}.proj", (*mod_path, "proj"))
  for level in range(len(block.modulation.focal_layers)):
    yield Entry(f"{mod_key}.focal_layers.{level}.0.weight",
                (*mod_path, "focal_layers", level, "kernel"), _conv_to_torch, _conv_from_torch)
  if block.modulation.ln is not None:
    yield from _norm(f"{mod_key}.ln", (*mod_path, "ln"))
  yield from _norm(f"{key}.norm2", (*path, "norm2"))
  yield from _linear(f"{key}.mlp.fc1", (*path, "mlp", "fc1"))
  yield from _linear(f"{key}.mlp.fc2", (*path, "mlp", "fc2"))


def official_entries(model: FocalNet) -> list[Entry]:
  """Every official state_dict entry of `model` (FocalNet has no buffers), official order."""
  entries = list(_patch_embed("patch_embed", ("patch_embed",), model.patch_embed))
  for i, layer in enumerate(model.layers):
    for j, block in enumerate(layer.blocks):
      entries.extend(_block(f"layers.{i}.blocks.{j}", ("layers", i, "blocks", j), block))
    if layer.downsample is not None:
      entries.extend(_patch_embed(f"layers.{i}.downsample", ("layers", i, "downsample"),
                                  layer.downsample))
  if model.norm is not None:  # a dense-prediction backbone has none
    entries.extend(_norm("norm", ("norm",)))
  if model.head is not None:
    entries.extend(_linear("head", ("head",)))
  return entries


def layout_of(state_dict: Mapping[str, Any]) -> str:
  """'official', 'timm' or 'transformers', recognised by the stem's key."""
  if any(key.startswith("stem.") for key in state_dict):
    return TIMM
  if any(key.removeprefix(HF_PREFIX).startswith("embeddings.") for key in state_dict):
    return HUGGING_FACE
  return OFFICIAL


_TIMM_CONV_1X1 = re.compile(r"\.(modulation\.(f|proj)|mlp\.fc[12])\.weight$")


def timm_key(key: str, use_postln: bool) -> str:
  """The timm name of an official key (timm's own `checkpoint_filter_fn`, inverted:
  downsamples open the next stage, layer scale is `ls1.gamma`, post-norms are `norm1_post`)."""
  key = re.sub(r"gamma_([12])$", r"ls\1.gamma", key)
  key = key.replace("patch_embed.", "stem.")
  key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample",
               key)
  if use_postln:
    key = re.sub(r"\.norm([12])\.", r".norm\1_post.", key)
  key = key.replace(".modulation.ln.", ".modulation.norm.")
  return re.sub(r"^head\.", "head.fc.", key)


_HF_RENAMES = (
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "embeddings.norm."),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"^layers\.(\d+)\.downsample\.proj\.", r"encoder.stages.\1.downsample.projection."),
    (r"^layers\.(\d+)\.downsample\.", r"encoder.stages.\1.downsample."),
    (r"\.modulation\.f\.", ".modulation.projection_in."),
    (r"\.modulation\.h\.", ".modulation.projection_context."),
    (r"\.modulation\.proj\.", ".modulation.projection_out."),
    (r"\.modulation\.ln\.", ".modulation.layernorm."),
    (r"^norm\.", "layernorm."),
)


def hf_key(key: str) -> str:
  """The `FocalNetForImageClassification` name of an official key."""
  if key.startswith("head."):
    return "classifier." + key.removeprefix("head.")
  for pattern, replacement in _HF_RENAMES:
    key = re.sub(pattern, replacement, key)
  return HF_PREFIX + key


def foreign_key(key: str, layout: str, use_postln: bool) -> str:
  if layout == TIMM:
    return timm_key(key, use_postln)
  if layout == HUGGING_FACE:
    return hf_key(key)
  return key


def to_official(state_dict: Mapping[str, Any], model: FocalNet) -> dict[str, Any]:
  """A timm or transformers state_dict renamed (and 1x1 convs reshaped to Linear weights)
  to the official layout; an official one is returned as is. Keys that belong to no
  official entry keep their names, so the strict checks downstream report them."""
  layout = layout_of(state_dict)
  if layout == OFFICIAL:
    return dict(state_dict)
  use_postln = model.config.use_postln
  official_names = {}
  for entry in official_entries(model):
    name = foreign_key(entry.key, layout, use_postln)
    official_names[name] = entry.key
    if layout == HUGGING_FACE:
      official_names[name.removeprefix(HF_PREFIX)] = entry.key  # FocalNetModel files
  result = {}
  for key, value in state_dict.items():
    if layout == HUGGING_FACE and key.removeprefix(HF_PREFIX) == "embeddings.mask_token":
      continue  # FocalNetForMaskedImageModeling's token, no part of the classifier
    official = official_names.get(key, key)
    if layout == TIMM and _TIMM_CONV_1X1.search(key) and len(value.shape) == 4:
      value = value.reshape(tuple(value.shape[:2]))  # [out, in, 1, 1] -> [out, in]
    result[official] = value
  return result


def from_official(state_dict: Mapping[str, np.ndarray], layout: str,
                  model: FocalNet) -> dict[str, np.ndarray]:
  """An official state_dict (e.g. `to_torch_state_dict(model)`) in another layout, e.g. to
  load into timm's or transformers' model with strict=True."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}.")
  result = {}
  for key, value in state_dict.items():
    name = foreign_key(key, layout, model.config.use_postln)
    if layout == TIMM and _TIMM_CONV_1X1.search(name):
      value = np.asarray(value)[:, :, None, None]  # [out, in] -> [out, in, 1, 1]
    result[name] = value
  return result
