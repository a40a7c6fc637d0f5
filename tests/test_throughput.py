"""`python -m focal_jax.benchmark --mode input` on a handful of small JPEGs, to its end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tensorflow as tf

from focal_jax import benchmark
from focal_jax.data import throughput


def test_input_mode_measures_the_pipeline_on_the_given_jpegs(tmp_path, capsys):
  rng = np.random.default_rng(0)
  for index in range(8):
    shape = (48, 64) if index % 2 else (64, 48)
    image = throughput.photo_like(rng, *shape)
    (tmp_path / f"photo_{index}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
  (tmp_path / "notes.txt").write_text("not an image")  # ignored: not a JPEG name

  results = benchmark.main(["--mode", "input", "--data", str(tmp_path), "--images", "8",
                            "--input-batch", "4", "--input-batches", "1", "--input-rounds", "2",
                            "--input-warmup", "1", "--input-size", "32", "--cores", "1"])
  out = capsys.readouterr().out

  assert "JPEGs: 8 (48x64: 4, 64x48: 4), mean " in out  # width x height, from the headers
  assert f"from {tmp_path}; cores 1, batch 4" in out
  names = [r.loader for r in results]
  assert names[0] == "focal_jax"
  assert names == (["focal_jax", "timm"] if throughput.timm_available() else ["focal_jax"])
  for result in results:
    assert result.error is None, result.error
    assert result.cores == 1 and result.batch == 4 and len(result.rounds) == 2
    assert result.images_per_s > 0 and result.images_per_s_per_core == result.images_per_s
    assert result.images_per_cpu_s is None or result.images_per_cpu_s > 0
    line = re.search(rf"^{result.loader}: ([\d.]+) img/s on 1 cores = ([\d.]+) img/s per core",
                     out, re.MULTILINE)
    assert line is not None and float(line.group(2)) == pytest.approx(result.images_per_s, abs=0.1)
  printed = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
             if line.startswith("INPUT_RESULT ")]
  assert [p["loader"] for p in printed] == names
  assert set(printed[0]) >= {"images_per_s", "images_per_s_per_core", "images_per_cpu_s",
                             "rounds", "first_batch_s", "cores", "batch"}
  if len(results) == 2:
    assert "focal_jax / timm: " in out
  else:
    assert "timm: torch or timm not installed" in out


def test_cores_needed_is_images_per_second_over_images_per_core():
  # 8 GPUs x 128 images per 0.4 s step = 2560 img/s; at 200 img/s per core: 12.8 -> 13.
  assert throughput.cores_needed(8, 128, 0.4, 200.0) == 13
  assert throughput.cores_needed(4, 256, 1.0, 256.0) == 4


def test_generated_jpegs_have_imagenet_shapes_and_sizes():
  blobs = throughput.make_jpegs(2)
  assert throughput.jpeg_sizes(blobs) == {"500x375": 1, "375x500": 1}
  assert all(60_000 < len(blob) < 160_000 for blob in blobs)  # ImageNet's ~110 kB a file


def test_other_arguments_stay_refused_outside_input_mode():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--mode", "inference", "--data", "somewhere"])
