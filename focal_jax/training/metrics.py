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
from typing import Any, Iterable

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


def read_metrics(source: str | os.PathLike | Iterable[dict[str, Any]], *, missing_ok: bool = True
                 ) -> list[dict[str, Any]]:
  """Records of a metrics.jsonl: a workdir holding one (local or gs://), the file itself, or
  records already read. A missing file reads as no records, or with `missing_ok=False`
  raises FileNotFoundError."""
  if not isinstance(source, (str, os.PathLike)):
    return [dict(r) for r in source]
  path = os.fspath(source)
  if not path.endswith(".jsonl") or storage.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not storage.exists(path):
    if missing_ok:
      return []
    raise FileNotFoundError(f"No metrics at {path}: pass a training workdir or its {METRICS_FILE}.")
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_training_curves(source: str | os.PathLike | Iterable[dict[str, Any]], *, title: str = ""
                         ) -> Any:
  """Training loss (and eval loss), learning rate, eval top-1 / top-5 against step.

  `source`: a metrics.jsonl, the workdir holding it, or its records. Returns the Figure.
  """
  import matplotlib.pyplot as plt  # noqa: PLC0415  (only the pictures need matplotlib)

  records = read_metrics(source, missing_ok=False)

  def series(key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])

  if not any("train/loss" in r or "eval/top1" in r for r in records):
    raise ValueError("The metrics hold neither train/loss nor eval/top1 records.")
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  axes[0].plot(*series("train/loss"), label="train")
  if series("eval/loss")[0]:
    axes[0].plot(*series("eval/loss"), marker="o", label="eval")
  axes[0].set(title="loss", xlabel="step")
  axes[0].legend(fontsize=8)
  axes[1].plot(*series("train/lr"), color="tab:green")
  axes[1].set(title="learning rate", xlabel="step")
  axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
  for key, style in (("eval/top1", "o-"), ("eval/top5", "s--"), ("eval_ema/top1", "^:")):
    steps, values = series(key)
    if steps:
      axes[2].plot(steps, values, style, label=key)
  axes[2].set(title="eval accuracy (%)", xlabel="step")
  if axes[2].lines:
    axes[2].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_curves(workdir: str) -> str | None:
  """Writes `plot_training_curves(workdir)` to <workdir>/training_curves.png (process 0)."""
  if jax.process_index() != 0:
    return None
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    logging.warning("matplotlib is not installed: no %s (pip install matplotlib).", CURVES_FILE)
    return None
  try:
    fig = plot_training_curves(workdir)
  except (FileNotFoundError, ValueError):  # nothing logged or evaluated yet: no picture
    return None
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
