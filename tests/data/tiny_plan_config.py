"""A two-stage Focal Transformer on 16x16 images: the smallest step the plan tests compile
(every kind of kernel of the full step, in seconds rather than minutes)."""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.name = ""
  config.model.overrides = dict(
      patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
      focal_levels=(2, 2), focal_windows=(3, 1), expand_sizes=(2, 2), drop_path_rate=0.05)
  config.image_size = 16
  config.mixup.prob = 0.0  # label smoothing only
  config.mixup.group_size = 0
  return config
