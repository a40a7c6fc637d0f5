"""Matmul precision of the train and eval steps, and bfloat16 training the TPU way: float32
parameters, second moments and EMA, optionally a bfloat16 first moment, and the logits,
softmax and loss in float32. Traced only (no compilation)."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import jaxprs_in_params

from focal_jax.training import evaluate, sharding
from focal_jax.training import train_state as ts
from focal_jax.training.config import default_config, validate_config
from focal_jax.training.train_step import step_setup

TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), focal_levels=(2, 2), window_size=2,
            focal_windows=(3, 1), expand_sizes=(1, 1), drop_path_rate=0.1)
CLASSES = 10
HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def tiny_config(**changes):
  config = default_config()
  config.model.name = ""
  config.model.overrides = dict(TINY)
  config.image_size = 16
  config.batch_size = 16
  config.mixup.group_size = 8
  config.ema_decay = 0.99
  config.num_train_steps = 2
  config.update(changes)
  validate_config(config)
  return config


def traced_step(config):
  """(jaxpr of the train step, its abstract output state) for `config`, on the CPU mesh."""
  mesh = sharding.make_mesh()
  spec = ts.model_spec_from_config(config, CLASSES)
  setup = step_setup(config, spec, mesh, 10, config.num_train_steps)
  arguments = setup.abstract_arguments(config, spec, mesh)
  traced = setup.train_step(config, spec, mesh).trace(*arguments)
  return traced.jaxpr, jax.eval_shape(setup.train_step(config, spec, mesh), *arguments)[0]


def traced_eval(config):
  mesh = sharding.make_mesh()
  spec = ts.model_spec_from_config(config, CLASSES)
  setup = step_setup(config, spec, mesh, 10, config.num_train_steps)
  step = evaluate.make_eval_step(spec, mesh, setup.shardings.params, setup.rest_shardings,
                                 config.matmul_precision)
  state, batch, rest = setup.abstract_arguments(config, spec, mesh)
  batch = {**batch, "mask": jax.ShapeDtypeStruct(batch["label"].shape, jnp.bool_,
                                                 sharding=batch["label"].sharding)}
  return step.trace(state.params, batch, rest).jaxpr


def equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for inner in jaxprs_in_params(eqn.params):
      yield from equations(inner)


def product_precisions(jaxpr):
  return [e.params["precision"] for e in equations(jaxpr.jaxpr)
          if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("traced", [lambda c: traced_step(c)[0], traced_eval],
                         ids=["train", "eval"])
def test_matmul_precision_reaches_every_product(traced):
  highest = product_precisions(traced(tiny_config(matmul_precision="highest")))
  assert len(highest) > 10 and all(p == HIGHEST for p in highest)
  default = product_precisions(traced(tiny_config()))
  assert len(default) == len(highest)
  # Only the bias-table one-hot products ask for HIGHEST themselves (exact copies).
  assert sum(p != HIGHEST for p in default) > len(default) // 2


def test_unknown_precision_is_refused():
  with pytest.raises(ValueError, match="matmul_precision='fast'; expected one of"):
    tiny_config(matmul_precision="fast")
  with pytest.raises(ValueError, match="adam_mu_dtype='int8'"):
    tiny_config(adam_mu_dtype="int8")


def test_bfloat16_training_keeps_float32_state_and_a_float32_loss():
  config = tiny_config(dtype="bfloat16", adam_mu_dtype="bfloat16")
  jaxpr, new_state = traced_step(config)
  adam = new_state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}
  assert dtypes(new_state.params) == {jnp.dtype(jnp.float32)}
  assert dtypes(new_state.ema_params) == {jnp.dtype(jnp.float32)}
  assert dtypes(adam.nu) == {jnp.dtype(jnp.float32)}
  assert dtypes(adam.mu) == {jnp.dtype(jnp.bfloat16)}
  # The model computes in bfloat16 ...
  products = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert any(e.outvars[0].aval.dtype == jnp.bfloat16 for e in products)
  # ... and every exp / log over the logits [batch, classes] (softmax, loss) is float32.
  logits_shape = (config.batch_size, CLASSES)
  softmax = [e for e in equations(jaxpr.jaxpr) if e.primitive.name in ("exp", "log")
             and e.outvars[0].aval.shape == logits_shape]
  assert softmax and {e.outvars[0].aval.dtype for e in softmax} == {jnp.dtype(jnp.float32)}


def test_first_moment_defaults_to_float32():
  _, new_state = traced_step(tiny_config(dtype="bfloat16"))
  adam = new_state.opt_state[1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.float32)}
