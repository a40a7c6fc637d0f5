"""Fine-tuning the demo: a model trained on the digits 0-4 learns all ten digits.

  python main.py --config configs/demo.py --workdir /tmp/digits_0to4 \
      --config.dataset=focal_digits/0to4 --config.num_train_steps=44
  python main.py --config configs/demo_finetune.py --workdir /tmp/digits_ft \
      --config.init_from=/tmp/digits_0to4/export

The first run trains the demo model on `focal_digits/0to4` (5 classes) and exports it;
the second starts from that export on `focal_digits` (10 classes): every parameter is
loaded except the head, re-initialised because its shape differs (a warning names it).
`--config.init_from=` (empty) trains the same steps from scratch, for comparison.
"""

import os

from focal_jax.training.config import load_config_file


def get_config():
  config = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
  config.dataset = "focal_digits"  # all ten digits
  config.init_from = ""  # required: --config.init_from=EXPORT_OR_FILE
  config.num_train_steps = 11  # half an epoch
  config.warmup_epochs = 0.0  # the features are trained already
  config.eval_every_steps = 11
  config.checkpoint_every_steps = 0  # the end only
  return config
