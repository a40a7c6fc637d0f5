"""focalv2_tiny (Focal-fast-T): the official ImageNet-1K recipe
(upstream configs/focalv2_tiny_useconv_patch4_window7_224.yaml: the focal_tiny_conv recipe,
focal_topK 128, which the focalv2_tiny variant carries).

  python main.py --config configs/focalv2_tiny.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focalv2_tiny"
  config.model.overrides.drop_path_rate = 0.2
  config.batch_size = 1024  # 128 per GPU x 8 GPUs
  return config
