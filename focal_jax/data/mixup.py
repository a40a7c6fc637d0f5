"""Mixup / CutMix with label smoothing, timm `Mixup(mode="batch")` semantics, in JAX.

One (lam, mixup-or-cutmix) draw per batch; every sample is mixed with the sample at the
mirrored batch position (timm's `x.flip(0)`). CutMix pastes one box from the flipped batch
and corrects lam to the pasted area. Targets are smoothed one-hots mixed with the same lam:
    target = lam * smooth(y) + (1 - lam) * smooth(flip(y)),
    smooth(y) = one_hot(y) * (1 - eps) + eps / K.
Pure functions of an explicit `jax.random` key: jit-able, deterministic, testable. Works on
NumPy or JAX batches (NHWC); call it per process-local batch to match timm's per-GPU mixing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  """Defaults are the official recipe (SPEC section 4)."""

  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0  # probability of mixing a batch at all
  switch_prob: float = 0.5  # probability of CutMix when both are enabled
  label_smoothing: float = 0.1
  correct_lam: bool = True  # lam := 1 - box area / image area for CutMix

  @property
  def enabled(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class MixParams(NamedTuple):
  """One batch's draw. box = (top, bottom, left, right), exclusive ends, used for CutMix."""

  lam: jax.Array  # float32 [], the weight of the original sample (after CutMix correction)
  use_cutmix: jax.Array  # bool []
  box: jax.Array  # int32 [4]


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int [B] -> float32 [B, K]: 1 - eps + eps/K on the label, eps/K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
  """timm `rand_bbox`: a box of side ~ sqrt(1 - lam) centred uniformly, clipped. int32 [4]."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(key)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  bottom = jnp.clip(cy + cut_h // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  right = jnp.clip(cx + cut_w // 2, 0, width)
  return jnp.stack([top, bottom, left, right]).astype(jnp.int32)


def sample_mix_params(key: jax.Array, height: int, width: int, config: MixupConfig) -> MixParams:
  """Draws lam, the mixup/cutmix switch and the CutMix box for one batch."""
  key_apply, key_switch, key_lam, key_box = jax.random.split(key, 4)
  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < config.switch_prob
  else:
    use_cutmix = jnp.asarray(config.cutmix_alpha > 0)
  apply = config.enabled & (jax.random.uniform(key_apply) < config.prob)
  if config.enabled:  # lam ~ Beta(alpha, alpha) of the chosen method (one sampler)
    alpha = jnp.where(use_cutmix, config.cutmix_alpha, config.mixup_alpha)
    lam = jnp.where(apply, jax.random.beta(key_lam, alpha, alpha), 1.0).astype(jnp.float32)
  else:
    lam = jnp.float32(1.0)
  box = cutmix_box(key_box, height, width, lam)
  if config.correct_lam:
    box_area = (box[1] - box[0]) * (box[3] - box[2])
    corrected = 1.0 - box_area.astype(jnp.float32) / float(height * width)
    lam = jnp.where(use_cutmix & apply, corrected, lam)
  return MixParams(lam=lam, use_cutmix=use_cutmix & apply, box=box)


def apply_mix(images: jax.Array, labels: jax.Array, params: MixParams, num_classes: int,
              label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Mixes images [B, H, W, C] with their batch-flipped partners; returns (images, targets)."""
  images = jnp.asarray(images)
  flipped = images[::-1]
  height, width = images.shape[1], images.shape[2]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  top, bottom, left, right = params.box
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [H, W]
  cutmixed = jnp.where(in_box[None, :, :, None], flipped, images)
  lam = params.lam.astype(images.dtype)
  mixed_up = images * lam + flipped * (1.0 - lam)
  mixed = jnp.where(params.use_cutmix, cutmixed, mixed_up)
  y = smooth_one_hot(labels, num_classes, label_smoothing)  # [B, K]
  targets = y * params.lam + y[::-1] * (1.0 - params.lam)
  return mixed, targets


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                 config: MixupConfig = MixupConfig()) -> tuple[jax.Array, jax.Array]:
  """timm Mixup(mode="batch"): images [B, H, W, C], int labels [B] -> (images, targets [B, K])."""
  if images.shape[0] % 2:
    raise ValueError(f"Mixup needs an even batch size (timm's rule), got {images.shape[0]}.")
  params = sample_mix_params(key, images.shape[1], images.shape[2], config)
  return apply_mix(images, labels, params, num_classes, config.label_smoothing)
