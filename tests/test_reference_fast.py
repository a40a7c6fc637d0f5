"""The PyTorch Focal-fast reference: official layout, sizes, FLOPs, key-set buffers, numerics
of its attention against a direct per-window computation, and its refusals."""

import pathlib

import numpy as np
import pytest
import torch

from focal_jax.convert.reference import fast
from focal_jax.models import make_config
from focal_jax.models.focal_fast import key_sets

# The released Focal-fast configurations (SPEC section 9).
RELEASED = dict(use_conv_embed=True, focal_pool="fc", focal_levels=[2, 2, 2, 2], focal_topK=128)
VARIANTS = {
    "focalv2_tiny": dict(RELEASED, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                         drop_path_rate=0.2),
    "focalv2_small": dict(RELEASED, embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],
                          drop_path_rate=0.3),
    "focalv2_base": dict(RELEASED, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                         drop_path_rate=0.5),
}
# name: (trainable parameters, official flops(), state_dict entries, of which buffers)
OFFICIAL = {
    "focalv2_tiny": (30_220_564, 5_320_637_440, 344, 60),
    "focalv2_small": (51_526_540, 9_879_774_208, 668, 120),
    "focalv2_base": (91_186_824, 17_033_354_496, 668, 120),
}
SMALL = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], focal_levels=[2, 2, 2, 2],
             num_classes=7, use_conv_embed=True, focal_topK=128)
DATA = np.load(pathlib.Path(__file__).parent / "data" / "focalv2_key_sets.npz")


@pytest.mark.parametrize("name", VARIANTS)
def test_released_variants_sizes_flops_and_layout(name):
  with torch.device("meta"):  # shapes only
    model = fast.FocalTransformer(img_size=224, **VARIANTS[name])
  params, flops, entries, buffers = OFFICIAL[name]
  assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
  assert model.flops() == flops
  state = model.state_dict()
  assert len(state) == entries and sum(1 for _ in model.buffers()) == buffers
  attn = "layers.0.blocks.0.attn."
  shapes = {key: (tuple(state[attn + key].shape), state[attn + key].dtype) for key in (
      "window_coords", "topk_cloest_indice_0", "topk_cloest_coords_0", "topk_cloest_indice_1",
      "topk_cloest_coords_1", "coord2rpb_all.0.0.weight", "coord2rpb_all.1.2.weight")}
  assert shapes == {
      "window_coords": ((7, 7, 2), torch.int64),
      "topk_cloest_indice_0": ((64, 128), torch.int64),
      "topk_cloest_coords_0": ((64, 49, 128, 2), torch.float32),
      "topk_cloest_indice_1": ((64, 64), torch.int64),
      "topk_cloest_coords_1": ((64, 49, 64, 2), torch.float32),
      "coord2rpb_all.0.0.weight": ((32, 2), torch.float32),
      "coord2rpb_all.1.2.weight": ((3 if name != "focalv2_base" else 4, 32), torch.float32),
  }
  assert tuple(state["layers.3.blocks.0.attn.topk_cloest_indice_0"].shape) == (1, 49)
  assert tuple(state["layers.3.blocks.0.attn.topk_cloest_indice_1"].shape) == (1, 1)
  assert "layers.0.blocks.0.pool_layers.0.weight" in state
  assert not any("relative_position" in key or "attn_mask" in key for key in state)
  assert model.no_weight_decay_keywords() == set()


def test_buffers_are_the_official_key_sets():
  model = fast.FocalTransformer(img_size=448, **SMALL)
  for stage, grid in enumerate((112, 56, 28, 14)):
    attn = model.layers[stage].blocks[0].attn
    for level in (0, 1):
      np.testing.assert_array_equal(getattr(attn, f"topk_cloest_indice_{level}").numpy(),
                                    DATA[f"official_grid{grid}_level{level}"])
      np.testing.assert_array_equal(getattr(attn, f"topk_cloest_coords_{level}").numpy(),
                                    key_sets.key_coords(level, grid, grid, 7, 128))


def test_shift_mask_buffer_is_built_and_not_applied():
  model = fast.FocalTransformer(img_size=224, use_shift=True, **{**SMALL, "depths": [2, 2, 2, 2]})
  state = model.state_dict()
  masks = sorted(key for key in state if key.endswith("attn_mask"))
  # Odd blocks of the stages larger than one window.
  assert masks == [f"layers.{i}.blocks.1.attn_mask" for i in range(3)]
  assert tuple(state["layers.0.blocks.1.attn_mask"].shape) == (64, 49, 49)
  assert set(state["layers.0.blocks.1.attn_mask"].unique().tolist()) == {-100.0, 0.0}
  block = model.layers[0].blocks[1].double().eval()
  x = torch.randn(1, 56 * 56, 16, dtype=torch.float64)
  with torch.no_grad():
    with_mask = block(x)
    block.attn_mask.zero_()
    np.testing.assert_array_equal(block(x).numpy(), with_mask.numpy())


def _direct_attention(attn, x, pooled):
  """Focal-fast attention evaluated window by window from its definition."""
  b, h, w, c = x.shape
  heads, hd, ws = attn.num_heads, c // attn.num_heads, attn.window_size[0]
  qkv, pooled_qkv = attn.qkv(x), attn.qkv(pooled)  # [B, H, W, 3C], [B, nWh, nWw, 3C]
  q = qkv[..., :c]
  k, v = qkv[..., c:2 * c].reshape(b, h * w, c), qkv[..., 2 * c:].reshape(b, h * w, c)
  pk, pv = pooled_qkv[..., c:2 * c].reshape(b, -1, c), pooled_qkv[..., 2 * c:].reshape(b, -1, c)
  n_ww = w // ws
  i, j = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
  i, j = i.reshape(-1, 1), j.reshape(-1, 1)  # the window's queries, [N, 1]
  out = []
  for window in range(h // ws * n_ww):
    a, bb = divmod(window, n_ww)
    keys0, keys1 = attn.topk_cloest_indice_0[window], attn.topk_cloest_indice_1[window]
    rows, cols = ws * a + i, ws * bb + j  # query pixels
    coords0 = torch.stack([rows - keys0 // w, cols - keys0 % w], -1)  # [N, K0, 2]
    coords1 = torch.stack([ws * (a - keys1 // n_ww) + i - ws // 2,
                           ws * (bb - keys1 % n_ww) + j - ws // 2], -1)  # [N, K1, 2]
    bias = torch.cat([attn.coord2rpb_all[0](coords0.to(x.dtype)),
                      attn.coord2rpb_all[1](coords1.to(x.dtype))], 1)  # [N, K, nH]
    keys = torch.cat([k[:, keys0], pk[:, keys1]], 1).view(b, -1, heads, hd)
    values = torch.cat([v[:, keys0], pv[:, keys1]], 1).view(b, -1, heads, hd)
    query = q[:, rows[:, 0], cols[:, 0]].view(b, -1, heads, hd) * attn.scale  # [B, N, nH, hd]
    logits = torch.einsum("bnhd,bkhd->bhnk", query, keys) + bias.permute(2, 0, 1)
    out.append(torch.einsum("bhnk,bkhd->bnhd", logits.softmax(-1), values).reshape(b, -1, c))
  return attn.proj(torch.stack(out, 1).view(-1, ws * ws, c))


def test_attention_matches_its_definition():
  torch.manual_seed(0)
  model = fast.FocalTransformer(img_size=224, **{**SMALL, "focal_topK": 60}).double()
  attn = model.layers[1].blocks[0].attn  # 28x28 map, 16 windows, K0 60, K1 16
  with torch.no_grad():
    for p in attn.parameters():
      p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 28, 28, 32, dtype=torch.float64)
    pooled = torch.randn(2, 4, 4, 32, dtype=torch.float64)
    np.testing.assert_allclose(attn(x, [pooled]).numpy(), _direct_attention(attn, x, pooled).numpy(),
                               rtol=0, atol=1e-12)


def test_accepts_the_v1_official_kwargs_and_round_trips_strictly():
  kwargs = make_config(None, **{k: v for k, v in SMALL.items() if k != "focal_topK"}).official_kwargs()
  model = fast.FocalTransformer(**kwargs, focal_topK=50).double().eval()
  assert model.layers[0].blocks[0].attn.topk_cloest_indice_0.shape == (64, 50)
  fresh = fast.FocalTransformer(**kwargs, focal_topK=50).double().eval()
  fresh.load_state_dict(model.state_dict(), strict=True)
  x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
  with torch.no_grad():
    np.testing.assert_array_equal(fresh(x).numpy(), model(x).numpy())
  assert [t.shape for t in model.forward_stages(x)] == [
      (2, 56, 56, 16), (2, 28, 28, 32), (2, 14, 14, 64), (2, 7, 7, 128)]


@pytest.mark.parametrize("options, message", [
    (dict(focal_levels=[3, 3, 3, 3]), "focal_levels 1 or 2, got 3"),
    (dict(focal_pool="none"), "focal_pool is 'none'"),
    (dict(focal_stages=[0, 1, 2]), "not in focal_stages"),
    (dict(img_size=256), "64x64 is not a multiple of window_size 7"),
])
def test_official_failures_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    fast.FocalTransformer(**{"img_size": 224, **SMALL, **options})


def test_benchmark_builds_the_reference_of_the_family():
  from types import SimpleNamespace  # noqa: PLC0415

  from focal_jax import benchmark  # noqa: PLC0415
  from focal_jax.convert.reference import focal  # noqa: PLC0415

  focal_config = make_config(None, **{k: v for k, v in SMALL.items() if k != "focal_topK"})
  model = benchmark.torch_reference(focal_config)
  assert type(model) is focal.FocalTransformer
  fast_config = SimpleNamespace(version=2, official_kwargs=lambda: {**focal_config.official_kwargs(),
                                                                    "focal_topK": 50})
  model = benchmark.torch_reference(fast_config)
  assert type(model) is fast.FocalTransformer
  assert model.layers[0].blocks[0].attn.topk_cloest_indice_0.shape == (64, 50)
