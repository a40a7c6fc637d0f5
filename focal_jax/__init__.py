"""focal_jax: the Focal Transformer in JAX / Flax NNX."""

# First, before JAX starts its backends: no libtpu start-up errors on a host without a TPU.
from focal_jax import platform

platform.quiet_tpu_start()

from focal_jax.models import (OFFICIAL_PARAM_COUNTS, VARIANTS, FocalConfig,  # noqa: E402
                              FocalTransformer, make_config)
from focal_jax.models.flops import count_flops  # noqa: E402
from focal_jax.models.segmenter import Segmenter, create_segmenter  # noqa: E402
from focal_jax.pretrained import create_model  # noqa: E402  models.create_model + checkpoint_path
from focal_jax.segment import segment  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FocalConfig", "FocalTransformer", "OFFICIAL_PARAM_COUNTS", "Segmenter", "VARIANTS",
           "count_flops", "create_model", "create_segmenter", "make_config", "segment"]
