"""focal_jax: the Focal Transformer in JAX / Flax NNX."""

from focal_jax.models import (OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig, FocalTransformer,
                              make_config)
from focal_jax.models.flops import count_flops
from focal_jax.models.segmenter import Segmenter, create_segmenter
from focal_jax.pretrained import create_model  # models.create_model + checkpoint_path
from focal_jax.segment import segment

__version__ = "0.1.0"

__all__ = ["FocalConfig", "FocalTransformer", "OFFICIAL_PARAM_COUNTS", "Segmenter", "VARIANTS",
           "count_flops", "create_model", "create_segmenter", "make_config", "segment"]
