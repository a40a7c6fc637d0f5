"""Side-by-side speed and memory of focal_jax and the PyTorch reference.

    python -m focal_jax.benchmark --model focal_tiny --img-size 224 --batch 8 --mode both
    python -m focal_jax.benchmark --sweep --mode inference        # 224, 448, 896
    python -m focal_jax.benchmark --sweep --sizes 32,64 --tiny --mode inference   # seconds
    python -m focal_jax.benchmark --tiny --img-size 64 --batch 2 --repeats 2   # seconds
    python -m focal_jax.benchmark --mode input    # host input pipeline vs timm's loader
    python -m focal_jax.benchmark --task segmentation --img-size 512 --batch 2   # UPerNet

`--task segmentation` compares the UPerNet segmenter with transformers' UperNet + Swin-T in
interleaved rounds (`focal_jax.segmentation_benchmark`, which says what it times).

`--mode input` measures the host side instead: training images per second per CPU core of
the project's tf.data pipeline and of timm's DataLoader on the same JPEGs
(`focal_jax.data.throughput`, whose options it takes: `--data DIR`, `--cores N`, ...).

For each framework and mode the measurement runs in a fresh worker process (this module
with `--worker`), so that the peak resident memory (`ru_maxrss`) of one measurement is
not that of another, and XLA's and PyTorch's thread pools never compete. Each worker
builds the model, warms up, times `--repeats` calls and reports medians as JSON.

JAX: inference is a jitted eval-mode forward. The training step is the project's own
`training.train_step` (what `main.py` runs), built by `train_step.step_setup` from
`train_config`: the official recipe of `training.config.default_config()` (optimiser of
`training.optim`: global-norm clipping at 5, AdamW with the official weight-decay mask,
warmup + cosine schedule; label smoothing 0.1; no EMA) with the benchmarked model, image
size, batch and dtype, on a one-device mesh, the state donated. One departure, for the
comparison: mixup/cutmix are off (`mixup.prob` 0), because the PyTorch side would need a
replica of them to do the same work, and they cost a few elementwise passes over the input
(the loss stays the soft-target cross-entropy of smoothed labels). Compile time is
`lower()` + `compile()` of the step; the compiled step is then called through the same
jitted function, and any further backend compilation is counted (it must be zero).
PyTorch: the reference model (`convert.reference.focal`, `convert.reference.fast` for
the focalv2_* models, `convert.reference.focalnet` for the focalnet_* ones)
in eval mode under `torch.inference_mode`, and the same training
step as the official training script takes it: cross-entropy with the same label
smoothing, `clip_grad_norm_`, `torch.optim.AdamW` with the official decay / no-decay
parameter groups, on `torch.set_num_threads(cores)` threads.
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
from typing import Any

from focal_jax.benchmark_timing import environment, num_cores, train_step_call, wait_for_quiet
from focal_jax.benchmark_timing import fmt as _fmt
from focal_jax.benchmark_timing import peak_rss_mb as _peak_rss_mb
from focal_jax.benchmark_timing import rss_mb as _rss_mb
from focal_jax.benchmark_timing import timed_calls as _timed_calls

# A narrow, shallow model that is still structurally complete (rings and pooled levels).
TINY_OVERRIDES = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                      focal_levels=(2, 2, 2, 2))
FOCALNET_TINY_OVERRIDES = dict(embed_dim=16, depths=(1, 1, 1, 1))
SWEEP_SIZES = (224, 448, 896)
_RESULT_MARK = "BENCHMARK_RESULT "


@dataclasses.dataclass
class Result:
  """One (framework, mode) measurement."""

  framework: str  # "jax" or "torch"
  mode: str  # "inference" or "train"
  model: str
  img_size: int
  batch: int
  dtype: str
  images_per_s: float  # median over repeats
  step_s: list[float]  # every timed call, seconds
  first_call_s: float  # jax: lower + compile; torch: the first (eager) call
  peak_rss_mb: float  # process high-water mark of resident memory
  base_rss_mb: float  # resident memory after imports, before the model is built
  recompiles: int = 0  # jax: backend compilations after the first call (must be 0)
  xla_temp_mb: float | None = None  # jax: XLA's temporary buffers of the compiled function
  device_peak_mb: float | None = None  # jax: device memory_stats() peak, where reported
  other_cpu: float | None = None  # CPU cores busy with other processes while timing (noise)
  compile_peak_rss_mb: float | None = None  # jax: peak RSS up to the end of compilation
  page_faults: float | None = None  # minor page faults per timed call (fresh memory touched)
  kernel_cpu_s: float | None = None  # CPU seconds per timed call spent in the kernel
  error: str | None = None


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
  if not args.tiny:
    return {}
  from focal_jax.models import FOCALNET_VARIANTS

  return dict(FOCALNET_TINY_OVERRIDES if args.model in FOCALNET_VARIANTS else TINY_OVERRIDES)


# --------------------------------------------------------------------------- JAX


def train_config(args: argparse.Namespace) -> Any:
  """The training config whose step is timed: the official recipe (`default_config()`) with
  the benchmarked model, size, batch and dtype, one device, mixup/cutmix off (module
  docstring: why). The model keeps its variant's drop path, as the PyTorch reference does."""
  import ml_collections

  from focal_jax.training.config import default_config, validate_config

  config = default_config()
  config.model.name = args.model
  config.model.overrides = ml_collections.ConfigDict(model_overrides(args))
  config.image_size = args.img_size
  config.batch_size = args.batch
  config.dtype = args.dtype
  config.mixup.prob = 0.0
  config.mesh.data, config.mesh.fsdp = 1, 1
  validate_config(config)
  return config


def run_jax(args: argparse.Namespace) -> Result:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import focal_jax
  from focal_jax.training import train_state as ts

  base_rss = _rss_mb()
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)

  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
  labels = rng.integers(0, args.num_classes, args.batch).astype(np.int32)

  if args.worker_mode == "inference":
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = focal_jax.create_model(args.model, num_classes=args.num_classes,
                                   img_size=args.img_size, dtype=dtype, **model_overrides(args))
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    inputs = (state, jnp.asarray(images))
    call = lambda: forward(*inputs).block_until_ready()
    lower = lambda: forward.lower(*inputs)
  else:
    config = train_config(args)
    spec = ts.model_spec_from_config(config, args.num_classes)
    # A run of num_epochs one-step epochs.
    call, lower = train_step_call(config, spec, images, labels, int(config.num_epochs))

  start = time.perf_counter()
  compiled = lower().compile()
  compile_s = time.perf_counter() - start
  compile_peak_mb = _peak_rss_mb()  # the compiler's own high-water mark
  memory = compiled.memory_analysis()
  xla_temp_mb = memory.temp_size_in_bytes / 2**20 if memory is not None else None
  del compiled
  call()  # step 1: must reuse the compilation above (jit's cache) ...
  compiles_before = len(compiles)
  timing = _timed_calls(call, args.warmup, args.repeats)
  recompiles = len(compiles) - compiles_before  # ... and nothing compiles after it
  stats = jax.devices()[0].memory_stats() or {}
  device_peak = stats.get("peak_bytes_in_use")
  return Result("jax", args.worker_mode, args.model, args.img_size, args.batch, args.dtype,
                args.batch / statistics.median(timing.times), timing.times, compile_s,
                _peak_rss_mb(), base_rss, recompiles=recompiles, xla_temp_mb=xla_temp_mb,
                compile_peak_rss_mb=compile_peak_mb,
                device_peak_mb=device_peak / 2**20 if device_peak else None,
                other_cpu=timing.other_cpu, page_faults=timing.page_faults,
                kernel_cpu_s=timing.kernel_cpu_s)


# ----------------------------------------------------------------------- PyTorch


def reference_config(args: argparse.Namespace) -> Any:
  """The config of the benchmarked variant (official constructor arguments)."""
  from focal_jax.models import make_model_config

  return make_model_config(args.model, num_classes=args.num_classes, img_size=args.img_size,
                     **model_overrides(args))


def torch_reference(config: Any) -> Any:
  """The PyTorch reference of `config`'s family (FocalNet, Focal-fast or the Focal Transformer)."""
  from focal_jax.convert.reference import reference_model

  return reference_model(config)


def official_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
  """The official `set_weight_decay` split of the reference's parameters: no decay for 1-D
  tensors, biases, `no_weight_decay()` names and `no_weight_decay_keywords()` matches."""
  skip, keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    exempt = (param.ndim == 1 or name.endswith(".bias") or name in skip
              or any(keyword in name for keyword in keywords))
    (no_decay if exempt else decay).append(param)
  return [{"params": decay, "weight_decay": weight_decay},
          {"params": no_decay, "weight_decay": 0.0}]


def run_torch(args: argparse.Namespace) -> Result:
  import torch

  base_rss = _rss_mb()
  torch.set_num_threads(num_cores())
  torch.manual_seed(0)
  model = torch_reference(reference_config(args))
  images = torch.randn(args.batch, 3, args.img_size, args.img_size)
  labels = torch.randint(0, args.num_classes, (args.batch,))
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  if args.worker_mode == "inference":
    model.eval()

    def call():
      with torch.inference_mode(), autocast:
        model(images)
  else:
    model.train()
    config = train_config(args)
    optimizer = torch.optim.AdamW(
        official_param_groups(model, config.weight_decay),
        lr=config.base_lr * config.batch_size / config.lr_base_batch_size,  # official scaling
        betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.mixup.label_smoothing)

    def call():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = loss_fn(model(images).float(), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
      optimizer.step()

  start = time.perf_counter()
  call()
  first_s = time.perf_counter() - start
  timing = _timed_calls(call, args.warmup, args.repeats)
  return Result("torch", args.worker_mode, args.model, args.img_size, args.batch, args.dtype,
                args.batch / statistics.median(timing.times), timing.times, first_s,
                _peak_rss_mb(), base_rss, other_cpu=timing.other_cpu,
                page_faults=timing.page_faults, kernel_cpu_s=timing.kernel_cpu_s)


# ---------------------------------------------------------------- orchestration


def run_worker(framework: str, mode: str, args: argparse.Namespace, img_size: int,
               batch: int) -> Result:
  """Runs one measurement in a fresh Python process and parses its JSON result."""
  command = [sys.executable, "-m", "focal_jax.benchmark", "--worker", framework,
             "--worker-mode", mode, "--model", args.model, "--img-size", str(img_size),
             "--batch", str(batch), "--dtype", args.dtype, "--repeats", str(args.repeats),
             "--warmup", str(args.warmup), "--num-classes", str(args.num_classes)]
  if args.tiny:
    command.append("--tiny")
  proc = subprocess.run(command, capture_output=True, text=True)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(_RESULT_MARK):
      return Result(**json.loads(line[len(_RESULT_MARK):]))
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
  return Result(framework, mode, args.model, img_size, batch, args.dtype, float("nan"), [],
                float("nan"), float("nan"), float("nan"),
                error=f"worker exited with {proc.returncode}: " + " | ".join(tail))


def results_table(results: list[Result]) -> str:
  """Markdown table: one row per measurement, with the JAX / PyTorch ratio per setting."""
  by_key = {(r.framework, r.mode, r.img_size, r.batch): r for r in results}
  lines = ["| framework | mode | img | batch | dtype | img/s | JAX/PyTorch | first call s "
           "| peak RSS MiB | peak RSS by compile end MiB | RSS after imports MiB | XLA temp MiB "
           "| recompiles | page faults / call | kernel CPU s / call | other CPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    ratio = "-"
    other = by_key.get(("torch", r.mode, r.img_size, r.batch))
    if r.framework == "jax" and other is not None and other.images_per_s > 0:
      ratio = f"{r.images_per_s / other.images_per_s:.2f}x"
    first = "compile " + _fmt(r.first_call_s) if r.framework == "jax" else _fmt(r.first_call_s)
    lines.append(
        f"| {r.framework} | {r.mode} | {r.img_size} | {r.batch} | {r.dtype} | "
        f"{_fmt(r.images_per_s)} | {ratio} | {first} | {_fmt(r.peak_rss_mb, 0)} | "
        f"{_fmt(r.compile_peak_rss_mb, 0)} | "
        f"{_fmt(r.base_rss_mb, 0)} | {_fmt(r.xla_temp_mb, 0)} | "
        f"{r.recompiles if r.framework == 'jax' else '-'} | {_fmt(r.page_faults, 0)} | "
        f"{_fmt(r.kernel_cpu_s)} | {_fmt(r.other_cpu)} |")
  errors = [f"- {r.framework} {r.mode} {r.img_size}: {r.error}" for r in results if r.error]
  return "\n".join(lines + ([""] + errors if errors else []))


def growth_lines(results: list[Result]) -> list[str]:
  """Per-image cost relative to the smallest size, per framework (inference)."""
  lines = []
  for framework in ("jax", "torch"):
    rows = sorted((r for r in results if r.framework == framework and r.mode == "inference"
                   and r.images_per_s == r.images_per_s), key=lambda r: r.img_size)
    if len(rows) < 2:
      continue
    base = rows[0]
    growth = ", ".join(f"{r.img_size}: {base.images_per_s / r.images_per_s:.2f}x"
                       for r in rows[1:])
    lines.append(f"- {framework} cost per image relative to {base.img_size}: {growth}")
  return lines


def report(args: argparse.Namespace, results: list[Result], env: dict[str, str]) -> str:
  command = "python -m focal_jax.benchmark " + " ".join(sys.argv[1:])
  lines = [f"### `{command}`", "",
           ", ".join(f"{k}: {v}" for k, v in env.items()), "",
           f"model {args.model}{' (tiny overrides)' if args.tiny else ''}, warmup {args.warmup}, "
           f"repeats {args.repeats} (medians)", "", results_table(results)]
  growth = growth_lines(results)
  if growth:
    lines += [""] + growth
  return "\n".join(lines) + "\n"


def _sizes(text: str) -> tuple[int, ...]:
  """'224,448,896' -> (224, 448, 896)."""
  try:
    sizes = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a comma-separated list of image sizes, e.g. 224,448,896") from None
  return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.benchmark",
      description="Throughput, compile time and peak memory of focal_jax vs the PyTorch reference.")
  parser.add_argument("--task", choices=("classification", "segmentation"),
                      default="classification",
                      help="segmentation: focal_jax's UPerNet vs transformers' UperNet + Swin-T "
                           "(focal_jax.segmentation_benchmark)")
  parser.add_argument("--model", default="focal_tiny", help="variant name (default focal_tiny)")
  parser.add_argument("--tiny", action="store_true",
                      help=f"shrink the variant with {TINY_OVERRIDES} (for smoke tests)")
  parser.add_argument("--img-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--num-classes", type=int, default=None,
                      help="default 1000 (classification) or 150 (segmentation)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
  parser.add_argument("--mode", choices=("inference", "train", "both", "input"), default="both",
                      help="input: host input throughput (options: python -m "
                           "focal_jax.data.throughput --help)")
  parser.add_argument("--sweep", action="store_true",
                      help="inference at each of --sizes (--img-size: only for --mode train/both)")
  parser.add_argument("--sizes", type=_sizes, default=SWEEP_SIZES, metavar="S1,S2,...",
                      help="image sizes of --sweep; per-image cost is reported relative to the "
                           f"smallest (default {','.join(map(str, SWEEP_SIZES))})")
  parser.add_argument("--rounds", type=int, default=3,
                      help="segmentation: interleaved rounds of --repeats calls per framework")
  parser.add_argument("--json", help="segmentation: write the results as JSON to this file")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--no-jax", action="store_true", help="skip focal_jax")
  parser.add_argument("--output", help="append the markdown report to this file")
  parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                      help="before each measurement wait up to SECONDS until other processes "
                           "use less than 0.25 CPU cores (shared machines)")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--worker-mode", choices=("inference", "train"), help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args(argv)
  if args.num_classes is None:
    args.num_classes = 150 if args.task == "segmentation" else 1000
  args.input_argv = rest  # the options of focal_jax.data.throughput, for --mode input
  if rest and args.mode != "input":
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  if args.mode == "input":
    return args
  if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
    parser.error("--batch and --repeats must be >= 1 and --warmup >= 0.")
  if args.worker:  # checked by the parent; a worker imports only what it measures
    return args
  if args.task == "segmentation" and (args.sweep or args.rounds < 1):
    parser.error("--task segmentation measures one --img-size (no --sweep) in --rounds >= 1.")
  from focal_jax.models import make_model_config

  checks = [("--model", args.model, {})]  # the variant, then every size, before any worker
  checks += [("--sizes", size, {"img_size": size}) for size in args.sizes] if args.sweep else []
  if not args.sweep or args.mode != "inference":
    checks.append(("--img-size", args.img_size, {"img_size": args.img_size}))
  for flag, value, size in checks:
    try:
      make_model_config(args.model, num_classes=args.num_classes, **size, **model_overrides(args))
    except ValueError as error:
      parser.error(f"{flag} {value}: {error}")
  return args


def main(argv: list[str] | None = None) -> list:
  """Model measurements (list of Result), or with --mode input the input throughput
  measurements (list of focal_jax.data.throughput.InputResult)."""
  args = parse_args(argv)
  if args.mode == "input":
    from focal_jax.data import throughput  # noqa: PLC0415  (imports TensorFlow)

    return throughput.main(args.input_argv)
  if args.task == "segmentation":
    from focal_jax import segmentation_benchmark  # noqa: PLC0415

    return segmentation_benchmark.main(args)
  if args.worker:  # inside a worker process: one measurement, one JSON line
    result = (run_jax if args.worker == "jax" else run_torch)(args)
    print(_RESULT_MARK + json.dumps(dataclasses.asdict(result)), flush=True)
    return [result]

  frameworks = [f for f, skip in (("jax", args.no_jax), ("torch", args.no_torch)) if not skip]
  if args.sweep:
    settings = [("inference", size) for size in args.sizes]
    if args.mode in ("train", "both"):
      settings.append(("train", args.img_size))
  else:
    modes = ("inference", "train") if args.mode == "both" else (args.mode,)
    settings = [(mode, args.img_size) for mode in modes]
  env = environment()
  results = []
  for mode, size in settings:
    for framework in frameworks:
      if args.wait_quiet > 0:
        wait_for_quiet(0.25, args.wait_quiet)
      result = run_worker(framework, mode, args, size, args.batch)
      results.append(result)
      print(f"{framework:5s} {mode:9s} {size:4d}px batch {args.batch}: "
            f"{_fmt(result.images_per_s)} img/s, first call {_fmt(result.first_call_s)} s, "
            f"peak RSS {_fmt(result.peak_rss_mb, 0)} MiB"
            + (f", recompiles {result.recompiles}" if framework == "jax" else "")
            + f", other processes {_fmt(result.other_cpu)} cores"
            + (f"  ERROR {result.error}" if result.error else ""), flush=True)
  env["load average (1/5/15 min)"] += " (start) / " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (end)"
  text = report(args, results, env)
  print()
  print(text)
  if args.output:
    with open(args.output, "a") as f:
      f.write("\n" + text)
  return results


def cli() -> None:
  """The `focal-jax-benchmark` command: exits with 1 when a measurement failed."""
  results = main()
  sys.exit(1 if any(r.error for r in results) else 0)


if __name__ == "__main__":
  cli()
