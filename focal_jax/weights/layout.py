"""The names on disk of a training workdir and of a parameter export: the one place they
are spelled, for the training code that writes them and the readers in `focal_jax.weights`.

  <workdir>/checkpoints/<step>/state     orbax StandardSave of the TrainState (its fields
                                         params, opt_state, ema_params, step, rng)
  <workdir>/checkpoints/<step>/meta      JSON: the model description ("model"), whether
                                         the state holds EMA parameters ("ema"), the data
                                         position and the run's config
  <workdir>/damaged_checkpoints/<step>   steps that could not be read, set aside
  <workdir>/export/                      the run's parameter export:
      params/       orbax StandardSave of the parameters (a pure dict mirroring the model)
      model.json    {"format": EXPORT_FORMAT, "model": ..., "num_classes": ...,
                     "img_size": ..., "overrides": {...}}
"""

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
EXPORT_DIR = "export"

# The items of each checkpoint step.
STATE_ITEM = "state"
META_ITEM = "meta"
CHECKPOINT_ITEMS = (STATE_ITEM, META_ITEM)

# Keys of the meta item that readers of a checkpoint rely on.
META_MODEL = "model"  # the model description (`focal_jax.weights.model_description`)
META_EMA = "ema"  # True when the state holds EMA parameters

# Fields of the state item holding parameters (named as in training's TrainState).
PARAMS_KEY = "params"
EMA_PARAMS_KEY = "ema_params"

# A parameter export.
EXPORT_FORMAT = "focal_jax.params/1"
MODEL_JSON = "model.json"
PARAMS_DIR = "params"
