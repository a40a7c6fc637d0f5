"""FocalNet logits parity with timm's and transformers' implementations (both build offline
from a config), from the same random weights in each one's layout.

They run in float64, focal_jax in float32 at the highest matmul precision; the tolerance
(2e-5 max abs on logits of magnitude ~5) fails a tanh GELU, a LayerNorm eps of 1e-6 or a
wrong modulator normalisation (`test_comparison_is_sensitive`). The official layout is
checked through timm's own converter of official checkpoints (`checkpoint_filter_fn`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (pip install -e '.[convert]')")
timm_focalnet = pytest.importorskip("timm.models.focalnet", reason="pip install timm")
hf_focalnet = pytest.importorskip("transformers.models.focalnet", reason="pip install transformers")

from focal_jax import convert  # noqa: E402
from focal_jax.convert import focalnet_names  # noqa: E402
from focal_jax.models import layers  # noqa: E402
from focal_jax.models.focalnet import make_focalnet_config  # noqa: E402

TOLERANCE = 2e-5
SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), num_classes=11)
# One case per family: (variant, overrides, img_size).
FAMILIES = {
    "srf_224": ("focalnet_tiny_srf", {}, 224),
    "lrf_96x64": ("focalnet_tiny_lrf", {}, (96, 64)),
    "fl3_postln_layerscale_conv": ("focalnet_large_fl3", {}, 64),
    "fl4_normalized": ("focalnet_large_fl4", {}, 64),
    "postln_in_modulation": ("focalnet_huge_fl4", {}, 64),
    "iso": ("focalnet_base_iso", dict(embed_dim=32, depths=(2,)), 64),
}


def timm_model(config) -> "torch.nn.Module":
  """timm's FocalNet for a focal_jax config (timm fixes patch_size 4 and a normed stem)."""
  return timm_focalnet.FocalNet(
      num_classes=config.num_classes, embed_dim=config.embed_dim, depths=config.depths,
      mlp_ratio=config.mlp_ratio, focal_levels=config.focal_levels,
      focal_windows=config.focal_windows, use_overlap_down=config.use_conv_embed,
      use_post_norm=config.use_postln, use_post_norm_in_modulation=config.use_postln_in_modulation,
      normalize_modulator=config.normalize_modulator,
      layerscale_value=config.layerscale_value if config.use_layerscale else None)


def hf_model(config) -> "torch.nn.Module":
  """transformers' FocalNetForImageClassification for a focal_jax config."""
  return hf_focalnet.FocalNetForImageClassification(hf_focalnet.FocalNetConfig(
      image_size=config.img_size[0], patch_size=config.patch_size, embed_dim=config.embed_dim,
      depths=list(config.depths), focal_levels=list(config.focal_levels),
      focal_windows=list(config.focal_windows), use_conv_embed=config.use_conv_embed,
      use_layerscale=config.use_layerscale, layerscale_value=config.layerscale_value,
      use_post_layernorm=config.use_postln,
      use_post_layernorm_in_modulation=config.use_postln_in_modulation,
      normalize_modulator=config.normalize_modulator, num_labels=config.num_classes,
      mlp_ratio=config.mlp_ratio, hidden_sizes=[config.stage_dim(i) for i in range(len(config.depths))]))


BUILDERS = {"timm": timm_model, "transformers": hf_model}


def randomise_(model: "torch.nn.Module", seed: int) -> None:
  """Moves every parameter well away from its initial value, keeping logits ~O(5)."""
  generator = torch.Generator().manual_seed(seed)
  noise = lambda p, std: torch.randn(p.shape, generator=generator, dtype=p.dtype) * std
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 1 and leaf == "weight":  # LayerNorm scales
        p.copy_(1.0 + noise(p, 0.2))
      elif "gamma" in name:  # layer scale
        p.copy_(0.5 + noise(p, 0.1))
      elif name in ("head.fc.weight", "classifier.weight"):
        p.copy_(noise(p, 4.0 / p.shape[1] ** 0.5))
      elif leaf == "bias":
        p.copy_(noise(p, 0.05))
      else:  # Linear and conv weights: twice their init spread
        p.add_(noise(p, float(p.std())))


def images(size, batch=2, seed=0) -> np.ndarray:
  """Low-contrast normalised images: small early activations make LayerNorm's eps count."""
  height, width = size
  rng = np.random.default_rng(seed)
  return (0.5 * rng.standard_normal((batch, height, width, 3))).astype(np.float32)


def build_pair(kind, name, img_size, seed=0, **overrides):
  """(our float32 model, their float64 model, config) holding the same random weights."""
  config = make_focalnet_config(name, img_size=img_size, **{**SMALL, **overrides})
  torch.manual_seed(seed)
  theirs = BUILDERS[kind](config)
  randomise_(theirs, seed)
  theirs = theirs.double().eval()
  ours = convert.from_torch_state_dict(theirs.state_dict(), name, img_size=img_size,
                                       **{**SMALL, **overrides})
  ours.eval()
  return ours, theirs, config


def run_pair(ours, theirs, x):
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x)))
  with torch.no_grad():
    out = theirs(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2))
  return logits, getattr(out, "logits", out).numpy()


def parity_error(ours, theirs, config) -> float:
  logits, expected = run_pair(ours, theirs, images(config.img_size))
  scale = np.abs(expected).max()
  assert 1.0 < scale < 50.0, f"logit scale {scale} out of the meaningful range"
  return float(np.abs(logits - expected).max())


@pytest.mark.parametrize("kind", BUILDERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_parity(kind, family):
  name, overrides, size = FAMILIES[family]
  if kind == "timm" and name.endswith("_iso"):
    pytest.skip("timm has no isotropic FocalNet (its stem is fixed at stride 4)")
  ours, theirs, config = build_pair(kind, name, size, **overrides)
  assert focalnet_names.layout_of(theirs.state_dict()) == kind
  error = parity_error(ours, theirs, config)
  assert error < TOLERANCE, f"max abs logit error {error:.3g}"


@pytest.mark.parametrize("kind", BUILDERS)
def test_official_state_dict_loads_into_both_strictly(kind):
  """to_torch_state_dict (the official layout) reaches timm through timm's own converter of
  official checkpoints, and transformers through this project's renames, strict=True."""
  ours, theirs, config = build_pair(kind, "focalnet_large_fl3", 64, seed=1)
  official = convert.to_torch_state_dict(ours)
  if kind == "timm":
    fresh = timm_model(config).double()
    tensors = {k: torch.from_numpy(v) for k, v in official.items()}
    converted = timm_focalnet.checkpoint_filter_fn({"model": tensors}, fresh)
    assert set(converted) == set(focalnet_names.from_official(official, "timm", ours))
  else:
    fresh = hf_model(config).double()
    converted = focalnet_names.from_official(official, "transformers", ours)
  fresh.load_state_dict({k: torch.as_tensor(np.asarray(v)).reshape(fresh.state_dict()[k].shape)
                         for k, v in converted.items()}, strict=True)
  fresh.eval()
  assert parity_error(ours, fresh, config) < TOLERANCE


def test_comparison_is_sensitive(monkeypatch):
  """A tanh GELU, a LayerNorm eps of 1e-6 or a flipped modulator normalisation fail it."""
  ours, theirs, config = build_pair("transformers", "focalnet_large_fl4", 64, seed=2)
  exact = parity_error(ours, theirs, config)
  state = convert.to_torch_state_dict(ours)
  options = dict(SMALL, img_size=64)

  def error_of(**changes):
    model = convert.from_torch_state_dict(state, "focalnet_large_fl4", **{**options, **changes})
    model.eval()
    return parity_error(model, theirs, config)

  assert error_of(normalize_modulator=False) > 5 * TOLERANCE
  monkeypatch.setattr(layers, "gelu", lambda x: jax.nn.gelu(x, approximate=True))
  jax.clear_caches()  # checkpointed functions would keep the exact GELU
  assert error_of() > 5 * TOLERANCE
  monkeypatch.undo()
  jax.clear_caches()
  monkeypatch.setattr(layers, "LAYER_NORM_EPS", 1e-6)
  assert error_of() > TOLERANCE > 2 * exact
