"""Conversion between focal_jax models and the official PyTorch checkpoint format.

PyTorch is optional: the state_dict functions work on NumPy arrays; only the reference
model imports torch. Weight files (`.pth`, `.safetensors`), exports and the errors
re-exported here live in `focal_jax.weights`.
"""

from focal_jax.convert.api import from_torch_state_dict, to_torch_state_dict
from focal_jax.convert.state_dict import load_state_dict
from focal_jax.weights.errors import InvalidWeights, StateDictMismatch, WeightsError
from focal_jax.weights.files import unwrap_state_dict

__all__ = ["InvalidWeights", "StateDictMismatch", "WeightsError", "from_torch_state_dict",
           "load_state_dict", "to_torch_state_dict", "unwrap_state_dict"]
