"""Base config: the official Focal-T ImageNet-1K recipe (SPEC section 4).

Every key, its meaning and its default live in focal_jax/training/config.py; the variant
files start from here and override what differs. Override any key on the command line:
  python main.py --config configs/base.py --workdir DIR --config.batch_size=256
"""

from focal_jax.training.config import default_config


def get_config():
  return default_config()
