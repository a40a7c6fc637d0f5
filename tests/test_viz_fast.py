"""Focal-fast pictures: the key geometry of `viz.focal_fast_keys`, drawn by `plot_focal_attention`."""

import pathlib
import types

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focal_jax import viz  # noqa: E402

DATA = np.load(pathlib.Path(__file__).parent / "data" / "focalv2_key_sets.npz")


def test_keys_are_the_official_sets_of_the_query_window():
  keys = viz.focal_fast_keys(224, stage=0, query=(120, 80))  # token (30, 20): window (4, 2)
  assert keys.query == (30, 20) and keys.version == 2
  level0, level1 = keys.groups
  window = 4 * 8 + 2
  np.testing.assert_array_equal(level0.boxes[:, 0] * 56 + level0.boxes[:, 1],
                                DATA["official_grid56_level0"][window])
  assert np.all(level0.boxes[:, 2:] - level0.boxes[:, :2] == 1)
  np.testing.assert_array_equal((level1.boxes[:, 0] // 7) * 8 + level1.boxes[:, 1] // 7,
                                DATA["official_grid56_level1"][window])
  assert np.all(level1.boxes[:, 2:] - level1.boxes[:, :2] == 7)
  own = {(r, c) for r in range(28, 35) for c in range(14, 21)}
  assert own <= {(int(r), int(c)) for r, c in level0.boxes[:, :2]}
  assert not level0.wrapped.any() and not level1.wrapped.any()


def test_keys_per_query_by_stage_at_224_and_448():
  per_stage = [viz.focal_fast_keys(224, stage).num_keys for stage in range(4)]
  assert per_stage == [192, 144, 132, 50]
  sparse = viz.focal_fast_keys(448, 0, query=(0, 0))
  assert [g.size for g in sparse.groups] == [128, 128]  # 128 of the 256 windows
  corners = sparse.groups[1].boxes[:, :2] // 7
  distance = np.hypot(*corners.T)
  assert distance.max() < np.hypot(15, 15)  # the nearest windows, not the far corner


def test_shifted_blocks_move_the_sets_with_the_roll():
  plain = viz.focal_fast_keys(224, 0, block=0, query=(4, 4), use_shift=True)
  shifted = viz.focal_fast_keys(224, 0, block=1, query=(4, 4), use_shift=True)
  assert plain.shift_size == 0 and shifted.shift_size == 3
  # Token (1, 1) sits at (54, 54) of the rolled map: the bottom-right window's set, moved by 3.
  np.testing.assert_array_equal(shifted.groups[0].boxes[:, :2] - 3,
                                np.stack(np.divmod(DATA["official_grid56_level0"][63], 56), -1))
  assert shifted.groups[0].wrapped.sum() > 0 and shifted.groups[1].wrapped.sum() > 0
  density = viz.key_density(shifted)  # wrapped keys are drawn across the border, not lost
  assert density.sum() == pytest.approx(shifted.num_keys)


def test_plot_and_model_dispatch():
  keys = viz.focal_fast_keys(448, 0, query=(200, 300))
  image = np.random.default_rng(0).random((448, 448, 3))
  fig = viz.plot_focal_attention(image, keys)
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[0].startswith("level 0: 128 nearest pixels")
  assert titles[1].startswith("level 1: 128 nearest windows")
  assert titles[2].startswith("all levels: 256 keys")
  with pytest.raises(ValueError, match="geometry only"):
    viz.query_attention(None, image, keys)
  config = types.SimpleNamespace(version=2, img_size=(448, 448), focal_topK=128, window_size=7,
                                 patch_size=4, use_shift=False)
  model = types.SimpleNamespace(config=config,
                                layers=[types.SimpleNamespace(blocks=[None, None])] * 4)
  via_model = viz.focal_keys(model, 0, 0, (200, 300))
  for a, b in zip(via_model.groups, keys.groups):
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_receptive_fields_of_a_focal_fast_model():
  config = types.SimpleNamespace(version=2, img_size=(224, 224), focal_topK=128, window_size=7,
                                 patch_size=4, use_shift=False)
  model = types.SimpleNamespace(config=config, layers=[types.SimpleNamespace(blocks=[None])] * 4)
  rows = viz.receptive_fields(model)
  assert [(r["stage"], r["keys"]) for r in rows] == [
      (1, 128), (1, 64), (2, 128), (2, 16), (3, 128), (3, 4), (4, 49), (4, 1)]
  level0 = rows[0]
  assert level0["tokens"] == 13 and level0["pixels"] == 52  # the 128-pixel disc of stage 1
  assert rows[1]["tokens"] == 56  # level 1 covers every window at 224
  fig = viz.plot_receptive_fields(model)
  assert "level 0 (pixels)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
