"""Models that start from trained weights: what `focal_jax.create_model(..., checkpoint_path=...)`
and a training run's `init_from` do with the parameters a checkpoint holds.

A checkpoint is an official `.pth` / `.safetensors` file or a parameter export (a training
run's `<workdir>/export`, or `python -m focal_jax.convert from-torch`'s output). Every
parameter of the new model must come from it with its shape, except the classifier head:
when the head's shape differs (another number of classes) or the checkpoint has none, the
head keeps its fresh initialisation and a warning lists the re-initialised keys, as timm
does for fine-tuning. `exclude` patterns re-initialise further parameters on purpose.

Names are the model's parameter paths joined by dots (`head.kernel`,
`layers.2.blocks.0.attn.qkv.kernel`); patterns are Python regular expressions searched in
them. The model package knows nothing of files; the formats live in `focal_jax.weights`,
the official names in `focal_jax.convert` (`convert.checkpoints` reads any checkpoint into
these names). This module works on names and arrays only.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from focal_jax import models

logger = logging.getLogger(__name__)

HEAD_PATTERN = r"^head\."  # the classifier, re-initialised whenever its shape differs
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def param_name(path: tuple[Any, ...]) -> str:
  """A pytree key path as the dotted parameter name, e.g. 'layers.0.blocks.1.attn.qkv.kernel'."""
  return jax.tree_util.keystr(path, simple=True, separator=".")


def param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """{dotted name: shape} of a parameter tree (arrays, ShapeDtypeStructs or nnx.State)."""
  return {param_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params)
                                                                 if isinstance(params, nnx.State)
                                                                 else params)}


def check_checkpoint_path(source: str) -> None:
  """Raises FileNotFoundError unless `source` is a parameter export or a weight file."""
  from focal_jax import weights  # noqa: PLC0415

  from focal_jax import storage  # noqa: PLC0415

  if weights.is_export(source) or (source.endswith(WEIGHT_FILE_SUFFIXES)
                                   and storage.isfile(source)):
    return
  if storage.isdir(source):
    raise FileNotFoundError(
        f"{source} is a directory but no parameter export (it has no {weights.MODEL_JSON} and "
        f"{weights.PARAMS_DIR}/). Pass an export (a training run's <workdir>/export, or the "
        "output of `python -m focal_jax.convert from-torch`) or a .pth / .safetensors file.")
  raise FileNotFoundError(
      f"No checkpoint at {source!r}: expected a parameter export directory or a file ending in "
      f"{', '.join(WEIGHT_FILE_SUFFIXES)}.")


def read_export_params(source: str) -> dict[str, np.ndarray]:
  """{dotted name: float32 array} of the parameters of an export directory."""
  from focal_jax import weights  # noqa: PLC0415  (orbax only when a checkpoint is read)

  tree = weights.load_exported_params(source)
  return {param_name(path): np.asarray(jax.device_get(leaf), np.float32)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def merge_checkpoint_params(target: dict[str, tuple[int, ...]], source: dict[str, np.ndarray],
                            where: str, exclude: Sequence[str] = ()
                            ) -> tuple[dict[str, np.ndarray], list[str]]:
  """(parameters to load {name: array}, names left to their fresh initialisation).

  `target` is {name: shape} of the model being built. The head (HEAD_PATTERN) and names
  matching an `exclude` pattern are re-initialised when the checkpoint lacks them or
  holds another shape (excluded ones always); any other missing, reshaped or unknown
  parameter is an error naming them.
  """
  patterns = [re.compile(p) for p in exclude]
  excluded = lambda name: any(p.search(name) for p in patterns)  # noqa: E731
  may_differ = lambda name: bool(re.search(HEAD_PATTERN, name)) or excluded(name)  # noqa: E731
  loaded, reinit, missing, reshaped = {}, [], [], []
  for name, shape in target.items():
    if excluded(name):
      reinit.append(name)
    elif name in source and tuple(source[name].shape) == tuple(shape):
      loaded[name] = source[name]
    elif may_differ(name):
      reinit.append(name)
    elif name in source:
      reshaped.append(f"{name}: checkpoint {tuple(source[name].shape)}, model {tuple(shape)}")
    else:
      missing.append(name)
  unexpected = [name for name in source if name not in target and not may_differ(name)]
  if missing or reshaped or unexpected:
    problems = [f"{len(names)} {what}: {_some(names)}" for what, names in (
        ("parameter(s) it lacks", missing), ("of another shape", reshaped),
        ("unknown to the model", unexpected)) if names]
    raise ValueError(
        f"The checkpoint {where} does not fit the model being built ({'; '.join(problems)}). "
        "Only the classifier head may differ; build the variant and options the checkpoint "
        "was trained with, or name parameters to re-initialise with exclude patterns.")
  if reinit:
    logger.warning("Loaded %d parameter arrays from %s; re-initialised %d that it does not "
                   "provide in this shape or that were excluded: %s", len(loaded), where,
                   len(reinit), ", ".join(reinit))
  return loaded, reinit


def load_params(model: models.FocalTransformer, source_params: dict[str, np.ndarray],
                where: str, exclude: Sequence[str] = ()) -> list[str]:
  """Loads `source_params` ({dotted name: array}, read from the checkpoint `where`) into
  `model` in place (see the module docstring); returns the names that kept their fresh
  initialisation."""
  params = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  loaded, reinit = merge_checkpoint_params(param_shapes(pure), source_params, where, exclude)
  pure = jax.tree_util.tree_map_with_path(
      lambda path, leaf: loaded.get(param_name(path), leaf), pure)
  nnx.replace_by_pure_dict(params, pure)
  nnx.update(model, params)
  return reinit


def _some(names: list[str], limit: int = 5) -> str:
  return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
