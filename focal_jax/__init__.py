"""focal_jax: the Focal Transformer in JAX / Flax NNX."""

from focal_jax.models import (OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig, FocalTransformer,
                              make_config)
from focal_jax.models.flops import count_flops
from focal_jax.pretrained import create_model  # models.create_model + checkpoint_path

__version__ = "0.1.0"

__all__ = ["FocalConfig", "FocalTransformer", "OFFICIAL_PARAM_COUNTS", "VARIANTS", "count_flops",
           "create_model", "make_config"]
