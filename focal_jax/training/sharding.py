"""Device mesh, logical-axis rules and the shardings of parameters, optimiser state and batches.

The model names its parameter axes logically (`out_sharding` metadata such as
('embed', 'mlp')); the rules here map those names onto mesh axes. Batches are split over
every device ('data' and 'fsdp' together); FSDP additionally shards the model width
('embed') of parameters and optimiser state over 'fsdp', and XLA gathers them per layer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over all devices

# logical parameter axis -> mesh axis (None: replicated). Data, not code: pass other rules
# to `param_shardings` to try e.g. sharding 'mlp' as well.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("qkv_out", None),
    ("heads", None),
    ("classes", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh; one of the sizes may be -1 (the remaining devices).

  Axes are `AxisType.Auto`: the model reshapes batch-sharded activations into windows, which
  Explicit axes (jax.make_mesh's default) reject without per-op output shardings. With
  Auto axes only the jit boundaries are pinned and XLA propagates the rest.
  If the sizes ask for fewer devices than exist (single process only), the first ones are used.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh sizes must be positive, with at most one -1; got data={data}, "
                     f"fsdp={fsdp}.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh with "
                       f"{'data' if fsdp != -1 else 'fsdp'}={known}; choose a divisor of "
                       f"{len(devices)}.")
    sizes[sizes.index(-1)] = len(devices) // known
  total = int(np.prod(sizes))
  if total > len(devices):
    raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} needs {total} devices, but "
                     f"only {len(devices)} are available.")
  if total < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} uses {total} of {len(devices)} "
                       "devices; with several processes the mesh must use all of them.")
    logging.warning("Mesh data=%d x fsdp=%d uses %d of %d devices.", sizes[0], sizes[1], total,
                    len(devices))
    devices = devices[:total]
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_mesh_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> P:
  """PartitionSpec of one parameter: each logical name mapped by `rules`.

  A dimension stays replicated when its rule names no mesh axis, when the mesh axis is
  already used by an earlier dimension, or when the size does not divide evenly.
  """
  table = dict(rules)
  spec, used = [], set()
  for name, size in zip(logical, shape):
    axis = table.get(name) if name is not None else None
    if axis is not None and (axis in used or size % mesh.shape[axis]):
      axis = None
    if axis is not None:
      used.add(axis)
    spec.append(axis)
  return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> dict:
  """NamedShardings (a pure dict like `nnx.to_pure_dict(params)`) from logical metadata.

  `abstract_params` is the Param state of a model (abstract or concrete), whose Variables
  carry `out_sharding` logical names.
  """
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  shapes = nnx.to_pure_dict(abstract_params)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), leaf.shape, mesh,
                                                                  rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        params_shardings: Any, mesh: Mesh) -> Any:
  """Parameter-shaped optimiser state (Adam moments) follows the parameters; the rest
  (step counts) is replicated."""
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated(mesh),
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  """A global batch must be a multiple of this (the devices the batch is split over)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Per-process NumPy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def describe(shardings: Any) -> dict[str, int]:
  """Counts of parameters by PartitionSpec (for the log)."""
  counts: dict[str, int] = {}
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    key = str(s.spec)
    counts[key] = counts.get(key, 0) + 1
  return counts


def any_process_flag(mesh: Mesh) -> Callable[[bool], jax.Array]:
  """Returns `vote(flag) -> bool []` (replicated, asynchronous): True when `flag` is True on
  any process. Every process must call it at the same point; it adds one tiny all-reduce."""
  sharding = batch_sharding(mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  reduce = jax.jit(lambda flags: flags.any(), out_shardings=replicated(mesh))

  def vote(flag: bool) -> jax.Array:
    local = np.full((local_devices,), bool(flag))
    return reduce(jax.make_array_from_process_local_data(sharding, local))

  return vote
