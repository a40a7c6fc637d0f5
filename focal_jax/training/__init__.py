"""Training: optimiser, sharding, train / eval steps, checkpoints and the loop.

    from focal_jax.training import train_and_evaluate
    train_and_evaluate(config, workdir)   # config: configs/*.py get_config()

The loop (and with it TensorFlow, for the input pipeline) and the config (ml_collections)
are imported on first use, so that `focal_jax.aot` and the models load neither.
Parameter exports are read and written by `focal_jax.weights`.
"""


def __getattr__(name):
  """The loop's and the config's public names, imported when first asked for."""
  if name in ("train_and_evaluate", "RunResult"):
    from focal_jax.training import loop  # noqa: PLC0415  (TensorFlow, ml_collections)
    return getattr(loop, name)
  if name in ("default_config", "validate_config", "load_config_file"):
    from focal_jax.training import config  # noqa: PLC0415  (ml_collections)
    return getattr(config, name)
  raise AttributeError(f"module 'focal_jax.training' has no attribute {name!r}")


__all__ = ["RunResult", "default_config", "load_config_file", "train_and_evaluate",
           "validate_config"]
