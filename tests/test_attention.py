"""`attention.attend`: softmax attention with its own backward pass equals autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.models.focal.attention import attend


def plain_attention(q, k, v, bias):
  logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) + bias
  return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))


@pytest.mark.parametrize("bias_shape", [(2, 3, 4, 9, 13), (2, 3, 1, 1, 13), (4, 9, 13)])
def test_values_and_gradients_equal_autodiff(bias_shape):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 2, 3, 4, n, 8)), jnp.float32)
             for n in (9, 13, 13))
  bias = jnp.asarray(rng.standard_normal(bias_shape), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

  def loss(fn):
    return lambda *args: (fn(*args) * cotangent).sum()

  np.testing.assert_allclose(attend(q, k, v, bias), plain_attention(q, k, v, bias),
                             rtol=1e-5, atol=1e-6)
  ours = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  reference = jax.grad(loss(plain_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for name, a, b in zip("qkv", ours, reference):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=5e-6, err_msg=name)
  assert ours[3].shape == bias_shape
  np.testing.assert_allclose(ours[3], reference[3], rtol=1e-5, atol=5e-6)


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 3, n, 8)), jnp.bfloat16) for n in (5, 7, 7))
  bias = jnp.zeros((3, 5, 7), jnp.float32)
  out = attend(q, k, v, bias)
  assert out.dtype == jnp.bfloat16
  grads = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))(
      q, k, v, bias)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
  reference = plain_attention(q, k, v, bias)
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, atol=1.5e-2)
