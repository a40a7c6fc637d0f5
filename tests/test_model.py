"""Model structure, shapes, resolutions, train/eval behaviour and the option matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import focal_jax
from conftest import OFFICIAL_OPTIONS, SMALL, images
from focal_jax.models import focal_transformer


def param_count(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", list(focal_jax.VARIANTS))
def test_full_size_parameter_count_and_shapes(name):
  model = nnx.eval_shape(lambda: focal_jax.create_model(name))
  assert param_count(model) == focal_jax.OFFICIAL_PARAM_COUNTS[name]
  graphdef, state = nnx.split(model)

  def forward(state, x):
    module = nnx.merge(graphdef, state)
    module.eval()
    return module(x), module.forward_features(x)

  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits, features = jax.eval_shape(forward, state, x)
  assert logits.shape == (2, 1000)
  width = model.config.embed_dim
  assert [f.shape for f in features] == [(2, 56, 56, width), (2, 28, 28, 2 * width),
                                         (2, 14, 14, 4 * width), (2, 7, 7, 8 * width)]


def test_parameter_names_follow_the_official_tree():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  attn = model.layers[0].blocks[0].attn
  assert attn.relative_position_bias_table.shape == (169, 3)
  assert attn.relative_position_bias_table_to_neighbors.shape == (1, 3, 49, 132)
  assert attn.relative_position_bias_table_to_windows[0].shape == (3, 169)
  assert model.layers[0].blocks[0].pool_layers[0].kernel.shape == (49, 1)
  last = model.layers[3].blocks[0].attn
  assert last.relative_position_bias_table_to_windows[0].shape == (24, 49)
  assert not hasattr(last, "relative_position_bias_table_to_neighbors")
  assert model.layers[0].downsample.proj.kernel.shape == (2, 2, 96, 192)
  assert model.head.kernel.shape == (768, 1000)


def test_parameters_carry_logical_axis_names():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert tuple(specs["layers"][0]["blocks"][0]["attn"]["qkv"]["kernel"].get_metadata()["out_sharding"]) == ("embed", "qkv")
  assert tuple(specs["layers"][0]["blocks"][0]["mlp"]["fc1"]["kernel"].get_metadata()["out_sharding"]) == ("embed", "mlp")


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (320, 320), (224, 320)])
def test_any_resolution_without_rebuilding(size):
  model = focal_jax.create_model(None, num_classes=7, img_size=224, **SMALL)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  model.eval()
  x = jnp.asarray(images(2, *size))
  logits, features = nnx.jit(lambda m, x: (m(x), m.forward_features(x)))(model, x)
  assert logits.shape == (2, 7) and bool(jnp.isfinite(logits).all())
  height, width = size
  for i, feature in enumerate(features):
    stride = 4 * 2**i
    assert feature.shape == (2, height // stride, width // stride, 16 * 2**i)
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_built_size_decides_the_structure():
  at_224 = nnx.eval_shape(lambda: focal_jax.create_model(None, img_size=224, **SMALL))
  at_64 = nnx.eval_shape(lambda: focal_jax.create_model(None, img_size=64, **SMALL))
  # 64 -> stage grids 16/8/4/2: stages 3 and 4 fall back to one window without ring.
  assert [layer.blocks[0].window_size for layer in at_224.layers] == [7, 7, 7, 7]
  assert [layer.blocks[0].expand_size for layer in at_224.layers] == [3, 3, 3, 0]
  assert [layer.blocks[0].window_size for layer in at_64.layers] == [7, 7, 4, 2]
  assert [layer.blocks[0].expand_size for layer in at_64.layers] == [3, 3, 0, 0]
  assert param_count(at_64) < param_count(at_224)


def test_eval_is_deterministic_and_train_is_stochastic():
  model = focal_jax.create_model(None, num_classes=5, drop_rate=0.1, attn_drop_rate=0.1,
                                 **{**SMALL, "drop_path_rate": 0.5})
  x = jnp.asarray(images(4))
  forward = nnx.jit(lambda m, x: m(x))
  model.eval()
  a, b = forward(model, x), forward(model, x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model.train()
  c, d = forward(model, x), forward(model, x)
  assert not np.allclose(np.asarray(c), np.asarray(d))
  assert not np.allclose(np.asarray(c), np.asarray(a))


def test_stochastic_depth_drops_whole_samples():
  block = focal_jax.create_model(None, num_classes=5, **{**SMALL, "drop_path_rate": 0.9}).layers[3].blocks[0]
  assert block.drop_path.broadcast_dims == (1, 2, 3)
  mask = block.drop_path(jnp.ones((64, 2, 2, 3)))
  per_sample = np.asarray(mask).reshape(64, -1)
  assert np.all((per_sample == 0).all(1) | (np.abs(per_sample - 10.0) < 1e-4).all(1))
  assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_gradients_are_finite_and_reach_every_parameter():
  model = focal_jax.create_model(None, num_classes=5, **{**SMALL, "focal_levels": (3, 3, 3, 3)})
  x = jnp.asarray(images(2))
  labels = jnp.array([1, 3])

  def loss_fn(module):
    logits = module(x)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()

  grads = nnx.jit(nnx.grad(loss_fn))(model)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert leaves
  for path, grad in leaves:
    assert bool(jnp.isfinite(grad).all()), jax.tree_util.keystr(path)
  zero = [jax.tree_util.keystr(p) for p, g in leaves if not np.any(np.asarray(g))]
  assert zero == [], f"parameters without gradient: {zero}"


OPTIONS = {
    **OFFICIAL_OPTIONS,
    "focal_stages_01": dict(focal_stages=(0, 1)),
    "expand_stages_ignored": dict(expand_stages=(0,)),
    "qk_scale": dict(qk_scale=0.25),
    "no_qkv_bias": dict(qkv_bias=False),
    "bfloat16": dict(dtype=jnp.bfloat16),
    "remat": dict(remat=True),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_option_matrix(option):
  model = focal_jax.create_model(None, num_classes=3, **{**SMALL, **OPTIONS[option]})
  x = jnp.asarray(images(2))
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())
  grads = nnx.jit(nnx.grad(lambda m: m(x).mean()))(model)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_option_structure():
  build = lambda **kw: nnx.eval_shape(lambda: focal_jax.create_model(None, **{**SMALL, **kw}))
  assert len(build(focal_levels=(3, 3, 3, 3)).layers[0].blocks[0].attn.relative_position_bias_table_to_windows) == 2
  assert build(focal_pool="conv").layers[0].blocks[0].pool_layers[0].kernel.shape == (7, 7, 1, 16)
  assert len(build(focal_pool="mean").layers[0].blocks[0].pool_layers) == 0
  assert len(build(focal_pool="none").layers[0].blocks[0].attn.relative_position_bias_table_to_windows) == 0
  even = build(expand_layer="even").layers[2]
  assert [b.expand_size for b in even.blocks] == [0, 3]
  odd = build(expand_layer="odd").layers[2]
  assert [b.expand_size for b in odd.blocks] == [3, 0]
  assert [b.shift_size for b in build(use_shift=True).layers[2].blocks] == [0, 3]
  assert build(use_pre_norm=True).layers[0].downsample.pre_norm is not None
  assert build(use_conv_embed=True).patch_embed.proj.kernel.shape == (7, 7, 3, 16)
  assert build(ape=True).absolute_pos_embed.shape == (1, 56 * 56, 16)
  assert build(patch_norm=False).patch_embed.norm is None
  assert [layer.blocks[0].attn.pooled_levels for layer in build(focal_stages=(0, 1)).layers] == [1, 1, 0, 0]


def test_bfloat16_keeps_float32_parameters_and_agrees():
  x = jnp.asarray(images(2))
  ref = focal_jax.create_model(None, num_classes=3, **SMALL)
  low = focal_jax.create_model(None, num_classes=3, dtype=jnp.bfloat16, **SMALL)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(low, nnx.Param)))
  ref.eval()
  low.eval()
  forward = nnx.jit(lambda m, x: m(x))
  a, b = np.asarray(forward(ref, x)), np.asarray(forward(low, x))
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max() + 0.05


def test_remat_gives_the_same_gradients():
  x = jnp.asarray(images(2))
  plain = focal_jax.create_model(None, num_classes=3, **SMALL)
  remat = focal_jax.create_model(None, num_classes=3, remat=True, **SMALL)
  plain.eval()
  remat.eval()
  gradient = nnx.jit(nnx.grad(lambda m: m(x).sum()))
  g1, g2 = gradient(plain), gradient(remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_scanned_blocks_match_unrolled_blocks_in_training(monkeypatch):
  """Runs of identical blocks under `lax.scan`: same outputs, RNG draws and gradients."""
  monkeypatch.setattr(focal_transformer, "SCAN_MIN_BLOCKS", 4)  # scan this short run
  config = {**SMALL, "depths": (1, 1, 4, 1), "drop_path_rate": 0.5}
  scanned = focal_jax.create_model(None, num_classes=3, **config)
  unrolled = focal_jax.create_model(None, num_classes=3, scan_blocks=False, **config)
  assert scanned.layers[2].scanned_runs == ((0, 4),)
  assert unrolled.layers[2].block_runs == ((0, 1), (1, 2), (2, 3), (3, 4))
  x = jnp.asarray(images(8))

  def loss_and_grad(model):
    return nnx.jit(nnx.value_and_grad(lambda m: (m(x) ** 2).mean()))(model)

  for _ in range(2):  # the second step checks that the RNG counters advanced alike
    (l1, g1), (l2, g2) = loss_and_grad(scanned), loss_and_grad(unrolled)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), g1, g2)
  assert not np.allclose(np.asarray(l1), np.asarray(loss_and_grad(scanned)[0]))


def test_only_long_runs_of_blocks_are_scanned():
  """Focal-B's 18 identical stage-3 blocks run under `lax.scan`; Focal-T's 6 stay unrolled
  (stacking their parameters would cost more run time than the scan saves compile time)."""
  for name, scanned in (("focal_tiny", ()), ("focal_base", ((0, 18),))):
    model = nnx.eval_shape(lambda name=name: focal_jax.create_model(name))
    assert [layer.scanned_runs for layer in model.layers] == [(), (), scanned, ()]
  unrolled = nnx.eval_shape(lambda: focal_jax.create_model("focal_base", scan_blocks=False))
  assert all(layer.scanned_runs == () for layer in unrolled.layers)
