"""focal_tiny_conv: the official ImageNet-1K recipe
(upstream configs/focal_tiny_useconv_patch4_window7_224.yaml).

  python main.py --config configs/focal_tiny_conv.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focal_tiny_conv"
  config.model.overrides.drop_path_rate = 0.2
  config.batch_size = 1024  # 128 per GPU x 8 GPUs
  return config
