"""Where metrics go: metrics.jsonl, TensorBoard event files, a PNG of the curves, the log.

Only process 0 writes, through `focal_jax.storage` (so a gs:// workdir works). Every
record is one JSON object per line with "step"; training records carry train/loss,
train/lr, train/grad_norm, train/img_per_sec, evaluation records eval/top1, eval/top5,
eval/loss and eval/examples.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
from typing import Any

import jax

from focal_jax import storage
from focal_jax.training.tensorboard import ScalarWriter

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Appends records to `<workdir>/metrics.jsonl` and to TensorBoard event files."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    """`resume_step`: a training run that (re)starts after this step (0 without a
    checkpoint); the records of later steps, in metrics.jsonl and for TensorBoard, are
    dropped, since this run writes them again. None (evaluation) keeps everything."""
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    storage.makedirs(workdir)
    purge_step = None
    if resume_step is not None:
      self._drop_after(resume_step)
      purge_step = resume_step + 1  # TensorBoard forgets the old points from here on
    self._tb = ScalarWriter(os.path.join(workdir, TENSORBOARD_DIR), purge_step=purge_step)

  def _drop_after(self, step: int) -> None:
    """A (re)started run repeats the steps after its checkpoint (all of them without one):
    forget their old records."""
    records = read_metrics(self.workdir)
    storage.write_text(self.path, "".join(json.dumps(record) + "\n" for record in records
                                          if record["step"] <= step))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    storage.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.write(step, {k: float(v) for k, v in record.items()
                            if k != "step" and isinstance(v, (int, float))})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _plain(value: Any) -> Any:
  if hasattr(value, "item"):
    return value.item()
  return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_curves(workdir: str) -> str | None:
  """Draws training loss, learning rate and eval top-1/top-5 against step into a PNG."""
  if jax.process_index() != 0:
    return None
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    logging.warning("matplotlib is not installed: no %s (pip install matplotlib).", CURVES_FILE)
    return None
  records = read_metrics(workdir)
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "eval/top1" in r]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot([r["step"] for r in train], [r["train/loss"] for r in train])
  axes[0].set(title="training loss", xlabel="step")
  axes[1].plot([r["step"] for r in train], [r["train/lr"] for r in train])
  axes[1].set(title="learning rate", xlabel="step")
  for key in ("eval/top1", "eval/top5", "eval_ema/top1"):
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      axes[2].plot(*zip(*points), marker="o", label=key)
  axes[2].set(title="evaluation accuracy (%)", xlabel="step")
  if evals:
    axes[2].legend()
  fig.tight_layout()
  path = os.path.join(workdir, CURVES_FILE)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
  return path


def progress_line(step: int, total: int, loss: float, lr: float, images_per_sec: float,
                  seconds_per_step: float) -> str:
  """'step 120/2000  loss 1.2345  lr 3.10e-04  85.2 img/s  ETA 0:05:31'."""
  eta = datetime.timedelta(seconds=int(max(total - step, 0) * seconds_per_step))
  return (f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {images_per_sec:.1f} img/s  "
          f"ETA {eta}")
