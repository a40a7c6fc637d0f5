"""An optional hint that keeps activations split by example over devices.

A training step sets it (`split_batch(sharding)`) while it traces the model; each block's
output is then constrained to that sharding. Without it, XLA's sharding propagation may
follow the parameters' FSDP sharding (channels split over devices) into the activations and
hold every example on every device: under `lax.scan` this took 2.5x the temporaries.
Without the hint (inference, a single device) `keep_batch_split` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_SHARDING: contextvars.ContextVar[jax.sharding.Sharding | None] = contextvars.ContextVar(
    "focal_jax_batch_sharding", default=None)


@contextlib.contextmanager
def split_batch(sharding: jax.sharding.Sharding | None) -> Iterator[None]:
  """Within this context, block outputs are constrained to `sharding` (leading dimension
  over the devices)."""
  token = _SHARDING.set(sharding)
  try:
    yield
  finally:
    _SHARDING.reset(token)


def keep_batch_split(x: jax.Array) -> jax.Array:
  """x constrained to the sharding `split_batch` set, or x itself when none is set."""
  sharding = _SHARDING.get()
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
