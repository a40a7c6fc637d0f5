"""The official optimiser: AdamW, linearly scaled learning rates, warmup + cosine per step,
weight decay masked as `set_weight_decay` does officially, global-norm clipping; and a
parameter EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from focal_jax.models import FOCALNET_VARIANTS

# The official model's `no_weight_decay()` and `no_weight_decay_keywords()`. Focal-fast
# keeps the same skip list and an empty keyword list; none of its parameter names holds these
# keywords, so one rule gives both official masks (Focal-fast: the coord2rpb and fc pooling matrices
# decay, 1-D parameters and biases do not).
NO_DECAY_NAMES = frozenset({"absolute_pos_embed"})
NO_DECAY_KEYWORDS = ("relative_position_bias_table", "relative_position_bias_table_to_neighbors",
                     "relative_position_bias_table_to_windows")


@dataclasses.dataclass(frozen=True)
class DecayRule:
  """A family's `no_weight_decay()` names and `no_weight_decay_keywords()`: the official
  `set_weight_decay` exempts these besides every 1-D tensor and bias."""

  names: frozenset[str]
  keywords: tuple[str, ...]


# Per model family. FocalNet's `classification/focalnet.py` returns {''} from both; the
# empty keyword is in every name, so its `set_weight_decay` exempts every parameter and the
# released recipe trains without weight decay, whatever TRAIN.WEIGHT_DECAY says.
DECAY_RULES: dict[str, DecayRule] = {
    "focal": DecayRule(NO_DECAY_NAMES, NO_DECAY_KEYWORDS),
    "focalnet": DecayRule(frozenset({""}), ("",)),
}


def model_family(name: str | None) -> str:
  """'focalnet' for the FocalNet variants, 'focal' for the Focal Transformer (v1, fast)."""
  return "focalnet" if name in FOCALNET_VARIANTS else "focal"


@dataclasses.dataclass(frozen=True)
class LearningRates:
  """Peak, warmup-start and final learning rates after linear batch scaling."""

  peak: float
  warmup: float
  minimum: float


def scaled_learning_rates(config: ml_collections.ConfigDict) -> LearningRates:
  """lr = base * global_batch / lr_base_batch_size, likewise warmup and min (official rule).

  `batch_size` is the examples per optimiser step (accumulated micro-batches included), as
  the official code multiplies by the accumulation steps too.
  """
  factor = config.batch_size / config.lr_base_batch_size
  return LearningRates(config.base_lr * factor, config.warmup_lr * factor, config.min_lr * factor)


def lr_schedule(rates: LearningRates, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """timm's CosineLRScheduler as the official code configures it (per step, no prefix).

  Steps [0, warmup): linear from `rates.warmup` towards `rates.peak`. Steps >= warmup:
  min + (peak - min) * (1 + cos(pi * step / total)) / 2, with the cosine measured from step
  0 (so it is slightly below the peak when warmup ends); `rates.minimum` from `total` on.
  """
  total = max(int(total_steps), 1)
  warmup = int(warmup_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = rates.warmup + step * (rates.peak - rates.warmup) / max(warmup, 1)
    progress = jnp.minimum(step, total) / total
    cosine = rates.minimum + 0.5 * (rates.peak - rates.minimum) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, ramp, cosine)

  return schedule


def poly_schedule(rates: LearningRates, warmup_steps: int, total_steps: int, power: float = 1.0
                  ) -> optax.Schedule:
  """mmcv's PolyLrUpdater with linear warmup, per iteration (mmsegmentation's schedule_160k).

  poly(step) = (peak - minimum) * (1 - min(step, total) / total)**power + minimum; during
  the first `warmup_steps` it is scaled by 1 - (1 - step / warmup) * (1 - ratio), ratio =
  rates.warmup / rates.peak (mmcv's warmup_ratio), as mmcv scales the regular rate.
  """
  total = max(int(total_steps), 1)
  warmup = int(warmup_steps)
  ratio = rates.warmup / rates.peak if rates.peak else 1.0
  poly = optax.polynomial_schedule(init_value=rates.peak - rates.minimum, end_value=0.0,
                                   power=power, transition_steps=total)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    regular = poly(step) + rates.minimum
    factor = 1.0 - (1.0 - step / max(warmup, 1)) * (1.0 - ratio)
    return jnp.where(step < warmup, regular * factor, regular)

  return schedule


def _path_name(path: tuple[Any, ...]) -> str:
  """('layers', 0, 'attn', 'qkv', 'bias') -> 'layers.0.attn.qkv.bias' (the torch-style name)."""
  parts = []
  for entry in path:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return ".".join(parts)


def decays(name: str, shape: tuple[int, ...], family: str = "focal") -> bool:
  """The official rule: no decay for 1-D tensors, biases, the family's skip list and
  keyword matches."""
  rule = DECAY_RULES[family]
  if len(shape) == 1 or name.endswith(".bias") or name in rule.names:
    return False
  return not any(keyword in name for keyword in rule.keywords)


def weight_decay_mask(params: Any, family: str = "focal") -> Any:
  """A tree of bools like `params` (pure dict of arrays): True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: decays(_path_name(path), tuple(leaf.shape), family), params)


def weight_decay_mask_for(model_name: str | None) -> Callable[[Any], Any]:
  """params -> bools: the official rule of `model_name`'s family."""
  family = model_family(model_name)
  return lambda params: weight_decay_mask(params, family)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   decay_mask: Any = weight_decay_mask) -> optax.GradientTransformation:
  """Global-norm clip, then AdamW with masked decoupled weight decay (torch.optim.AdamW's).

  The second moment always has the parameters' dtype (float32); `adam_mu_dtype` may store
  the first moment in bfloat16 (half its memory; the update is computed in float32).
  `decay_mask`: params -> tree of bools (the task's rule; default the official one)."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           mu_dtype=jnp.dtype(config.adam_mu_dtype) if config.adam_mu_dtype
                           else None,
                           weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)


def schedule_fn(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
                ) -> optax.Schedule:
  """The learning-rate schedule of a run: warmup_steps (or warmup_epochs of steps), then
  cosine or poly (config.lr_schedule) to total_steps."""
  if config.warmup_steps >= 0:
    warmup = int(config.warmup_steps)
  else:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  if config.lr_schedule == "poly":
    return poly_schedule(scaled_learning_rates(config), min(warmup, total_steps), total_steps,
                         config.poly_power)
  return lr_schedule(scaled_learning_rates(config), min(warmup, total_steps), total_steps)


__all__ = [
    "DECAY_RULES", "DecayRule", "LearningRates", "NO_DECAY_KEYWORDS", "NO_DECAY_NAMES", "decays",
    "model_family", "weight_decay_mask_for", "ema_update",
    "lr_schedule", "make_optimizer", "poly_schedule", "scaled_learning_rates", "schedule_fn",
    "weight_decay_mask"]
