"""Flax NNX modules of the Focal family: the Focal Transformer (v1 and Focal-fast) and FocalNet."""

from typing import Any

from focal_jax.models import focalnet
from focal_jax.models.config import OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig, make_config
from focal_jax.models.focal_transformer import FocalStage, FocalTransformer
from focal_jax.models.focal_transformer import create_model as create_focal_transformer
from focal_jax.models.focalnet import FocalNet, FocalNetConfig

FOCALNET_VARIANTS = focalnet.VARIANTS
ALL_VARIANTS = {**VARIANTS, **FOCALNET_VARIANTS}  # every registered name, both families
MODEL_NAMES = tuple(ALL_VARIANTS)


def make_model_config(name: str | None = None, **overrides: Any) -> FocalConfig | FocalNetConfig:
  """The checked config of the variant `name` of either family (see `create_model`)."""
  if name in FOCALNET_VARIANTS:
    return focalnet.make_focalnet_config(name, **overrides)
  return make_config(name, **overrides)


def create_model(name: str | None = "focal_tiny", num_classes: int = 1000, img_size: Any = 224,
                 seed: int = 0, **overrides: Any) -> FocalTransformer:
  """Builds the variant `name` of either family (a Focal Transformer when `name` is None)
  with the official constructor's option names as overrides."""
  build = focalnet.create_focalnet if name in FOCALNET_VARIANTS else create_focal_transformer
  return build(name, num_classes=num_classes, img_size=img_size, seed=seed, **overrides)


__all__ = ["ALL_VARIANTS", "FOCALNET_VARIANTS", "FocalConfig", "FocalNet", "FocalNetConfig", "FocalStage",
           "FocalTransformer", "MODEL_NAMES", "OFFICIAL_PARAM_COUNTS", "VARIANTS",
           "create_model", "make_config", "make_model_config"]
