"""Parameter exports, and the parameters of a training checkpoint.

A parameter export is a directory with:
  params/      orbax StandardSave of the parameters as a pure dict mirroring the model tree,
               e.g. params["layers"]["0"]["blocks"]["0"]["attn"]["qkv"]["kernel"] [in, out]
  model.json   {"format": "focal_jax.params/1", "model": "focal_tiny" | null,
                "num_classes": 1000, "img_size": 224, "overrides": {...official names...}}
`load_exported_model(path)` turns an export, and `load_workdir_model(workdir)` a training
checkpoint (`<workdir>/checkpoints/<step>/{state, meta}`, reading only its parameters),
back into a FocalTransformer. The names on disk are `focal_jax.weights.layout`'s.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from focal_jax import storage
from focal_jax.models import FocalTransformer, create_model
from focal_jax.weights.layout import (CHECKPOINT_DIR, CHECKPOINT_ITEMS, EMA_PARAMS_KEY,
                                      EXPORT_FORMAT, META_EMA, META_ITEM, META_MODEL,
                                      MODEL_JSON, PARAMS_DIR, PARAMS_KEY, STATE_ITEM)


def model_description(name: str | None, num_classes: int, img_size: int,
                      overrides: dict[str, Any]) -> dict[str, Any]:
  """The JSON that says how to rebuild the model (written beside checkpoints and exports)."""
  return {"format": EXPORT_FORMAT, "model": name, "num_classes": int(num_classes),
          "img_size": int(img_size), "overrides": overrides}


def export_params(directory: str, params: Any, description: dict[str, Any]) -> str:
  """Writes `params` (pure dict, possibly sharded) and model.json into `directory`."""
  directory = storage.absolute(directory)
  if jax.process_index() == 0:
    storage.makedirs(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, PARAMS_DIR), params, force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    storage.write_text(os.path.join(directory, MODEL_JSON), json.dumps(description, indent=2))
  return directory


def is_export(path: str) -> bool:
  return storage.isfile(os.path.join(path, MODEL_JSON)) and storage.isdir(
      os.path.join(path, PARAMS_DIR))


def read_description(path: str) -> dict[str, Any]:
  description = json.loads(storage.read_text(os.path.join(path, MODEL_JSON)))
  if description.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{path}/{MODEL_JSON} has format {description.get('format')!r}; expected "
                     f"{EXPORT_FORMAT!r} (written by focal_jax.weights.export_params).")
  return description


def overrides_from_json(overrides: dict[str, Any]) -> dict[str, Any]:
  out = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  if "dtype" in out:
    out["dtype"] = jnp.dtype(out["dtype"])
  return out


def load_exported_params(path: str, abstract_params: Any | None = None) -> Any:
  """Restores the `params` pure dict of an export (onto `abstract_params`' shardings if given,
  else as host-local arrays on the default device)."""
  with ocp.StandardCheckpointer() as checkpointer:
    target = abstract_params
    if target is None:
      meta = checkpointer.metadata(os.path.join(storage.absolute(path), PARAMS_DIR))
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    return checkpointer.restore(os.path.join(storage.absolute(path), PARAMS_DIR), target)


def abstract_model(description: dict[str, Any]):
  """(graphdef, abstract params pure dict, abstract rest) of a described model; no init."""
  model = nnx.eval_shape(lambda: create_model(
      description["model"], num_classes=description["num_classes"],
      img_size=description["img_size"], **overrides_from_json(description["overrides"])))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def model_from_params(description: dict[str, Any], params: Any, where: str,
                      seed: int = 0) -> FocalTransformer:
  """Merges a pure dict of parameters into the described model (checked); the dropout
  streams are seeded from `seed`."""
  graphdef, expected, abstract_rest = abstract_model(description)
  params = _int_keys(params)
  check_shapes(params, expected, f"The parameters in {where} do not fit the model described "
               f"beside them ({description})")
  return merge_with_fresh_rest(graphdef, params, abstract_rest, seed)


def check_shapes(got_tree: Any, expected_tree: Any, what: str) -> None:
  """Raises ValueError(`what` + the missing, unexpected and wrongly shaped names) unless the
  two trees hold the same names with the same shapes."""
  got = {jax.tree_util.keystr(k): tuple(np.shape(v))
         for k, v in jax.tree_util.tree_leaves_with_path(got_tree)}
  want = {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(expected_tree)}
  if got != want:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    raise ValueError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}, wrong "
                     f"shape {wrong[:5]}.")


def merge_with_fresh_rest(graphdef: Any, values: Any, abstract_rest: Any, seed: int) -> Any:
  """The module of `graphdef` from `values` and placeholders for the rest of its state (the
  RNG streams), reseeded from `seed`."""
  def placeholder(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.zeros((*leaf.shape, 2), jnp.uint32))
    return jnp.zeros(leaf.shape, leaf.dtype)

  module = nnx.merge(graphdef, values, jax.tree.map(placeholder, abstract_rest))
  nnx.reseed(module, dropout=seed + 1)
  return module


def load_exported_model(path: str, seed: int = 0) -> FocalTransformer:
  """The FocalTransformer of an export directory, parameters loaded (default device)."""
  return model_from_params(read_description(path), load_exported_params(path), path, seed)


def load_workdir_model(workdir: str, ema: bool = False, step: int | None = None
                       ) -> tuple[FocalTransformer, dict[str, Any]]:
  """(model, description) from a training workdir's checkpoint (latest unless `step`):
  only the parameters (or, with `ema`, their moving average) are read."""
  directory = os.path.join(storage.absolute(workdir), CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(directory, item_names=CHECKPOINT_ITEMS)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no checkpoint.")
    meta = manager.restore(step, args=ocp.args.Composite(
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    description = meta[META_MODEL]
    key = EMA_PARAMS_KEY if ema else PARAMS_KEY
    if ema and not meta.get(META_EMA):
      raise ValueError(f"The checkpoint at step {step} in {directory} has no EMA parameters "
                       "(it was trained with ema_decay=0); leave out --ema.")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract_model(description)[1])
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    state = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
        item={key: target}, restore_args={key: restore_args}, partial_restore=True)}))[STATE_ITEM]
  finally:
    manager.close()
  return model_from_params(description, state[key], f"{directory}/{step}"), description


def _int_keys(tree: Any) -> Any:
  """Orbax stores list indices as string keys; turn '0' back into 0."""
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
            for k, v in tree.items()}
  return tree
