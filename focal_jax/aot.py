"""Compile the training step for a TPU slice or NVIDIA GPUs on any machine, before renting.

    python -m focal_jax.aot --model focal_tiny --topology v5e:2x2 --batch-per-chip 128 --json
    python -m focal_jax.aot --config configs/focal_base.py --topology v5e:2x2 \\
        --batch-per-chip 128 --remat --max-batch
    python -m focal_jax.aot --model focal_tiny --topology h100:8 --batch-per-chip 128

With `jax[tpu]` installed (it brings libtpu), XLA compiles for a TPU topology without the
hardware; with the `gpu-plan` packages (focal_jax.cuda_compiler) it compiles for GPUs that
`focal_jax.accelerators` describes. The topology's devices are described, the train step
of `focal_jax.training` (the one `main.py` runs: the config's optimiser, mixup, clipping,
accumulation and EMA) is lowered with abstract arguments sharded over a mesh of those
devices, and the compiled program tells the memory each device needs, its FLOPs and bytes
moved (with the roofline they set and where the bytes go, focal_jax.hlo_cost) and the
operations in it. Nothing is allocated and no data is read.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Sequence

# Compiling opens no TPU chip, so several compiles (and a training run) may load libtpu at
# once; without this libtpu refuses every process but the first (its lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF comes in with the input pipeline

import jax  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from focal_jax import accelerators, cuda_compiler, hlo_cost, vit_reference  # noqa: E402
from focal_jax.accelerators import GPU_CARDS, TPU_GENERATIONS, TpuGeneration  # noqa: E402
from focal_jax.models.flops import xla_flops  # noqa: E402
from focal_jax.training import memory, sharding  # noqa: E402
from focal_jax.training import train_state as ts  # noqa: E402
from focal_jax.training.tasks import get_task  # noqa: E402
from focal_jax.training.config import (default_config, load_config_file,  # noqa: E402
                                       validate_config)
from focal_jax.training.train_step import step_setup  # noqa: E402

GIB = memory.GIB
IMAGENET_TRAIN_EXAMPLES = 1_281_167  # sets the schedule's constants only
DEFAULT_CLASSES = {"classification": 1000, "segmentation": 150}  # ImageNet-1K, ADE20K


# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION).
DEFAULT_GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """What a compile is measured against: the memory one device may use, its peak FLOP/s
  for the step's dtype and its memory bandwidth."""

  hbm_bytes: int
  peak_flops: dict[str, float]  # compute dtype -> FLOP/s
  bandwidth: float  # bytes/s
  compiler_options: dict[str, str] = dataclasses.field(default_factory=dict)


def tpu_target(generation: TpuGeneration) -> Target:
  # TPU matrix units multiply float32 inputs in one bfloat16 pass by default.
  peak = generation.peak_bf16_flops
  return Target(generation.hbm_bytes, {"bfloat16": peak, "float32": peak},
                generation.hbm_bandwidth)


def gpu_target(card: accelerators.GpuCard) -> Target:
  # float32 products run on TensorFloat-32 by default (matmul_precision "default").
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
  return Target(int(card.memory_bytes * fraction),
                {"bfloat16": card.peak_bf16_flops, "float32": card.peak_tf32_flops},
                card.memory_bandwidth, cuda_compiler.compiler_options())

# HLO opcodes counted in the report; collectives also in their asynchronous "-start" form.
COUNTED_OPS = ("gather", "scatter", "copy", "transpose")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(")


class AotError(ValueError):
  """A setting the tool cannot compile for; the message says what to change."""


def install_line() -> str:
  return f'pip install "jax[tpu]=={jax.__version__}"'


def gpu_devices(topology: str) -> tuple[list[Any], Target]:
  """The compile-only devices of GPU hosts such as 'h100:8' or 'a100-40gb:2x8'."""
  name, _, shape = topology.partition(":")
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
  if name not in GPU_CARDS or match is None:
    raise AotError(f"Unknown topology {topology!r}: expected CARD:GPUS or CARD:HOSTSxGPUS "
                   f"with CARD one of {', '.join(GPU_CARDS)}, e.g. h100:8 or h100:2x8.")
  hosts, per_host = int(match.group(1) or 1), int(match.group(2))
  card = GPU_CARDS[name]
  try:
    devices = cuda_compiler.gpu_devices(card.target_config(), hosts, per_host)
  except cuda_compiler.CudaCompilerMissing as error:
    raise AotError(str(error)) from error
  return devices, gpu_target(card)


def topology_devices(topology: str) -> tuple[list[Any], Target]:
  """The compile-only devices of a TPU slice or GPU hosts, and what they offer."""
  if topology.partition(":")[0] in GPU_CARDS:
    return gpu_devices(topology)
  devices, generation = tpu_devices(topology)
  return devices, tpu_target(generation)


def tpu_devices(topology: str) -> tuple[list[Any], TpuGeneration]:
  """The compile-only devices of a slice such as 'v5e:2x2' or 'v4:2x2x1'."""
  if importlib.util.find_spec("libtpu") is None:
    raise AotError(f"Compiling for TPU needs libtpu, which is not installed. Install it with: "
                   f"{install_line()}")
  generation, _, shape = topology.partition(":")
  if generation not in TPU_GENERATIONS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise AotError(f"Unknown topology {topology!r}: expected GENERATION:SHAPE with GENERATION "
                   f"one of {', '.join(TPU_GENERATIONS)} and SHAPE chips per axis, e.g. "
                   "v5e:2x2, v6e:4x4, v4:2x2x1 or v5p:2x2x2; or CARD:GPUS with CARD one of "
                   f"{', '.join(GPU_CARDS)}, e.g. h100:8.")
  from jax.experimental import topologies  # noqa: PLC0415
  spec = TPU_GENERATIONS[generation]
  kwargs = {"chip_config_name": spec.chip_config} if spec.chip_config else {}
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as error:  # noqa: BLE001  libtpu refuses shapes its generation lacks
    raise AotError(f"libtpu does not know the topology {topology!r}: {error}") from error
  return list(description.devices), spec


def load_config(path: str | None) -> ml_collections.ConfigDict:
  """`get_config()` of a configs/*.py file, or the default (official Focal-T) recipe."""
  if not path:
    return default_config()
  try:
    return load_config_file(path)
  except (FileNotFoundError, ValueError) as error:
    raise AotError(f"--config {path}: {error}") from error


def step_config(base: ml_collections.ConfigDict, args: argparse.Namespace, chips: int,
                batch_per_chip: int) -> ml_collections.ConfigDict:
  """The training config compiled: `base` with the command line's model, batch and mesh."""
  config = ml_collections.ConfigDict(base.to_dict())
  if args.model == vit_reference.NAME:
    config.model.name = ""  # built by vit_reference, not from the registry
  elif args.model:
    config.model.name = args.model
  if args.dtype:
    config.dtype = args.dtype
  if args.img_size:
    config.image_size = args.img_size
  if args.remat:
    config.model.overrides.remat = True
  if args.grad_accum:
    config.grad_accum_steps = args.grad_accum
  if chips % args.fsdp:
    raise AotError(f"--fsdp {args.fsdp} does not divide the {chips} chips of the slice; use a "
                   f"divisor of {chips}.")
  config.mesh.data, config.mesh.fsdp = chips // args.fsdp, args.fsdp
  config.batch_size = batch_per_chip * chips
  accum = config.grad_accum_steps
  if batch_per_chip % accum:
    raise AotError(f"{batch_per_chip} examples per chip cannot be split into grad_accum_steps="
                   f"{accum} equal micro-batches; use a multiple of {accum}.")
  try:
    validate_config(config)
  except ValueError as error:
    raise AotError(str(error)) from error
  return config


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
  """Counts of the reported opcodes in an HLO module's text (fusion bodies included)."""
  opcodes = collections.Counter()
  for line in hlo_text.splitlines():
    match = _OPCODE.search(line)
    if match:
      opcodes[match.group(1)] += 1
  counts = {op: opcodes[op] + opcodes[f"{op}-start"] for op in COUNTED_OPS}
  counts["collective"] = sum(opcodes[op] + opcodes[f"{op}-start"] for op in COLLECTIVES)
  return counts


def model_spec(config: ml_collections.ConfigDict, num_classes: int,
               reference: bool = False) -> ts.ModelSpec:
  """The compiled model: the config's, or the ViT-S/16 reference."""
  if reference:
    return vit_reference.model_spec(num_classes, config.image_size, ts.DTYPES[config.dtype],
                                    config.seed)
  return get_task(config).model_spec(config, num_classes)


def model_step_flops(spec: ts.ModelSpec, examples: int) -> float:
  """FLOPs of a training step on `examples` images from the model alone: three times XLA's
  count of the compiled forward pass on the CPU (the backward pass does about twice the
  forward's products); the ViT reference from its products' count."""
  if spec.name == vit_reference.NAME:
    forward = 2 * vit_reference.official_macs(spec.img_size, spec.num_classes)
  else:
    forward = xla_flops(nnx.eval_shape(spec.create), spec.img_size)
  return 3.0 * forward * examples


def compile_step(config: ml_collections.ConfigDict, devices: list[Any], num_classes: int,
                 hbm_bytes: int, *, reference: bool = False,
                 compiler_options: dict[str, str] | None = None,
                 hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles the train step on a mesh over `devices`; its memory per chip, FLOPs, bytes
  moved (by group) and op counts. When XLA refuses because the step cannot fit in HBM (it
  does, for TPUs), the report says so (`fits` false, `compile_error`), with the bytes the
  error names. XLA:GPU compiles without counting FLOPs: they come from the model then
  (`flops_source` "model"), and the bytes from the program's kernels (focal_jax.hlo_cost).
  `hlo_path`: where to write the compiled program's optimised HLO text."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)
  if config.batch_size % sharding.batch_divisor(mesh):
    raise AotError(f"The global batch {config.batch_size} does not divide over the "
                   f"{sharding.batch_divisor(mesh)} chips; use a multiple of them.")
  spec = model_spec(config, num_classes, reference)
  steps_per_epoch = max(1, IMAGENET_TRAIN_EXAMPLES // config.batch_size)
  total = max(1, int(config.num_epochs * steps_per_epoch))
  setup = step_setup(config, spec, mesh, steps_per_epoch, total)
  step = setup.train_step(config, spec, mesh)
  arguments = setup.abstract_arguments(config, spec, mesh)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract.params))
  start = time.perf_counter()
  compiled, need, refusal = memory.compile_measured(step.lower(*arguments), arguments,
                                                    compiler_options)
  if compiled is None:
    # The state is donated: outputs reuse the argument buffers but for the metrics.
    state_bytes = memory.bytes_per_device(arguments[0])
    argument_bytes = memory.bytes_per_device(arguments)
    report = {"argument_bytes": argument_bytes, "output_bytes": state_bytes,
              "alias_bytes": state_bytes,
              "temp_bytes": None if need is None else need - argument_bytes,
              "code_bytes": None, "total_bytes": need, "hbm_bytes": hbm_bytes, "fits": False,
              "flops_per_chip": None, "flops_source": None, "bytes_accessed_per_chip": None,
              "bytes_by_group": None,
              **{op: None for op in (*COUNTED_OPS, "collective")}, "compile_error": refusal}
  else:
    if hlo_path:
      with open(hlo_path, "w") as f:
        f.write(compiled.as_text())
    per_device = config.batch_size // sharding.batch_divisor(mesh)
    report = analyse(compiled, hbm_bytes, lambda: model_step_flops(spec, per_device))
  return {"params": params, "compile_s": round(time.perf_counter() - start, 1), **report}


def analyse(compiled: jax.stages.Compiled, hbm_bytes: int,
            model_flops: Any = None) -> dict[str, Any]:
  """Memory per chip, whether it fits, FLOPs, bytes moved (in total and by group) and op
  counts of a compiled step. `model_flops()`: the FLOPs when XLA gives none (GPU)."""
  mem = memory.step_memory(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  groups = hlo_cost.cost_by_group(text)
  if cost:
    flops, source = float(cost.get("flops", 0.0)), "xla"
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
  else:
    flops, source = (float(model_flops()), "model") if model_flops else (None, None)
    bytes_accessed = sum(group["bytes"] for group in groups.values())
  report = {"argument_bytes": mem.argument_bytes, "output_bytes": mem.output_bytes,
            "alias_bytes": mem.alias_bytes, "temp_bytes": mem.temp_bytes,
            "code_bytes": mem.code_bytes, "total_bytes": mem.total_bytes,
            "hbm_bytes": hbm_bytes, "fits": mem.total_bytes <= hbm_bytes,
            "flops_per_chip": flops, "flops_source": source,
            "bytes_accessed_per_chip": bytes_accessed, "bytes_by_group": groups}
  report.update(hlo_op_counts(text))
  return report


def roofline(result: dict[str, Any], target: Target) -> dict[str, Any]:
  """FLOP per byte, the device's peak and bandwidth, and the images per second per device
  the roofline allows: no faster than the FLOPs at the peak nor the bytes at the bandwidth."""
  peak = target.peak_flops[result["dtype"]]
  flops, nbytes = result.get("flops_per_chip"), result.get("bytes_accessed_per_chip")
  known = bool(flops) and bool(nbytes)
  return {"peak_flops_per_chip": peak, "hbm_bandwidth_per_chip": target.bandwidth,
          "flops_per_byte": flops / nbytes if known else None,
          "roofline_img_s_per_chip": (result["batch_per_chip"] / max(flops / peak,
                                                                     nbytes / target.bandwidth)
                                      if known else None)}


def default_num_classes(config: ml_collections.ConfigDict) -> int:
  """Classes when --num-classes is not given: as many as the config's per-class loss
  weights, else ImageNet-1K's or ADE20K's."""
  task = config.get("task", "classification")
  weights = config.segmentation.get("class_weight", ()) if "segmentation" in config else ()
  return len(weights) if task == "segmentation" and weights else DEFAULT_CLASSES.get(task, 1000)


def run(args: argparse.Namespace) -> dict[str, Any]:
  devices, target = topology_devices(args.topology)
  chips = len(devices)
  if args.global_batch is not None:
    if args.global_batch % chips:
      raise AotError(f"--global-batch {args.global_batch} does not divide over the {chips} chips "
                     f"of {args.topology}; use a multiple of {chips}.")
    batch_per_chip = args.global_batch // chips
  else:
    batch_per_chip = args.batch_per_chip
  base = load_config(args.config)
  num_classes = args.num_classes or default_num_classes(base)

  def measure(batch: int) -> dict[str, Any]:
    config = step_config(base, args, chips, batch)
    name = args.model if args.model == vit_reference.NAME else config.model.name or "custom"
    result = {"model": name, "topology": args.topology,
              "chips": chips, "batch_per_chip": batch, "global_batch": config.batch_size,
              "grad_accum_steps": config.grad_accum_steps, "dtype": config.dtype,
              "img_size": config.image_size, "remat": bool(args.remat), "fsdp": args.fsdp,
              **compile_step(config, devices, num_classes, target.hbm_bytes,
                             reference=args.model == vit_reference.NAME,
                             compiler_options=target.compiler_options,
                             hlo_path=args.dump_hlo and f"{args.dump_hlo}.{batch}.hlo")}
    result.update(roofline(result, target))
    logging.info("%s", _summary(result))
    return result

  result = measure(batch_per_chip)
  if args.max_batch:
    accum = args.grad_accum or base.grad_accum_steps
    group = base.mixup.group_size if base.mixup.group_size > 0 else 8
    # Per-chip batches that keep whole micro-batches of whole mixup groups on every chip.
    quantum = accum * math.lcm(8, group // math.gcd(group, chips))
    result["max_batch_per_chip"] = max_batch(measure, result, target.hbm_bytes, quantum)
  return result


def max_batch(measure, first: dict[str, Any], capacity: int, quantum: int) -> int:
  """The largest per-chip batch (a multiple of `quantum`) that fits: a line through two
  compiles, then compiles at the answer and below it until one fits, then above it while
  the next one fits (near the capacity XLA:TPU rematerialises on its own, so memory grows
  more slowly than the line says). At most four compiles at or below the line's answer
  and three above it."""
  b1 = first["batch_per_chip"]
  b2 = b1 // 2 if b1 >= 2 * quantum else b1 * 2
  b2 = max(quantum, b2 // quantum * quantum)
  second = measure(b2)
  if first["total_bytes"] is None or second["total_bytes"] is None:
    raise AotError("XLA did not say how much memory the step needs at batch "
                   f"{b1 if first['total_bytes'] is None else b2}; try --max-batch from a "
                   "batch that fits.")
  known = {b1: first["fits"], b2: second["fits"]}

  def fits(batch: int) -> bool:
    if batch not in known:
      known[batch] = measure(batch)["fits"]
    return known[batch]

  guess = memory.largest_batch(b1, first["total_bytes"], b2, second["total_bytes"], capacity,
                               quantum)
  for _ in range(3):
    if guess <= 0 or fits(guess):
      break
    guess -= quantum
  if guess <= 0 or not fits(guess):
    return max((b for b, ok in known.items() if ok), default=0)
  for _ in range(3):
    if not fits(guess + quantum):
      break
    guess += quantum
  return guess


def _gib(value: int | None) -> str:
  return "?" if value is None else f"{value / GIB:.2f}"


def _summary(r: dict[str, Any]) -> str:
  head = (f"{r['model']} on {r['topology']} ({r['chips']} chips), {r['batch_per_chip']} per "
          f"chip, {r['dtype']}{', remat' if r['remat'] else ''}"
          f"{', fsdp ' + str(r['fsdp']) if r['fsdp'] > 1 else ''}: ")
  if r.get("compile_error"):
    return (head + f"does NOT fit: XLA needs {_gib(r['temp_bytes'])} GiB of temporaries and "
            f"{_gib(r['argument_bytes'])} GiB of arguments per chip, the chip has "
            f"{r['hbm_bytes'] / GIB:.0f} GiB ({r['compile_s']:.0f} s)")
  flops = "?" if r["flops_per_chip"] is None else f"{r['flops_per_chip'] / 1e12:.2f}"
  roof = ("" if r.get("flops_per_byte") is None else
          f", {r['bytes_accessed_per_chip'] / 1e9:.1f} GB moved: {r['flops_per_byte']:.1f} "
          f"FLOP/byte, roofline cap {r['roofline_img_s_per_chip']:.0f} img/s per chip")
  return (head + f"{_gib(r['total_bytes'])} of {r['hbm_bytes'] / GIB:.0f} GiB per chip "
          f"({'fits' if r['fits'] else 'does NOT fit'}; arguments {_gib(r['argument_bytes'])}, "
          f"temporaries {_gib(r['temp_bytes'])} GiB), {flops} TFLOP per chip{roof}, "
          f"compiled in {r['compile_s']:.0f} s; HLO: {r['gather']} gather, "
          f"{r['scatter']} scatter, {r['copy']} copy, {r['transpose']} transpose, "
          f"{r['collective']} collective")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="focal-jax-aot", description=__doc__.split("\n\n")[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", help="variant (focal_jax.VARIANTS), or vit_s16_reference (a plain "
                 "ViT-S/16 in the same training step); default: the config's")
  p.add_argument("--topology", required=True,
                 help=f"TPU slice, GENERATION:SHAPE ({', '.join(TPU_GENERATIONS)}), e.g. "
                 f"v5e:2x2; or GPUs, CARD:GPUS or CARD:HOSTSxGPUS ({', '.join(GPU_CARDS)}), "
                 "e.g. h100:8")
  batch = p.add_mutually_exclusive_group(required=True)
  batch.add_argument("--batch-per-chip", type=int, help="examples per chip per optimiser step")
  batch.add_argument("--global-batch", type=int, help="examples per optimiser step, all chips")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="compute dtype (parameters and optimiser state stay float32)")
  p.add_argument("--img-size", type=int, default=0, help="image side; default: the config's")
  p.add_argument("--remat", action="store_true", help="rematerialise each block")
  p.add_argument("--fsdp", type=int, default=1, help="chips that shard parameters (FSDP)")
  p.add_argument("--grad-accum", type=int, default=0,
                 help="micro-batches per step; default: the config's grad_accum_steps")
  p.add_argument("--config", help="a training config (configs/*.py); default: the official "
                 "Focal-T recipe (focal_jax.training.default_config)")
  p.add_argument("--num-classes", type=int,
                 help="default: 1000 (classification), 150 (segmentation; or as many as "
                      "segmentation.class_weight holds)")
  p.add_argument("--max-batch", action="store_true",
                 help="also report the largest batch per chip that fits")
  p.add_argument("--json", action="store_true", help="print the report as one JSON line last")
  p.add_argument("--dump-hlo", metavar="PREFIX", help="write each compiled program's optimised "
                 "HLO to PREFIX.<batch per chip>.hlo (focal_jax.hlo_cost reads it)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
  for positive in ("batch_per_chip", "global_batch", "fsdp", "num_classes"):
    value = getattr(args, positive)
    if value is not None and value <= 0:
      raise SystemExit(f"focal-jax-aot: error: --{positive.replace('_', '-')} must be positive, "
                       f"got {value}.")
  try:
    result = run(args)
  except AotError as error:
    raise SystemExit(f"focal-jax-aot: error: {error}") from None
  if args.max_batch:
    print(f"Largest batch per chip that fits: {result['max_batch_per_chip']}")
  if args.json:
    print(json.dumps(result))
  else:
    print(_summary(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
