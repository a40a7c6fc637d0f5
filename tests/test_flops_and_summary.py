"""FLOPs against the official table, the summary table, and errors for bad input."""

import numpy as np
import pytest
from flax import nnx

import focal_jax
from focal_jax import summary
from focal_jax.models import flops, focal_transformer
from conftest import SMALL

OFFICIAL_GFLOPS = {"focal_tiny": 4.92, "focal_tiny_conv": 5.17, "focal_small": 9.43,
                   "focal_small_conv": 9.68, "focal_base": 16.37, "focal_base_conv": 16.80}


@pytest.mark.parametrize("name", list(OFFICIAL_GFLOPS))
def test_official_flops_match_the_table(name):
  model = nnx.eval_shape(lambda: focal_jax.create_model(name))
  measured = flops.official_macs(model) / 1e9
  assert abs(measured - OFFICIAL_GFLOPS[name]) / OFFICIAL_GFLOPS[name] < 0.01
  assert flops.keys_per_query(model) == [230, 206, 190, 50]


def test_count_flops_reports_official_and_xla():
  model = focal_jax.create_model(None, num_classes=10, **SMALL)
  counts = focal_jax.count_flops(model, 224)
  assert set(counts) == {"official", "xla"}
  # XLA counts a multiply-add as 2 FLOPs and adds elementwise work and the pooled queries.
  assert 2 * counts["official"] < counts["xla"] < 4 * counts["official"]
  bigger = focal_jax.count_flops(model, 320)
  assert bigger["official"] > counts["official"] and bigger["xla"] > counts["xla"]


def test_xla_flops_count_every_scanned_block(monkeypatch):
  monkeypatch.setattr(focal_transformer, "SCAN_MIN_BLOCKS", 4)  # scan this short run
  config = {**SMALL, "depths": (1, 1, 4, 1)}
  scanned = nnx.eval_shape(lambda: focal_jax.create_model(None, num_classes=10, **config))
  unrolled = nnx.eval_shape(
      lambda: focal_jax.create_model(None, num_classes=10, scan_blocks=False, **config))
  assert scanned.layers[2].scanned_runs == ((0, 4),)
  assert flops.xla_flops(scanned) == pytest.approx(flops.xla_flops(unrolled), rel=1e-6)


def test_summary_lists_stages(capsys):
  summary.main(["--model", "focal_tiny"])
  out = capsys.readouterr().out
  assert "28,880,380" in out and "4.92 G" in out
  rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
  assert [int(r[7]) for r in rows] == [230, 206, 190, 50]
  assert [r[1] for r in rows] == ["56x56", "28x28", "14x14", "7x7"]


def test_summary_lists_focalnet_stages(capsys):
  summary.main(["--model", "focalnet_tiny_lrf"])
  out = capsys.readouterr().out
  assert "28,647,928" in out and "4.49 G" in out  # the official count and flops()
  rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
  assert [r[1] for r in rows] == ["56x56", "28x28", "14x14", "7x7"]
  assert [r[4] for r in rows] == ["3"] * 4 and [r[5] for r in rows] == ["3,5,7"] * 4
  assert sum(int(r[6].replace(",", "")) for r in rows) < 28_647_928  # stages only
  summary.main(["--model", "focalnet_base_iso"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.strip()[:1].isdigit()]
  assert len(rows) == 1 and rows[0][1] == "14x14"


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model variant 'focal_huge'.*focal_tiny"):
    focal_jax.create_model("focal_huge")


def test_unknown_option_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown model option.*focal_level"):
    focal_jax.create_model("focal_tiny", focal_level=3)


def test_heads_must_divide_width():
  with pytest.raises(ValueError, match="num_heads=5 does not divide the embedding width 96"):
    focal_jax.create_model("focal_tiny", num_heads=(5, 6, 12, 24))


def test_image_size_must_be_a_multiple_of_32():
  with pytest.raises(ValueError, match="multiples of 32"):
    focal_jax.create_model("focal_tiny", img_size=230)
  model = focal_jax.create_model(None, num_classes=3, **SMALL)
  with pytest.raises(ValueError, match="multiples of 32"):
    model(np.zeros((1, 100, 224, 3), np.float32))
  with pytest.raises(ValueError, match=r"NHWC"):
    model(np.zeros((1, 3, 224, 224), np.float32))


def test_ape_needs_its_size():
  model = focal_jax.create_model(None, num_classes=3, ape=True, **SMALL)
  with pytest.raises(ValueError, match="ape=True"):
    model(np.zeros((1, 256, 256, 3), np.float32))


@pytest.mark.parametrize("bad,match", [(dict(focal_pool="avg"), "focal_pool"),
                                       (dict(expand_layer="every"), "expand_layer"),
                                       (dict(focal_levels=(4, 2, 2, 2)), "focal_levels"),
                                       (dict(num_heads=(3, 6)), "one entry per stage")])
def test_invalid_options(bad, match):
  with pytest.raises(ValueError, match=match):
    focal_jax.create_model("focal_tiny", **bad)
