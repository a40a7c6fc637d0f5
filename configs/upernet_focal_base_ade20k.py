"""UPerNet with a Focal-B backbone on ADE20K, 512x512 crops, 160k iterations: the recipe
of the UPerNet ADE20K configs Swin and FocalNet released for mmsegmentation (SPEC section 12;
the official Focal README: Focal-B 49.0 mIoU single-scale).

  python main.py --config configs/upernet_focal_base_ade20k.py --workdir DIR \\
      --config.manual_dir=DIR_WITH_ADEChallengeData2016.zip \\
      --config.init_from=focal-base-is224-ws7.pth   # the ImageNet backbone (export or .pth)
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()
  config.task = "segmentation"
  config.model.name = "focal_base"
  config.model.overrides.drop_path_rate = 0.3
  config.init_from = ""  # the backbone's ImageNet weights: --config.init_from=FILE_OR_EXPORT
  config.dataset = "ade20k"  # built from ADEChallengeData2016.zip in manual_dir
  config.train_split = "train"  # 20,210 images
  config.eval_split = "validation"  # 2,000 images, each at its test size
  config.image_size = 512  # the training crop
  config.shuffle_buffer = 1000
  config.mixup.prob = 0.0  # no mixup in segmentation
  config.mixup.group_size = 0

  # AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01 (none for names holding
  # absolute_pos_embed, relative_position_bias_table or norm); no gradient clipping.
  config.batch_size = 16  # 2 per GPU x 8 GPUs
  config.num_train_steps = 160_000
  config.lr_schedule = "poly"  # power 1.0 to 0, after a linear warmup from ratio 1e-6
  config.poly_power = 1.0
  config.warmup_steps = 1500
  config.base_lr = 6e-5
  config.warmup_lr = 6e-11  # warmup_ratio 1e-6
  config.min_lr = 0.0
  config.lr_base_batch_size = 16  # the rates above are the actual rates
  config.weight_decay = 0.01
  config.adam_b1, config.adam_b2 = 0.9, 0.999
  config.grad_clip_norm = 0.0

  config.segmentation.eval_mode = "whole"  # "slide": crop 512, stride 341
  config.log_every_steps = 50
  config.eval_every_steps = 16_000
  config.checkpoint_every_steps = 16_000
  return config
