"""Training: optimiser, sharding, train / eval steps, checkpoints and the loop.

    from focal_jax.training import train_and_evaluate
    train_and_evaluate(config, workdir)   # config: configs/*.py get_config()

The loop (and with it TensorFlow, for the input pipeline) is imported on first use.
Parameter exports are read and written by `focal_jax.weights`.
"""

from focal_jax.training.config import default_config, validate_config

_LAZY = {"train_and_evaluate", "RunResult"}


def __getattr__(name):
  if name in _LAZY:
    from focal_jax.training import loop  # noqa: PLC0415
    return getattr(loop, name)
  raise AttributeError(f"module 'focal_jax.training' has no attribute {name!r}")


__all__ = ["RunResult", "default_config", "train_and_evaluate", "validate_config"]
