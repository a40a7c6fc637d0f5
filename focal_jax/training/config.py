"""The training configuration: every key, its default (the official ImageNet recipe for
Focal-T, SPEC section 4) and the checks that run before anything expensive starts.

`configs/*.py` start from `default_config()` and override values; a key that is not here is
a mistake (usually a typo) and `validate_config` says so at once.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Any

import ml_collections

from focal_jax import models

MODES = ("train", "eval")
TASKS = ("classification", "segmentation")
LR_SCHEDULES = ("cosine", "poly")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")
MU_DTYPES = ("", "float32", "bfloat16")
CPU_COLLECTIVES = ("gloo", "mpi", "")
# model.overrides that belong to the segmenter rather than its backbone.
SEGMENTER_OPTIONS = ("frozen_stages", "auxiliary_head", "decode_channels", "auxiliary_channels")
# drop_path_rate of a model built from model.overrides alone (no variant) when unset: Focal-T's.
CUSTOM_DROP_PATH_RATE = 0.2


def default_config() -> ml_collections.ConfigDict:
  """All training keys with the official Focal-T / ImageNet-1K recipe as defaults."""
  c = ml_collections.ConfigDict()
  c.mode = "train"  # "train", or "eval": evaluate `checkpoint_path` (default: latest in workdir)
  # What is learnt (focal_jax.training.tasks): "classification" (one label per image) or
  # "segmentation" (UPerNet, one label per pixel; `segmentation` below).
  c.task = "classification"
  c.checkpoint_path = ""  # eval mode: a checkpoint step dir, a checkpoints dir or an export dir
  c.seed = 0  # model init, dropout / stochastic depth, mixup, data order and augmentation
  # Fine-tuning: a fresh run (no checkpoint in the workdir yet) starts from these weights
  # (a parameter export, .pth or .safetensors) instead of a random init; the head is
  # re-initialised when its shape differs, and so is every parameter whose dotted name
  # (e.g. "head.kernel") matches a regular expression of `init_from_exclude`. A resumed
  # run restores its own checkpoint and ignores both.
  c.init_from = ""
  c.init_from_exclude = ()

  c.model = ml_collections.ConfigDict()
  c.model.name = "focal_tiny"  # a variant of focal_jax.models.ALL_VARIANTS, or "" for overrides only
  # Official constructor arguments (SPEC section 1) on top of the variant's values.
  # drop_path_rate unset: the variant's recipe value (T 0.2, S 0.3, B 0.5, conv and Focal-fast
  # alike), so that changing model.name alone trains the variant's recipe.
  c.model.overrides = ml_collections.ConfigDict(
      {"drop_path_rate": ml_collections.config_dict.placeholder(float)})
  c.dtype = "float32"  # activation / compute dtype; parameters and optimiser stay float32
  # jax.default_matmul_precision of the train and eval steps for float32 operands:
  # "default" is each backend's fastest (TPU: one bfloat16 pass; GPU: TensorFloat-32 where
  # the GPU has it; CPU: float32), "high" three bfloat16 passes (TPU), "highest" full
  # float32 everywhere. bfloat16 operands (dtype="bfloat16") are not affected.
  c.matmul_precision = "default"

  c.dataset = "imagenet2012"  # any TFDS image classification dataset; "focal_digits" is built in
  c.data_dir = ""  # TFDS data dir ("" = TFDS default, ~/tensorflow_datasets)
  c.manual_dir = ""  # imagenet2012 tars ("" = <data_dir>/downloads/manual)
  c.train_split = "train"
  c.eval_split = "validation"
  c.image_size = 224
  c.shuffle_buffer = 10_000
  c.data_threads = 0  # tf.data private threads per pipeline (0 = TF default)

  # Augmentation (focal_jax.data.AugmentConfig fields).
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_scale = (0.08, 1.0)
  c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.augment.hflip = 0.5
  c.augment.randaugment = "rand-m9-mstd0.5-inc1"  # "" disables it
  c.augment.reprob = 0.25
  c.augment.remode = "pixel"
  c.augment.recount = 1
  c.augment.crop_pct = 0.875  # eval: resize short side to image_size / crop_pct, centre crop

  # Mixup / CutMix with label smoothing (timm mode "batch"), applied inside the train step.
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.label_smoothing = 0.1
  # Examples mixed together with one draw (timm mixes each GPU's batch: 128 officially).
  # The global batch is cut into groups of this size, independent of the device count.
  c.mixup.group_size = 128

  c.batch_size = 1024  # global batch per optimiser step (all devices, all processes)
  c.eval_batch_size = 0  # 0 = batch_size; rounded up to a multiple of the device count
  c.grad_accum_steps = 1  # the batch is processed in this many sequential micro-batches
  c.num_epochs = 300.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.warmup_epochs = 20.0

  # AdamW; learning rates are for a global batch of `lr_base_batch_size` and scale linearly.
  c.base_lr = 5e-4
  c.warmup_lr = 5e-7
  c.min_lr = 5e-6
  c.lr_base_batch_size = 512
  c.weight_decay = 0.05
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.adam_mu_dtype = ""  # Adam's first moment: "" = the parameters' (float32), or "bfloat16"
  # "cosine" (the official ImageNet one, from warmup_lr) or "poly": mmcv's PolyLrUpdater,
  # (peak - min_lr) * (1 - step / total)**poly_power + min_lr, its first warmup steps scaled
  # linearly from warmup_lr / base_lr to 1 (mmcv's linear warmup, as mmsegmentation uses).
  c.lr_schedule = "cosine"
  c.poly_power = 1.0
  c.warmup_steps = -1  # >= 0 overrides warmup_epochs
  c.grad_clip_norm = 5.0  # global norm; <= 0 disables clipping
  c.ema_decay = 0.0  # > 0 keeps an exponential moving average of the parameters (also evaluated)

  # Devices: a ('data', 'fsdp') mesh; -1 takes the remaining devices. FSDP shards parameters
  # and optimiser state by the logical-axis rules in focal_jax.training.sharding.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Before the first step the compiled train step's memory per device is logged against the
  # device's capacity, and a step that cannot fit stops the run with the largest batch that
  # would. 0: the device's own capacity, on accelerators only; > 0: this many bytes, on any
  # backend (the CPU included).
  c.device_memory_bytes = 0

  # Multi-host: jax.distributed.initialize() before anything else (auto-detected on TPU
  # pods and SLURM / Open MPI; give the coordinator explicitly elsewhere).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ""
  c.distributed.num_processes = 0
  c.distributed.process_id = -1
  # Collectives between the CPU devices of several processes ("gloo" or "mpi"; "" = JAX's
  # default). Only the CPU backend uses it; TPUs and GPUs have their own interconnect.
  c.distributed.cpu_collectives = "gloo"

  # Segmentation (task="segmentation"): image_size is the training crop; images of the eval
  # split are evaluated whole at their test size, or by sliding crops.
  c.segmentation = ml_collections.ConfigDict()
  c.segmentation.auxiliary_loss_weight = 0.4  # FCNHead on stage 3 (decode head: 1.0)
  # One loss weight per class (mmsegmentation's class_weight), or () for none.
  c.segmentation.class_weight = ()
  c.segmentation.eval_mode = "whole"  # or "slide"
  c.segmentation.slide_crop = 512
  c.segmentation.slide_stride = 341
  # Multi-scale + flip evaluation (the "MS" column): eval_scales=(0.5, 0.75, 1.0, 1.25, 1.5,
  # 1.75), eval_flip=True; ratios of the test-scale image, softmaxes averaged.
  c.segmentation.eval_scales = (1.0,)
  c.segmentation.eval_flip = False
  # Training transforms (focal_jax.data.SegAugmentConfig); defaults: mmsegmentation's ADE20K
  # recipe. Random rescale ratio, the crop's largest-class limit (>= 1 disables it),
  # horizontal flip probability, photometric distortion on or off.
  c.segmentation.ratio_range = (0.5, 2.0)
  c.segmentation.cat_max_ratio = 0.75
  c.segmentation.hflip = 0.5
  c.segmentation.photometric = True

  c.log_every_steps = 50
  c.eval_every_steps = 0  # 0 = once per epoch; the end of training is always evaluated
  c.eval_steps = -1  # > 0 evaluates only this many batches (quick looks; not exact)
  c.checkpoint_every_steps = 1000  # and always at the end
  c.keep_checkpoints = 3  # keep the last K; 0 keeps all
  c.export_params = True  # write <workdir>/export (parameters + model.json) at the end
  return c


def _known_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    name = f"{prefix}{key}"
    keys.add(name)
    if isinstance(value, ml_collections.ConfigDict) and name != "model.overrides":
      keys |= _known_keys(value, name + ".")
  return keys


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for unknown keys, an unknown variant, a bad mode or batch setup."""
  known = _known_keys(default_config())
  given = _known_keys(config)
  unknown = sorted(given - known)
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, sorted(known), n=1)
      hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"Unknown config key(s): {', '.join(hints)}. Every key, with its meaning, is listed in "
        "focal_jax/training/config.py (default_config); model options go under "
        "model.overrides with the official constructor names.")
  name = config.model.name
  if name and name not in models.ALL_VARIANTS:
    raise ValueError(f"Unknown model variant model.name={name!r}. Expected one of: "
                     f"{', '.join(models.ALL_VARIANTS)} (or '' to build from model.overrides).")
  if config.mode not in MODES:
    raise ValueError(f"mode={config.mode!r}; expected one of {MODES}.")
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; expected one of {TASKS}.")
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule={config.lr_schedule!r}; expected one of {LR_SCHEDULES}.")
  if config.segmentation.eval_mode not in ("whole", "slide"):
    raise ValueError(f"segmentation.eval_mode={config.segmentation.eval_mode!r}; expected "
                     "'whole' or 'slide'.")
  scales = tuple(config.segmentation.eval_scales)
  if not scales or any(not isinstance(r, (int, float)) or r <= 0 for r in scales):
    raise ValueError(f"segmentation.eval_scales={scales!r}; expected positive ratios, e.g. "
                     "(0.5, 0.75, 1.0, 1.25, 1.5, 1.75).")
  if config.distributed.cpu_collectives not in CPU_COLLECTIVES:
    raise ValueError(f"distributed.cpu_collectives={config.distributed.cpu_collectives!r}; "
                     f"expected one of {CPU_COLLECTIVES}.")
  if config.dtype not in DTYPES:
    raise ValueError(f"dtype={config.dtype!r}; expected one of {DTYPES}.")
  if config.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision={config.matmul_precision!r}; expected one of "
                     f"{MATMUL_PRECISIONS}.")
  if config.adam_mu_dtype not in MU_DTYPES:
    raise ValueError(f"adam_mu_dtype={config.adam_mu_dtype!r}; expected one of {MU_DTYPES}.")
  if config.batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {config.batch_size}.")
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(
        f"grad_accum_steps={config.grad_accum_steps} must be >= 1 and divide batch_size="
        f"{config.batch_size} (the global batch is split into that many micro-batches).")
  mixup_group_size(config)
  for pattern in config.init_from_exclude:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as error:
      raise ValueError(f"init_from_exclude holds {pattern!r}, which is no regular expression "
                       f"({error}); give patterns such as '^head\\.'.") from None
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("Set num_epochs > 0 or num_train_steps > 0.")
  # Build the model config now: unknown options, bad heads or image sizes fail here.
  overrides = model_overrides(config)
  for segmenter_option in SEGMENTER_OPTIONS:  # create_segmenter's own, not the backbone's
    overrides.pop(segmenter_option, None)
  models.make_model_config(name or None, img_size=config.image_size, **overrides)


def mixup_group_size(config: ml_collections.ConfigDict) -> int:
  """Examples per mixup draw in a micro-batch; raises if the groups cannot tile it."""
  micro = config.batch_size // config.grad_accum_steps
  group = min(config.mixup.group_size, micro) if config.mixup.group_size > 0 else micro
  mixing = config.mixup.prob > 0 and (config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0)
  if mixing and (micro % group or group % 2):
    raise ValueError(
        f"mixup.group_size={config.mixup.group_size} must be even and divide the micro-batch "
        f"{micro} (batch_size={config.batch_size} / grad_accum_steps="
        f"{config.grad_accum_steps}); got groups of {group}. Pick an even divisor.")
  return group


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """model.overrides as plain Python values (lists become tuples), with an unset
  drop_path_rate resolved to the variant's recipe value (`CUSTOM_DROP_PATH_RATE` without
  a variant)."""
  overrides = {}
  for key, value in config.model.overrides.items():
    overrides[key] = tuple(value) if isinstance(value, list) else value
  if "drop_path_rate" in overrides and overrides["drop_path_rate"] is None:
    name = config.model.name
    overrides["drop_path_rate"] = (models.ALL_VARIANTS[name]["drop_path_rate"] if name
                                   else CUSTOM_DROP_PATH_RATE)
  return overrides


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """`get_config()` (or `get_config(arg)`) of a config file such as configs/focal_base.py, as
  `python main.py --config PATH[:ARG]` reads it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No config file at {path}: expected a Python file such as "
                            "configs/focal_tiny.py.")
  stem = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"focal_jax_config_{stem}", path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"{path} is not a Python config file (expected configs/*.py).")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} defines no get_config(); a config file returns its "
                     "ConfigDict from get_config().")
  return module.get_config() if arg is None else module.get_config(arg)
