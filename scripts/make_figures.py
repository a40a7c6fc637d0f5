"""Regenerates the README pictures in docs/.

  python scripts/make_figures.py                       # all figures; trains both demos (~8 min, CPU)
  python scripts/make_figures.py --metrics WORKDIR     # training curve of an existing run
  python scripts/make_figures.py --only attention      # attention + receptive fields only (seconds)
  python scripts/make_figures.py --only segmentation --seg-workdir WORKDIR  # of a demo_seg run

docs/attention.png         what one query token of Focal-T attends to (stage 1 in the image
                           interior, and at the image border where the ring wraps around;
                           stage 3 where the ring covers most of the 14x14 grid)
docs/receptive_fields.png  the region each focal level covers, per stage
docs/training_curve.png    loss, learning rate and eval top-1 / top-5 of a short run of
                           configs/demo.py on the built-in focal_digits dataset
docs/segmentation_demo.png validation scenes of the built-in focal_digit_scenes: image,
                           ground truth and the prediction of configs/demo_seg.py's run
                           (trained here, about 5 min, unless --seg-workdir gives one)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax import viz  # noqa: E402

# (stage, query pixel (row, col)) of each row of the attention figure.
ATTENTION_QUERIES = ((0, (118, 142)), (0, (6, 10)), (2, (40, 190)))


def save_png(fig, path: str, dpi: int = 80) -> None:
  """Saves `fig` as a 256-colour PNG (a photo in a figure would otherwise take megabytes)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  plt.close(fig)
  Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
      path, optimize=True)


def sample_image(size: int = 224) -> np.ndarray:
  """scikit-learn's 'china.jpg' (a real photo shipped with the package), centre-cropped to a
  square and resized to `size` x `size`: uint8 [size, size, 3]."""
  from sklearn.datasets import load_sample_image

  photo = load_sample_image("china.jpg")  # [427, 640, 3]
  height, width = photo.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  square = Image.fromarray(photo[top:top + side, left:left + side])
  return np.asarray(square.resize((size, size), Image.BICUBIC))


def attention_figure(path: str) -> None:
  # Geometry only: an abstract Focal-T (no parameters allocated) has every attribute needed.
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny", img_size=224))
  image = sample_image(224)
  keys = [viz.focal_keys(model, stage, 0, query) for stage, query in ATTENTION_QUERIES]
  panels = max(len(k.groups) + 1 for k in keys)
  fig, axes = plt.subplots(len(keys), panels, figsize=(3.3 * panels, 3.9 * len(keys)),
                           squeeze=False)
  for row, k in zip(axes, keys):
    viz.plot_focal_attention(image, k, axes=row[:len(k.groups) + 1])
    for ax in row[len(k.groups) + 1:]:
      ax.axis("off")
  fig.suptitle("Focal-T at 224x224: the keys of one query token (star) at each focal level\n"
               "hatched: ring keys the cyclic roll takes from the opposite border; masked: pooled "
               "keys in the unfold's zero padding", fontsize=11)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  save_png(fig, path)


def receptive_field_figure(path: str) -> None:
  model = nnx.eval_shape(lambda: focal_jax.create_model("focal_tiny", img_size=224))
  save_png(viz.plot_receptive_fields(model), path)


def demo_config(steps: int):
  """configs/demo.py, shortened to `steps` steps with evaluations along the way."""
  from focal_jax.training.config import load_config_file  # noqa: PLC0415  (ml_collections)

  config = load_config_file(os.path.join(ROOT, "configs", "demo.py"))
  config.num_train_steps = steps
  config.log_every_steps = max(1, steps // 30)
  config.eval_every_steps = max(1, steps // 10)
  config.checkpoint_every_steps = 0  # the end only
  return config


def training_figure(path: str, metrics: str | None, steps: int, workdir: str | None,
                    data_dir: str | None) -> None:
  if metrics is None:
    from focal_jax.training import train_and_evaluate

    workdir = workdir or tempfile.mkdtemp(prefix="focal_demo_")
    config = demo_config(steps)
    if data_dir:
      config.data_dir = data_dir
    start = time.time()
    print(f"training configs/demo.py for {steps} steps in {workdir} ...", flush=True)
    train_and_evaluate(config, workdir)
    print(f"trained in {time.time() - start:.0f} s", flush=True)
    metrics = workdir
  records = viz.read_metrics(metrics)
  final = [r for r in records if "eval/top1" in r]
  title = "configs/demo.py on focal_digits (CPU)"
  if final:
    title += f": eval top-1 {final[-1]['eval/top1']:.1f}% after {final[-1]['step']} steps"
  save_png(viz.plot_training_curves(records, title=title), path)


def seg_demo_config(steps: int | None):
  """configs/demo_seg.py, shortened to `steps` steps when given, evaluated at the end only."""
  from focal_jax.training.config import load_config_file  # noqa: PLC0415  (ml_collections)

  config = load_config_file(os.path.join(ROOT, "configs", "demo_seg.py"))
  if steps is not None:
    config.num_train_steps = steps
    config.warmup_steps = min(config.warmup_steps, steps)
  config.eval_every_steps = config.num_train_steps
  config.checkpoint_every_steps = 0  # the end only
  return config


# Segmentation colours: the ten digits in tab10's colours, background light grey.
SEG_COLOURS = np.concatenate([plt.get_cmap("tab10").colors, [(0.92, 0.92, 0.92)]])


def segmentation_figure(path: str, workdir: str | None, steps: int | None,
                        data_dir: str | None, scenes: int = 6) -> None:
  """The first `scenes` validation scenes of focal_digit_scenes: image, ground truth and the
  prediction of the demo_seg run in `workdir` (trained there first when it has no export)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from focal_jax.data import digit_scenes, segmentation  # noqa: PLC0415
  from focal_jax.data.seg_augment import MMSEG_MEAN, MMSEG_STD  # noqa: PLC0415
  from focal_jax.weights.segmenter_exports import load_exported_segmenter  # noqa: PLC0415

  workdir = workdir or tempfile.mkdtemp(prefix="focal_demo_seg_")
  export = os.path.join(workdir, "export")
  if not os.path.isdir(export):
    from focal_jax.training import train_and_evaluate  # noqa: PLC0415

    config = seg_demo_config(steps)
    if data_dir:
      config.data_dir = data_dir
    start = time.time()
    print(f"training configs/demo_seg.py for {config.num_train_steps} steps in {workdir} ...",
          flush=True)
    train_and_evaluate(config, workdir)
    print(f"trained in {time.time() - start:.0f} s", flush=True)
  model = load_exported_segmenter(export)
  elements = segmentation.create_segmentation_input(
      "focal_digit_scenes", train=False, batch_size=1, data_dir=data_dir or None)
  images, labels = [], []
  for element, _ in zip(elements, range(scenes)):
    images.append(element["image"][0])  # [64, 64, 3], normalised
    labels.append(element["label"][0])  # [64, 64]
  predictions = np.asarray(focal_jax.segment(model, jnp.asarray(np.stack(images))))
  evals = [r for r in viz.read_metrics(workdir) if "eval/mIoU" in r]
  fig, axes = plt.subplots(3, scenes, figsize=(1.9 * scenes, 6.4), squeeze=False)
  for column, (image, label, prediction) in enumerate(zip(images, labels, predictions)):
    rgb = np.clip(image * np.array(MMSEG_STD) + np.array(MMSEG_MEAN), 0, 255).astype(np.uint8)
    for row, picture in enumerate((rgb, SEG_COLOURS[label], SEG_COLOURS[prediction])):
      axes[row, column].imshow(picture, interpolation="nearest")
      axes[row, column].set_xticks([])
      axes[row, column].set_yticks([])
  for row, name in enumerate(("image", "ground truth", "prediction")):
    axes[row, 0].set_ylabel(name, fontsize=11)
  handles = [matplotlib.patches.Patch(color=SEG_COLOURS[k], label=name)
             for k, name in enumerate(digit_scenes.CLASS_NAMES)]
  fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
  title = "configs/demo_seg.py: UPerNet + Focal on focal_digit_scenes (CPU), validation scenes"
  if evals:
    title += (f"\neval mIoU {evals[-1]['eval/mIoU']:.1f}% over the 300 validation scenes after "
              f"{evals[-1]['step']} steps")
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="output directory")
  parser.add_argument("--only", choices=("attention", "curve", "segmentation"),
                      help="one group of figures")
  parser.add_argument("--metrics", help="a metrics.jsonl (or its workdir) to plot instead of "
                      "training the demo")
  parser.add_argument("--steps", type=int, default=330, help="demo training steps (default 330, "
                      "15 epochs, about 3 minutes on 2 CPU cores)")
  parser.add_argument("--workdir", help="workdir of the demo run (default: a temporary one)")
  parser.add_argument("--data-dir", help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--seg-workdir", help="workdir of a configs/demo_seg.py run to show (with "
                      "its export); without one the demo is trained in a temporary workdir")
  parser.add_argument("--seg-steps", type=int, help="segmentation demo training steps "
                      "(default: the config's)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.only in (None, "attention"):
    attention_figure(os.path.join(args.out, "attention.png"))
    receptive_field_figure(os.path.join(args.out, "receptive_fields.png"))
    print(f"wrote {args.out}/attention.png and {args.out}/receptive_fields.png")
  if args.only in (None, "segmentation"):
    segmentation_figure(os.path.join(args.out, "segmentation_demo.png"), args.seg_workdir,
                        args.seg_steps, args.data_dir)
    print(f"wrote {args.out}/segmentation_demo.png")
  if args.only in (None, "curve"):
    training_figure(os.path.join(args.out, "training_curve.png"), args.metrics, args.steps,
                    args.workdir, args.data_dir)
    print(f"wrote {args.out}/training_curve.png")


if __name__ == "__main__":
  main()
