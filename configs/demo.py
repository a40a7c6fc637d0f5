"""Demo: a small Focal Transformer learns the built-in `focal_digits` dataset (scikit-learn's
handwritten digits as 32x32 RGB, served by TFDS, no download) on a laptop CPU in minutes.

  python main.py --config configs/demo.py --workdir /tmp/focal_demo
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()
  config.model.name = ""  # no variant: the architecture is given in full below
  config.model.overrides = dict(
      patch_size=2, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), window_size=4,
      focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 1), expand_sizes=(2, 2, 2, 2),
      drop_path_rate=0.05)
  config.dataset = "focal_digits"
  config.train_split = "train"  # 1,433 images
  config.eval_split = "test"  # 364 images
  config.image_size = 32
  config.shuffle_buffer = 2048  # the whole split

  # Digits: no flips (a mirrored 2 is not a 2), gentle crops, no RandAugment or erasing.
  config.augment.crop_scale = (0.5, 1.0)
  config.augment.hflip = 0.0
  config.augment.randaugment = ""
  config.augment.reprob = 0.0
  config.augment.crop_pct = 1.0  # eval on the whole 32x32 image
  config.mixup.prob = 0.0  # label smoothing 0.1 only
  config.mixup.group_size = 0

  config.batch_size = 64
  config.num_epochs = 30.0  # 22 steps per epoch
  config.warmup_epochs = 2.0
  config.base_lr = 2e-3
  config.warmup_lr = 2e-5
  config.min_lr = 2e-5
  config.lr_base_batch_size = 64  # the rates above are the actual rates at batch 64

  config.log_every_steps = 22
  config.eval_every_steps = 110  # every 5 epochs
  config.checkpoint_every_steps = 220
  config.keep_checkpoints = 2
  return config
