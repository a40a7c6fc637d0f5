"""The training process around the run: distributed start, library log filtering, SIGTERM.

Nothing here knows the model or the data: these are the process-wide settings a run makes
before it builds anything, and the signal handler it holds while it trains.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import ml_collections


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize() when config.distributed.enabled (before any computation)."""
  d = config.distributed
  if not d.enabled or jax.distributed.is_initialized():
    return
  if d.cpu_collectives:  # CPU devices of several processes talk through gloo (or MPI)
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


class _QuietLibraries(logging.Filter):
  """Drops the per-save / per-dataset INFO chatter of orbax and TFDS (they log through
  absl) so progress lines stay readable; their warnings and errors still show."""

  NOISY = ("/orbax/", "/tensorflow_datasets/")

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
  """Installs the filter above on absl's logger (once per process)."""
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())


class StopRequest:
  """Turns SIGTERM (preemption) into a request to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step (with "
                    "several processes, after the step at which they all know).")
    self.requested = True

  def __exit__(self, *exc):
    if threading.current_thread() is threading.main_thread():
      # None: the previous handler was not Python's (e.g. set in C); the default is closest.
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None
                    else signal.SIG_DFL)
