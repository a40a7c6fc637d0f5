"""Focal-fast key sets against the official constructor's (tests/data/README.md says where the
vectors come from), and the torch CPU top-k replica against torch itself."""

import json
import pathlib

import jax
import numpy as np
import pytest
import torch

from focal_jax.models.focal_fast import key_sets, torch_topk

DATA = np.load(pathlib.Path(__file__).parent / "data" / "focalv2_key_sets.npz")
CASES = json.loads(str(DATA["cases_json"]))
WINDOW = 7


@pytest.mark.parametrize("grid", [7, 14, 28, 56, 112])
def test_released_geometry_matches_official(grid):
  """Every stage grid of the official model at 224, 448 and 896 (focal_topK 128)."""
  level0 = key_sets.pixel_key_sets(grid, grid, WINDOW, 128)
  level1 = key_sets.window_key_sets(grid // WINDOW, grid // WINDOW, 128)
  np.testing.assert_array_equal(level0, DATA[f"official_grid{grid}_level0"])
  np.testing.assert_array_equal(level1, DATA[f"official_grid{grid}_level1"])
  assert level0.dtype == level1.dtype == np.int64


def test_896_stage1_sampled_windows_match_official():
  """Stage 1 at 896 (224x224 map, heap-selection path): corner, edge and interior windows."""
  windows = DATA["official_grid224_level0_windows"].astype(np.int64)
  n_ww = 224 // WINDOW
  a, b = windows // n_ww, windows % n_ww
  level0, _ = key_sets.nearest_points(WINDOW * a + 3, WINDOW * b + 3, 224, 224, 128)
  np.testing.assert_array_equal(level0, DATA["official_grid224_level0"])
  level1, _ = key_sets.nearest_points(a, b, n_ww, n_ww, 128)
  np.testing.assert_array_equal(level1, DATA["official_grid224_level1"])


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_other_geometries_match_official(case):
  """Non-square grids, other windows and K (official WindowAttention built directly)."""
  (grid_h, grid_w), ws, top_k, key = case["grid"], case["window_size"], case["top_k"], case["key"]
  np.testing.assert_array_equal(key_sets.pixel_key_sets(grid_h, grid_w, ws, top_k),
                                DATA[f"{key}_level0"])
  np.testing.assert_array_equal(key_sets.window_key_sets(grid_h // ws, grid_w // ws, top_k),
                                DATA[f"{key}_level1"])
  np.testing.assert_array_equal(key_sets.window_offsets(ws), DATA[f"{key}_window_coords"])
  for level in (0, 1):
    if f"{key}_coords{level}" in DATA:
      coords = key_sets.key_coords(level, grid_h, grid_w, ws, top_k)
      assert coords.dtype == np.float32
      np.testing.assert_array_equal(coords, DATA[f"{key}_coords{level}"])


def test_checked_geometries_cover_both_selection_paths():
  paths = set()
  for grid in (7, 14, 28, 56, 112, 224):
    paths.add(torch_topk.selection_path(grid * grid, min(128, grid * grid)))
    paths.add(torch_topk.selection_path((grid // 7) ** 2, min(128, (grid // 7) ** 2)))
  for case in CASES:
    (h, w), k = case["grid"], case["top_k"]
    paths.add(torch_topk.selection_path(h * w, min(k, h * w)))
  assert paths == {"partial_sort", "nth_element"}
  # Level 1 is sparse (fewer keys than windows) at 448 stage 1.
  assert DATA["official_grid112_level1"].shape == (256, 128)


def _torch_topk(scores, k):
  return torch.topk(torch.from_numpy(scores), k, largest=True, sorted=True).indices.numpy()


def test_topk_indices_matches_torch_on_ties():
  rng = np.random.default_rng(0)
  paths = set()
  for _ in range(300):
    n = int(rng.integers(1, 2000))
    k = int(rng.integers(1, min(n, 160) + 1))
    scores = rng.integers(0, int(rng.integers(1, 40)), n).astype(np.float32)
    np.testing.assert_array_equal(torch_topk.topk_indices(scores, k), _torch_topk(scores, k))
    paths.add(torch_topk.selection_path(n, k))
  assert paths == {"partial_sort", "nth_element"}


def test_topk_indices_matches_torch_past_the_depth_limit(monkeypatch):
  """Inputs that drive introselect / introsort into their heap-select fallbacks."""
  calls = []
  heap_select = torch_topk._heap_select
  monkeypatch.setattr(torch_topk, "_heap_select",
                      lambda *args: calls.append(args[2:]) or heap_select(*args))
  for n in (64, 255, 1024):
    half = n // 2
    killer = np.zeros(n)  # Musser's median-of-3 killer sequence
    for i in range(1, half + 1):
      if i % 2:
        killer[i - 1], killer[i] = i, half + i
      killer[half + i - 1] = 2 * i
    for scores in (killer, -killer, np.arange(n) % 5, np.minimum(np.arange(n), n - 1 - np.arange(n))):
      scores = scores.astype(np.float32)
      for k in (1, 3, n // 3, n):
        np.testing.assert_array_equal(torch_topk.topk_indices(scores, k), _torch_topk(scores, k))
  assert calls, "no input reached a depth-limit fallback"


def test_lowest_index_first_gives_other_sets():
  """Breaking ties by index (a stable argsort, jax.lax.top_k) is not what the official sets
  hold: the replica is needed."""
  official = DATA["official_grid56_level0"]
  rows, cols = np.divmod(np.arange(56 * 56), 56)
  centres = np.arange(8) * 7 + 3
  scores = np.stack([-np.sqrt(np.float32(r - rows) ** 2 + np.float32(c - cols) ** 2)
                     for r in centres for c in centres]).astype(np.float32)  # [64, 3136]
  stable = np.argsort(-scores, axis=1, kind="stable")[:, :128]
  lax_top_k = np.asarray(jax.lax.top_k(scores, 128)[1])
  np.testing.assert_array_equal(stable, lax_top_k)
  differ = [set(s) != set(o) for s, o in zip(stable, official)]
  assert sum(differ) == 58  # of 64 windows at 224, stage 1
  assert not np.array_equal(np.sort(stable, 1), np.sort(official, 1))
  replica = np.stack([torch_topk.topk_indices(s, 128) for s in scores])
  np.testing.assert_array_equal(replica, official)


@pytest.mark.parametrize("grid_h, grid_w, top_k", [(14, 28, 128), (21, 7, 30), (28, 14, 64)])
def test_non_square_sets_are_the_nearest_keys(grid_h, grid_w, top_k):
  """On any grid of whole windows each set holds the K nearest pixels (all of its own
  window's when K >= 49), in order of distance, with coordinates query minus key."""
  sets = key_sets.pixel_key_sets(grid_h, grid_w, WINDOW, top_k)
  n_wh, n_ww = grid_h // WINDOW, grid_w // WINDOW
  assert sets.shape == (n_wh * n_ww, min(top_k, grid_h * grid_w))
  rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)
  coords = key_sets.key_coords(0, grid_h, grid_w, WINDOW, top_k)
  offsets = key_sets.window_offsets(WINDOW).reshape(-1, 2)
  for w, keys in enumerate(sets):
    a, b = divmod(w, n_ww)
    centre = np.array([7 * a + 3, 7 * b + 3])
    dist2 = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2
    np.testing.assert_array_equal(dist2[keys], np.sort(dist2)[:sets.shape[1]])
    assert len(set(keys.tolist())) == len(keys)
    if top_k >= 49:
      own = {(7 * a + i) * grid_w + 7 * b + j for i in range(7) for j in range(7)}
      assert own <= set(keys.tolist())
    expected = centre + offsets[:, None, :] - np.stack([rows[keys], cols[keys]], -1)[None]
    np.testing.assert_array_equal(coords[w], expected)
  level1 = key_sets.key_coords(1, grid_h, grid_w, WINDOW, top_k)
  win = key_sets.window_key_sets(n_wh, n_ww, top_k)
  assert level1.shape == (n_wh * n_ww, 49, min(top_k, n_wh * n_ww), 2)
  q = np.stack(np.divmod(np.arange(n_wh * n_ww), n_ww), -1)  # [nW, 2]
  k = np.stack(np.divmod(win, n_ww), -1)  # [nW, K1, 2]
  np.testing.assert_array_equal(level1, 7 * (q[:, None, None] - k[:, None]) + offsets[None, :, None])


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="multiple of window_size 7.*Pad the map to 35x35"):
    key_sets.pixel_key_sets(32, 32, 7, 128)
  with pytest.raises(ValueError, match="NaN"):
    torch_topk.topk_indices(np.array([0.0, np.nan], np.float32), 1)
  with pytest.raises(ValueError, match="levels 0 and 1"):
    key_sets.key_coords(2, 56, 56, 7, 128)
  assert not key_sets.pixel_key_sets(56, 56, 7, 128).flags.writeable
