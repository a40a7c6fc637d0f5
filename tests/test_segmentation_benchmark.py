"""`python -m focal_jax.benchmark --task segmentation` runs to its end on a tiny configuration
(tiny backbones and heads, 64 px, one round) and reports what it measured. About 4 minutes
on a quiet 2-core machine (four worker processes; the JAX training step's compilation is
most of it)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from focal_jax import benchmark, segmentation_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_segmentation_command_times_both_frameworks_in_interleaved_rounds(tmp_path):
  args = ["--task", "segmentation", "--model", "focal_tiny", "--tiny", "--img-size", "64",
          "--batch", "2", "--mode", "both", "--rounds", "1", "--repeats", "1", "--warmup", "0",
          "--json", str(tmp_path / "seg.json"), "--output", str(tmp_path / "report.md")]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
  result = subprocess.run([sys.executable, "-m", "focal_jax.benchmark", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  rounds = re.findall(r"^(jax|torch) +(inference|train) +round 1: ([\d.]+) s per step$", out,
                      re.MULTILINE)
  assert [(f, m) for f, m, _ in rounds] == [
      ("jax", "inference"), ("torch", "inference"), ("jax", "train"), ("torch", "train")]

  record = json.loads((tmp_path / "seg.json").read_text())
  assert record["environment"]["transformers"] != "not installed"
  results = {(r["framework"], r["mode"]): r for r in record["results"]}
  assert sorted(results) == sorted((f, m) for f in ("jax", "torch") for m in ("inference", "train"))
  for (framework, mode), r in results.items():
    assert r["error"] is None, r["error"]
    assert (r["img_size"], r["batch"], r["dtype"]) == (64, 2, "float32")
    assert len(r["step_s"]) == 1 and len(r["step_s"][0]) == 1 and r["step_s"][0][0] > 0
    assert r["best_images_per_s"] == pytest.approx(2 / r["step_s"][0][0])
    assert math.isfinite(r["first_call_s"]) and r["first_call_s"] > 0
    assert r["peak_rss_mb"] >= r["base_rss_mb"] > 0
    if framework == "jax":
      assert r["recompiles"] == 0, f"{mode} recompiled after its first call"
  assert results["torch", "train"]["model"] == segmentation_benchmark.TORCH_MODEL

  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 15 and cells[2] in ("inference", "train"):
      rows[cells[0], cells[2]] = cells
  assert sorted(rows) == sorted(results)
  for mode in ("inference", "train"):
    jax_row, torch_row = rows["jax", mode], rows["torch", mode]
    ratio = results["jax", mode]["best_images_per_s"] / results["torch", mode]["best_images_per_s"]
    assert jax_row[8] == f"{ratio:.2f}x"  # focal_jax / PyTorch, best call
    assert torch_row[8] == "-"
    assert jax_row[11].startswith("compile ") and jax_row[13] == "0"
  assert (tmp_path / "report.md").read_text().strip() in out


def test_transformers_config_is_upernet_swin_tiny():
  """The PyTorch side is mmsegmentation's upernet_swin_tiny: Swin-T, heads 512 / 256 on 384."""
  args = benchmark.parse_args(["--task", "segmentation", "--img-size", "512", "--batch", "2"])
  assert args.num_classes == 150
  config = segmentation_benchmark.hf_upernet_config(args)
  swin = config.backbone_config
  assert (swin.embed_dim, list(swin.depths), list(swin.num_heads), swin.window_size) == (
      96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
  assert swin.out_features == ["stage1", "stage2", "stage3", "stage4"]
  assert swin.drop_path_rate == 0.3
  assert (config.num_labels, config.hidden_size, config.auxiliary_in_channels,
          config.auxiliary_channels, config.auxiliary_loss_weight) == (150, 512, 384, 256, 0.4)


def test_segmentation_refuses_a_sweep(capsys):
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--task", "segmentation", "--sweep"])
  assert "--task segmentation measures one --img-size" in capsys.readouterr().err
