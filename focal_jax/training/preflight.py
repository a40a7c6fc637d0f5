"""Checks that run before anything expensive starts (dataset preparation, compilation):
the workdir can be created and written, and has room for a checkpoint. With several
processes every process checks, and all of them stop if any check fails.

On a bucket (`gs://...`) the write probe is an object written, read back and deleted (it
fails without write permission or with a bucket that does not exist); there is no free
space to check, a bucket's capacity not being fixed.
"""

from __future__ import annotations

import errno
import logging

import jax
import numpy as np

from focal_jax import storage

# Besides one checkpoint and the export: metrics, event files, curves, config.
MARGIN_BYTES = 16 << 20


class WorkdirError(OSError):
  """The workdir cannot be created or written, or has too little free space."""


def all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def check_workdir(workdir: str, checkpoint_bytes: int = 0, keep: int = 1) -> None:
  """Raises WorkdirError unless `workdir` can be created and written by this process and
  its filesystem has room for one checkpoint of `checkpoint_bytes` (plus a margin); warns
  when it has less than room for `keep` + 1 of them (what the saves reach at the peak)."""
  problem = _workdir_problem(workdir, checkpoint_bytes)
  if not all_processes_ok(problem is None):
    raise WorkdirError(problem or f"Another process cannot use the workdir {workdir} (see its "
                       "log); every process needs to write there (a shared filesystem).")
  free = storage.free_bytes(workdir)
  peak = (keep + 1) * checkpoint_bytes + MARGIN_BYTES
  if keep > 0 and free is not None and free < peak:
    logging.warning("The workdir %s has %s free; keeping %d checkpoints of %s needs about %s.",
                    workdir, _size(free), keep, _size(checkpoint_bytes), _size(peak))


def _workdir_problem(workdir: str, checkpoint_bytes: int) -> str | None:
  """What stops this process from using `workdir`, or None."""
  try:
    storage.makedirs(workdir)
  except Exception as error:  # noqa: BLE001  OSError locally; a bucket's client raises its own
    return (f"Cannot create the workdir {workdir}: {error}. Expected a directory this process "
            "can create and write to; pass another --workdir or fix the permissions.")
  probe = storage.join(workdir, f".write_test.{jax.process_index()}")
  try:
    storage.write_bytes(probe, b"\0" * 4096, sync=True)
    if storage.read_bytes(probe) != b"\0" * 4096:
      raise OSError(f"{probe} did not read back what was written")
  except Exception as error:  # noqa: BLE001
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return (f"Cannot write to the workdir {workdir}: {error}. " + (
        "The filesystem is full: free some space or pass another --workdir." if full else
        "Expected a directory this process can write to; pass another --workdir or fix "
        "the permissions."))
  finally:
    try:
      storage.remove(probe)
    except Exception:  # noqa: BLE001  nothing was written
      pass
  needed = checkpoint_bytes + MARGIN_BYTES
  free = storage.free_bytes(workdir)
  if free is not None and free < needed:
    return (f"The workdir {workdir} has {_size(free)} free, but one checkpoint of this run takes "
            f"{_size(checkpoint_bytes)} (about {_size(needed)} with logs): free some space or "
            "pass another --workdir.")
  return None


def _size(num_bytes: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024:
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  return f"{num_bytes:.1f} TiB"
