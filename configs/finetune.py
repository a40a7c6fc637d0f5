"""Fine-tuning from trained weights (an official `.pth`, a `.safetensors` or a parameter
export) on a new dataset, resolution or number of classes:

  python main.py --config configs/finetune.py --workdir DIR \
      --config.init_from=focal-tiny-is224-ws7.pth --config.dataset=DATASET

The architecture must be the checkpoint's (set `model.name` / `model.overrides` as for the
variant it was trained as; focal_tiny by default). The head is re-initialised when the
number of classes differs; `--config.init_from_exclude='("^head\\.",)'` re-initialises it
anyway. The official Focal Transformer code has no fine-tuning recipe and no layer-wise
learning-rate decay; the schedule below is the fine-tuning recipe of the Swin Transformer
repository, on whose training code the official Focal code is built (its 384 and
22K-to-1K fine-tuning configs): 30 epochs, 5 of warmup, LR 2e-5 (for batch 512), weight
decay 1e-8. Everything else (augmentation, mixup, clipping) stays the base recipe's.
"""

from focal_jax.training.config import default_config


def get_config():
  config = default_config()
  config.init_from = ""  # required: --config.init_from=FILE_OR_EXPORT
  config.num_epochs = 30.0
  config.warmup_epochs = 5.0
  config.base_lr = 2e-5
  config.warmup_lr = 2e-8
  config.min_lr = 2e-7
  config.weight_decay = 1e-8
  return config
