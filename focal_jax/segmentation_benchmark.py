"""Side-by-side speed of focal_jax's UPerNet segmenter and transformers' UperNet + Swin-T.

    python -m focal_jax.benchmark --task segmentation --model focal_tiny --img-size 512 \\
        --batch 2 --mode both --rounds 3

What a PyTorch user picks for UPerNet today is Hugging Face transformers'
`UperNetForSemanticSegmentation`; with a Swin-T backbone (same head, a backbone of the
same FLOP class as Focal-T) it is built here from a config, mmsegmentation's
`upernet_swin_tiny` settings (no download): embed_dim 96, depths 2-2-6-2, heads 3-6-12-24,
window 7, drop path 0.3, every stage out; head width 512, pool scales 1-2-3-6; FCN auxiliary
head on stage 3 (384 -> 256 channels, one conv, weight 0.4).

JAX: inference is the jitted eval-mode `model(images)` (logits at stride 4); the training
step is the project's `training.train_step` of the segmentation task (decode + 0.4 x
auxiliary per-pixel cross-entropy at the label size, AdamW of the `upernet_focal_*_ade20k`
recipe: lr 6e-5, weight decay 0.01 without decay on norms, no clipping), state donated.
PyTorch: `model(pixel_values)` in eval mode under `torch.no_grad` (its logits come
upsampled to the image size, as transformers returns them), and the training step
`model(pixel_values, labels=labels).loss` (decode + 0.4 x auxiliary cross-entropy),
backward, `torch.optim.AdamW` with the same rates and no-decay names, on
`torch.set_num_threads(cores)` threads. transformers is an optional import.

Rounds are interleaved: for each mode one worker process per framework builds, compiles
and warms up, then the two take turns (`--rounds` rounds of `--repeats` timed calls each),
so that a noisy stretch of a shared machine hits both. Reported: the fastest call (min)
and the median of all timed calls, in images per second, and focal_jax / PyTorch ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from focal_jax.benchmark_timing import (environment, fmt, num_cores, peak_rss_mb, train_step_call, rss_mb,
                                        timed_calls, wait_for_quiet)

NUM_CLASSES = 150  # ADE20K
DROP_PATH_RATE = 0.3  # upernet_swin_tiny's and upernet_focal_tiny_ade20k's
# The smoke-test configuration (--tiny): both backbones narrow and shallow, heads of a few
# channels instead of 512 / 256.
TINY_BACKBONE = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
TINY_FOCAL = dict(TINY_BACKBONE, focal_levels=(2, 2, 2, 2))
TINY_HEAD = dict(decode_channels=16, auxiliary_channels=8)
TORCH_MODEL = "upernet-swin-tiny (transformers)"
_READY, _ROUND = "SEG_BENCHMARK_READY ", "SEG_BENCHMARK_ROUND "
# Substrings of parameter names without weight decay (mmsegmentation's custom_keys).
NO_DECAY_SUBSTRINGS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


@dataclasses.dataclass
class SegmentationResult:
  """One framework's measurement of one mode over all rounds."""

  framework: str  # "jax" or "torch"
  mode: str  # "inference" or "train"
  model: str
  img_size: int
  batch: int
  dtype: str
  step_s: list[list[float]]  # per round, every timed call, seconds
  first_call_s: float  # jax: lower + compile; torch: the first (eager) call
  base_rss_mb: float  # resident memory after imports
  peak_rss_mb: float  # high-water mark after the last round
  recompiles: int = 0  # jax: backend compilations after the first call (must be 0)
  other_cpu: list[float | None] = dataclasses.field(default_factory=list)  # per round
  error: str | None = None

  def _all(self) -> list[float]:
    return [t for round_times in self.step_s for t in round_times]

  @property
  def best_images_per_s(self) -> float:
    times = self._all()
    return self.batch / min(times) if times else float("nan")

  @property
  def median_images_per_s(self) -> float:
    times = self._all()
    return self.batch / statistics.median(times) if times else float("nan")

  def summary(self) -> dict[str, Any]:
    """The JSON record: the fields and the derived images per second."""
    return {**dataclasses.asdict(self), "best_images_per_s": self.best_images_per_s,
            "median_images_per_s": self.median_images_per_s}


# --------------------------------------------------------------------------- JAX


def train_config(args: argparse.Namespace) -> Any:
  """The segmentation training config whose step is timed: `upernet_focal_tiny_ade20k`'s
  optimiser (AdamW 6e-5, weight decay 0.01, poly, no clipping) with the benchmarked model,
  crop, batch and dtype on one device."""
  import ml_collections

  from focal_jax.training.config import default_config, validate_config

  config = default_config()
  config.task = "segmentation"
  config.model.name = args.model
  config.model.overrides = ml_collections.ConfigDict(jax_overrides(args))
  config.image_size = args.img_size
  config.batch_size = args.batch
  config.dtype = args.dtype
  config.mixup.prob = 0.0
  config.mixup.group_size = 0
  config.num_train_steps = 160_000
  config.lr_schedule = "poly"
  config.warmup_steps = 1500
  config.base_lr, config.warmup_lr, config.min_lr = 6e-5, 6e-11, 0.0
  config.lr_base_batch_size = args.batch  # the rates above are the actual rates
  config.weight_decay = 0.01
  config.grad_clip_norm = 0.0
  config.mesh.data, config.mesh.fsdp = 1, 1
  validate_config(config)
  return config


def jax_overrides(args: argparse.Namespace) -> dict[str, Any]:
  """Backbone and head options of the focal_jax segmenter."""
  overrides: dict[str, Any] = {"drop_path_rate": DROP_PATH_RATE}
  if args.tiny:
    overrides.update(TINY_FOCAL, **TINY_HEAD)
  return overrides


def jax_call(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], Any]]:
  """(timed call, its lower + compile) of focal_jax's segmenter."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from focal_jax.training.tasks import segmentation

  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
  num_classes = args.num_classes
  labels = rng.integers(0, num_classes, (args.batch, args.img_size, args.img_size)).astype(np.int32)
  config = train_config(args)
  spec = segmentation.model_spec(config, num_classes)
  if args.worker_mode == "inference":
    model = spec.create()
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    inputs = (state, jnp.asarray(images))
    return (lambda: forward(*inputs).block_until_ready(),
            lambda: forward.lower(*inputs).compile())
  call, lower = train_step_call(config, spec, images, labels, config.num_train_steps)
  return call, lambda: lower().compile()


# ----------------------------------------------------------------------- PyTorch


def hf_upernet_config(args: argparse.Namespace) -> Any:
  """transformers' UperNetConfig of mmsegmentation's upernet_swin_tiny (or a tiny one)."""
  try:
    from transformers import SwinConfig, UperNetConfig
  except ImportError as error:
    raise SystemExit(
        "The segmentation benchmark compares with Hugging Face transformers' "
        "UperNetForSemanticSegmentation; install it (pip install 'transformers~=5.25', as the "
        f"test extra does) or pass --no-torch. Import failed: {error}") from None
  if args.tiny:
    embed, depths, heads = (TINY_BACKBONE[k] for k in ("embed_dim", "depths", "num_heads"))
    hidden, auxiliary = TINY_HEAD["decode_channels"], TINY_HEAD["auxiliary_channels"]
  else:
    embed, depths, heads, hidden, auxiliary = 96, (2, 2, 6, 2), (3, 6, 12, 24), 512, 256
  backbone = SwinConfig(
      image_size=args.img_size, patch_size=4, embed_dim=embed, depths=list(depths),
      num_heads=list(heads), window_size=7, mlp_ratio=4.0, qkv_bias=True,
      drop_path_rate=DROP_PATH_RATE, out_features=["stage1", "stage2", "stage3", "stage4"])
  return UperNetConfig(backbone_config=backbone, num_labels=args.num_classes, hidden_size=hidden,
                       pool_scales=[1, 2, 3, 6], use_auxiliary_head=True,
                       auxiliary_loss_weight=0.4, auxiliary_in_channels=embed * 4,
                       auxiliary_channels=auxiliary, auxiliary_num_convs=1,
                       auxiliary_concat_input=False, loss_ignore_index=255)


def torch_call(args: argparse.Namespace) -> Callable[[], None]:
  """The timed call of transformers' UperNet (Swin-T)."""
  import torch

  config = hf_upernet_config(args)
  from transformers import UperNetForSemanticSegmentation

  torch.set_num_threads(num_cores())
  torch.manual_seed(0)
  model = UperNetForSemanticSegmentation(config)
  images = torch.randn(args.batch, 3, args.img_size, args.img_size)
  labels = torch.randint(0, args.num_classes, (args.batch, args.img_size, args.img_size))
  if args.worker_mode == "inference":
    model.eval()

    def call():
      with torch.no_grad():
        model(pixel_values=images)

    return call
  model.train()
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    (no_decay if any(s in name for s in NO_DECAY_SUBSTRINGS) else decay).append(param)
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=6e-5, betas=(0.9, 0.999), eps=1e-8)

  def call():
    optimizer.zero_grad(set_to_none=True)
    model(pixel_values=images, labels=labels).loss.backward()
    optimizer.step()

  return call


# ------------------------------------------------------------------------ worker


def run_worker(args: argparse.Namespace) -> None:
  """A worker process: builds and warms up, prints READY; then for each line read from
  stdin times `--repeats` calls and prints a ROUND line; exits at the end of stdin."""
  base_rss = rss_mb()
  compiles: list[str] = []
  start = time.perf_counter()
  if args.worker == "jax":
    import jax

    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    call, compile_fn = jax_call(args)
    start = time.perf_counter()
    compile_fn()
  else:
    call = torch_call(args)
    call()
  first_call_s = time.perf_counter() - start
  if args.worker == "jax":
    call()  # the first call reuses the compilation above
  counted = len(compiles)
  for _ in range(args.warmup):
    call()
  print(_READY + json.dumps({"first_call_s": first_call_s, "base_rss_mb": base_rss}), flush=True)
  for _ in sys.stdin:
    timing = timed_calls(call, 0, args.repeats)
    print(_ROUND + json.dumps({"times": timing.times, "other_cpu": timing.other_cpu,
                               "recompiles": len(compiles) - counted,
                               "peak_rss_mb": peak_rss_mb()}), flush=True)


class _Worker:
  """A running worker process of one framework and mode."""

  def __init__(self, framework: str, mode: str, args: argparse.Namespace):
    command = [sys.executable, "-m", "focal_jax.segmentation_benchmark", "--worker", framework,
               "--worker-mode", mode, "--model", args.model, "--img-size", str(args.img_size),
               "--batch", str(args.batch), "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--num-classes", str(args.num_classes)]
    if args.tiny:
      command.append("--tiny")
    self.result = SegmentationResult(framework, mode, args.model if framework == "jax"
                                     else TORCH_MODEL, args.img_size, args.batch, args.dtype,
                                     [], float("nan"), float("nan"), float("nan"))
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    ready = self._expect(_READY)
    if ready is not None:
      self.result.first_call_s = ready["first_call_s"]
      self.result.base_rss_mb = ready["base_rss_mb"]

  def _expect(self, mark: str) -> dict[str, Any] | None:
    """The JSON of the next `mark` line, or None (the error recorded) when the worker died."""
    for line in self.proc.stdout:
      if line.startswith(mark):
        return json.loads(line[len(mark):])
    tail = self.proc.stderr.read().strip().splitlines()[-15:]
    self.result.error = (f"worker exited with {self.proc.wait()}: " + " | ".join(tail))
    return None

  def round(self) -> None:
    if self.result.error:
      return
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    timed = self._expect(_ROUND)
    if timed is not None:
      self.result.step_s.append(timed["times"])
      self.result.other_cpu.append(timed["other_cpu"])
      self.result.recompiles, self.result.peak_rss_mb = timed["recompiles"], timed["peak_rss_mb"]

  def close(self) -> SegmentationResult:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait()
    return self.result


# ---------------------------------------------------------------- orchestration


def measure(args: argparse.Namespace) -> list[SegmentationResult]:
  """Every mode: both workers ready, then `--rounds` alternating rounds."""
  frameworks = [f for f, skip in (("jax", args.no_jax), ("torch", args.no_torch)) if not skip]
  modes = ("inference", "train") if args.mode == "both" else (args.mode,)
  results = []
  for mode in modes:
    workers = []
    for framework in frameworks:
      workers.append(_Worker(framework, mode, args))
      ready = workers[-1].result
      print(f"{framework:5s} {mode:9s} ready: first call {fmt(ready.first_call_s)} s"
            + (f"  ERROR {ready.error}" if ready.error else ""), flush=True)
    for index in range(args.rounds):
      for worker in workers if index % 2 == 0 else workers[::-1]:
        if args.wait_quiet > 0:
          wait_for_quiet(0.25, args.wait_quiet)
        worker.round()
        result = worker.result
        last = result.step_s[-1] if result.step_s and not result.error else []
        print(f"{result.framework:5s} {mode:9s} round {index + 1}: "
              + (" ".join(f"{t:.2f}" for t in last) + " s per step" if last else "-")
              + (f"  ERROR {result.error}" if result.error else ""), flush=True)
    results += [worker.close() for worker in workers]
  return results


def results_table(results: list[SegmentationResult]) -> str:
  """Markdown: one row per (framework, mode), focal_jax / PyTorch ratios of min and median."""
  torch_by_mode = {r.mode: r for r in results if r.framework == "torch"}
  lines = ["| framework | model | mode | img | batch | dtype | img/s (best) | img/s (median) "
           "| focal_jax/PyTorch (best) | focal_jax/PyTorch (median) | s/step (median) "
           "| first call s | peak RSS MiB | recompiles | rounds x calls |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    other = torch_by_mode.get(r.mode)
    best_ratio = median_ratio = "-"
    if r.framework == "jax" and other is not None and not other.error and not r.error:
      best_ratio = f"{r.best_images_per_s / other.best_images_per_s:.2f}x"
      median_ratio = f"{r.median_images_per_s / other.median_images_per_s:.2f}x"
    first = ("compile " if r.framework == "jax" else "") + fmt(r.first_call_s)
    calls = len(r.step_s[0]) if r.step_s else 0
    lines.append(
        f"| {r.framework} | {r.model} | {r.mode} | {r.img_size} | {r.batch} | {r.dtype} | "
        f"{fmt(r.best_images_per_s, 3)} | {fmt(r.median_images_per_s, 3)} | {best_ratio} | "
        f"{median_ratio} | {fmt(r.batch / r.median_images_per_s)} | {first} | "
        f"{fmt(r.peak_rss_mb, 0)} | {r.recompiles if r.framework == 'jax' else '-'} | "
        f"{len(r.step_s)} x {calls} |")
  errors = [f"- {r.framework} {r.mode}: {r.error}" for r in results if r.error]
  return "\n".join(lines + ([""] + errors if errors else []))


def main(args: argparse.Namespace) -> list[SegmentationResult]:
  """The parent: measures, prints the markdown report, appends it to --output, writes
  --json."""
  env = environment()
  try:
    import transformers
    env["transformers"] = transformers.__version__
  except ImportError:
    env["transformers"] = "not installed"
  if not args.no_torch:
    hf_upernet_config(args)  # a clear error now when transformers is missing
  results = measure(args)
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  env["load average (1/5/15 min)"] += f" (start) / {load} (end)"
  command = "python -m focal_jax.benchmark " + " ".join(sys.argv[1:])
  text = "\n".join([
      f"### `{command}`", "", ", ".join(f"{k}: {v}" for k, v in env.items()), "",
      f"focal_jax {args.model}{' (tiny overrides)' if args.tiny else ''} UPerNet vs "
      f"{TORCH_MODEL}, {args.num_classes} classes, warmup {args.warmup}, {args.rounds} "
      f"interleaved rounds of {args.repeats} calls", "", results_table(results)]) + "\n"
  print()
  print(text)
  if args.output:
    with open(args.output, "a") as f:
      f.write("\n" + text)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"environment": env, "results": [r.summary() for r in results]}, f, indent=1)
  return results


def _worker_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m focal_jax.segmentation_benchmark",
                                   description="A worker of `focal_jax.benchmark --task "
                                               "segmentation` (not run by hand).")
  parser.add_argument("--worker", choices=("jax", "torch"), required=True)
  parser.add_argument("--worker-mode", choices=("inference", "train"), required=True)
  parser.add_argument("--model", required=True)
  parser.add_argument("--img-size", type=int, required=True)
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, required=True)
  parser.add_argument("--warmup", type=int, required=True)
  parser.add_argument("--num-classes", type=int, required=True)
  parser.add_argument("--tiny", action="store_true")
  return parser.parse_args(argv)


if __name__ == "__main__":
  run_worker(_worker_args())
