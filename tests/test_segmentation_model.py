"""UPerNet segmenter: static pooling/resize matrices, BatchNorm, heads and the whole model
against the PyTorch reference (float64, mmsegmentation's computation), weights both ways,
frozen stages, and every variant's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="segmentation parity needs PyTorch (pip install -e '.[convert]')")
import torch.nn.functional as F  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax import convert  # noqa: E402
from focal_jax.convert.reference import upernet as reference_upernet  # noqa: E402
from focal_jax.convert.segmentation_names import auxiliary_head_entries, decode_head_entries  # noqa: E402
from focal_jax.convert import StateDictMismatch  # noqa: E402
from focal_jax.models import resize  # noqa: E402
from focal_jax.convert.segmentation import load_segmentation_state_dict  # noqa: E402
from focal_jax.models.conv_bn import BatchNorm  # noqa: E402
from focal_jax.models.segmenter import segmenter_config  # noqa: E402
from focal_jax.models.upernet import FCNHead, UPerHead  # noqa: E402

# Logits are O(5); a float32 model against a float64 reference stays within ~1e-5, where a
# pooling bin or align_corners gone wrong moves them by > 1e-2 (test_heads_match_reference).
TOLERANCE = 5e-5
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), focal_levels=(2, 2, 2, 2))


def to_nchw(x):
  return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)


def to_nhwc(t):
  return t.permute(0, 2, 3, 1).detach().numpy()


@pytest.mark.parametrize("size_in,size_out", [(16, 6), (16, 3), (7, 6), (4, 6), (10, 3), (5, 1),
                                              (13, 2)])
def test_adaptive_pool_matches_torch(size_in, size_out):
  x = np.random.default_rng(size_in).standard_normal((2, size_in, size_in + 3, 4))
  ours = resize.adaptive_avg_pool(jnp.asarray(x), (size_out, size_out + 1))
  theirs = F.adaptive_avg_pool2d(to_nchw(x), (size_out, size_out + 1))
  np.testing.assert_allclose(np.asarray(ours), to_nhwc(theirs), atol=1e-6)


@pytest.mark.parametrize("size_in,size_out", [(4, 16), (16, 64), (7, 28), (13, 50), (50, 13),
                                              (1, 4), (3, 5), (6, 6)])
def test_bilinear_resize_matches_torch(size_in, size_out):
  x = np.random.default_rng(size_out).standard_normal((2, size_in, size_in + 2, 3))
  ours = resize.resize_bilinear(jnp.asarray(x), (size_out, size_out + 5))
  theirs = F.interpolate(to_nchw(x), size=(size_out, size_out + 5), mode="bilinear",
                         align_corners=False)
  np.testing.assert_allclose(np.asarray(ours), to_nhwc(theirs), atol=1e-6)


def test_batch_norm_matches_torch_in_training_and_eval():
  x = 3.0 + 2.0 * np.random.default_rng(0).standard_normal((4, 5, 3, 8)).astype(np.float32)
  with nnx.use_eager_sharding(False):
    ours = BatchNorm(8, rngs=nnx.Rngs(0))
  theirs = torch.nn.BatchNorm2d(8)  # momentum 0.1, eps 1e-5
  ours.train()
  for _ in range(2):
    y = ours(jnp.asarray(x))
    expected = to_nhwc(theirs.double()(to_nchw(x)))
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours.mean[...]), theirs.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours.var[...]), theirs.running_var.numpy(), atol=1e-5)
  assert int(ours.num_batches_tracked[...]) == int(theirs.num_batches_tracked) == 2
  ours.eval(), theirs.eval()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), to_nhwc(theirs(to_nchw(x))), atol=1e-5)


class Heads(nnx.Module):
  def __init__(self, widths, num_classes, channels):
    rngs = nnx.Rngs(0)
    self.decode_head = UPerHead(widths, num_classes, channels=channels, rngs=rngs)
    self.auxiliary_head = FCNHead(widths[2], num_classes, channels=channels, rngs=rngs)


def load_heads(heads: Heads, state_dict) -> None:
  state = nnx.state(heads)
  for entry in [*decode_head_entries(heads.decode_head), *auxiliary_head_entries(heads.auxiliary_head)]:
    node = state
    for part in entry.path:
      node = node[part]
    node[...] = entry.from_torch(state_dict[entry.key].numpy())
  nnx.update(heads, state)


def test_heads_match_reference_and_a_wrong_bin_or_align_corners_shows(monkeypatch):
  """UPerHead and FCNHead alone (narrow channels) on maps whose pooled sizes do not divide
  (7x5 pooled to 2, 3 and 6); then with adaptive bins computed by plain division and with
  align_corners=True resizing, which must both fail the tolerance by far."""
  widths, classes, channels = (8, 12, 16, 20), 7, 16
  rng = np.random.default_rng(1)
  maps = [rng.standard_normal((2, 7 * 2**(3 - i), 5 * 2**(3 - i), w)).astype(np.float32)
          for i, w in enumerate(widths)]
  torch_decode = reference_upernet.UPerHead(widths, classes, channels=channels)
  torch_aux = reference_upernet.FCNHead(widths[2], classes, channels=channels)
  container = torch.nn.Module()
  container.decode_head, container.auxiliary_head = torch_decode, torch_aux
  reference_upernet.randomise_(container)
  container.double().eval()
  with torch.no_grad():
    expected = to_nhwc(torch_decode([to_nchw(m) for m in maps]))
    expected_aux = to_nhwc(torch_aux(to_nchw(maps[2])))
  with nnx.use_eager_sharding(False):
    heads = Heads(widths, classes, channels)
  load_heads(heads, {k: v.float() for k, v in container.state_dict().items()})
  heads.eval()
  # A new jitted function per run: the matrices are built when it is traced.
  run = lambda: np.asarray(nnx.jit(lambda h, ms: h(ms))(heads.decode_head, [jnp.asarray(m) for m in maps]))  # noqa: E731
  assert np.abs(run() - expected).max() < TOLERANCE
  assert np.abs(np.asarray(heads.auxiliary_head(jnp.asarray(maps[2]))) - expected_aux).max() < TOLERANCE

  def divided_bins(size_in, size_out):
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
      start, end = i * size_in // size_out, max((i + 1) * size_in // size_out, i * size_in // size_out + 1)
      matrix[i, start:end] = 1.0 / (end - start)
    return matrix

  def corners_aligned(size_in, size_out):
    positions = np.linspace(0, size_in - 1, size_out)
    low = np.minimum(np.floor(positions).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in))
    matrix[np.arange(size_out), low] += 1 - (positions - low)
    matrix[np.arange(size_out), high] += positions - low
    return matrix

  for name, wrong in (("adaptive_pool_matrix", divided_bins), ("bilinear_matrix", corners_aligned)):
    with monkeypatch.context() as patch:
      patch.setattr(resize, name, wrong)
      assert np.abs(run() - expected).max() > 100 * TOLERANCE, name


def reference_and_converted(name, num_classes, img_size, **options):
  """The randomised float64 reference and a focal_jax segmenter converted from its weights."""
  config = segmenter_config(name, img_size, **options)
  ref = reference_upernet.reference_segmenter(config, num_classes)
  reference_upernet.randomise_(ref)
  state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
  seg = convert.from_torch_state_dict({"meta": {"task": "segmentation"}, "state_dict": state_dict},
                                      name, task="segmentation", img_size=img_size, **options)
  return ref.double().eval(), seg, state_dict


def test_segmenter_matches_reference_at_a_size_that_needs_padding():
  """90x150 images: padded to 96x160 (stage 4 is 3x5, so every pyramid pool but 1x1 has
  overlapping bins), logits cropped back to 23x38 at stride 4 and 6x10 at stride 16."""
  ref, seg, state_dict = reference_and_converted(None, 11, (96, 160), **TINY)
  assert list(convert.to_torch_state_dict(seg)) == list(state_dict)
  x = (0.5 * np.random.default_rng(0).standard_normal((2, 90, 150, 3))).astype(np.float32)
  seg.eval()
  with jax.default_matmul_precision("highest"):
    decode, auxiliary = nnx.jit(lambda m, v: m.forward_train(v))(seg, jnp.asarray(x))
  with torch.no_grad():
    expected, expected_aux = (to_nhwc(t) for t in ref.forward_train(to_nchw(x)))
  assert decode.shape == (2, 23, 38, 11) and auxiliary.shape == (2, 6, 10, 11)
  assert np.abs(expected).max() > 1.0
  assert np.abs(np.asarray(decode) - expected).max() < TOLERANCE
  assert np.abs(np.asarray(auxiliary) - expected_aux).max() < TOLERANCE


def test_state_dict_round_trip_layout_and_errors():
  ref, seg, state_dict = reference_and_converted("focal_tiny", 150, 64, depths=(1, 1, 1, 1))
  back = convert.to_torch_state_dict(seg)
  assert list(back) == list(ref.state_dict())  # mmsegmentation's order, buffers included
  for key, value in ref.state_dict().items():
    assert back[key].shape == tuple(value.shape), key
    assert back[key].dtype == state_dict[key].dtype, key
    np.testing.assert_array_equal(back[key], state_dict[key])
  assert back["decode_head.bottleneck.bn.num_batches_tracked"].dtype == np.int64
  for key in ("backbone.norm3.weight", "decode_head.psp_modules.3.1.conv.weight",
              "decode_head.psp_modules.0.1.bn.num_batches_tracked", "decode_head.fpn_bottleneck.bn.running_var",
              "decode_head.lateral_convs.2.conv.weight", "decode_head.fpn_convs.0.bn.bias",
              "decode_head.bottleneck.conv.weight", "auxiliary_head.convs.0.conv.weight",
              "auxiliary_head.conv_seg.bias"):
    assert key in back
  assert not any(k.startswith("backbone.head") or k.startswith("backbone.norm.") for k in back)
  assert back["decode_head.conv_seg.weight"].shape == (150, 512, 1, 1)
  assert back["auxiliary_head.convs.0.conv.weight"].shape == (256, 384, 3, 3)
  assert int(back["decode_head.bottleneck.bn.num_batches_tracked"]) == 160_000
  # Loads into the reference strictly.
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  broken = dict(state_dict)
  del broken["decode_head.fpn_convs.1.bn.running_mean"]
  with pytest.raises(StateDictMismatch, match="fpn_convs.1.bn.running_mean"):
    load_segmentation_state_dict(seg, broken)
  other_classes = {k: (v[:19] if "conv_seg" in k else v) for k, v in state_dict.items()}
  with pytest.raises(StateDictMismatch, match="decode_head.conv_seg.weight: got .19, 512, 1, 1."):
    load_segmentation_state_dict(seg, other_classes)
  negative = {**state_dict, "decode_head.bottleneck.bn.num_batches_tracked": np.array(-1)}
  with pytest.raises(convert.InvalidWeights, match="num_batches_tracked"):
    load_segmentation_state_dict(seg, negative)


def test_frozen_stages_get_no_gradient_and_no_dropout():
  seg = focal_jax.create_segmenter("focal_tiny", 3, 64, frozen_stages=2, drop_path_rate=0.5,
                                   embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4))
  backbone = seg.backbone
  assert backbone.frozen_paths() == [("patch_embed",), ("layers", 0)]
  assert backbone.layers[0].blocks[1].drop_path.rate == 0.0  # 0.5 * 1/4 unfrozen
  assert backbone.layers[1].blocks[0].drop_path.rate > 0.0
  seg.train()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

  def loss(backbone):  # the backbone alone: freezing happens there (the heads compile slowly)
    return sum((feature**2).mean() for feature in backbone(x))

  grads = nnx.jit(nnx.grad(loss))(backbone)
  norms = {jax.tree_util.keystr(path, simple=True, separator="."): float(jnp.abs(g).max())
           for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))}
  frozen = [n for n in norms if n.startswith(("patch_embed", "layers.0."))]
  assert frozen and all(norms[n] == 0.0 for n in frozen)
  assert norms["layers.1.blocks.0.mlp.fc1.kernel"] > 0.0
  assert norms["layers.0.downsample.proj.kernel"] == 0.0
  assert norms["norm0.scale"] > 0.0
  trainable = nnx.state(seg, seg.trainable_filter())
  names = {jax.tree_util.keystr(p, simple=True, separator=".")
           for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(trainable))}
  assert "backbone.layers.1.downsample.proj.kernel" in names
  assert "decode_head.conv_seg.kernel" in names
  assert not any(n.startswith(("backbone.patch_embed", "backbone.layers.0.")) for n in names)
  assert not any(n.endswith(("mean", "var", "num_batches_tracked")) for n in names)


@pytest.mark.parametrize("name", ["focal_tiny", "focal_tiny_conv", "focal_small", "focal_small_conv",
                                  "focal_base", "focal_base_conv"])
def test_every_variant_builds_for_512_crops(name):
  seg = nnx.eval_shape(lambda: focal_jax.create_segmenter(name, 150, 512))
  out = jax.eval_shape(lambda m, v: m(v), seg, jax.ShapeDtypeStruct((2, 512, 683, 3), jnp.float32))
  assert out.shape == (2, 128, 171, 150)
  widths = [seg.config.stage_dim(i) for i in range(4)]
  assert seg.decode_head.psp_modules[0].conv_module.conv.kernel.shape == (1, 1, widths[3], 512)
  assert seg.auxiliary_head.convs[0].conv.kernel.shape == (3, 3, widths[2], 256)


def test_focal_fast_needs_whole_windows():
  """Focal-fast crops must give whole windows in every stage: multiples of 224 with its
  window of 7 (448, 672), or multiples of 256 with window_size=8 (512)."""
  for img_size, options in ((448, {}), (512, {"window_size": 8})):  # 112 = 16 x 7, 128 = 16 x 8
    seg = nnx.eval_shape(lambda s=img_size, o=options: focal_jax.create_segmenter("focalv2_tiny", 150, s, **o))
    out = jax.eval_shape(lambda m, v: m(v), seg,
                         jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32))
    assert out.shape == (1, img_size // 4, img_size // 4, 150)
  with pytest.raises(ValueError, match="multiples of 224"):
    focal_jax.create_segmenter("focalv2_tiny", 150, 512)


def test_training_step_and_inference_are_gather_free():
  """Padding, pyramid pooling, resizing, BatchNorm, the auxiliary head and their gradient;
  then sliding-window inference with a scale and flip: no gather or scatter anywhere."""
  from conftest import walk_primitives  # noqa: PLC0415
  from test_no_gather import FORBIDDEN  # noqa: PLC0415

  seg = focal_jax.create_segmenter(None, 5, (96, 160), **TINY)
  seg.train()
  graphdef, params, rest = nnx.split(seg, nnx.Param, ...)
  x = jnp.zeros((2, 90, 150, 3))

  def gradient(params, rest, x):
    module = nnx.merge(graphdef, params, rest)
    loss = lambda m, x: sum(logits.sum() for logits in m.forward_train(x))  # noqa: E731
    return nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.Param), 1))(module, x)

  def inference(params, rest, x):
    return focal_jax.segment(nnx.merge(graphdef, params, rest), x, mode="slide", crop=(64, 96),
                             stride=(40, 60), scales=(1.0, 0.75), flip=True)

  for name, jaxpr in (("training gradient", jax.make_jaxpr(gradient)(params, rest, x).jaxpr),
                      ("inference", jax.make_jaxpr(inference)(params, rest, x).jaxpr)):
    primitives = walk_primitives(jaxpr)
    assert "dot_general" in primitives and "conv_general_dilated" in primitives
    found = sorted({p for p in primitives if p in FORBIDDEN})
    assert not found, f"{name} contains {found}"
