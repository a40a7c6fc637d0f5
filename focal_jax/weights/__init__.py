"""Weight files and parameter exports: the one place their formats are read and written.

The conversion CLI, the training loop and `focal_jax.create_model(checkpoint_path=...)`
all go through here:

- `files`: the official formats, `.pth` (PyTorch, optional; read through a safe loader)
  and `.safetensors`;
- `exports`: the parameter export (orbax `params/` + `model.json`) and the parameters of a
  training workdir's checkpoint;
- `layout`: the names on disk of a training workdir and of an export;
- `errors`: `WeightsError` and the errors of weights that cannot be used.

Paths may be local or on a bucket (`gs://...`), through `focal_jax.storage`. Which official
name each parameter has is `focal_jax.convert`'s business, not this package's.
"""

from focal_jax.weights.errors import (InvalidWeights, StateDictMismatch, UnsafeCheckpointError,
                                      WeightsError, WeightsFileError)
from focal_jax.weights.exports import (abstract_model, export_params, is_export,
                                       load_exported_model, load_exported_params,
                                       load_workdir_model, model_description, model_from_params,
                                       overrides_from_json, read_description)
from focal_jax.weights.files import load_weights_file, save_weights_file, unwrap_state_dict
from focal_jax.weights.layout import (CHECKPOINT_DIR, EXPORT_DIR, EXPORT_FORMAT, MODEL_JSON,
                                      PARAMS_DIR)

__all__ = ["CHECKPOINT_DIR", "EXPORT_DIR", "EXPORT_FORMAT", "InvalidWeights", "MODEL_JSON",
           "PARAMS_DIR", "StateDictMismatch", "UnsafeCheckpointError", "WeightsError",
           "WeightsFileError", "abstract_model", "export_params", "is_export",
           "load_exported_model", "load_exported_params", "load_weights_file",
           "load_workdir_model", "model_description", "model_from_params",
           "overrides_from_json", "read_description", "save_weights_file", "unwrap_state_dict"]
