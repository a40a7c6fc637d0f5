"""TensorBoard event files for scalars, written by TensorFlow's own event writer.

Why this writer: TensorFlow is already a dependency (the input pipeline), and its writer
goes through TensorFlow's file-system layer, so a `gs://` log directory works as a local
one. Of TensorFlow's writers, `tf.compat.v1.summary.FileWriter` is the one that can write a
`SessionLog(START)` event: TensorBoard's loader takes it as "the run restarted at this
step" and drops the points at and after that step it already holds, which is how a
resumed run tells TensorBoard that the steps after its checkpoint were rewritten. The
`tf.summary` (v2) writers, `flax.metrics.tensorboard` and `clu` (built on them) cannot write
that event; `tensorboardX` can (`purge_step`), but would be one more dependency with its
own file layer. The v1 writer refuses to be built under eager execution, so it is built
inside a private `tf.Graph` (it runs no graph: events go straight to the file).

Scalars are `simple_value` summaries (float32, as TensorBoard stores every scalar). Every
write is flushed, so a run killed with SIGKILL loses no point it logged.

A remote logdir (`gs://...`) is written through `focal_jax.storage` like every other file
of a workdir: the writer fills a local event file, and each flush uploads it whole (the
object is replaced; scalar event files stay small). TensorFlow's own GCS client would
work against real buckets, but it has no endpoint setting, so it cannot be pointed at a
local GCS emulator; this way the same code path is tested and used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from focal_jax import storage


class ScalarWriter:
  """Appends scalar summaries to a new event file in `logdir` (a local path or `gs://`).

  `purge_step`: the first step this run writes again after a restart; TensorBoard then
  forgets the points of earlier runs at steps >= purge_step.
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    import tensorflow as tf  # noqa: PLC0415  heavy: only when metrics are written

    self._tf = tf
    # Unique and in creation order within a second: TensorBoard reads the files of a
    # directory in name order, and the name otherwise holds only the second and the host.
    suffix = f".{time.time_ns()}.{os.getpid()}"
    self._logdir = logdir
    remote = storage.is_remote(logdir)
    self._staging = tempfile.mkdtemp(prefix="focal_jax_events_") if remote else None
    with tf.Graph().as_default():
      self._writer = tf.compat.v1.summary.FileWriter(self._staging or logdir, flush_secs=3600,
                                                     filename_suffix=suffix)
    if purge_step is not None:
      self._writer.add_session_log(
          tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START), int(purge_step))
    self._flush()

  def _flush(self) -> None:
    self._writer.flush()
    if self._staging is not None:  # upload the local event file whole
      storage.makedirs(self._logdir)
      for name in os.listdir(self._staging):
        storage.upload(os.path.join(self._staging, name), storage.join(self._logdir, name))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    values = [self._tf.compat.v1.Summary.Value(tag=tag, simple_value=float(value))
              for tag, value in scalars.items()]
    self._writer.add_summary(self._tf.compat.v1.Summary(value=values), int(step))
    self._flush()

  def close(self) -> None:
    if self._writer is not None:
      self._flush()
      self._writer.close()
      self._writer = None
      if self._staging is not None:
        shutil.rmtree(self._staging, ignore_errors=True)
