"""focal_small_conv: the official ImageNet-1K recipe
(upstream configs/focal_small_useconv_patch4_window7_224.yaml).

  python main.py --config configs/focal_small_conv.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focal_small_conv"
  config.model.overrides.drop_path_rate = 0.3
  config.batch_size = 1024  # 128 per GPU x 8 GPUs
  return config
