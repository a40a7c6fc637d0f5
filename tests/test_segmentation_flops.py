"""The segmenter's MAC count as mmsegmentation reports it: the analytic decode-head count
against mmcv's counting rules applied by forward hooks to the PyTorch reference's modules."""

import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the hook count runs the PyTorch reference")

from focal_jax.convert.reference import upernet as reference_upernet  # noqa: E402
from focal_jax.models.segmenter import create_segmenter, segmenter_config  # noqa: E402
from focal_jax.models.segmenter_flops import backbone_hook_macs, decode_head_macs  # noqa: E402
from focal_jax.models.upernet import UPerHead  # noqa: E402


def mmcv_hook_count(module: "torch.nn.Module", inputs) -> int:
  """mmcv's get_model_complexity_info rules: conv kernel*in/groups MACs per output element
  (+1 with bias), affine BatchNorm 2 per input element, ReLU 1 per output element, adaptive
  average pooling 1 per input element; functional calls (interpolate) count nothing."""
  total = 0

  def hook(layer, args, output):
    nonlocal total
    if isinstance(layer, torch.nn.Conv2d):
      per_position = layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels // layer.groups
      total += output.numel() * per_position + (output.numel() if layer.bias is not None else 0)
    elif isinstance(layer, torch.nn.BatchNorm2d):
      total += 2 * args[0].numel()
    elif isinstance(layer, torch.nn.AdaptiveAvgPool2d):
      total += args[0].numel()

  handles = [m.register_forward_hook(hook) for m in module.modules()]
  relu_total = 0
  original_relu = torch.nn.functional.relu

  def counting_relu(x, *args, **kwargs):  # the reference calls F.relu where mmcv has nn.ReLU
    nonlocal relu_total
    relu_total += x.numel()
    return original_relu(x, *args, **kwargs)

  reference_upernet.F.relu = counting_relu
  try:
    with torch.no_grad():
      module.eval()(inputs)
  finally:
    reference_upernet.F.relu = original_relu
    for handle in handles:
      handle.remove()
  return total + relu_total


def test_decode_head_count_matches_mmcv_rules_on_the_reference():
  widths, classes, grids = (8, 12, 16, 20), 9, [(20, 12), (10, 6), (5, 3), (3, 2)]
  reference = reference_upernet.UPerHead(widths, classes, channels=16)
  maps = [torch.zeros(1, w, h, wd) for w, (h, wd) in zip(widths, grids)]
  with nnx.use_eager_sharding(False):
    head = nnx.eval_shape(lambda: UPerHead(widths, classes, channels=16, rngs=nnx.Rngs(0)))
  assert decode_head_macs(head, grids, classes) == mmcv_hook_count(reference, maps)


def backbone_hook_count(backbone: "torch.nn.Module", images) -> int:
  """mmcv's rules on the backbone's modules: Linear in-elements x out_features, conv as
  above, affine LayerNorm 2 per element; attention products and GELU count nothing."""
  total = 0

  def hook(layer, args, output):
    nonlocal total
    if isinstance(layer, torch.nn.Linear):
      total += args[0].numel() * layer.out_features
    elif isinstance(layer, torch.nn.Conv2d):
      per_position = layer.kernel_size[0] * layer.kernel_size[1] * layer.in_channels // layer.groups
      total += output.numel() * (per_position + (1 if layer.bias is not None else 0))
    elif isinstance(layer, torch.nn.LayerNorm):
      total += 2 * args[0].numel()

  handles = [m.register_forward_hook(hook) for m in backbone.modules()]
  try:
    with torch.no_grad():
      backbone.eval()(images)
  finally:
    for handle in handles:
      handle.remove()
  return total


@pytest.mark.parametrize("options", [{}, {"use_conv_embed": True, "focal_levels": (3, 3, 3, 3)}])
def test_backbone_count_matches_mmcv_rules_on_the_reference(options):
  """160x96: stage grids 40x24 .. 5x3, partial 7x7 windows padded in every stage."""
  config = segmenter_config("focal_tiny", (160, 96), embed_dim=16, depths=(2, 1, 1, 1),
                            num_heads=(1, 2, 2, 4), **options)
  reference = reference_upernet.FocalBackbone(**{k: v for k, v in config.official_kwargs().items()
                                                  if k != "num_classes"})
  segmenter = nnx.eval_shape(lambda: create_segmenter(
      "focal_tiny", 5, (160, 96), embed_dim=16, depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 4),
      **options))
  expected = backbone_hook_count(reference, torch.zeros(1, 3, 160, 96))
  assert backbone_hook_macs(segmenter, (160, 96)) == expected
