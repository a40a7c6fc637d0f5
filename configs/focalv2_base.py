"""focalv2_base (Focal-fast-B): the official ImageNet-1K recipe
(upstream configs/focalv2_base_useconv_patch4_window7_224.yaml: the focal_base_conv recipe,
focal_topK 128, which the focalv2_base variant carries).

  python main.py --config configs/focalv2_base.py --workdir DIR --config.data_dir=...
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()  # = configs/base.py
  config.model.name = "focalv2_base"
  config.model.overrides.drop_path_rate = 0.5
  # Officially 64 per GPU x 2 accumulation steps x 8 GPUs, as for focal_base_conv: 1024 per
  # optimiser step in micro-batches of 512, each mixed in groups of 64.
  config.batch_size = 1024
  config.grad_accum_steps = 2
  config.mixup.group_size = 64
  return config
