"""focalv2_small (Focal-fast-S): the official ImageNet-1K recipe
(upstream configs/focalv2_small_useconv_patch4_window7_224.yaml: the focal_small_conv recipe,
focal_topK 128, which the focalv2_small variant carries).

  python main.py --config configs/focalv2_small.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focalv2_small"
  config.model.overrides.drop_path_rate = 0.3
  config.batch_size = 1024  # 128 per GPU x 8 GPUs
  return config
