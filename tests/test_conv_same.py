"""conv2d_same: forward and gradients equal XLA's convolution; ConvModule uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from focal_jax.models import conv_same
from focal_jax.models.conv_bn import ConvModule


def _xla_conv(x, kernel):
  pad = [(kernel.shape[0] // 2,) * 2, (kernel.shape[1] // 2,) * 2]
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _inputs(kernel_size, seed=0):
  kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (2, 7, 11, 5))  # non-square H, W
  kernel = jax.random.normal(kk, (*kernel_size, 5, 6))
  cotangent = jax.random.normal(kg, (2, 7, 11, 6))
  return x, kernel, cotangent


def _grads(conv, x, kernel, cotangent):
  return jax.grad(lambda x_, k_: jnp.sum(conv(x_, k_) * cotangent), argnums=(0, 1))(x, kernel)


@pytest.mark.parametrize("kernel_size", [(3, 3), (1, 1), (3, 1)])
def test_forward_and_gradients_equal_xla(kernel_size):
  x, kernel, cotangent = _inputs(kernel_size)
  np.testing.assert_allclose(conv_same.conv2d_same(x, kernel), _xla_conv(x, kernel),
                             rtol=1e-6, atol=1e-5)
  dx, dkernel = jax.jit(lambda *a: _grads(conv_same.conv2d_same, *a))(x, kernel, cotangent)
  dx_ref, dkernel_ref = _grads(_xla_conv, x, kernel, cotangent)
  assert dkernel.shape == kernel.shape and dkernel.dtype == kernel.dtype
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dkernel, dkernel_ref, rtol=1e-5, atol=1e-4)


def test_both_kernel_gradient_paths_agree():
  """The per-tap product (CPU) and XLA's kernel gradient (other backends) agree."""
  x, kernel, cotangent = _inputs((3, 3), seed=1)
  dy = cotangent
  per_tap = conv_same._kernel_grad_per_tap(x, dy, kernel)
  xla = conv_same._kernel_grad_xla(x, dy, kernel)
  np.testing.assert_allclose(per_tap, xla, rtol=1e-5, atol=1e-4)


def test_other_convolutions_fall_back_to_lax():
  x, kernel, _ = _inputs((3, 3))
  dims = ("NHWC", "HWIO", "NHWC")
  strided = conv_same.conv_general_dilated_same(x, kernel, (2, 2), [(1, 1), (1, 1)],
                                                dimension_numbers=dims)
  np.testing.assert_allclose(strided, jax.lax.conv_general_dilated(
      x, kernel, (2, 2), [(1, 1), (1, 1)], dimension_numbers=dims), rtol=1e-6, atol=1e-5)
  valid = conv_same.conv_general_dilated_same(x, kernel, (1, 1), "VALID",
                                              dimension_numbers=dims)
  assert valid.shape == (2, 5, 9, 6)


def test_conv_module_routes_through_conv2d_same(monkeypatch):
  calls = []
  original = conv_same.conv2d_same
  monkeypatch.setattr(conv_same, "conv2d_same", lambda *a: calls.append(1) or original(*a))
  with nnx.use_eager_sharding(False):
    module = ConvModule(5, 6, 3, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert module.conv.kernel.shape == (3, 3, 5, 6)
  x = jax.random.normal(jax.random.key(2), (2, 7, 11, 5))
  y = module(x)
  assert calls and y.shape == (2, 7, 11, 6)


def test_bfloat16_gradients_keep_dtype_and_match_float32():
  x, kernel, cotangent = _inputs((3, 3), seed=3)
  low = [a.astype(jnp.bfloat16) for a in (x, kernel, cotangent)]
  dx, dkernel = _grads(conv_same.conv2d_same, *low)
  assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.bfloat16
  dx_ref, dkernel_ref = _grads(_xla_conv, *(a.astype(jnp.float32) for a in low))
  scale = float(jnp.abs(dkernel_ref).max())
  np.testing.assert_allclose(dkernel.astype(jnp.float32), dkernel_ref, atol=2e-2 * scale)
  np.testing.assert_allclose(dx.astype(jnp.float32), dx_ref,
                             atol=2e-2 * float(jnp.abs(dx_ref).max()))
