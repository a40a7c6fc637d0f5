"""focal_jax: the Focal Transformer in JAX / Flax NNX.

`create_model` here is `focal_jax.models.create_model` plus trained weights. The package
is where the model, the weight files and the official name map meet: `focal_jax.convert`
is imported only when a checkpoint is read, and the modules below (models, weights,
pretrained, training) never import it.
"""

from __future__ import annotations

from typing import Any, Sequence

# First, before JAX starts its backends: no libtpu start-up errors on a host without a TPU.
from focal_jax import platform

platform.quiet_tpu_start()

import numpy as np  # noqa: E402

from focal_jax import models  # noqa: E402
from focal_jax.models import (OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig,  # noqa: E402
                              FocalTransformer, make_config)
from focal_jax.models.flops import count_flops  # noqa: E402
from focal_jax.models.segmenter import Segmenter, create_segmenter  # noqa: E402
from focal_jax.segment import segment  # noqa: E402

__version__ = "0.1.0"


def create_model(name: str | None = "focal_tiny", num_classes: int = 1000, img_size: Any = 224,
                 seed: int = 0, checkpoint_path: str | None = None,
                 checkpoint_exclude: Sequence[str] = (), **overrides: Any) -> FocalTransformer:
  """`focal_jax.models.create_model`, then (with `checkpoint_path`) the checkpoint's weights.

  For fine-tuning: `create_model("focal_tiny", num_classes=10, checkpoint_path="ft.pth")`
  keeps every pretrained parameter and re-initialises the head (with a warning) because
  its shape differs. `checkpoint_exclude` re-initialises the parameters matching those
  regular expressions too (e.g. `[r"^head\\."]` for a head of the same shape). See
  `focal_jax.pretrained`.
  """
  model = models.create_model(name, num_classes=num_classes, img_size=img_size, seed=seed,
                              **overrides)
  if checkpoint_path:
    from focal_jax.convert import checkpoints  # noqa: PLC0415  orbax, torch: only when asked

    checkpoints.load_checkpoint(model, checkpoint_path, checkpoint_exclude)
  return model


def read_checkpoint_params(source: str, model: FocalTransformer) -> dict[str, np.ndarray]:
  """{dotted name: float32 array in focal_jax layout} of the parameters in `source` (an
  export, `.pth` or `.safetensors`); `model` (may be abstract) names the official keys.
  What a training run's `init_from` reads (see `focal_jax.convert.checkpoints`)."""
  from focal_jax.convert import checkpoints  # noqa: PLC0415

  return checkpoints.read_checkpoint_params(source, model)


__all__ = ["FocalConfig", "FocalTransformer", "OFFICIAL_PARAM_COUNTS", "Segmenter", "VARIANTS",
           "count_flops", "create_model", "create_segmenter", "make_config",
           "read_checkpoint_params", "segment"]
