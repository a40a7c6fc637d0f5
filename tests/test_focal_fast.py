"""Focal-fast (version 2): structure, key layouts, parity with the PyTorch reference of
`focal_transformer_v2.py`, conversion both ways, and the options it refuses.

Parity as for v1 (`test_parity.py`): focal_jax in float32 against the reference in float64
from the same random weights moved far from init, max abs logit error under 2e-5. The
position-bias MLPs get weights large enough (biases of order 1) that a key set chosen with
the wrong tie order, or a bias coordinate off by the window centre, fails that tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import focal_jax
import focal_jax.summary
from focal_jax.models import make_config
from focal_jax.models.focal_fast import key_layout, key_sets

torch = pytest.importorskip("torch", reason="parity tests need PyTorch (see requirements.txt)")

from focal_jax import convert  # noqa: E402
from focal_jax.convert.reference import fast  # noqa: E402
from test_parity import TOLERANCE, images, randomise_, run_pair  # noqa: E402

# name: (parameters, official flops(), state_dict entries, of which buffers) (SPEC section 9)
VARIANTS = {"focalv2_tiny": (30_220_564, 5_320_637_440, 344, 60),
            "focalv2_small": (51_526_540, 9_879_774_208, 668, 120),
            "focalv2_base": (91_186_824, 17_033_354_496, 668, 120)}
# Narrow, shallow, structurally complete at 224 (grids 56/28/14/7 as in the full models).
SMALL = dict(version=2, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
             num_classes=17, focal_levels=(2, 2, 2, 2), focal_topK=128, use_conv_embed=True)
TINY = dict(SMALL, embed_dim=16, num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))


def reference_model(config) -> "torch.nn.Module":
  return fast.FocalTransformer(**config.official_kwargs())


def randomise_fast_(model: "torch.nn.Module", seed: int) -> None:
  """v1's randomisation, plus position-bias MLPs that give biases of order 1."""
  randomise_(model, seed)
  generator = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "coord2rpb" in name:
        std = {"weight": 0.2, "bias": 0.5}[name.rsplit(".", 1)[-1]]
        p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def build_pair(name, seed=0, **overrides):
  """(our float32 model, reference float64 model, config) with the same random weights."""
  config = make_config(name, **overrides)
  ref = reference_model(config)
  randomise_fast_(ref, seed)
  ref = ref.double().eval()
  kwargs = {k: v for k, v in overrides.items() if k != "img_size"}
  ours = convert.from_torch_state_dict(ref.state_dict(), name, img_size=config.img_size, **kwargs)
  ours.eval()
  return ours, ref, config


def parity_error(ours, ref, config) -> float:
  logits, expected = run_pair(ours, ref, images(config))
  scale = np.abs(expected).max()
  assert 1.0 < scale < 50.0, f"logit scale {scale} out of the meaningful range"
  return float(np.abs(logits - expected).max())


# --- structure ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_full_size_counts_flops_keys_and_state_dict(name):
  params, macs, entries, buffers = VARIANTS[name]
  model = nnx.eval_shape(lambda: focal_jax.create_model(name))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == params
  assert focal_jax.models.flops.official_macs(model) == macs
  assert focal_jax.models.flops.keys_per_query(model) == [192, 144, 132, 50]
  layout = convert.names.official_entries(model)
  assert len(layout) == entries
  assert sum(e.buffer is not None for e in layout) == buffers
  assert model.config.focal_topK == 128 and model.config.use_conv_embed


def test_focal_fast_differs_from_v1_only_in_the_attention():
  v1 = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny_conv"))
  fast_model = nnx.eval_shape(lambda: focal_jax.create_model("focalv2_tiny"))
  assert type(v1.layers[0].blocks[0]) is type(fast_model.layers[0].blocks[0])
  without_attention = lambda m: {k: v.shape for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))
                                 if "attn" not in k or "qkv" in k or "proj" in k}
  assert without_attention(v1) == without_attention(fast_model)
  attn = fast_model.layers[0].blocks[0].attn
  assert attn.coord2rpb_all[0].fc1.kernel.shape == (2, 32)
  assert attn.coord2rpb_all[1].fc2.kernel.shape == (32, 3)


@pytest.mark.parametrize("grid,window,top_k", [((56, 56), 7, 128), ((14, 14), 7, 128),
                                               ((7, 7), 7, 128), ((112, 112), 7, 128),
                                               ((28, 56), 7, 128), ((56, 56), 7, 9)])
def test_layouts_hold_exactly_the_official_key_sets(grid, window, top_k):
  """Each window's masked slots are its key set: nothing more, nothing outside the map."""
  n_wh, n_ww = grid[0] // window, grid[1] // window
  expected = [key_sets.pixel_key_sets(*grid, window, top_k),
              key_sets.window_key_sets(n_wh, n_ww, top_k)]
  for grouped in (False, True):
    covered = np.zeros((n_wh, n_ww), int)
    for block in key_layout.window_blocks(grid, window, top_k, 2, grouped):
      covered[slice(*block.rows), slice(*block.cols)] += 1
      for layout, sets, key_grid in zip(block.levels, expected, (grid, (n_wh, n_ww))):
        rows, cols = layout.rows.key_positions(), layout.cols.key_positions()
        for a in range(*block.rows):
          for b in range(*block.cols):
            member = layout.member[a - block.rows[0], b - block.cols[0]]
            slot_rows, slot_cols = np.divmod(np.flatnonzero(member), layout.cols.size)
            r, c = rows[a - block.rows[0]][slot_rows], cols[b - block.cols[0]][slot_cols]
            assert ((r >= 0) & (r < key_grid[0]) & (c >= 0) & (c < key_grid[1])).all()
            assert sorted(r * key_grid[1] + c) == sorted(sets[a * n_ww + b])
    assert (covered == 1).all()  # every window in exactly one block
  blocks = key_layout.window_blocks(grid, window, top_k, 2, True)
  if top_k == 9:  # few keys: both levels are neighbourhoods (3x3 windows inside, 5x5 for all)
    assert not blocks[4].levels[1].rows.dense and blocks[4].levels[1].size == 9
    assert key_layout.window_blocks(grid, window, top_k, 2, False)[0].levels[1].size == 25
  elif grid == (56, 56):  # interior 13x13, edges 11x15, corners 12x12; the pooled level dense
    assert [b.levels[0].size for b in blocks] == [144, 165, 144, 165, 169, 165, 144, 165, 144]
    assert key_layout.window_blocks(grid, window, top_k, 2, False)[0].levels[0].size == 17 * 17
    assert all(b.levels[1].rows.dense and b.levels[1].size == 64 for b in blocks)


def test_summary_command(capsys):
  focal_jax.summary.main(["--model", "focalv2_tiny"])
  out = capsys.readouterr().out
  assert "30,220,564" in out and "5.32 G" in out
  rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
  assert [int(r[7]) for r in rows] == [192, 144, 132, 50]


def test_refused_options_and_sizes():
  with pytest.raises(ValueError, match="focal_levels 1 or 2"):
    make_config("focalv2_tiny", focal_levels=(3, 3, 3, 3))
  with pytest.raises(ValueError, match="no pooled map.*crashes"):
    make_config("focalv2_tiny", focal_pool="none")
  with pytest.raises(ValueError, match="no pooled map"):
    make_config("focalv2_tiny", focal_stages=(0, 1, 2))
  make_config("focalv2_tiny", focal_pool="none", focal_levels=(1, 1, 1, 1))  # no pooled level: fine
  with pytest.raises(ValueError, match="256x256 gives a 64x64 grid.*multiples of 224"):
    make_config("focalv2_tiny", img_size=256)
  model = nnx.eval_shape(lambda: focal_jax.create_model(None, **TINY))
  with pytest.raises(ValueError, match="320x224 gives a 80x56 grid in stage 1"):
    model(jnp.zeros((1, 320, 224, 3)))


# --- parity with the reference -----------------------------------------------------------

def test_focalv2_tiny_reduced_depth_parity_and_sensitivity(monkeypatch):
  ours, ref, config = build_pair("focalv2_tiny", seed=1, depths=(1, 1, 1, 1))
  exact = parity_error(ours, ref, config)
  assert exact < TOLERANCE

  # Lowest-index-first tie breaking (what a stable argsort or lax.top_k gives).
  def lowest_index_first(q_grid, k_grid, factor, top_k):
    centre = lambda n: np.arange(n) * factor + factor // 2
    d_rows = centre(q_grid[0])[:, None, None, None] - np.arange(k_grid[0])[None, None, :, None]
    d_cols = centre(q_grid[1])[None, :, None, None] - np.arange(k_grid[1])[None, None, None, :]
    dist = np.sqrt(np.float32(d_rows**2 + d_cols**2)).reshape(q_grid[0] * q_grid[1], -1)
    return np.argsort(dist, axis=1, kind="stable")[:, :min(top_k, dist.shape[1])]

  monkeypatch.setattr(key_sets, "pixel_key_sets", lambda h, w, ws, k: lowest_index_first(
      (h // ws, w // ws), (h, w), ws, k))
  monkeypatch.setattr(key_sets, "window_key_sets", lambda h, w, k: lowest_index_first(
      (h, w), (h, w), 1, k))
  key_layout._window_blocks.cache_clear()
  official = ref.layers[0].blocks[0].attn.topk_cloest_indice_0.numpy()
  wrong = key_sets.pixel_key_sets(56, 56, 7, 128)
  assert (np.sort(wrong, 1) != np.sort(official, 1)).any(axis=1).sum() > 32  # most windows
  jax.clear_caches()
  assert parity_error(ours, ref, config) > 5 * TOLERANCE
  monkeypatch.undo()
  key_layout._window_blocks.cache_clear()

  # The pooled windows' coordinate taken at their corner instead of their centre.
  original = key_layout.query_minus_key
  monkeypatch.setattr(key_layout, "query_minus_key",
                      lambda axis, window, stride, centre: original(axis, window, stride, 0))
  jax.clear_caches()
  assert parity_error(ours, ref, config) > 5 * TOLERANCE > 5 * exact
  monkeypatch.undo()
  key_layout._window_blocks.cache_clear()


@pytest.mark.parametrize("size", [(224, 448), 448])
def test_sizes(size):
  """448 on the tiny model: a sparse pooled level (128 of 256 windows) in stage 1."""
  ours, ref, config = build_pair(None, seed=2, img_size=size, **(TINY if size == 448 else SMALL))
  assert parity_error(ours, ref, config) < TOLERANCE


OPTIONS = {
    "pool_conv_shift": dict(focal_pool="conv", use_shift=True),
    "pool_mean_layerscale": dict(focal_pool="mean", use_layerscale=True, layerscale_value=0.1),
    "pool_max_pre_norm_levels_2121_topk_200": dict(focal_pool="max", use_pre_norm=True,
                                                   focal_levels=(2, 1, 2, 1), focal_topK=200),
    "no_conv_embed_topk_9": dict(use_conv_embed=False, focal_topK=9),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_options(option):
  ours, ref, config = build_pair(None, seed=3, **{**TINY, **OPTIONS[option]})
  assert parity_error(ours, ref, config) < TOLERANCE


def test_model_runs_any_whole_window_size_without_rebuilding():
  ours, ref, config = build_pair(None, seed=4, **TINY)
  other = make_config(None, **{**TINY, "img_size": (448, 224)})
  ref_other = reference_model(other).double().eval()
  ref_other.load_state_dict({k: v for k, v in ref.state_dict().items()
                             if "topk_cloest" not in k}, strict=False)
  logits, expected = run_pair(ours, ref_other, images(other))
  assert np.abs(logits - expected).max() < TOLERANCE


# --- conversion --------------------------------------------------------------------------

def test_export_loads_strictly_into_the_reference_and_round_trips():
  options = {**TINY, "use_shift": True, "depths": (1, 1, 2, 1)}
  config = make_config(None, **options)
  ref = reference_model(config)
  randomise_fast_(ref, 5)
  state = ref.state_dict()
  ours = convert.from_torch_state_dict({"model": state}, None, **options)
  back = convert.to_torch_state_dict(ours)
  assert list(back) == list(state)
  assert "layers.2.blocks.1.attn_mask" in back and "layers.0.blocks.0.attn.window_coords" in back
  for key, value in state.items():
    assert back[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
  fresh = reference_model(config)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)


def test_checkpoint_with_other_key_sets_is_refused():
  model = focal_jax.create_model(None, **TINY)
  state = convert.to_torch_state_dict(model)
  key = "layers.1.blocks.0.attn.topk_cloest_indice_0"
  state[key] = state[key][:, ::-1].copy()  # the same sets in another order
  state["layers.0.blocks.0.attn.topk_cloest_indice_1"] = np.zeros_like(
      state["layers.0.blocks.0.attn.topk_cloest_indice_1"])
  with pytest.raises(convert.StateDictMismatch) as error:
    convert.from_torch_state_dict(state, None, **TINY)
  message = str(error.value)
  assert "layers.1.blocks.0" in message and "layers.0.blocks.0" in message
  assert "the same keys in another order" in message and "other keys in 64 of 64 windows" in message


def test_remat_gradients_bfloat16_scan_and_features():
  """Train mode with remat gives finite gradients on every parameter; bfloat16 agrees with
  float32 to bfloat16 accuracy; 8 identical blocks run under the scan; stage maps."""
  config = dict(TINY, drop_path_rate=0.0, remat=True)  # no sample dropped: every grad > 0
  model = focal_jax.create_model(None, **config)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 224, 224, 3)), jnp.float32)
  leaves = jax.tree.leaves(nnx.jit(nnx.grad(lambda m, x: m(x).sum()))(model, x))
  assert all(bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0 for g in leaves)
  model.eval()
  half = focal_jax.create_model(None, dtype=jnp.bfloat16, **config)
  nnx.update(half, nnx.state(model, nnx.Param))
  half.eval()
  forward = nnx.jit(lambda m, x: (m(x), m.forward_features(x)))
  (a, _), (b, features) = forward(half, x), forward(model, x)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05 * np.abs(np.asarray(b)).max()
  assert [f.shape[1:3] for f in features] == [(56, 56), (28, 28), (14, 14), (7, 7)]
  scanned = nnx.eval_shape(lambda: focal_jax.create_model(None, **{**TINY, "depths": (1, 1, 8, 1)}))
  assert scanned.layers[2].scanned_runs == ((0, 8),)
  graphdef, state = nnx.split(scanned)
  logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert logits.shape == (1, 17)
