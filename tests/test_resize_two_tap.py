"""Upsampling by a whole factor through two shifted slices (`models.resize`) is the bilinear
matrix product it replaces: same values and same gradient, float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.models import resize


def matrix_resize(x, size):
  rows = resize.bilinear_matrix(x.shape[1], size[0])
  cols = resize.bilinear_matrix(x.shape[2], size[1])
  return jnp.einsum("pw,bowc->bopc", cols, jnp.einsum("oh,bhwc->bowc", rows, x))


@pytest.mark.parametrize("size_in,size_out", [((1, 1), (16, 16)), ((2, 3), (16, 12)),
                                              ((16, 16), (128, 128)), ((32, 8), (512, 64)),
                                              ((7, 5), (21, 10)), ((5, 4), (15, 8))])
def test_whole_factor_upsampling_equals_the_matrix_product(size_in, size_out):
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(size_out[0]).standard_normal((2, *size_in, 3)))
    for axis_in, axis_out in zip(size_in, size_out):
      assert resize.two_tap_weights(axis_in, axis_out) is not None  # the slice path runs
    np.testing.assert_allclose(resize.resize_bilinear(x, size_out), matrix_resize(x, size_out),
                               rtol=0, atol=1e-13)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((2, *size_out, 3)))
    ours = jax.grad(lambda x: jnp.sum(resize.resize_bilinear(x, size_out) * cotangent))(x)
    theirs = jax.grad(lambda x: jnp.sum(matrix_resize(x, size_out) * cotangent))(x)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_other_ratios_keep_the_matrix():
  for size_in, size_out in ((3, 16), (6, 16), (128, 64), (16, 16), (13, 50)):
    assert resize.two_tap_weights(size_in, size_out) is None
  low, high = resize.two_tap_weights(2, 8)  # factor 4: phases 0, 1 reach back, 2, 3 forward
  np.testing.assert_allclose(low + high, np.ones((4, 2)))
  assert (low[:, 0] == [0.0, 0.0, 0.875, 0.625]).all()  # row 0 and 1: clamped to x[0] alone
