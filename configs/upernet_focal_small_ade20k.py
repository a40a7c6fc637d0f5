"""UPerNet with a Focal-S backbone on ADE20K, 512x512 crops, 160k iterations: the recipe
of configs/upernet_focal_tiny_ade20k.py with the Focal-S backbone (the official Focal
README: Focal-S 48.0 mIoU single-scale).

  python main.py --config configs/upernet_focal_small_ade20k.py --workdir DIR \\
      --config.manual_dir=DIR_WITH_ADEChallengeData2016.zip \\
      --config.init_from=focal-small-is224-ws7.pth   # the ImageNet backbone (export or .pth)
"""

import os

from focal_jax.training.config import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(__file__), "upernet_focal_tiny_ade20k.py"))
  config.model.name = "focal_small"
  return config
