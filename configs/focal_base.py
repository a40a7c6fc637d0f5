"""focal_base: the official ImageNet-1K recipe
(upstream configs/focal_base_patch4_window7_224.yaml).

  python main.py --config configs/focal_base.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focal_base"
  config.model.overrides.drop_path_rate = 0.5
  # Officially 64 per GPU x 2 accumulation steps x 8 GPUs: 1024 per optimiser step, learning
  # rates scaled by 1024 / 512. Here batch_size is the examples per optimiser step and
  # grad_accum_steps splits it into micro-batches (memory); each micro-batch of 512 is
  # mixed in groups of 64, as each GPU mixed its own 64.
  config.batch_size = 1024
  config.grad_accum_steps = 2
  config.mixup.group_size = 64
  return config
