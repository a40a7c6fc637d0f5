"""A workdir in a bucket: training, a kill, a damaged checkpoint, the resume, the export,
the metrics, TensorBoard and conversion, all against a GCS API served on 127.0.0.1 by
`gcp-storage-emulator` (tests/gcs_emulator.py, started and stopped here).

How each client is pointed at the emulator:
- tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL;
- etils.epath (orbax's directories and every other file, through focal_jax.storage):
  EPATH_USE_TF=false selects its fsspec backend, gcsfs, which reads STORAGE_EMULATOR_HOST;
  FSSPEC_GCS_TOKEN=anon skips the credential search,
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false the bucket-type lookup over gRPC, which the
  emulator does not serve (each lookup otherwise waits 60 s, then falls back), and
  FSSPEC_GCS_USE_LISTINGS_CACHE=false gcsfs's directory cache, which would not see the
  objects another process wrote (this one watches the training run's checkpoints).
TensorFlow's own GCS client has no endpoint setting (it always calls
storage.googleapis.com), so nothing here goes through it: TensorBoard event files are
uploaded through focal_jax.storage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import focal_jax
from focal_jax import data, storage, weights
from focal_jax.convert import to_torch_state_dict
from focal_jax.convert.__main__ import main as convert_main
from test_reliability import _finish, _start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "focal-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env():
  """A GCS emulator on 127.0.0.1 with an empty bucket; the variables that point every
  client at it, set for this process (restored afterwards) and returned for subprocesses."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), str(port),
       BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      if server.poll() is not None or time.time() > deadline:
        server.kill()
        pytest.fail("the GCS emulator did not start")
      time.sleep(0.1)
  variables = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "EPATH_USE_TF": "false", "FSSPEC_GCS_TOKEN": "anon",
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
               "FSSPEC_GCS_USE_LISTINGS_CACHE": "false"}
  previous = {k: os.environ.get(k) for k in variables}
  os.environ.update(variables)
  # epath reads EPATH_USE_TF once and caches it, fsspec its FSSPEC_* variables at import
  # (TFDS has used both in this process already): read them again.
  import fsspec.config  # noqa: PLC0415
  from etils.epath import gpath  # noqa: PLC0415
  gpath._is_tf_installed.cache_clear()  # noqa: SLF001
  fsspec.config.set_conf_env(fsspec.config.conf)
  try:
    yield variables
  finally:
    gpath._is_tf_installed.cache_clear()  # noqa: SLF001
    for key, value in previous.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  data.get_builder("focal_digits", path)
  return path


def _config_file(path, **changes) -> str:
  path.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                  "from test_training import tiny_config\n\n\ndef get_config():\n"
                  f"  return tiny_config(**{changes!r})\n")
  return str(path)


def _committed_steps(workdir) -> list[int]:
  """The checkpoint steps that orbax finished (on a bucket: those with commit_success.txt)."""
  directory = storage.join(workdir, "checkpoints")
  if not storage.isdir(directory):
    return []
  return sorted(int(name) for name in storage.listdir(directory) if name.isdigit()
                and storage.exists(storage.join(directory, name, "commit_success.txt")))


def test_gs_workdir_trains_is_killed_resumes_and_exports(tmp_path, gcs_env, digits_dir):
  workdir = f"gs://{BUCKET}/runs/tiny"
  config_file = _config_file(
      tmp_path / "tiny.py", dataset="focal_digits", data_dir=digits_dir, eval_split="test",
      eval_batch_size=16, num_train_steps=40, checkpoint_every_steps=4, log_every_steps=4,
      keep_checkpoints=0, **{"mesh.data": 1})
  cache = str(tmp_path / "jax_cache")
  killed = _start(config_file, workdir, tmp_path / "killed.log", devices=1, env=gcs_env,
                  cache_dir=cache)
  deadline = time.time() + 240
  while len(_committed_steps(workdir)) < 2:  # two checkpoints in the bucket, then SIGKILL
    if killed.poll() is not None or time.time() > deadline:
      killed.kill()
      pytest.fail("no two checkpoints in the bucket; output:\n" + _finish(killed)[-3000:])
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  output = _finish(killed)
  assert killed.returncode == -signal.SIGKILL, output[-3000:]
  steps = _committed_steps(workdir)
  assert 8 <= steps[-1] < 40, "the run ended before the kill"
  assert not storage.exists(storage.join(workdir, "export"))
  # Damage the newest checkpoint: its meta item disappears.
  newest = storage.join(workdir, "checkpoints", str(steps[-1]))
  for name in storage.listdir(storage.join(newest, "meta")):
    storage.remove(storage.join(newest, "meta", name))
  rerun = _start(config_file, workdir, tmp_path / "rerun.log", devices=1, env=gcs_env,
                 cache_dir=cache)
  output = _finish(rerun)
  assert rerun.returncode == 0, output[-3000:]
  assert f"Restored checkpoint step {steps[-2]}" in output
  aside = storage.join(workdir, "damaged_checkpoints", str(steps[-1]))
  assert f"Moved it to {aside}" in output and storage.isdir(aside)
  assert _committed_steps(workdir)[-1] == 40
  # metrics.jsonl: each step once, the rewritten ones too; TensorBoard: one file per run.
  records = [json.loads(line) for line in
             storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == list(range(4, 41, 4))
  assert [r["step"] for r in records if "eval/top1" in r] == [40]
  events = storage.listdir(storage.join(workdir, "tensorboard"))
  assert len(events) == 2 and all(name.startswith("events.out.tfevents.") for name in events)
  assert storage.exists(storage.join(workdir, "config.json"))
  assert storage.exists(storage.join(workdir, "training_curves.png"))
  # The export, read from the bucket; converted from the bucket into the bucket.
  export = storage.join(workdir, "export")
  model = weights.load_exported_model(export)
  target = f"gs://{BUCKET}/converted/tiny.safetensors"
  convert_main(["to-torch", "--checkpoint", export, "--output", target])
  state_dict = weights.load_weights_file(target)
  expected = to_torch_state_dict(model)
  assert state_dict.keys() == expected.keys()
  assert all(np.array_equal(state_dict[k], expected[k]) for k in expected)
  # ... and a fine-tuning start from the bucket's file, with another head.
  description = weights.read_description(export)
  tuned = focal_jax.create_model(None, num_classes=3, img_size=description["img_size"],
                                 checkpoint_path=target,
                                 **weights.overrides_from_json(description["overrides"]))
  np.testing.assert_array_equal(np.asarray(tuned.norm.scale[...]),
                                np.asarray(model.norm.scale[...]))
