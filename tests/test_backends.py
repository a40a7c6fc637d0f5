"""Forms chosen per backend at lowering time: the CPU keeps its tuned form, other backends
(TPU, GPU) get theirs, also when a TPU program is lowered on a CPU host (focal_jax.aot)."""

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.models.focal import attention


def test_key_value_gradient_forms_agree():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((2, 3, 49, 8)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((2, 3, 49, 75)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    pinned = attention._contract_queries_pinned(a, b)
    plain = attention._contract_queries_plain(a, b)
  expected = np.einsum("...qd,...qk->...kd", np.asarray(a, np.float64), np.asarray(b, np.float64))
  np.testing.assert_allclose(pinned, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, expected, rtol=1e-5, atol=1e-5)


def test_attend_backward_pins_transposes_on_cpu_only():
  """The key / value gradients of `attend` carry optimisation barriers only when lowered
  for the CPU."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 2, 2, 3, 49, 8)), jnp.bfloat16)
  k = v = jnp.asarray(rng.standard_normal((2, 2, 2, 3, 169, 8)), jnp.bfloat16)
  bias = jnp.zeros((2, 2, 3, 49, 169), jnp.float32)
  grad = jax.grad(lambda q, k, v: attention.attend(q, k, v, bias).astype(jnp.float32).sum(),
                  argnums=(0, 1, 2))
  traced = jax.jit(grad).trace(q, k, v)
  lowered = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
  assert lowered["cpu"].count("optimization_barrier") == 4  # two per gradient (keys, values)
  assert "optimization_barrier" not in lowered["tpu"]
  assert "optimization_barrier" not in lowered["cuda"]
