"""Conversion between focal_jax models and the official PyTorch checkpoint format.

PyTorch is optional: the state_dict functions work on NumPy arrays; only reading and
writing `.pth` files (and the reference model) import torch.
"""

from focal_jax.convert.api import from_torch_state_dict, to_torch_state_dict
from focal_jax.convert.state_dict import (InvalidWeights, StateDictMismatch, WeightsError,
                                          load_state_dict, unwrap_state_dict)

__all__ = ["InvalidWeights", "StateDictMismatch", "WeightsError", "from_torch_state_dict",
           "load_state_dict", "to_torch_state_dict", "unwrap_state_dict"]
