"""Train or evaluate a Focal Transformer. The loop lives in focal_jax.training; this file
only reads flags (kept short on purpose, as in the Flax examples).

  python main.py --config configs/demo.py --workdir /tmp/focal_demo
  python main.py --config configs/focal_base.py --workdir DIR --config.data_dir=DATA
  python main.py --config configs/focal_tiny.py --workdir DIR --config.mode=eval
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only the input pipeline

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax.training import train_and_evaluate  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Official weight files in init_from need the official names: the package's reader.
  train_and_evaluate(FLAGS.config, FLAGS.workdir, focal_jax.read_checkpoint_params)


if __name__ == "__main__":
  app.run(main)
