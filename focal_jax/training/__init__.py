"""Training: optimiser, sharding, train / eval steps, checkpoints and the loop.

    from focal_jax.training import train_and_evaluate
    train_and_evaluate(config, workdir)   # config: configs/*.py get_config()

The loop (and with it TensorFlow, for the input pipeline) and the config (ml_collections)
are imported on first use. Parameter exports are read and written by `focal_jax.weights`.
"""

import importlib

_LAZY = {"train_and_evaluate": "loop", "RunResult": "loop", "default_config": "config",
         "validate_config": "config"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"focal_jax.training.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'focal_jax.training' has no attribute {name!r}")


__all__ = ["RunResult", "default_config", "train_and_evaluate", "validate_config"]
