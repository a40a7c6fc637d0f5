"""Flax NNX modules of the Focal Transformer."""

from focal_jax.models.config import OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig, make_config
from focal_jax.models.focal_transformer import FocalStage, FocalTransformer, create_model

__all__ = ["FocalConfig", "FocalStage", "FocalTransformer", "OFFICIAL_PARAM_COUNTS", "VARIANTS",
           "create_model", "make_config"]
