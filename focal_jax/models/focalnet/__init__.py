"""FocalNet (microsoft/FocalNet): focal modulation in the Focal Transformer's frame."""

from focal_jax.models.focalnet.config import (OFFICIAL_PARAM_COUNTS, VARIANTS, FocalNetConfig,
                                              make_focalnet_config)
from focal_jax.models.focalnet.model import FocalNet, create_focalnet

__all__ = ["FocalNet", "FocalNetConfig", "OFFICIAL_PARAM_COUNTS", "VARIANTS", "create_focalnet",
           "make_focalnet_config"]
