"""Device memory of a compiled step: what XLA reserves per device, against the capacity.

XLA's `memory_analysis()` of a compiled executable gives, per device, the bytes of the
arguments, outputs, the outputs that reuse (alias) donated arguments, the temporaries and
the generated code. A step needs about `arguments + outputs - aliased + temporaries + code`
at its peak. Memory is close to affine in the batch, so two compiles at different batches
predict the largest one that fits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled step (XLA's memory analysis)."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int

  @property
  def total_bytes(self) -> int:
    """Peak bytes the step needs on each device."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def describe(self, capacity: int | None) -> str:
    cap = f" of {capacity / GIB:.2f} GiB" if capacity else ""
    return (f"{self.total_bytes / GIB:.2f} GiB per device{cap} (arguments "
            f"{self.argument_bytes / GIB:.2f}, outputs {self.output_bytes / GIB:.2f}, aliased "
            f"{self.alias_bytes / GIB:.2f}, temporaries {self.temp_bytes / GIB:.2f} GiB)")


def step_memory(compiled: jax.stages.Compiled) -> StepMemory:
  """The memory analysis of a compiled function."""
  m = compiled.memory_analysis()
  return StepMemory(argument_bytes=int(m.argument_size_in_bytes),
                    output_bytes=int(m.output_size_in_bytes),
                    alias_bytes=int(m.alias_size_in_bytes),
                    temp_bytes=int(m.temp_size_in_bytes),
                    code_bytes=int(m.generated_code_size_in_bytes))


def device_capacity(device: Any) -> int | None:
  """Bytes of memory a device offers (its allocator's limit); None when it does not say
  (CPU, compile-only devices)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  compile-only and some CPU devices raise
    return None
  if not stats:
    return None
  limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
  return int(limit) if limit else None


def largest_batch(batch_a: int, bytes_a: int, batch_b: int, bytes_b: int, capacity: int,
                  multiple: int = 1) -> int:
  """The largest batch (a multiple of `multiple`) whose bytes, on the line through the two
  measurements, stay within `capacity`; 0 when even the smallest does not fit."""
  if batch_a == batch_b:
    raise ValueError("Two different batch sizes are needed to fit a line.")
  per_example = (bytes_b - bytes_a) / (batch_b - batch_a)
  fixed = bytes_a - per_example * batch_a
  if per_example <= 0:
    raise ValueError(f"Memory did not grow with the batch ({batch_a}: {bytes_a} bytes, "
                     f"{batch_b}: {bytes_b} bytes); cannot extrapolate.")
  batch = math.floor((capacity - fixed) / per_example)
  return max(0, batch // multiple * multiple)


_OOM_TEMPORARIES = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")
_OOM_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class StepTooLarge(MemoryError):
  """The train step needs more memory per device than the device has; the figures are
  attributes (bytes per device; `largest` is the batch that fits, 0 if none, None if it
  could not be estimated)."""

  def __init__(self, message: str, *, need: int | None, capacity: int, other_batch: int,
               other_need: int | None, largest: int | None):
    super().__init__(message)
    self.need, self.capacity, self.largest = need, capacity, largest
    self.other_batch, self.other_need = other_batch, other_need


def format_bytes(n: int | None) -> str:
  if n is None:
    return "?"
  if n >= GIB // 10:
    return f"{n / GIB:.2f} GiB"
  return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / (1 << 10):.1f} KiB"


def oom_temp_bytes(message: str, argument_bytes: int) -> int | None:
  """The temporaries' bytes per device a compile-time out-of-memory error implies (XLA:TPU
  refuses to compile a program that cannot fit). It names them in one of two forms:
  '... HLO temporaries (27.02G) exceeds available HBM (15.75G)', or, when the temporaries
  alone fit but not with the rest, 'Used 15.77G of 15.75G hbm' (all the program held when
  its allocation failed, arguments included: they are subtracted; a lower bound, like the
  first). None when it names neither."""
  match = _OOM_TEMPORARIES.search(message)
  if match is not None:
    return int(float(match.group(1)) * _UNITS[match.group(2)])
  match = _OOM_USED.search(message)
  if match is not None:
    return max(0, int(float(match.group(1)) * _UNITS[match.group(2)]) - argument_bytes)
  return None


def bytes_per_device(tree: Any) -> int:
  """Bytes of one device's shards of sharded arrays (or ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      itemsize = 8  # a threefry key: two uint32
    else:
      itemsize = jnp.dtype(leaf.dtype).itemsize
    total += math.prod(shape) * itemsize
  return total


def compile_measured(lowered: jax.stages.Lowered, arguments: Any,
                     compiler_options: dict[str, Any] | None = None
                     ) -> tuple[jax.stages.Compiled | None, int | None, str | None]:
  """(compiled or None, peak bytes per device, the compiler's refusal or None).

  A compile that fails for lack of device memory (RESOURCE_EXHAUSTED) gives no executable;
  its bytes are then the arguments' plus the temporaries the error names (None if it names
  none). `compiler_options`: XLA options for this compile."""
  try:
    compiled = lowered.compile(compiler_options or None)
  except jax.errors.JaxRuntimeError as error:
    message = str(error)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    argument_bytes = bytes_per_device(arguments)
    temp = oom_temp_bytes(message, argument_bytes)
    need = None if temp is None else argument_bytes + temp
    return None, need, message.splitlines()[0][:300]
  return compiled, step_memory(compiled).total_bytes, None


def check_step_fits(step: Any, arguments: tuple, capacity: int, batch_size: int,
                    step_at_batch: Callable[[int], tuple[Any, tuple]], quantum: int
                    ) -> jax.stages.Compiled:
  """Compiles `step(*arguments)`, logs its memory per device against `capacity` and returns
  the executable; raises StepTooLarge when it cannot fit, with the largest batch that would
  (from a second compile at a smaller batch: `step_at_batch(b) -> (step, arguments)`).
  `quantum`: batches are multiples of it."""
  compiled, need, refusal = compile_measured(step.lower(*arguments), arguments)
  detail = memory_detail(compiled) if compiled is not None else f" (XLA: {refusal})"
  logging.info("Train step memory: %s per device of %s%s.", format_bytes(need),
               format_bytes(capacity), detail)
  if compiled is not None and need <= capacity:
    return compiled
  other = max(quantum, batch_size // 2 // quantum * quantum)
  if other == batch_size:
    other = 2 * batch_size
  other_step, other_arguments = step_at_batch(other)
  _, other_need, _ = compile_measured(other_step.lower(*other_arguments), other_arguments)
  largest = None
  if need is not None and other_need is not None and other_need != need:
    largest = largest_batch(batch_size, need, other, other_need, capacity, quantum)
    hint = (f"the largest batch_size that fits is about {largest}" if largest > 0 else
            f"no batch_size fits (at batch_size={other} it needs {format_bytes(other_need)})")
  else:
    hint = "its size at a smaller batch could not be measured"
  raise StepTooLarge(
      f"The train step does not fit: batch_size={batch_size} needs {format_bytes(need)} per "
      f"device and the device has {format_bytes(capacity)}; at batch_size={other} it needs "
      f"{format_bytes(other_need)}, so {hint}. Lower batch_size (or raise grad_accum_steps), "
      "set model.overrides.remat=True, shard parameters with mesh.fsdp, or train in "
      "dtype='bfloat16'. `python -m focal_jax.aot` measures these settings for TPU slices "
      "without the hardware.", need=need, capacity=capacity, other_batch=other,
      other_need=other_need, largest=largest)


def memory_detail(compiled: jax.stages.Compiled) -> str:
  m = step_memory(compiled)
  return (f" (arguments {format_bytes(m.argument_bytes)}, outputs {format_bytes(m.output_bytes)}"
          f", aliased {format_bytes(m.alias_bytes)}, temporaries {format_bytes(m.temp_bytes)})")
