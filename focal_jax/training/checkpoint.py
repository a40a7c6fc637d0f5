"""Orbax checkpoints of the train state.

Training checkpoints: `<workdir>/checkpoints/<step>/{state, meta}` (the names are
`focal_jax.weights.layout`'s, which the readers of checkpoints share); `state` is the whole
TrainState (params, optimiser, EMA, step, RNG), `meta` a JSON with the data position and
the model description. Saves are asynchronous (written to a temporary directory, renamed
when complete); the last `keep` are kept. Restoring builds its targets on the current mesh,
so a checkpoint restores onto any device count; a state field that is empty (None) in this
version and absent from an older checkpoint restores as None. A step that cannot be read is moved to
`<workdir>/damaged_checkpoints/` (`set_aside`), never deleted.

Parameter exports, and reading a checkpoint's parameters for inference or conversion,
live in `focal_jax.weights`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy

from focal_jax import storage
from focal_jax.weights.layout import CHECKPOINT_ITEMS, DAMAGED_DIR, META_ITEM, STATE_ITEM


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with a state item and a JSON meta item."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               cleanup: bool = True):
    self.directory = storage.absolute(directory)  # a local path or gs://...
    # `cleanup` removes temporary directories: what a killed save leaves behind, never a
    # complete step (only the run that writes the directory may do it).
    # The newest `keep` steps are kept (every step when keep <= 0); older ones are deleted
    # after each save.
    keeps = (preservation_policy.LatestN(n=keep) if keep > 0
             else preservation_policy.PreserveAll())
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keeps, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=CHECKPOINT_ITEMS)
    # The cleanup runs in a background thread; finish it before anything else touches the
    # directory (orbax itself waits for it only at the first save).
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if cleanup and await_cleanup is not None:
      await_cleanup()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _state_tree(self, step: int) -> Any:
    """The saved state's tree of array metadata (no array read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      meta = handler.metadata(epath.Path(self.directory) / str(step) / STATE_ITEM)
    finally:
      handler.close()
    tree = getattr(meta, "tree", meta)
    if tree is None:
      raise ValueError(f"No array metadata in {self.directory}/{step}/{STATE_ITEM}.")
    return tree

  def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{path: shape} of every array in the saved state, from its metadata (no array read)."""
    return {_path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(self._state_tree(step))}

  def _empty_fields_not_saved(self, step: int, target: Any) -> list[str]:
    """The fields of a dataclass `target` that are None and that the checkpoint lacks (it was
    written before they existed, e.g. `batch_stats`)."""
    if not dataclasses.is_dataclass(target):
      return []
    empty = [f.name for f in dataclasses.fields(target) if getattr(target, f.name) is None]
    if not empty:
      return []
    try:
      saved = self._state_tree(step)
    except Exception:  # noqa: BLE001  unreadable metadata: restoring tells if the step is damaged
      return []
    return [name for name in empty if isinstance(saved, dict) and name not in saved]

  def set_aside(self, step: int) -> str:
    """Moves step `step` (damaged) to `<workdir>/damaged_checkpoints/<step>[-n]`; returns
    that path. Process 0 moves it; every process then sees the step gone."""
    aside_root = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    target = os.path.join(aside_root, str(step))
    suffix = 1
    while storage.exists(target):
      target = os.path.join(aside_root, f"{step}-{suffix}")
      suffix += 1
    if jax.process_index() == 0:
      storage.makedirs(aside_root)
      storage.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"focal_jax set aside checkpoint {step}")
    self.manager.reload()
    return target

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state` (any pytree of jax.Arrays) at `step`."""
    self.manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}),
        force=True)

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into `target` (ShapeDtypeStructs with shardings) -> (state, meta)."""
    absent = self._empty_fields_not_saved(step, target)
    item = target
    if absent:  # an older checkpoint: restore the fields it has, the others stay None
      item = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
              if f.name not in absent}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(item), META_ITEM: ocp.args.JsonRestore()}))
    state = restored[STATE_ITEM]
    if absent:
      state = dataclasses.replace(target, **state)
    return state, restored[META_ITEM]

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _path_name(path: tuple[Any, ...]) -> str:
  """A pytree key path as 'opt_state/1/0/mu/head/kernel' (list indices and keys alike)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def state_differences(saved: dict[str, tuple[int, ...]], target: Any, limit: int = 4
                      ) -> list[str]:
  """How a saved state's arrays ({path: shape}, `state_shapes`) differ from `target`'s
  (a pytree of arrays or ShapeDtypeStructs); empty when they fit."""
  wanted = {_path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  reshaped = sorted(p for p in set(wanted) & set(saved) if wanted[p] != saved[p])
  differences = []
  if missing:
    differences.append(f"{len(missing)} array(s) this config needs are not in it: "
                       f"{_some(missing, limit)}")
  if unexpected:
    differences.append(f"{len(unexpected)} saved array(s) this config has no place for: "
                       f"{_some(unexpected, limit)}")
  if reshaped:
    differences.append(f"{len(reshaped)} array(s) of another shape, e.g. {reshaped[0]}: "
                       f"saved {saved[reshaped[0]]}, this config {wanted[reshaped[0]]}")
  return differences


def _some(names: list[str], limit: int) -> str:
  return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def log_restore(step: int, meta: dict[str, Any]) -> None:
  position = meta.get("data_position")
  logging.info("Restored checkpoint step %d (data: %s).", step,
               f"epoch, record per process {position}" if position is not None
               else f"step {meta.get('data_step')}")
