"""The train state (a pytree of arrays) and the model pieces the steps merge it with.

Parameters live in the state as a pure dict mirroring the model tree
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), so optax, orbax and jit see plain arrays.
A model with BatchNorm (the segmenter) also has `batch_stats`, its nnx.BatchStat variables as
a pure dict: updated by the train step, checkpointed and exported, never optimised.
Dropout keys are not state: every step reseeds the model's dropout streams from
fold_in(rng, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from focal_jax import models, pretrained, weights
from focal_jax.training import sharding
from focal_jax.training.config import model_overrides

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []: optimiser steps taken = global batches consumed
  params: Any  # pure dict of float32 parameters
  opt_state: Any  # optax state of `params`
  ema_params: Any  # pure dict like params (EMA on), or None
  rng: jax.Array  # uint32 [2]: key data; step s uses fold_in(key, s)
  batch_stats: Any = None  # pure dict of the model's nnx.BatchStat variables, or None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build the model, and the static pieces the train / eval steps merge with."""

  name: str | None
  num_classes: int
  img_size: int
  overrides: dict[str, Any]  # official constructor names (+ dtype, remat)
  seed: int
  train_graphdef: Any
  eval_graphdef: Any
  abstract_params: nnx.State  # with logical-axis metadata
  abstract_rest: Any  # pure dict of ShapeDtypeStructs: the dropout RNG streams
  abstract_stats: Any = None  # pure dict of ShapeDtypeStructs (BatchStat), or None
  build: Callable[..., nnx.Module] = models.create_model  # (name, num_classes=, ...)

  def create(self) -> nnx.Module:
    return self.build(self.name, num_classes=self.num_classes, img_size=self.img_size,
                      seed=self.seed, **self.overrides)

  def merge(self, graphdef: Any, params: Any, stats: Any, rest: Any) -> nnx.Module:
    """The model of `graphdef` with these parameters, batch statistics (or None) and rest."""
    if stats is None:
      return nnx.merge(graphdef, params, rest)
    return nnx.merge(graphdef, params, stats, rest)

  def json_overrides(self) -> dict[str, Any]:
    """Overrides with JSON-friendly values (dtype by name)."""
    out = dict(self.overrides)
    if "dtype" in out:
      out["dtype"] = jnp.dtype(out["dtype"]).name
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _shapes(state: Any) -> Any:
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def model_spec(name: str | None, num_classes: int, img_size: int, overrides: dict[str, Any],
               seed: int = 0, build: Callable[..., nnx.Module] = models.create_model
               ) -> ModelSpec:
  """Builds the model abstractly (no parameters allocated) to get graphdefs and metadata;
  `build(name, num_classes=, img_size=, seed=, **overrides)` makes the model."""
  partial = ModelSpec(name, num_classes, img_size, dict(overrides), seed, None, None, None, None,
                      None, build)
  model = nnx.eval_shape(partial.create)
  model.train()
  stats = None
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    train_graphdef, abstract_params, stats, abstract_rest = nnx.split(
        model, nnx.Param, nnx.BatchStat, ...)
    stats = _shapes(stats)
  else:
    train_graphdef, abstract_params, abstract_rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return dataclasses.replace(partial, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef,
                             abstract_params=abstract_params, abstract_rest=_shapes(abstract_rest),
                             abstract_stats=stats)


def model_spec_from_config(config: ml_collections.ConfigDict, num_classes: int,
                           build: Callable[..., nnx.Module] = models.create_model
                           ) -> ModelSpec:
  """The model of a training config: model.name + model.overrides, dtype, image_size, seed."""
  overrides = model_overrides(config)
  if config.dtype != "float32":
    overrides["dtype"] = DTYPES[config.dtype]
  return model_spec(config.model.name or None, num_classes, config.image_size, overrides,
                    config.seed, build)


def model_variables(params: Any, stats: Any) -> Any:
  """One pure dict of the model's parameters and batch statistics (what an export holds)."""
  if stats is None:
    return params
  merged = dict(params)
  for key, value in stats.items():
    merged[key] = model_variables(merged[key], value) if key in merged else value
  return merged


def split_variables(variables: Any, abstract_stats: Any) -> tuple[Any, Any]:
  """`model_variables`' inverse: (params, stats) where `abstract_stats` says which are stats."""
  if abstract_stats is None:
    return variables, None
  params, stats = {}, {}
  for key, value in variables.items():
    if key not in abstract_stats:
      params[key] = value
    elif isinstance(abstract_stats[key], dict):
      params[key], stats[key] = split_variables(value, abstract_stats[key])
      if not params[key]:
        del params[key]
    else:
      stats[key] = value
  return params, stats


def init_stats(spec: ModelSpec, mesh: Mesh) -> Any:
  """The model's initial batch statistics (its constructor's), replicated; None without."""
  if spec.abstract_stats is None:
    return None
  return jax.jit(lambda: nnx.to_pure_dict(nnx.state(spec.create(), nnx.BatchStat)),
                 out_shardings=sharding.replicated(mesh))()


def init_params(spec: ModelSpec, params_shardings: Any) -> Any:
  """Parameters (pure dict) created by a jitted init directly in their shardings, so a
  large model is never materialised whole on one device.

  The init runs once, so it is compiled without backend optimisation (5x faster to
  compile on CPU). Its values are deterministic; they may differ from an eager
  `create_model` in the last bit of some truncated-normal draws.
  """
  init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(spec.create(), nnx.Param)),
                 out_shardings=params_shardings)
  return init.lower().compile({"xla_backend_optimization_level": 0})()


def init_rest(spec: ModelSpec, mesh: Mesh) -> Any:
  """The model's non-parameter state (dropout RNG streams), replicated. Its values do not
  matter: the train step reseeds every stream before use."""

  def placeholder(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jnp.zeros((*leaf.shape, 2), jnp.uint32))
    return jnp.zeros(leaf.shape, leaf.dtype)

  # Created by a jitted function: with several processes a device_put cannot reach them all.
  return jax.jit(lambda: jax.tree.map(placeholder, spec.abstract_rest),
                 out_shardings=sharding.replicated(mesh))()


def rng_data(seed: int) -> jax.Array:
  """uint32 [2] key data of the training RNG (separate from the parameter-init stream)."""
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0x7261696E))


def state_shardings(tx: optax.GradientTransformation, spec: ModelSpec, mesh: Mesh,
                    use_ema: bool, rules=sharding.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
  """(abstract state, shardings): shapes of every leaf and the NamedSharding it lives in."""
  params_shardings = sharding.param_shardings(spec.abstract_params, mesh, rules)
  abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                                 nnx.to_pure_dict(spec.abstract_params))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_shardings = sharding.opt_state_shardings(tx, abstract_opt, params_shardings, mesh)
  rep = sharding.replicated(mesh)
  stats = spec.abstract_stats
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt,
      ema_params=abstract_params if use_ema else None,
      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), batch_stats=stats)
  shardings = TrainState(step=rep, params=params_shardings, opt_state=opt_shardings,
                         ema_params=params_shardings if use_ema else None, rng=rep,
                         batch_stats=None if stats is None else jax.tree.map(lambda _: rep, stats))
  return abstract, shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying their target shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


# (source, abstract model) -> {dotted focal_jax name: float32 array}
CheckpointReader = Callable[[str, Any], dict[str, np.ndarray]]


def read_export_only(source: str, abstract_model: Any) -> dict[str, np.ndarray]:
  """The default checkpoint reader of a run: parameter exports only (`focal_jax.weights`).
  Official `.pth` / `.safetensors` files need the official name map, which the caller
  supplies (`main.py` passes `focal_jax.read_checkpoint_params`)."""
  del abstract_model
  if not weights.is_export(source):
    raise ValueError(
        f"init_from={source!r} is not a parameter export; reading an official weight file "
        "needs the name map: call train_and_evaluate(config, workdir, "
        "read_checkpoint=focal_jax.read_checkpoint_params), as main.py does.")
  return pretrained.read_export_params(source)


def pretrained_params(spec: ModelSpec, params_shardings: Any, source: str,
                      exclude: tuple[str, ...] = (),
                      read_checkpoint: CheckpointReader = read_export_only) -> Any:
  """The initial parameters of a fine-tuning run: `source`'s (read by `read_checkpoint`:
  exports by default, any weight file with `focal_jax.read_checkpoint_params`) where they
  fit, a fresh init for the head when its shape differs and for names matching `exclude`
  (logged); each array placed in its sharding."""
  abstract_model = nnx.eval_shape(spec.create)
  target = pretrained.param_shapes(spec.abstract_params)
  loaded, _ = pretrained.merge_checkpoint_params(
      target, read_checkpoint(source, abstract_model), source, exclude)
  fresh = init_params(spec, params_shardings)

  def place(path, leaf):
    value = loaded.get(pretrained.param_name(path))
    if value is None:
      return leaf
    value = value.astype(leaf.dtype)  # every process holds the whole array; each takes its shards
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(place, fresh)


def create_train_state(spec: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState,
                       mesh: Mesh, seed: int, params: Any | None = None) -> TrainState:
  """A fresh state (step 0), every leaf in its sharding; from `params` (sharded like
  `shardings.params`) when given, else from a random init."""
  if params is None:
    params = init_params(spec, shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  ema = None
  if shardings.ema_params is not None:
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.ema_params)(params)
  step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), rng_data(seed)),
                      out_shardings=sharding.replicated(mesh))()
  return TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema, rng=rng,
                    batch_stats=init_stats(spec, mesh))
