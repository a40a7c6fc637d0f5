"""The forward pass and its gradient contain no gather or scatter primitive."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import focal_jax
from conftest import SMALL, images, walk_primitives

FORBIDDEN = ("gather", "scatter", "scatter-add", "scatter_add", "dynamic_slice",
             "dynamic_update_slice")

CASES = {
    "default": {},
    "levels3_shift": dict(focal_levels=(3, 3, 3, 3), use_shift=True),
    "conv_pool_layerscale": dict(focal_pool="conv", use_layerscale=True, use_conv_embed=True,
                                 use_pre_norm=True, ape=True),
    "max_pool_odd": dict(focal_pool="max", expand_layer="odd"),
    # Focal-fast: a neighbourhood and a dense level (224), a sparse pooled level (448).
    "focal_fast_shift": dict(version=2, focal_topK=128, use_shift=True, use_conv_embed=True),
    "focal_fast_448": dict(version=2, focal_topK=128, img_size=448),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradient_are_gather_free(case):
  options = {"img_size": 224, **SMALL, **CASES[case]}
  model = focal_jax.create_model(None, num_classes=10, **options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.asarray(images(1, *model.config.img_size))

  def loss(params, rest, x):  # train mode: dropout and stochastic depth are traced too
    module = nnx.merge(graphdef, params, rest)
    return module(x).sum()

  def gradient(params, rest, x):  # d loss / d (parameters, input)
    module = nnx.merge(graphdef, params, rest)
    summed = lambda m, x: m(x).sum()
    return nnx.grad(summed, argnums=(nnx.DiffState(0, nnx.Param), 1))(module, x)

  forward = jax.make_jaxpr(loss)(params, rest, x).jaxpr
  backward = jax.make_jaxpr(gradient)(params, rest, x).jaxpr
  for name, jaxpr in (("forward", forward), ("gradient", backward)):
    primitives = walk_primitives(jaxpr)
    assert "dot_general" in primitives  # the walk does see the model
    found = sorted({p for p in primitives if p in FORBIDDEN})
    assert not found, f"{name} pass of {case} contains {found}"


def test_walk_detects_a_gather():
  """The walk itself finds a gather when one is present (nested in a jit too)."""
  table = jnp.arange(10.0)
  index = jnp.array([3, 1])
  jaxpr = jax.make_jaxpr(jax.jit(lambda t: t[index]))(table).jaxpr
  assert "gather" in walk_primitives(jaxpr)
  grad = jax.make_jaxpr(jax.grad(lambda t: t[index].sum()))(table).jaxpr
  assert any(p.startswith("scatter") for p in walk_primitives(grad))
