"""`pooled_grid`: attending over whole pooled grids equals the unfolded key set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from focal_jax.models.focal import index_tables, pooled_grid, windows
from focal_jax.models.focal.attention import FocalWindowAttention


@pytest.mark.parametrize("num_windows, focal_window, level",
                         [((8, 8), 7, 0), ((4, 4), 5, 0), ((2, 3), 3, 0), ((2, 2), 3, 1),
                          ((1, 1), 1, 0)])
def test_selector_finds_the_grid_token_of_every_unfolded_slot(num_windows, focal_window, level):
  grid = (num_windows[0] * 2**level, num_windows[1] * 2**level)
  tokens = np.arange(1, grid[0] * grid[1] + 1, dtype=np.float32).reshape(1, *grid, 1)
  unfolded = np.asarray(windows.unfold_neighbourhood(jnp.asarray(tokens), focal_window, level))
  selector = pooled_grid.grid_selector(num_windows, focal_window, level)
  assert selector.shape == (*num_windows, index_tables.pooled_keys_per_window(focal_window, level),
                            grid[0] * grid[1])
  # Zero-padded slots (token 0) select nothing; every other slot its own token.
  np.testing.assert_array_equal(selector @ tokens.reshape(-1), unfolded[0, ..., 0])
  assert selector.sum(axis=-1).max() == 1


def _attention(window, expand, focal_window, dim=16, heads=2):
  with nnx.use_eager_sharding(False):
    return FocalWindowAttention(dim, heads, window_size=window, expand_size=expand,
                                focal_window=focal_window, focal_level=2, pool_method="fc",
                                qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                                dtype=None, rngs=nnx.Rngs(0))


def _as_tpu(monkeypatch):
  """Makes the model take its TPU branch on this CPU."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, tpu, default: tpu(*args))


@pytest.mark.parametrize("shifted", [False, True])
def test_grid_attention_equals_unfolded_attention_with_gradients(shifted, monkeypatch):
  window, expand, focal_window, size = 4, 2, 3, 12  # 3 x 3 windows, pooled grid 3 x 3
  assert pooled_grid.use_grid((3, 3), focal_window, 0)
  attn = _attention(window, expand, focal_window)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, size, size, 16)), jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((2, 3, 3, 16)), jnp.float32)
  mask = index_tables.shift_mask((size, size), window, window // 2) if shifted else None
  cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(x, pooled):
    return (attn(x, [pooled], mask) * cotangent).sum()

  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(x, pooled)
  _as_tpu(monkeypatch)
  grid_value, grid_grads = jax.value_and_grad(loss, argnums=(0, 1))(x, pooled)
  np.testing.assert_allclose(grid_value, value, rtol=1e-5)
  for ours, theirs in zip(grid_grads, grads):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_grid_attention_gives_the_parameter_gradients_of_the_unfolded_path(monkeypatch):
  attn = _attention(4, 2, 3)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 16)), jnp.float32)
  pooled = jnp.asarray(rng.standard_normal((1, 2, 2, 16)), jnp.float32)
  loss = lambda module: (module(x, [pooled]) ** 2).sum()  # noqa: E731
  plain = nnx.grad(loss)(attn)
  _as_tpu(monkeypatch)
  grid = nnx.grad(loss)(attn)
  leaves = jax.tree.leaves(plain)
  assert len(leaves) == len(jax.tree.leaves(grid)) > 4
  for a, b in zip(leaves, jax.tree.leaves(grid)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
