"""Smoke test of `python -m focal_jax.benchmark` at tiny sizes: it runs and reports numbers."""

import math
import os
import re
import subprocess
import sys

import pytest

from focal_jax import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_measures_both_frameworks_and_writes_a_report(tmp_path):
  output = tmp_path / "BENCHMARKS.md"
  results = benchmark.main(["--tiny", "--img-size", "64", "--batch", "2", "--repeats", "2",
                            "--warmup", "1", "--num-classes", "10", "--output", str(output)])
  assert [(r.framework, r.mode) for r in results] == [
      ("jax", "inference"), ("torch", "inference"), ("jax", "train"), ("torch", "train")]
  for result in results:
    assert result.error is None, result.error
    assert math.isfinite(result.images_per_s) and result.images_per_s > 0
    assert len(result.step_s) == 2 and all(t > 0 for t in result.step_s)
    assert result.peak_rss_mb >= result.base_rss_mb > 0
    assert result.first_call_s > 0
    assert result.page_faults is not None and result.page_faults >= 0
    assert result.kernel_cpu_s is not None and result.kernel_cpu_s >= 0
  jax_train = results[2]
  assert jax_train.recompiles == 0, "the training step recompiled after its first call"
  assert jax_train.xla_temp_mb is not None and jax_train.xla_temp_mb > 0
  text = output.read_text()
  assert "| jax | train | 64 | 2 | float32 |" in text
  ratio = results[2].images_per_s / results[3].images_per_s
  assert f"{ratio:.2f}x" in text  # the JAX / PyTorch column
  assert "allocator settings: " in text


def test_timed_calls_count_the_pages_a_call_touches_first():
  import mmap

  import numpy as np

  def touch_fresh_memory():  # maps 16 MiB and writes one byte per 4 KiB page
    with mmap.mmap(-1, 16 * 2**20) as memory:
      np.frombuffer(memory, np.uint8)[::4096] = 1

  timing = benchmark._timed_calls(touch_fresh_memory, 0, 2)
  assert len(timing.times) == 2
  assert timing.page_faults >= 16 * 2**20 / 4096 * 0.9


def test_growth_lines_compare_per_image_cost_with_the_smallest_size():
  def result(size, images_per_s):
    return benchmark.Result("jax", "inference", "focal_tiny", size, 8, "float32", images_per_s,
                            [1.0], 1.0, 100.0, 50.0)
  lines = benchmark.growth_lines([result(448, 2.0), result(224, 8.0), result(896, 0.4)])
  assert lines == ["- jax cost per image relative to 224: 448: 4.00x, 896: 20.00x"]


def test_bad_arguments_are_refused(capsys):
  for argv, message in ((["--batch", "0"], "--batch and --repeats must be >= 1"),
                        (["--sweep", "--sizes", "224,x"], "'224,x' is not a comma-separated list"),
                        (["--sweep", "--sizes", "224,100"], ("--sizes 100: Image size 100x100 is "
                         "not supported: height and width must be positive multiples of 32")),
                        (["--img-size", "100"], "--img-size 100: Image size 100x100"),
                        (["--model", "focal_huge"], "--model focal_huge: Unknown model variant")):
    with pytest.raises(SystemExit):
      benchmark.parse_args(argv)
    assert message in capsys.readouterr().err, argv
  args = benchmark.parse_args(["--sweep", "--mode", "inference", "--img-size", "100"])
  assert args.sizes == (224, 448, 896)  # --img-size is not measured by an inference sweep
  assert benchmark.parse_args(["--sweep", "--sizes", "32,64"]).sizes == (32, 64)


def test_sweep_command_reports_every_size_and_the_growth(tmp_path):
  """`python -m focal_jax.benchmark --sweep --mode inference` (the README's command) on the
  tiny variant at two small sizes: a progress line per measurement, the table with the
  JAX / PyTorch ratio at each size, and per-image cost relative to the smallest size."""
  sizes = (32, 64)
  args = ["--sweep", "--mode", "inference", "--sizes", ",".join(map(str, sizes)), "--tiny",
          "--batch", "1", "--repeats", "1", "--warmup", "0", "--num-classes", "10",
          "--output", str(tmp_path / "report.md")]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
  result = subprocess.run([sys.executable, "-m", "focal_jax.benchmark", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  progress = re.findall(r"^(jax|torch) +inference +(\d+)px batch 1: ([\d.]+) img/s", out,
                        re.MULTILINE)
  assert [(f, int(s)) for f, s, _ in progress] == [(f, s) for s in sizes for f in ("jax", "torch")]
  assert f"### `python -m focal_jax.benchmark {' '.join(args)}`" in out
  assert "model focal_tiny (tiny overrides), warmup 0, repeats 1 (medians)" in out

  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 16 and cells[1] == "inference":
      rows[cells[0], int(cells[2])] = cells
  assert sorted(rows) == sorted((f, s) for f in ("jax", "torch") for s in sizes)
  speed = {key: float(cells[5]) for key, cells in rows.items()}
  assert all(v > 0 for v in speed.values()), speed
  for size in sizes:
    jax_row, torch_row = rows["jax", size], rows["torch", size]
    assert jax_row[6].endswith("x") and float(jax_row[6][:-1]) == pytest.approx(
        speed["jax", size] / speed["torch", size], rel=0.02)  # JAX/PyTorch, from rounded img/s
    assert torch_row[6] == "-"
    assert jax_row[7].startswith("compile ") and jax_row[12] == "0"  # no recompilation
    assert float(jax_row[8]) > 0 and float(torch_row[8]) > 0  # peak RSS

  growth = re.findall(r"^- (jax|torch) cost per image relative to (\d+): (\d+): ([\d.]+)x$", out,
                      re.MULTILINE)
  assert [(f, int(base), int(size)) for f, base, size, _ in growth] == [
      ("jax", 32, 64), ("torch", 32, 64)]
  for framework, _, _, figure in growth:
    # Printed with two decimals, from img/s rounded in the table: 2 % or 0.01, whichever is more.
    assert float(figure) == pytest.approx(speed[framework, 32] / speed[framework, 64], rel=0.02,
                                          abs=0.01)
  assert (tmp_path / "report.md").read_text().strip() in out
