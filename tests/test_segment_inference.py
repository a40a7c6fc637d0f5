"""`focal_jax.segment`: whole and sliding-window inference, scales and flip, against
mmsegmentation's procedure run on the PyTorch reference (float64) with the same weights."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the inference check needs PyTorch (pip install -e '.[convert]')")
import torch.nn.functional as F  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax.segment import crop_boxes, predict_probabilities  # noqa: E402
from test_segmentation_model import reference_and_converted  # noqa: E402


def test_crop_boxes_as_mmsegmentation():
  # An ADE20K validation image at the test scale: 512 x 683, crop 512, stride 341.
  assert crop_boxes(512, 683, (512, 512), (341, 341)) == [(0, 0, 512, 512), (0, 171, 512, 683)]
  # Smaller than a crop: one crop, the image itself.
  assert crop_boxes(300, 400, (512, 512), (341, 341)) == [(0, 0, 300, 400)]
  boxes = crop_boxes(1000, 1000, (512, 512), (341, 341))
  assert len(boxes) == 9 and boxes[-1] == (488, 488, 1000, 1000)


def mmseg_probabilities(model, images, mode, crop, stride, scales, flip):
  """mmsegmentation's EncoderDecoder.aug_test / inference, on NCHW float64 tensors."""
  height, width = images.shape[2:]

  def encode_decode(x):
    return F.interpolate(model(x), size=x.shape[2:], mode="bilinear", align_corners=False)

  def slide(x):
    h, w = x.shape[2:]
    total = torch.zeros((x.shape[0], 5, h, w), dtype=x.dtype)
    count = torch.zeros((1, 1, h, w), dtype=x.dtype)
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
      for c in range(cols):
        y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
        y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
        logits = encode_decode(x[:, :, y1:y2, x1:x2])
        total += F.pad(logits, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return total / count

  result = 0
  passes = 0
  for scale in scales:
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    for flipped in ((False, True) if flip else (False,)):
      x = scaled.flip(3) if flipped else scaled
      logits = encode_decode(x) if mode == "whole" else slide(x)
      logits = logits.flip(3) if flipped else logits
      logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
      result, passes = result + F.softmax(logits, dim=1), passes + 1
  return (result / passes).permute(0, 2, 3, 1).numpy()


def test_slide_inference_with_scales_and_flip_matches_mmsegmentation():
  ref, seg, _ = reference_and_converted("focal_tiny", 5, 64, embed_dim=16, depths=(1, 1, 1, 1),
                                        num_heads=(1, 2, 2, 4))
  images = np.random.default_rng(0).standard_normal((1, 72, 96, 3)).astype(np.float32)
  options = dict(mode="slide", crop=64, stride=40, scales=(1.0, 0.75), flip=True)
  ours = np.asarray(predict_probabilities(seg, jnp.asarray(images), **options))
  with torch.no_grad():
    expected = mmseg_probabilities(ref, torch.from_numpy(images).double().permute(0, 3, 1, 2),
                                   **options)
  assert ours.shape == (1, 72, 96, 5)
  assert np.abs(expected - 0.2).max() > 0.05  # the classes are told apart
  assert np.abs(ours - expected).max() < 1e-4
  maps = focal_jax.segment(seg, jnp.asarray(images), **options)
  assert maps.shape == (1, 72, 96) and maps.dtype == jnp.int32
  confident = np.sort(expected, axis=-1)[..., -1] - np.sort(expected, axis=-1)[..., -2] > 1e-3
  np.testing.assert_array_equal(np.asarray(maps)[confident], expected.argmax(-1)[confident])


def test_segment_refuses_unknown_mode_and_scales():
  seg = object()  # checked before the model is used
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="mode='sliding'"):
    focal_jax.segment(seg, images, mode="sliding")
  with pytest.raises(ValueError, match="scales"):
    focal_jax.segment(seg, images, scales=())
