"""Smoke test of `python -m focal_jax.benchmark` at tiny sizes: it runs and reports numbers."""

import math

import pytest

from focal_jax import benchmark


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


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--batch", "0"])
