"""Timing and machine facts shared by the benchmarks (`focal_jax.benchmark`,
`focal_jax.segmentation_benchmark`): timed calls with the page faults, kernel time and other
processes' CPU use they saw, resident memory, the machine and library versions."""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
from typing import Any, Callable


def rss_mb() -> float:
  """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except OSError:
    return peak_rss_mb()


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def num_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cpu_seconds() -> float | None:
  """Machine-wide non-idle CPU time so far (Linux /proc/stat), in seconds."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Timing:
  """What `timed_calls` measured."""

  times: list[float]  # wall seconds per call
  other_cpu: float | None  # cores other processes kept busy meanwhile
  page_faults: float  # minor page faults per call
  kernel_cpu_s: float  # system CPU seconds per call


def timed_calls(call: Callable[[], Any], warmup: int, repeats: int) -> Timing:
  """Times `repeats` calls after `warmup` untimed ones.

  Page faults and kernel time per call show how much freshly mapped memory a call
  touches: on virtual machines a first touch of a 4 KiB page costs microseconds.
  """
  for _ in range(warmup):
    call()
  times = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  busy, own, start_all = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  other = None
  if busy is not None:
    elapsed = time.perf_counter() - start_all
    others = (busy_cpu_seconds() - busy) - (sum(os.times()[:2]) - own)
    other = max(0.0, others / elapsed)
  after = resource.getrusage(resource.RUSAGE_SELF)
  return Timing(times, other, (after.ru_minflt - usage.ru_minflt) / repeats,
                (after.ru_stime - usage.ru_stime) / repeats)


def wait_for_quiet(max_cores: float, timeout_s: float) -> float | None:
  """Waits (up to `timeout_s`) until other processes use less than `max_cores` CPU cores,
  probing 3 s at a time. Returns the last probe's busy cores (None without /proc/stat)."""
  deadline = time.monotonic() + timeout_s
  while True:
    busy = busy_cpu_seconds()
    if busy is None:
      return None
    time.sleep(3.0)
    cores = (busy_cpu_seconds() - busy) / 3.0
    if cores < max_cores or time.monotonic() > deadline:
      return cores
    time.sleep(7.0)


def environment() -> dict[str, str]:
  """Machine and library versions, for the record."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch"):
    try:
      module = __import__(name)
      versions[name] = module.__version__
    except ImportError:
      versions[name] = "not installed"
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  allocator = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                       if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")) or "default"
  return {"cpu": cpu, "cores": str(num_cores()), "python": platform.python_version(),
          **versions, "allocator settings": allocator, "load average (1/5/15 min)": load}


def fmt(value: float | None, digits: int = 2) -> str:
  if value is None or value != value:  # None or NaN
    return "-"
  return f"{value:.{digits}f}"


def train_step_call(config: Any, spec: Any, images: Any, labels: Any, total_steps: int
                    ) -> tuple[Callable[[], None], Callable[[], Any]]:
  """The run's own jitted train step on one device over a fixed batch, as the benchmarks
  time it: (call: one step, state carried over and donated; lower: the step lowered)."""
  import jax  # noqa: PLC0415  (JAX only in the worker that times it)

  from focal_jax.training import sharding  # noqa: PLC0415
  from focal_jax.training import train_state as ts  # noqa: PLC0415
  from focal_jax.training.train_step import step_setup  # noqa: PLC0415

  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  # The step counts set only the schedule's constants.
  setup = step_setup(config, spec, mesh, steps_per_epoch=1, total_steps=total_steps)
  step = setup.train_step(config, spec, mesh)
  placed = sharding.batch_sharding(mesh)
  batch = {"image": jax.device_put(images, placed), "label": jax.device_put(labels, placed)}
  rest = ts.init_rest(spec, mesh)
  holder = {"state": ts.create_train_state(spec, setup.tx, setup.shardings, mesh, config.seed)}

  def call():
    holder["state"], metrics = step(holder["state"], batch, rest)
    metrics["loss"].block_until_ready()

  return call, lambda: step.lower(holder["state"], batch, rest)
