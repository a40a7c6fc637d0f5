"""Device memory of a compiled step: what XLA reserves per device, against the capacity.

XLA's `memory_analysis()` of a compiled executable gives, per device, the bytes of the
arguments, outputs, the outputs that reuse (alias) donated arguments, the temporaries and
the generated code. A step needs about `arguments + outputs - aliased + temporaries + code`
at its peak. Memory is close to affine in the batch, so two compiles at different batches
predict the largest one that fits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

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
