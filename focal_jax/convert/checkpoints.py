"""The parameters a model starts from, read from any checkpoint: a parameter export, or an
official `.pth` / `.safetensors` file whose keys the official name map translates.

`focal_jax.create_model(checkpoint_path=...)` and a training run's `init_from` read their
checkpoint here; what happens to the parameters next (which load, which the head
re-initialises) is `focal_jax.pretrained`'s.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from focal_jax import models, pretrained, weights
from focal_jax.convert.state_dict import params_by_path


def read_checkpoint_params(source: str, model: models.FocalTransformer) -> dict[str, np.ndarray]:
  """{dotted name: float32 array in focal_jax layout} of the parameters in `source` (an export
  directory, `.pth` or `.safetensors`). `model` (may be abstract) names the official keys."""
  pretrained.check_checkpoint_path(source)
  if weights.is_export(source):
    return pretrained.read_export_params(source)
  by_path, unexpected = params_by_path(weights.load_weights_file(source), model)
  unexpected = [key for key in unexpected if not re.search(pretrained.HEAD_PATTERN, key)]
  if unexpected:
    shown = ", ".join(unexpected[:5]) + (f" (+{len(unexpected) - 5} more)"
                                         if len(unexpected) > 5 else "")
    raise ValueError(
        f"{source} holds {len(unexpected)} tensor(s) that are no parameter of the model being "
        f"built: {shown}. Build the variant and options it was trained with "
        "(e.g. use_conv_embed=True, focal_levels=[3, 3, 3, 3]).")
  return {".".join(str(part) for part in path): value for path, value in by_path.items()}


def load_checkpoint(model: models.FocalTransformer, source: str, exclude: Sequence[str] = ()
                    ) -> list[str]:
  """Loads `source` into `model` in place (see `focal_jax.pretrained`); returns the names
  that kept their fresh initialisation."""
  return pretrained.load_params(model, read_checkpoint_params(source, model), source, exclude)
