"""FocalNet: variants and exact parameter counts, the official FLOP count, options, the
layouts of the official code, timm and transformers, and fine-tuning from each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import focal_jax
from conftest import walk_primitives
from focal_jax.models import focalnet
from focal_jax.models.flops import official_macs

# The official flops() (multiply-accumulates) at 224 with 1000 classes, read by instantiating
# the official classes.
OFFICIAL_FLOPS = {
    "focalnet_tiny_srf": 4_412_630_784, "focalnet_tiny_lrf": 4_485_561_600,
    "focalnet_small_srf": 8_613_265_152, "focalnet_small_lrf": 8_732_257_536,
    "focalnet_base_srf": 15_260_800_000, "focalnet_base_lrf": 15_419_456_512,
    "focalnet_tiny_iso": 1_112_048_256, "focalnet_small_iso": 4_304_995_584,
    "focalnet_base_iso": 16_933_587_456, "focalnet_large_fl3": 34_794_502_656,
    "focalnet_large_fl4": 34_845_832_704, "focalnet_xlarge_fl3": 61_498_456_064,
    "focalnet_xlarge_fl4": 61_566_896_128, "focalnet_huge_fl3": 115_100_099_840,
    "focalnet_huge_fl4": 115_810_165_504,
}

TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_classes=7)


def param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(focalnet.VARIANTS))
def test_parameter_counts_and_flops_are_the_official_ones(name):
  count, classes = focalnet.OFFICIAL_PARAM_COUNTS[name]
  model = nnx.eval_shape(lambda: focal_jax.create_model(name, num_classes=classes))
  assert isinstance(model, focalnet.FocalNet)
  assert param_count(model) == count
  head_macs = model.config.num_features * (classes - 1000)  # OFFICIAL_FLOPS: 1000 classes
  assert official_macs(model) - head_macs == OFFICIAL_FLOPS[name]


def test_stage_maps_and_logits_at_two_sizes():
  model = focal_jax.create_model("focalnet_tiny_srf", **TINY)
  model.eval()
  forward = nnx.jit(lambda m, x: (m.forward_features(x), m(x)))
  for size in ((64, 64), (96, 64)):
    features, logits = forward(model, jnp.zeros((2, *size, 3)))
    assert [f.shape for f in features] == [
        (2, size[0] // s, size[1] // s, 16 * s // 4) for s in (4, 8, 16, 32)]
    assert logits.shape == (2, 7) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="multiples of 32"):
    model(jnp.zeros((1, 48, 64, 3)))


def test_parameter_names_follow_the_official_tree():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focalnet_large_fl3"))
  block = model.layers[0].blocks[0]
  assert block.modulation.f.kernel.shape == (192, 2 * 192 + 4)
  assert block.modulation.h.kernel.shape == (1, 1, 192, 192)
  assert [c.kernel.shape for c in block.modulation.focal_layers] == [
      (5, 5, 1, 192), (7, 7, 1, 192), (9, 9, 1, 192)]
  assert block.gamma_1.shape == (192,) and block.modulation.ln is None
  assert model.patch_embed.proj.kernel.shape == (7, 7, 3, 192)  # use_conv_embed
  assert model.layers[0].downsample.proj.kernel.shape == (3, 3, 192, 384)


def test_unknown_options_and_bad_windows_are_refused():
  with pytest.raises(ValueError, match="Unknown FocalNet option"):
    focal_jax.create_model("focalnet_tiny_srf", num_heads=(1, 2, 3, 4))
  with pytest.raises(ValueError, match="odd kernel"):
    focal_jax.create_model("focalnet_tiny_srf", focal_windows=(4, 3, 3, 3))
  with pytest.raises(ValueError, match="fewer entries"):
    focal_jax.create_model("focalnet_tiny_srf", focal_levels=(2, 2))


def test_forward_and_gradient_are_gather_free():
  options = {**TINY, "embed_dim": 8, "depths": (1, 1, 1, 1)}
  model = focal_jax.create_model("focalnet_huge_fl4", drop_rate=0.1, img_size=64, **options)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.ones((1, 64, 64, 3))

  def gradient(params, rest, x):
    module = nnx.merge(graphdef, params, rest)
    return nnx.grad(lambda m, x: m(x).sum(), argnums=(nnx.DiffState(0, nnx.Param), 1))(module, x)

  primitives = walk_primitives(jax.make_jaxpr(gradient)(params, rest, x).jaxpr)
  assert "conv_general_dilated" in primitives
  assert not {p for p in primitives if "gather" in p or "scatter" in p or "dynamic" in p}


def test_scanned_blocks_match_unrolled_ones():
  options = dict(TINY, depths=(1, 1, 9, 1), img_size=64)
  scanned = focal_jax.create_model("focalnet_small_lrf", **options)
  unrolled = focal_jax.create_model("focalnet_small_lrf", scan_blocks=False, **options)
  assert scanned.layers[2].scanned_runs == ((0, 9),)
  scanned.eval(), unrolled.eval()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)), jnp.float32)
  np.testing.assert_allclose(scanned(x), unrolled(x), atol=1e-5)
