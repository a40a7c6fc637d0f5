"""Logits parity with the PyTorch reference (the official numerics) from the same weights.

The reference runs in float64; focal_jax runs in float32 at the highest matmul
precision. Weights are random and moved well away from their initial values. The
tolerance (2e-5 max abs on logits of magnitude ~5) is tight enough that a tanh GELU or
a LayerNorm eps of 1e-6 fails it, which `test_comparison_is_sensitive` checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (pip install -e '.[convert]')")

from focal_jax import convert  # noqa: E402
from focal_jax.convert.reference import focal  # noqa: E402
from focal_jax.models import layers, make_config  # noqa: E402
from conftest import OFFICIAL_OPTIONS  # noqa: E402

TOLERANCE = 2e-5
REDUCED = dict(depths=(1, 1, 2, 1))  # every variant at reduced depth
SMALL = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=17,
             focal_levels=(2, 2, 2, 2))


def reference_model(config) -> "torch.nn.Module":
  return focal.FocalTransformer(**config.official_kwargs())


def randomise_(model: "torch.nn.Module", seed: int) -> None:
  """Moves every parameter well away from its initial value, keeping logits ~O(5)."""
  generator = torch.Generator().manual_seed(seed)
  noise = lambda p, std: torch.randn(p.shape, generator=generator, dtype=p.dtype) * std
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if "relative_position_bias_table" in name:
        p.copy_(noise(p, 0.5))  # position tables: large, so a wrong index shows
      elif "pool_layers" in name and leaf == "weight":
        p.copy_(1.0 / p[0].numel() + noise(p, 0.1))  # pooling weights: far from init
      elif "norm" in name and leaf == "weight":
        p.copy_(1.0 + noise(p, 0.2))
      elif name.endswith("gamma_1") or name.endswith("gamma_2"):
        p.copy_(0.5 + noise(p, 0.1))
      elif name == "head.weight":
        p.copy_(noise(p, 4.0 / p.shape[1] ** 0.5))  # logits of magnitude ~5
      elif leaf == "bias" or name == "absolute_pos_embed":
        p.copy_(noise(p, 0.05))
      else:  # Linear and conv weights: twice their init spread
        p.add_(noise(p, float(p.std()) if p.numel() > 1 else 0.02))


def images(config, batch: int = 2, seed: int = 0) -> np.ndarray:
  """Low-contrast normalised images: small early activations make LayerNorm's eps count."""
  height, width = config.img_size
  rng = np.random.default_rng(seed)
  return (0.5 * rng.standard_normal((batch, height, width, config.in_chans))).astype(np.float32)


def build_pair(name, seed=0, **overrides):
  """(our float32 model, reference float64 model) holding the same random weights."""
  config = make_config(name, **overrides)
  ref = reference_model(config)
  randomise_(ref, seed)
  ref = ref.double().eval()
  kwargs = {k: v for k, v in overrides.items() if k not in ("img_size",)}
  ours = convert.from_torch_state_dict(ref.state_dict(), name, img_size=config.img_size, **kwargs)
  ours.eval()
  return ours, ref, config


def torch_nchw(x: np.ndarray) -> "torch.Tensor":
  return torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)


def run_pair(ours, ref, x):
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x)))
  with torch.no_grad():
    expected = ref(torch_nchw(x)).numpy()
  return logits, expected


def assert_parity(ours, ref, config, tolerance=TOLERANCE):
  logits, expected = run_pair(ours, ref, images(config))
  scale = np.abs(expected).max()
  assert 1.0 < scale < 50.0, f"logit scale {scale} out of the meaningful range"
  error = np.abs(logits - expected).max()
  assert error < tolerance, f"max abs logit error {error:.3g} (logit scale {scale:.3g})"
  return error


def test_focal_tiny_full_size_224():
  ours, ref, config = build_pair("focal_tiny")
  assert_parity(ours, ref, config)


@pytest.mark.parametrize("name", ["focal_tiny", "focal_tiny_conv", "focal_small",
                                  "focal_small_conv", "focal_base", "focal_base_conv"])
def test_every_variant_at_reduced_depth(name):
  ours, ref, config = build_pair(name, seed=1, **REDUCED)
  assert_parity(ours, ref, config)


@pytest.mark.parametrize("img_size", [224, 256, 320, (224, 320)])
def test_resolutions(img_size):
  ours, ref, config = build_pair(None, seed=2, img_size=img_size, **SMALL)
  assert_parity(ours, ref, config)


OPTIONS = {
    **OFFICIAL_OPTIONS,
    "levels_3_shift_conv_pool": dict(focal_levels=(3, 3, 3, 3), use_shift=True, focal_pool="conv"),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_options(option):
  ours, ref, config = build_pair(None, seed=3, **{**SMALL, **OPTIONS[option]})
  assert_parity(ours, ref, config)


def test_forward_features_match_reference_stage_maps():
  ours, ref, config = build_pair(None, seed=4, **SMALL)
  x = images(config)
  with jax.default_matmul_precision("highest"):
    features = nnx.jit(lambda m, x: m.forward_features(x))(ours, jnp.asarray(x))
  with torch.no_grad():
    expected = [t.numpy() for t in ref.forward_stages(torch_nchw(x))]
  assert len(features) == len(expected) == 4
  for ours_map, ref_map in zip(features, expected):
    assert ours_map.shape == ref_map.shape
    scale = np.abs(ref_map).max()
    assert np.abs(np.asarray(ours_map) - ref_map).max() < 1e-5 * max(1.0, scale)


def test_input_gradients_match_reference():
  ours, ref, config = build_pair(None, seed=5, **SMALL)
  x = images(config)
  weights = np.random.default_rng(6).standard_normal((2, config.num_classes))

  def loss(images):
    return (ours(images) * weights).sum()

  with jax.default_matmul_precision("highest"):
    grad = np.asarray(nnx.jit(jax.grad(loss))(jnp.asarray(x)))
  x_torch = torch_nchw(x).requires_grad_(True)
  (ref(x_torch) * torch.from_numpy(weights)).sum().backward()
  expected = x_torch.grad.permute(0, 2, 3, 1).numpy()
  scale = np.abs(expected).max()
  assert scale > 0
  assert np.abs(grad - expected).max() < 1e-4 * scale


def test_comparison_is_sensitive(monkeypatch):
  """A tanh GELU or a LayerNorm eps of 1e-6 must fail the parity tolerance."""
  ours, ref, config = build_pair("focal_tiny", seed=7, **REDUCED)
  exact_error = assert_parity(ours, ref, config)
  state = convert.to_torch_state_dict(ours)

  monkeypatch.setattr(layers, "gelu", lambda x: jax.nn.gelu(x, approximate=True))
  jax.clear_caches()  # traced (checkpointed) functions would keep the exact GELU
  tanh_model = convert.from_torch_state_dict(state, "focal_tiny", **REDUCED)
  tanh_model.eval()
  logits, expected = run_pair(tanh_model, ref, images(config))
  assert np.abs(logits - expected).max() > 5 * TOLERANCE
  monkeypatch.undo()
  jax.clear_caches()

  monkeypatch.setattr(layers, "LAYER_NORM_EPS", 1e-6)
  eps_model = convert.from_torch_state_dict(state, "focal_tiny", **REDUCED)
  eps_model.eval()
  logits, expected = run_pair(eps_model, ref, images(config))
  assert np.abs(logits - expected).max() > TOLERANCE > 2 * exact_error


def test_round_trip_torch_to_jax_to_torch_is_bit_exact():
  config = make_config("focal_tiny", **REDUCED)
  ref = reference_model(config)
  randomise_(ref, 8)
  state = ref.state_dict()
  ours = convert.from_torch_state_dict({"model": state}, "focal_tiny", **REDUCED)
  back = convert.to_torch_state_dict(ours)
  assert list(back) == list(state)
  for key, value in state.items():
    assert back[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  fresh = reference_model(config)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_full_size_state_dict_layout():
  """Official key counts and a strict load of a converted model into the reference."""
  for name, entries in (("focal_tiny", 256), ("focal_small", 496)):
    ours = convert.from_torch_state_dict(reference_model(make_config(name)).state_dict(), name)
    state = convert.to_torch_state_dict(ours)
    assert len(state) == entries
  assert state["layers.0.blocks.0.attn.valid_ind_rolled"].shape == (132,)
  assert state["layers.0.blocks.0.attn.valid_ind_rolled"].dtype == np.int64
  assert state["layers.3.blocks.0.attn.relative_position_index_0"].shape == (49, 1)


def test_mismatched_state_dict_is_a_clear_error():
  state = convert.to_torch_state_dict(
      convert.from_torch_state_dict(reference_model(make_config("focal_tiny", **REDUCED)).state_dict(),
                                    "focal_tiny", **REDUCED))
  with pytest.raises(convert.StateDictMismatch) as error:
    convert.from_torch_state_dict(state, "focal_tiny_conv", **REDUCED)
  assert "wrongly shaped" in str(error.value) and "focal_tiny_conv" in str(error.value)
  broken = dict(state)
  broken.pop("head.bias")
  broken["extra.weight"] = np.zeros(3)
  with pytest.raises(convert.StateDictMismatch) as error:
    convert.from_torch_state_dict(broken, "focal_tiny", **REDUCED)
  message = str(error.value)
  assert "missing keys" in message and "head.bias" in message
  assert "unexpected keys" in message and "extra.weight" in message
  with pytest.raises(convert.StateDictMismatch, match="missing keys"):
    convert.from_torch_state_dict(state, "focal_tiny", **{**REDUCED, "depths": (1, 1, 3, 1)})
