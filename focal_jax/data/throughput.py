"""Host input throughput: training images per second per CPU core, this project's tf.data
pipeline against timm's PyTorch loader, on the same JPEGs with the official augmentation.

    python -m focal_jax.benchmark --mode input                  # generated ImageNet-sized JPEGs
    python -m focal_jax.benchmark --mode input --data DIR       # the JPEGs under DIR

Both loaders read the same encoded bytes from memory and run SPEC section 4's training
transform (random resized crop 224 bicubic, flip, RandAugment "rand-m9-mstd0.5-inc1",
normalise, random erasing 0.25 "pixel"; mixup/cutmix work on the device batch, not here):
  - focal_jax: `train_batches_from_records`, the pipeline `create_train_dataset` builds,
    on a private thread pool of `cores` threads;
  - timm (when torch and timm are installed): `create_transform(224, is_training=True,
    auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel",
    interpolation="bicubic")` on PIL images in a torch DataLoader with `cores` workers.
Each loader runs in a fresh process (PyTorch's forked workers and TensorFlow's threads do
not share a process safely); its first batches (tracing, worker start-up) are not timed. Generated JPEGs are
ImageNet's typical sizes (500x375 and 375x500, quality 90) with photo-like detail at every
scale, so that decoding costs what it costs on ImageNet (about 110 kB a file there).

Host cores a device slice needs: cores = images per step / step seconds / (img/s per core),
with images per step = devices x batch per device.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

DEFAULT_SIZES = ((375, 500), (500, 375))  # (height, width): ImageNet's commonest shapes
JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPEG", ".JPG")


@dataclasses.dataclass
class InputResult:
  """One loader's throughput on one set of JPEGs."""

  loader: str  # "focal_jax" or "timm"
  cores: int  # threads (focal_jax) or DataLoader workers (timm)
  batch: int
  batches: int  # timed batches per round
  images_per_s: float  # wall clock, median over the timed rounds
  images_per_s_per_core: float  # images_per_s / cores
  images_per_cpu_s: float | None  # images per CPU second the loader used (all its processes)
  rounds: list[float]  # wall-clock img/s of each timed round
  first_batch_s: float  # start-up: pipeline construction (and tracing) to the first batch
  error: str | None = None


def num_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------
# JPEGs.
# ----------------------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] with detail at every scale (smooth regions, edges, texture, grain)."""
  image = np.zeros((height, width, 3), np.float32)
  for cell, amplitude in ((64, 90.0), (16, 40.0), (4, 20.0)):
    rows, cols = height // cell + 2, width // cell + 2
    coarse = rng.uniform(-amplitude, amplitude, (rows, cols, 3)).astype(np.float32)
    # Bilinear upsampling of the coarse grid (separable, NumPy only).
    y = np.linspace(0, rows - 1.001, height)
    x = np.linspace(0, cols - 1.001, width)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    image += top * (1 - fy) + bottom * fy
  image += rng.normal(0.0, 16.0, image.shape)
  return np.clip(image + 128.0, 0, 255).astype(np.uint8)


def make_jpegs(count: int, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
               quality: int = 90, seed: int = 0) -> list[bytes]:
  """`count` encoded JPEGs, cycling through `sizes` ((height, width) pairs)."""
  import tensorflow as tf  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  return [tf.io.encode_jpeg(photo_like(rng, *sizes[i % len(sizes)]), quality=quality).numpy()
          for i in range(count)]


def read_jpegs(directory: str, limit: int) -> list[bytes]:
  """Up to `limit` JPEG files found under `directory` (recursively), in name order."""
  paths = sorted(p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
                 if p.endswith(JPEG_SUFFIXES))[:limit]
  if not paths:
    raise FileNotFoundError(f"No JPEG files ({', '.join(JPEG_SUFFIXES)}) under {directory}.")
  blobs = []
  for path in paths:
    with open(path, "rb") as f:
      blobs.append(f.read())
  return blobs


def jpeg_sizes(blobs: Sequence[bytes]) -> dict[str, int]:
  """{"WxH": count} of the images' shapes, read from the JPEG headers."""
  import tensorflow as tf  # noqa: PLC0415

  counts: dict[str, int] = {}
  for blob in blobs:
    height, width, _ = tf.image.extract_jpeg_shape(blob).numpy()
    key = f"{width}x{height}"
    counts[key] = counts.get(key, 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------
# The two loaders.
# ----------------------------------------------------------------------------------------


def _cpu_seconds(pids: Sequence[int]) -> float | None:
  """User + system CPU seconds of this process and of `pids` (Linux /proc), else None."""
  total = time.process_time()
  try:
    for pid in pids:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None
  return total


def _time_rounds(next_batch, batch: int, warmup: int, batches: int, rounds: int,
                 worker_pids=lambda: ()) -> tuple[float, list[float], float | None]:
  """(seconds to the first batch, img/s of each round of `batches` batches after warmup,
  images per CPU second over all rounds)."""
  start = time.perf_counter()
  next_batch()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    next_batch()
  rates = []
  cpu_start = _cpu_seconds(worker_pids())
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(batches):
      next_batch()
    rates.append(batches * batch / (time.perf_counter() - start))
  cpu_end = _cpu_seconds(worker_pids())
  per_cpu_s = None
  if cpu_start is not None and cpu_end is not None and cpu_end > cpu_start:
    per_cpu_s = rounds * batches * batch / (cpu_end - cpu_start)
  return first, rates, per_cpu_s


def measure_focal_jax(blobs: Sequence[bytes], *, batch: int, cores: int, warmup: int,
                      batches: int, rounds: int, image_size: int = 224) -> InputResult:
  """The project's training pipeline (as `create_train_dataset` builds it) over `blobs`."""
  import tensorflow as tf  # noqa: PLC0415

  from focal_jax.data.augment import AugmentConfig  # noqa: PLC0415
  from focal_jax.data.input_pipeline import train_batches_from_records  # noqa: PLC0415

  start = time.perf_counter()
  records = tf.data.Dataset.from_tensor_slices(
      {"image": tf.constant(list(blobs)), "label": tf.range(len(blobs), dtype=tf.int64)})
  records_per_epoch = len(blobs) // batch * batch
  dataset = train_batches_from_records(
      records, records_per_epoch=records_per_epoch, local_batch_size=batch,
      config=AugmentConfig(image_size=image_size), seed=0, shuffle_buffer=len(blobs),
      threads=cores, name="the benchmark's JPEGs")
  iterator = iter(dataset)
  setup = time.perf_counter() - start
  first, rates, per_cpu_s = _time_rounds(lambda: next(iterator), batch, warmup, batches, rounds)
  rate = statistics.median(rates)
  return InputResult("focal_jax", cores, batch, batches, rate, rate / cores, per_cpu_s, rates,
                     setup + first)


class _TimmDataset:
  """Map-style dataset of (timm-transformed image, label) over in-memory JPEG bytes."""

  def __init__(self, blobs: Sequence[bytes], transform, length: int):
    self.blobs, self.transform, self.length = list(blobs), transform, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int):
    from PIL import Image  # noqa: PLC0415

    image = Image.open(io.BytesIO(self.blobs[index % len(self.blobs)])).convert("RGB")
    return self.transform(image), index % len(self.blobs)


def timm_available() -> bool:
  """Whether torch and timm are installed (found, not imported: importing torch after
  TensorFlow can crash the process)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "timm"))


def _allow_zero_bit_posterize() -> None:
  """timm's PosterizeIncreasing asks for 0 bits at magnitude 10, which Pillow >= 13 refuses
  (older Pillow returned black, as this project's posterize does); give it that again."""
  from PIL import Image, ImageOps  # noqa: PLC0415

  posterize = ImageOps.posterize
  if getattr(posterize, "allows_zero_bits", False):
    return

  def posterize_zero_bits_black(image, bits):
    if bits == 0:
      return Image.new(image.mode, image.size)
    return posterize(image, bits)

  posterize_zero_bits_black.allows_zero_bits = True
  ImageOps.posterize = posterize_zero_bits_black


def measure_timm(blobs: Sequence[bytes], *, batch: int, cores: int, warmup: int, batches: int,
                 rounds: int, image_size: int = 224) -> InputResult:
  """timm's official training transform in a torch DataLoader with `cores` workers."""
  import torch  # noqa: PLC0415
  from timm.data import create_transform  # noqa: PLC0415

  _allow_zero_bit_posterize()
  start = time.perf_counter()
  transform = create_transform(image_size, is_training=True,
                               auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                               re_mode="pixel", interpolation="bicubic")
  length = batch * (warmup + batches * rounds + 2 * cores + 2)  # never runs dry
  dataset = _TimmDataset(blobs, transform, length)
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=batch, shuffle=True, num_workers=cores, drop_last=True,
      persistent_workers=False, generator=torch.Generator().manual_seed(0))
  iterator = iter(loader)
  setup = time.perf_counter() - start
  first, rates, per_cpu_s = _time_rounds(
      lambda: next(iterator), batch, warmup, batches, rounds,
      worker_pids=lambda: [w.pid for w in iterator._workers])  # noqa: SLF001
  rate = statistics.median(rates)
  return InputResult("timm", cores, batch, batches, rate, rate / cores, per_cpu_s, rates,
                     setup + first)


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------


def cores_needed(devices: int, batch_per_device: int, step_s: float, per_core: float) -> int:
  """Host cores that keep `devices` fed: devices x batch / step_s / (img/s per core)."""
  return math.ceil(devices * batch_per_device / step_s / per_core)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `--mode input` options (shared with `focal_jax.benchmark`)."""
  group = parser.add_argument_group("input throughput (--mode input)")
  group.add_argument("--data", help="directory of JPEGs to use (default: generate them)")
  group.add_argument("--images", type=int, default=64,
                     help="JPEGs to generate or read, cycled through (default 64)")
  group.add_argument("--input-batch", type=int, default=32, help="loader batch (default 32)")
  group.add_argument("--input-batches", type=int, default=8,
                     help="batches per timed round (default 8)")
  group.add_argument("--input-rounds", type=int, default=3,
                     help="timed rounds, median reported (default 3)")
  group.add_argument("--input-warmup", type=int, default=2,
                     help="untimed batches first (default 2)")
  group.add_argument("--cores", type=int, default=None,
                     help="threads / DataLoader workers (default: the cores this process may use)")
  group.add_argument("--input-size", type=int, default=224, help="crop size (default 224)")
  group.add_argument("--loaders", default="focal_jax,timm",
                     help="comma-separated: focal_jax, timm (skipped when not installed)")


_RESULT_MARK = "INPUT_RESULT "


def write_jpegs(directory: str, blobs: Sequence[bytes]) -> None:
  for index, blob in enumerate(blobs):
    with open(os.path.join(directory, f"image_{index:05d}.jpg"), "wb") as f:
      f.write(blob)


def _measure_in_worker(name: str, directory: str, args: argparse.Namespace,
                       cores: int) -> InputResult:
  """Runs one loader's measurement in a fresh Python process; returns its result."""
  # timm's worker runs this file by its path, outside the package (whose __init__ imports
  # TensorFlow): its forked DataLoader workers then hold no TensorFlow threads.
  program = ([os.path.abspath(__file__)] if name == "timm"
             else ["-m", "focal_jax.data.throughput"])
  command = [sys.executable, *program, "--worker", name, "--data", directory,
             "--images", str(args.images), "--cores", str(cores),
             "--input-batch", str(args.input_batch), "--input-batches", str(args.input_batches),
             "--input-rounds", str(args.input_rounds), "--input-warmup", str(args.input_warmup),
             "--input-size", str(args.input_size)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith(_RESULT_MARK):
      return InputResult(**json.loads(line[len(_RESULT_MARK):]))
  tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
  return InputResult(name, cores, args.input_batch, args.input_batches, 0.0, 0.0, None, [], 0.0,
                     error=f"worker exited with {done.returncode}: " + " | ".join(tail))


def _worker(args: argparse.Namespace) -> None:
  blobs = read_jpegs(args.data, args.images)
  measure = measure_focal_jax if args.worker == "focal_jax" else measure_timm
  result = measure(blobs, batch=args.input_batch, cores=args.cores, warmup=args.input_warmup,
                   batches=args.input_batches, rounds=args.input_rounds,
                   image_size=args.input_size)
  print(_RESULT_MARK + json.dumps(dataclasses.asdict(result)), flush=True)


def run(args: argparse.Namespace) -> list[InputResult]:
  """Measures the chosen loaders on the same JPEGs, each in its own process; prints one
  line per loader, the JPEG sizes and the per-core ratio."""
  loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
  unknown = set(loaders) - {"focal_jax", "timm"}
  if unknown:
    raise ValueError(f"--loaders: unknown {sorted(unknown)}; known: focal_jax, timm.")
  cores = args.cores or num_cores()
  batch = args.input_batch
  with tempfile.TemporaryDirectory(prefix="focal_jax_jpegs_") as scratch:
    if args.data:
      blobs = read_jpegs(args.data, args.images)
    else:
      blobs = make_jpegs(args.images)
    if len(blobs) < batch:
      raise ValueError(f"{len(blobs)} JPEGs are fewer than --input-batch {batch}; "
                       "give at least one batch of them.")
    write_jpegs(scratch, blobs)
    sizes = jpeg_sizes(blobs)
    mean_kb = sum(len(b) for b in blobs) / len(blobs) / 1000
    print(f"JPEGs: {len(blobs)} ({', '.join(f'{k}: {v}' for k, v in sizes.items())}), "
          f"mean {mean_kb:.1f} kB, from {args.data or 'generated (quality 90)'}; "
          f"cores {cores}, batch {batch}", flush=True)
    results = []
    for name in loaders:
      if name == "timm" and not timm_available():
        print("timm: torch or timm not installed (pip install timm), skipped", flush=True)
        continue
      result = _measure_in_worker(name, scratch, args, cores)
      results.append(result)
      print(_RESULT_MARK + json.dumps(dataclasses.asdict(result)), flush=True)
      if result.error:
        print(f"{name}: failed: {result.error}", flush=True)
        continue
      per_cpu_s = ("n/a" if result.images_per_cpu_s is None
                   else f"{result.images_per_cpu_s:.1f}")
      print(f"{name}: {result.images_per_s:.1f} img/s on {cores} cores = "
            f"{result.images_per_s_per_core:.1f} img/s per core; {per_cpu_s} img per CPU "
            f"second (rounds {', '.join(f'{r:.0f}' for r in result.rounds)} img/s)", flush=True)
  by_name = {r.loader: r for r in results if not r.error}
  if "focal_jax" in by_name and "timm" in by_name:
    jax_result, timm_result = by_name["focal_jax"], by_name["timm"]
    ratio = jax_result.images_per_s_per_core / timm_result.images_per_s_per_core
    line = f"focal_jax / timm: {ratio:.2f}x img/s per core"
    if jax_result.images_per_cpu_s and timm_result.images_per_cpu_s:
      line += f", {jax_result.images_per_cpu_s / timm_result.images_per_cpu_s:.2f}x per CPU second"
    print(line, flush=True)
  return results


def main(argv: list[str] | None = None) -> list[InputResult]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_arguments(parser)
  parser.add_argument("--worker", choices=("focal_jax", "timm"), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args)
    return []
  return run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
