"""`scripts/segmentation_check.py`, the README's commands, run to their end (small sizes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "segmentation_check.py")


def _run(*args: str) -> str:
  result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_table_prints_every_variant_and_setting_with_the_official_figures():
  out = _run("table")
  rows = [line for line in out.splitlines() if line.startswith("| focal_")]
  assert len(rows) == 9  # T, S, B x three settings
  tiny = next(r for r in rows if r.startswith("| focal_tiny | classification settings"))
  assert "| 60.84M | 62M |" in tiny and tiny.rstrip().endswith("| 998G |")
  focalnet = [line for line in out.splitlines() if line.startswith("| focalnet_")]
  assert len(focalnet) == 6  # T, S, B x SRF, LRF with the released segmentation options
  assert focalnet[0].startswith("| focalnet_tiny_srf | 60.82M | 61M | 235.8G | 943.0G")
  assert focalnet[0].rstrip().endswith("| 944G |")


def test_parity_reports_small_errors_at_a_small_size():
  out = _run("parity", "--model", "focal_tiny", "--size", "64", "96")
  errors = [float(e) for e in re.findall(r"max abs difference ([0-9.e+-]+)", out)]
  assert len(errors) == 2  # decode and auxiliary logits
  assert all(e < 1e-4 for e in errors), out
