"""The notebooks, executed top to bottom on the CPU with small parameters, and focal_jax.viz.

Each notebook runs in a fresh Jupyter kernel (nbclient) with FOCAL_JAX_OFFLINE=1, so its
install cell installs nothing; small parameters go into a cell inserted after the one tagged
"parameters", as papermill does. The kernels see one CPU device (8 simulated ones only slow
the run down; the sharded loop has its own tests). A persistent compilation cache shared by
the kernels lets a program compiled by one notebook (the same small model) load in the
next. Notebooks 01 and 02 run side by side (a compilation keeps one core busy). Each test
prints how long its notebook took.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax import viz  # noqa: E402
from focal_jax.models.focal import index_tables  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

# One small architecture for every notebook (at 32x32), so the kernels share compiled programs.
TEST_ARCH = dict(patch_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                 window_size=4, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 1),
                 expand_sizes=(2, 2, 2, 2))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment of the notebook kernels (and a compilation cache for this process too)."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  previous = {key: getattr(jax.config, key) for key in settings}
  for key, value in settings.items():
    jax.config.update(key, value)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("FOCAL_JAX_OFFLINE", "1")
    for key, value in settings.items():
      patch.setenv(key.upper(), str(value))
    patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    patch.delenv("XLA_FLAGS", raising=False)  # conftest's 8 devices stay in this process only
    yield cache
  for key, value in previous.items():
    jax.config.update(key, value)


def run_notebook(name: str, parameters: dict, timeout: int = 400
                 ) -> tuple[nbformat.NotebookNode, float]:
  """Executes notebooks/`name` with `parameters` injected; returns (executed notebook, seconds)."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters', found {len(tagged)}"
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, injected)
  client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": NOTEBOOKS}})
  start = time.time()
  client.execute()  # raises CellExecutionError on the first failing cell
  seconds = time.time() - start
  print(f"\n{name}: {seconds:.1f} s on the CPU ({os.cpu_count()} cores)")
  return nb, seconds


def text_output(nb: nbformat.NotebookNode) -> str:
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream":
        parts.append(output.text)
      elif "text/plain" in output.get("data", {}):
        parts.append(output.data["text/plain"])
  return "\n".join(parts)


def count_images(nb: nbformat.NotebookNode) -> int:
  return sum("image/png" in output.get("data", {}) for cell in nb.cells
             for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_train_tpu.ipynb", "03_convert.ipynb"])
def test_notebooks_are_committed_clean(name):
  """No outputs or execution counts in the repository, a first cell that installs, and a
  parameters cell; internet cells are switched off by the environment, not by editing."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert "pip" in code[0].source and 'os.environ.get("FOCAL_JAX_OFFLINE") == "1"' in code[0].source
  assert "parameters" in code[1].metadata.get("tags", [])


@pytest.fixture(scope="module")
def runs(kernel_env, tmp_path_factory):
  """Notebooks 01 and 02 executing side by side (XLA compiles on one core each); every
  test waits for the one it checks. Notebook 02 trains on the digits in `workdir`."""
  workdir = str(tmp_path_factory.mktemp("train") / "run")
  train = dict(TRAIN_STEPS=4, RESUME_STEPS=0, BATCH_SIZE=16, EVAL_EVERY=4, WORKDIR=workdir,
               DATA_DIR=str(tmp_path_factory.mktemp("tfds")), JAX_CACHE_DIR=kernel_env,
               MODEL_OVERRIDES=dict(TEST_ARCH, drop_path_rate=0.1))
  quickstart = dict(OVERRIDES=TEST_ARCH, IMG_SIZE=32, QUERY=(10, 20),
                    SEG_OVERRIDES=dict(TEST_ARCH, patch_size=4, decode_channels=16,
                                       auxiliary_channels=8))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  futures = {"train": pool.submit(run_notebook, "02_train_tpu.ipynb", train),
             "quickstart": pool.submit(run_notebook, "01_quickstart.ipynb", quickstart)}
  yield futures, workdir
  pool.shutdown(wait=True)


def test_quickstart_notebook(runs):
  nb, _ = runs[0]["quickstart"].result()
  text = text_output(nb)
  assert "keys/query" in text and "FOCAL_JAX_OFFLINE=1" in text
  assert "logits (1, 1000)" in text
  assert "segmenter logits (4, 16, 16, 11)" in text and "class maps (4, 64, 64)" in text
  # photo, 2 attention pictures, weighted one, receptive fields, segmentation scenes
  assert count_images(nb) >= 6


@pytest.fixture(scope="module")
def trained(runs):
  """Notebook 02 on the digits: (executed notebook, its workdir)."""
  futures, workdir = runs
  nb, _ = futures["train"].result()
  return nb, workdir


def test_train_notebook(trained):
  nb, workdir = trained
  text = text_output(nb)
  assert "1 x cpu (cpu)" in text and "{'data': 1, 'fsdp': 1}" in text  # mesh from jax.devices()
  assert "identical to the saved one: True" in text
  records = viz.read_metrics(workdir)
  assert {r["step"] for r in records if "eval/top1" in r} == {4}  # training's and eval mode's
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  assert count_images(nb) >= 2  # curves, predictions


def test_convert_notebook(trained, tmp_path):
  """Notebook 03 converts notebook 02's export to PyTorch and an official-format file back."""
  _, workdir = trained
  parameters = dict(MODEL="focal_tiny", OVERRIDES=TEST_ARCH, IMG_SIZE=32, NUM_CLASSES=10,
                    EXPORT=os.path.join(workdir, "export"), OUT_DIR=str(tmp_path))
  nb, _ = run_notebook("03_convert.ipynb", parameters)
  text = text_output(nb)
  assert "<All keys matched successfully>" in text
  assert text.count("max |logit difference|") == 2
  assert os.path.isfile(tmp_path / "from_jax.pth") and os.path.isfile(tmp_path / "official.pth")


def test_convert_notebook_on_a_focal_fast_model(tmp_path):
  """The notebook's model choice covers Focal-fast: both directions against reference.fast."""
  # The conv stem has stride 4 whatever patch_size says (as officially): patches of 2 need it off.
  arch = dict(patch_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
              focal_topK=9, use_conv_embed=False)
  parameters = dict(MODEL="focalv2_tiny", OVERRIDES=arch, IMG_SIZE=112, NUM_CLASSES=10,
                    OUT_DIR=str(tmp_path))
  nb, _ = run_notebook("03_convert.ipynb", parameters)
  text = text_output(nb)
  assert "<All keys matched successfully>" in text
  assert text.count("max |logit difference|") == 2
  assert os.path.isfile(tmp_path / "official.pth")


# ---------------------------------------------------------------------------------- viz
# Window 5 at 48x48 (grids 24/12/6/3): stage 1 pads 24 to 25, its level-1 pooled map is
# fitted centrally (10 sub-windows of 2 cover 20 of 25 rows), stage 4 falls back to one
# 3x3 window; three focal levels; the second block of stage 2 is cyclically shifted.
VIZ_ARCH = dict(patch_size=2, embed_dim=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
                window_size=5, focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 1),
                expand_sizes=(2, 2, 2, 2), use_shift=True)


@pytest.fixture(scope="module")
def viz_model(kernel_env):
  model = focal_jax.create_model(None, num_classes=10, img_size=48, seed=0, **VIZ_ARCH)
  # Relative-position tables and attention projections far from their small initial values:
  # a key in the wrong place (or order) then changes the block's output visibly.
  rng = np.random.default_rng(0)
  for path, param in nnx.iter_graph(model):
    if not isinstance(param, nnx.Param):
      continue
    names = [str(p) for p in path]
    shape = param[...].shape
    if any("relative_position_bias_table" in name for name in names):
      param[...] = jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32)
    elif "proj" in names and "attn" in names and names[-1] == "kernel":
      param[...] = jnp.asarray(rng.normal(0.0, shape[0] ** -0.5, shape), jnp.float32)
  model.eval()
  return model


def block_output_at_query(model, images, keys) -> np.ndarray:
  """The block's output at the query token, rebuilt from `query_attention`'s probabilities."""
  parts = viz.query_attention(model, images, keys)
  block = model.layers[keys.stage].blocks[keys.block]
  heads = block.attn.num_heads
  values = parts["values"].reshape(len(parts["values"]), heads, -1)  # [keys, nH, hd]
  attended = np.einsum("hk,khd->hd", parts["probabilities"], values).reshape(1, -1)
  x = parts["block_input"] + np.asarray(block.attn.proj(jnp.asarray(attended, jnp.float32)))[0]
  return x + np.asarray(block.mlp(block.norm2(jnp.asarray(x[None], jnp.float32))))[0]


def block_output(model, images, keys) -> np.ndarray:
  x = viz._stage_input(model, jnp.asarray(images), keys.stage, keys.block)
  return np.asarray(model.layers[keys.stage].blocks[keys.block](x))[0, keys.query[0], keys.query[1]]


CASES = {  # name: (stage, block, query pixel) at 48x48
    "corner_wraps": (0, 0, (1, 46)),
    "padded_grid": (0, 0, (47, 3)),
    "shifted_block": (1, 1, (2, 45)),
    "small_stage": (2, 0, (20, 40)),
    "single_window": (3, 0, (40, 10)),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_probabilities_rebuild_the_block_output(viz_model, case):
  """Keys in the official order with their probabilities and values reproduce the real block
  at the query token: ring wrap-around, padding, central fit, shift and masks included."""
  stage, block, query = CASES[case]
  images = np.random.default_rng(1).standard_normal((1, 48, 48, 3)).astype(np.float32)
  keys = viz.focal_keys(viz_model, stage, block, query)
  probs = viz.attention_probabilities(viz_model, images, keys)
  assert probs.shape == (viz_model.layers[stage].blocks[block].attn.num_heads, keys.num_keys)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-9)
  expected = block_output(viz_model, images, keys)
  np.testing.assert_allclose(block_output_at_query(viz_model, images, keys), expected, atol=1e-5)

  # The same check notices a key out of place: swap two ring keys on different image tokens
  # (tokens in the padding all hold the same key, so they are left out).
  if keys.expand_size:
    ring = keys.groups[1]
    cells = ring.boxes[:, :2] % np.array(keys.padded_grid)
    inside = np.flatnonzero((cells < np.array(keys.grid)).all(axis=1))
    i = inside[0]
    j = inside[(cells[inside] != cells[i]).any(axis=1)][-1]
    boxes = ring.boxes.copy()
    boxes[[i, j]] = boxes[[j, i]]
    wrong = dataclasses.replace(keys, groups=(
        keys.groups[0], viz.KeyGroup(ring.name, boxes, ring.valid, ring.wrapped), *keys.groups[2:]))
    assert np.abs(block_output_at_query(viz_model, images, wrong) - expected).max() > 1e-4


def test_keys_per_query_match_the_official_counts():
  """Focal-T at 224: 230 / 206 / 190 / 50 keys per query (SPEC), 49 + 132 + pooled."""
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  keys = [viz.focal_keys(model, stage, 0, (100, 100)) for stage in range(4)]
  assert [k.num_keys for k in keys] == [230, 206, 190, 50]
  assert [[g.size for g in k.groups] for k in keys] == [[49, 132, 49], [49, 132, 25], [49, 132, 9],
                                                        [49, 1]]


def test_ring_is_the_expanded_square_around_the_window():
  """Inside the image the 132 ring keys cover the 13x13 square minus the 7x7 window, 12 of
  them twice; at the border the roll brings them from the opposite side."""
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  keys = viz.focal_keys(model, 0, 0, (100, 100))  # token (25, 25), window rows/cols 21..27
  ring = keys.groups[1]
  cells = [tuple(box[:2]) for box in ring.boxes]
  square = {(r, c) for r in range(18, 31) for c in range(18, 31)}
  window = {(r, c) for r in range(21, 28) for c in range(21, 28)}
  assert set(cells) == square - window and len(cells) - len(set(cells)) == 12
  assert not ring.wrapped.any() and (ring.boxes[:, 2:] - ring.boxes[:, :2] == 1).all()

  corner = viz.focal_keys(model, 0, 0, (0, 0)).groups[1]  # window rows/cols 0..6 of 56
  rows = corner.boxes[:, 0]
  assert corner.wrapped.sum() > 0
  assert set(rows[corner.wrapped]) & {53, 54, 55} and set(rows) <= set(range(10)) | {53, 54, 55}
  # The pooled level: 7x7 windows around the window, those above/left of the map masked.
  pooled = viz.focal_keys(model, 0, 0, (0, 0)).groups[2]
  sides = pooled.boxes[pooled.valid, 2:] - pooled.boxes[pooled.valid, :2]
  assert pooled.valid.sum() == 16 and (sides == 7).all()


def test_pooled_sub_windows_follow_the_central_fit():
  """Window 7 at level k=1: 16 sub-windows of 3 tokens cover 48 of the 56 rows of stage 1;
  the map is trimmed centrally (4 rows on top), so sub-window 0 starts at row 4."""
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny", focal_levels=(3, 3, 3, 3)))
  level1 = viz.focal_keys(model, 0, 0, (0, 0)).groups[3]
  starts = sorted({int(r) for r in level1.boxes[level1.valid, 0]})
  assert starts[0] == 4 and np.all(np.diff(starts) == 3)
  assert level1.size == index_tables.pooled_keys_per_window(7, 1) == 64


def test_key_density_spreads_each_key_over_its_region():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  keys = viz.focal_keys(model, 1, 0, (100, 100))
  centre = 12  # the middle one of the 5x5 pooled windows: the query's own window
  weights = np.zeros(keys.num_keys)
  weights[keys.groups[0].size + keys.groups[1].size + centre] = 1.0
  density = viz.key_density(keys, weights)
  box = keys.groups[2].boxes[centre]
  assert keys.groups[2].valid[centre] and tuple(box) == (7, 7, 14, 14)  # token (12, 12)
  np.testing.assert_allclose(density[7:14, 7:14], 1.0 / 49)
  assert np.isclose(density.sum(), 1.0)
  with pytest.raises(ValueError, match="one weight per key"):
    viz.key_density(keys, np.ones(3))


def test_plot_focal_attention_draws_one_panel_per_level():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  keys = viz.focal_keys(model, 0, 0, (3, 220))
  image = np.zeros((224, 224, 3), np.uint8)
  fig = viz.plot_focal_attention(image, keys)
  assert len(fig.axes) == len(keys.groups) + 1 == 4
  assert "wrapped" in fig.axes[1].get_title() and "masked" in fig.axes[2].get_title()
  plt.close(fig)
  weights = np.full(keys.num_keys, 1.0 / keys.num_keys)
  fig = viz.plot_focal_attention(image, keys, weights)
  assert "mass" in fig.axes[0].get_title()
  plt.close(fig)
  with pytest.raises(ValueError, match="224x224"):
    viz.plot_focal_attention(np.zeros((64, 64, 3)), keys)
  with pytest.raises(ValueError, match="outside"):
    viz.focal_keys(model, 0, 0, (300, 0))


def test_receptive_fields_of_focal_tiny():
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny"))
  rows = {(r["stage"], r["level"]): (r["pixels"], r["keys"]) for r in viz.receptive_fields(model)}
  assert rows[(1, "window")] == (28, 49) and rows[(1, "ring")] == (52, 132)
  assert rows[(1, "pooled k=0")] == (196, 49)  # 7 windows of 7 tokens of 4 pixels
  assert rows[(3, "pooled k=0")] == (336, 9) and (4, "ring") not in rows
  fig = viz.plot_receptive_fields(model)
  assert len(fig.axes[0].patches) == len(rows)
  plt.close(fig)


def test_plot_training_curves(tmp_path):
  records = [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-3 * s} for s in (1, 2, 3, 4)]
  records += [{"step": 4, "eval/top1": 50.0, "eval/top5": 90.0, "eval/loss": 1.5},
              {"step": 4, "eval/checkpoint": "x"}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  for source in (tmp_path, tmp_path / "metrics.jsonl", records):
    fig = viz.plot_training_curves(source)
    loss, lr, accuracy = fig.axes
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [2.0, 1.0, 2 / 3, 0.5])
    np.testing.assert_allclose(lr.lines[0].get_xdata(), [1, 2, 3, 4])
    assert [line.get_ydata()[0] for line in accuracy.lines] == [50.0, 90.0]
    plt.close(fig)
  with pytest.raises(FileNotFoundError, match="metrics"):
    viz.plot_training_curves(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="train/loss"):
    viz.plot_training_curves([{"step": 1, "eval/checkpoint": "x"}])


def test_make_figures_script_plots_a_given_run(tmp_path):
  """`scripts/make_figures.py --metrics WORKDIR/metrics.jsonl`: the curve of an existing run
  (`--only curve`; the whole script, training included, runs in test_commands.py)."""
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "train/loss": 2.0, "train/lr": 1e-3}) + "\n"
      + json.dumps({"step": 1, "eval/top1": 10.0, "eval/top5": 50.0}) + "\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_figures.py"), "--out",
                  str(tmp_path / "docs"), "--only", "curve", "--metrics",
                  str(tmp_path / "run" / "metrics.jsonl")], check=True, env=env, cwd=ROOT,
                 timeout=300)
  assert os.listdir(tmp_path / "docs") == ["training_curve.png"]
  assert (tmp_path / "docs" / "training_curve.png").stat().st_size > 5_000
