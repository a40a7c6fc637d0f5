"""FocalNet as the UPerNet backbone: the released ADE20K settings, the whole segmenter in
float32 against the float64 PyTorch reference (the official segmentation backbone's
computation, padding inside included), weights both ways in mmsegmentation's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="segmentation parity needs PyTorch (pip install -e '.[convert]')")

import focal_jax  # noqa: E402
from focal_jax import convert  # noqa: E402
from focal_jax.convert.reference import upernet as reference_upernet  # noqa: E402
from focal_jax.models import layers  # noqa: E402
from focal_jax.models.focalnet.config import SEGMENTATION_VARIANTS  # noqa: E402
from focal_jax.models.segmenter import segmenter_config  # noqa: E402

# Decode logits are O(5); float32 against float64 stays within 1e-5 (8e-6 measured), while
# a tanh GELU or LayerNorm eps 1e-6 moves them by 6e-5 to 7e-5.
TOLERANCE = 2e-5
REDUCED = dict(embed_dim=16, depths=(1, 1, 2, 1))
NAME = "focalnet_tiny_lrf"  # three focal levels: kernels 9, 11, 13 as released


def to_nhwc(t):
  return t.permute(0, 2, 3, 1).detach().numpy()


def reference_and_converted(img_size, num_classes=11):
  config = segmenter_config(NAME, img_size, **REDUCED)
  ref = reference_upernet.reference_segmenter(config, num_classes)
  reference_upernet.randomise_(ref)
  state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
  seg = convert.from_torch_state_dict({"meta": {"task": "segmentation"}, "state_dict": state_dict},
                                      NAME, task="segmentation", img_size=img_size, **REDUCED)
  return ref.double().eval(), seg, state_dict


def logits(seg, x):
  seg.eval()
  with jax.default_matmul_precision("highest"):
    return [np.asarray(a) for a in nnx.jit(lambda m, v: m.forward_train(v))(seg, jnp.asarray(x))]


def test_released_segmentation_settings():
  config = segmenter_config("focalnet_base_srf")
  assert config.focal_windows == (9, 9, 9, 9) and config.focal_levels == (2, 2, 2, 2)
  assert config.drop_path_rate == 0.3 and config.patch_norm and not config.remat
  assert config.num_classes == 0 and config.embed_dim == 128
  assert segmenter_config("focalnet_tiny_lrf", use_checkpoint=True).remat
  with pytest.raises(ValueError, match="focalnet_large_fl3.*has no segmentation backbone"):
    segmenter_config("focalnet_large_fl3")
  with pytest.raises(ValueError, match="use_conv_embed"):
    segmenter_config("focalnet_tiny_srf", use_conv_embed=True)


def test_segmenter_matches_reference_padding_inside(monkeypatch):
  """64x100 images: the stem map 16x25 is padded to even before each downsampling (stages
  16x25, 8x13, 4x7, 2x4), as the official backbone pads; logits 16x25 and 4x7. A tanh
  GELU or LayerNorm eps 1e-6 fails the tolerance."""
  ref, seg, state_dict = reference_and_converted((64, 96))
  x = (0.5 * np.random.default_rng(0).standard_normal((2, 64, 100, 3))).astype(np.float32)
  decode, auxiliary = logits(seg, x)
  with torch.no_grad():
    expected, expected_aux = (to_nhwc(t) for t in ref.forward_train(
        torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)))
  assert decode.shape == (2, 16, 25, 11) and auxiliary.shape == (2, 4, 7, 11)
  assert np.abs(expected).max() > 1.0
  exact = np.abs(decode - expected).max()
  assert exact < TOLERANCE
  assert np.abs(auxiliary - expected_aux).max() < TOLERANCE

  def error_with_changed_numerics():
    jax.clear_caches()  # compiled functions would keep the exact numerics
    changed = convert.from_torch_state_dict(state_dict, NAME, task="segmentation",
                                            img_size=(64, 96), **REDUCED)
    return np.abs(logits(changed, x)[0] - expected).max()

  monkeypatch.setattr(layers, "gelu", lambda v: jax.nn.gelu(v, approximate=True))
  assert error_with_changed_numerics() > 2 * TOLERANCE
  monkeypatch.undo()
  monkeypatch.setattr(layers, "LAYER_NORM_EPS", 1e-6)
  assert error_with_changed_numerics() > 2 * TOLERANCE
  monkeypatch.undo()
  jax.clear_caches()


def test_weights_both_ways_in_the_released_layout():
  ref, seg, state_dict = reference_and_converted(64)
  back = convert.to_torch_state_dict(seg)
  assert list(back) == list(ref.state_dict())
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  for key in ("backbone.patch_embed.proj.weight", "backbone.layers.0.downsample.norm.bias",
              "backbone.layers.2.blocks.1.modulation.h.weight", "backbone.norm3.weight",
              "backbone.layers.3.blocks.0.modulation.f.bias", "decode_head.conv_seg.bias",
              "auxiliary_head.convs.0.bn.num_batches_tracked"):
    assert key in back, key
  kernels = [back[f"backbone.layers.1.blocks.0.modulation.focal_layers.{i}.0.weight"].shape
             for i in range(3)]
  assert kernels == [(32, 1, 9, 9), (32, 1, 11, 11), (32, 1, 13, 13)]
  assert not any(k.startswith(("backbone.head", "backbone.norm.")) for k in back)


# Parameters of the released models' segmenters, 150 classes (published: 61M, 61M, 83M, 84M,
# 124M, 126M).
PARAMS = {"focalnet_tiny_srf": 60_822_512, "focalnet_tiny_lrf": 61_573_244,
          "focalnet_small_srf": 83_060_756, "focalnet_small_lrf": 84_594_860,
          "focalnet_base_srf": 123_681_012, "focalnet_base_lrf": 125_726_476}


@pytest.mark.parametrize("name", SEGMENTATION_VARIANTS)
def test_every_focalnet_segmenter_builds_for_512_crops(name):
  seg = nnx.eval_shape(lambda: focal_jax.create_segmenter(name, 150, img_size=512))
  out = jax.eval_shape(lambda m, v: m(v), seg, jax.ShapeDtypeStruct((1, 512, 683, 3), jnp.float32))
  assert out.shape == (1, 128, 171, 150)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(seg, nnx.Param)))
  assert count == PARAMS[name]


def test_segmentation_weight_decay_matches_the_released_rule_on_official_names():
  """The segmentation task's substring rule (FocalNet's released configs: no decay for names
  holding absolute_pos_embed, relative_position_bias_table or norm) gives the same mask on
  our dotted names as on the official keys, for every FocalNet segmenter parameter."""
  from focal_jax.convert.segmentation_names import segmentation_entries  # noqa: PLC0415
  from focal_jax.training.tasks import segmentation as segmentation_task  # noqa: PLC0415

  seg = nnx.eval_shape(lambda: focal_jax.create_segmenter("focalnet_tiny_lrf", 150, 512))
  params = nnx.to_pure_dict(nnx.state(seg, nnx.Param))
  mask = {jax.tree_util.keystr(k, simple=True, separator="."): bool(v) for k, v in
          jax.tree_util.tree_leaves_with_path(segmentation_task.decay_mask(None)(params))}
  official = {".".join(str(p) for p in e.path): e.key for e in segmentation_entries(seg)
              if e.path is not None and ".".join(str(p) for p in e.path) in mask}
  assert len(official) == len(mask) == 271
  assert all(mask[path] == segmentation_task.decays(key) for path, key in official.items())
  assert not mask["backbone.layers.0.blocks.0.norm1.scale"] and not mask["backbone.norm2.bias"]
  assert mask["backbone.layers.0.blocks.0.modulation.focal_layers.0.kernel"]


def test_command_line_both_ways(tmp_path):
  """focal-jax-convert --task segmentation with a FocalNet backbone: .pth -> export -> .pth."""
  from focal_jax.convert.__main__ import main as convert_main  # noqa: PLC0415

  ref, _, state_dict = reference_and_converted(64, num_classes=7)
  source, export, out = tmp_path / "in.pth", tmp_path / "export", tmp_path / "out.pth"
  torch.save({"meta": {}, "state_dict": ref.float().state_dict()}, source)
  convert_main(["from-torch", "--task", "segmentation", "--model", NAME, "--checkpoint",
                str(source), "--output", str(export), "--img-size", "64",
                "--set", "depths=[1,1,2,1]", "--set", "embed_dim=16"])
  convert_main(["to-torch", "--checkpoint", str(export), "--output", str(out)])
  written = torch.load(out, weights_only=True)
  assert written["meta"]["backbone"] == NAME
  assert written["meta"]["backbone_options"]["focal_windows"] == [9, 9, 9, 9]
  assert list(written["state_dict"]) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(written["state_dict"][key].numpy(), value)


def test_imagenet_focal_kernels_are_padded_into_the_segmentation_backbone():
  """init_from: the classifier's 3x3 / 5x5 / 7x7 focal kernels sit zero-padded in the
  backbone's 9x9 / 11x11 / 13x13, as FocalNet's segmentation load_checkpoint places them."""
  from jax.sharding import SingleDeviceSharding  # noqa: PLC0415

  from focal_jax import pretrained  # noqa: PLC0415
  from focal_jax.models.segmenter import create_segmenter  # noqa: PLC0415
  from focal_jax.training import train_state as ts  # noqa: PLC0415
  from focal_jax.training.tasks import segmentation as segmentation_task  # noqa: PLC0415

  options = dict(REDUCED, decode_channels=16, auxiliary_channels=8)
  spec = ts.model_spec(NAME, 5, 64, options, 0, create_segmenter)
  classifier = focal_jax.create_model(NAME, num_classes=1000, img_size=64, **REDUCED)
  source = {pretrained.param_name(path): np.asarray(v) for path, v in
            jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(classifier, nnx.Param)))}
  device = SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(spec.abstract_params))
  params = segmentation_task.pretrained_params(spec, shardings, "classifier",
                                               read_checkpoint=lambda *_: source)
  modulation = params["backbone"]["layers"][1]["blocks"][0]["modulation"]
  kernel = np.asarray(modulation["focal_layers"][2]["kernel"])
  small = source["layers.1.blocks.0.modulation.focal_layers.2.kernel"]
  assert small.shape == (7, 7, 1, 32) and kernel.shape == (13, 13, 1, 32)
  np.testing.assert_array_equal(kernel[3:10, 3:10], small)
  assert not kernel[:3].any() and not kernel[:, 10:].any()
  assert segmentation_task.fit_focal_kernel(kernel, (9, 9, 1, 32)).shape == (9, 9, 1, 32)
