"""Weight files and parameter exports: the one place their formats are read and written.

The conversion CLI, the training loop and `focal_jax.create_model(checkpoint_path=...)`
all go through here:

- `exports`: the parameter export (orbax `params/` + `model.json`) and the parameters of a
  training workdir's checkpoint;
- `files`: the official formats, `.pth` (PyTorch, optional) and `.safetensors` (the
  readers and writers themselves are `focal_jax.convert.files`).

Paths may be local or on a bucket (`gs://...`), through `focal_jax.storage`.
"""

from focal_jax.weights.exports import (CHECKPOINT_DIR, EXPORT_FORMAT, MODEL_JSON, PARAMS_DIR,
                                       abstract_model, export_params, is_export,
                                       load_exported_model, load_exported_params,
                                       load_workdir_model, model_description, model_from_params,
                                       overrides_from_json, read_description)
from focal_jax.weights.files import load_weights_file, save_weights_file

__all__ = ["CHECKPOINT_DIR", "EXPORT_FORMAT", "MODEL_JSON", "PARAMS_DIR", "abstract_model",
           "export_params", "is_export", "load_exported_model", "load_exported_params",
           "load_weights_file", "load_workdir_model", "model_description", "model_from_params",
           "overrides_from_json", "read_description", "save_weights_file"]
