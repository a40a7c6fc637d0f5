"""Demo: UPerNet on a small Focal Transformer learns the built-in `focal_digit_scenes`
(64x64 scenes of scikit-learn digits, each pixel labelled with its digit or background;
TFDS, no download) on a laptop CPU in minutes.

  python main.py --config configs/demo_seg.py --workdir /tmp/focal_demo_seg
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()
  config.task = "segmentation"
  config.model.name = ""  # no variant: the backbone is given in full below
  config.model.overrides = dict(
      patch_size=4, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), window_size=4,
      focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 1), expand_sizes=(2, 2, 2, 2),
      drop_path_rate=0.1, decode_channels=64, auxiliary_channels=32)  # heads: 512, 256
  config.dataset = "focal_digit_scenes"
  config.train_split = "train"  # 1,200 scenes
  config.eval_split = "test"  # 300 scenes
  config.image_size = 64  # the whole scene
  config.shuffle_buffer = 1200
  config.mixup.prob = 0.0
  config.mixup.group_size = 0

  config.batch_size = 16
  config.num_train_steps = 300
  config.lr_schedule = "poly"
  config.warmup_steps = 30
  config.base_lr = 1e-3
  config.warmup_lr = 1e-9  # warmup ratio 1e-6, as the ADE20K recipe
  config.min_lr = 0.0
  config.lr_base_batch_size = 16
  config.weight_decay = 0.01
  config.grad_clip_norm = 0.0

  config.log_every_steps = 25
  config.eval_every_steps = 150
  config.checkpoint_every_steps = 150
  config.keep_checkpoints = 2
  return config
