"""Model configuration: the official constructor's arguments, the variant table, checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp

FOCAL_POOLS = ("fc", "conv", "mean", "max", "none")
EXPAND_LAYERS = ("all", "even", "odd")


# Options this project adds to the official constructor's. `version` picks the official
# file the model follows: 1 `focal_transformer.py`, 2 `focal_transformer_v2.py` (Focal-fast).
PROJECT_OPTIONS = ("dtype", "remat", "scan_blocks", "version")
VERSIONS = (1, 2)


class StageGeometry:
  """Stage widths, grids and stochastic-depth rates shared by every family's config (a
  dataclass with `img_size`, `patch_size`, `embed_dim`, `depths`, `drop_path_rate`): each
  stage halves the grid and doubles the width, as in both official generations."""

  @property
  def num_layers(self) -> int:
    return len(self.depths)

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (self.num_layers - 1)

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this (32 for the official layout)."""
    return self.patch_size * 2 ** (self.num_layers - 1)

  def stage_dim(self, stage: int) -> int:
    return self.embed_dim * 2**stage

  def stage_resolution(self, stage: int, size: Sequence[int] | None = None) -> tuple[int, int]:
    """Token-grid size of a stage for an input of `size` (default: the built img_size)."""
    height, width = size if size is not None else self.img_size
    return height // self.patch_size // 2**stage, width // self.patch_size // 2**stage

  def drop_path_rates(self) -> list[float]:
    """Linearly increasing stochastic depth over all blocks, as officially."""
    total = sum(self.depths)
    if total == 1:
      return [0.0]
    return [self.drop_path_rate * i / (total - 1) for i in range(total)]


@dataclasses.dataclass(frozen=True)
class FocalConfig(StageGeometry):
  """Hyperparameters of a Focal Transformer, named as in the official constructor.

  `expand_stages` is accepted for compatibility and, as in the official code, has no
  effect (every stage uses its `expand_sizes` entry). `version=2` is Focal-fast (the
  official `focal_transformer_v2.py`): `focal_topK` nearest pixels and pooled windows per
  window, and, as officially, no effect of `expand_sizes`, `expand_layer`, `focal_windows`.
  `dtype` (activation dtype), `remat` (rematerialise each block in the backward pass) and
  `scan_blocks` (run runs of identical blocks under `lax.scan`, which cuts compile time; same
  parameters and results) are this project's additions.
  """

  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 4
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: float | None = None
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  ape: bool = False
  patch_norm: bool = True
  use_shift: bool = False
  focal_stages: tuple[int, ...] = (0, 1, 2, 3)
  focal_levels: tuple[int, ...] = (1, 1, 1, 1)
  focal_windows: tuple[int, ...] = (7, 5, 3, 1)
  focal_pool: str = "fc"
  expand_stages: tuple[int, ...] = (0, 1, 2, 3)
  expand_sizes: tuple[int, ...] = (3, 3, 3, 3)
  expand_layer: str = "all"
  use_conv_embed: bool = False
  use_layerscale: bool = False
  layerscale_value: float = 1e-4
  use_pre_norm: bool = False
  focal_topK: int = 64  # Focal-fast only (the official Focal-fast constructor's default)
  version: int = 1
  dtype: Any = jnp.float32
  remat: bool = False
  scan_blocks: bool = True

  def official_kwargs(self) -> dict[str, Any]:
    """The official constructor's keyword arguments for this model (without this project's
    additions; sequences as lists, `img_size` as a pair)."""
    skip = PROJECT_OPTIONS + (("focal_topK",) if self.version == 1 else ())
    kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
    return {k: list(v) if isinstance(v, tuple) and k != "img_size" else v
            for k, v in kwargs.items()}


# name -> official constructor arguments (SPEC section 1).
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
_COMMON = dict(
    patch_size=4, window_size=7, mlp_ratio=4.0, focal_pool="fc", focal_stages=(0, 1, 2, 3),
    focal_levels=(2, 2, 2, 2), focal_windows=(7, 5, 3, 1), expand_sizes=(3, 3, 3, 3),
    expand_layer="all", use_shift=False, ape=False, patch_norm=True)

VARIANTS: dict[str, dict[str, Any]] = {
    "focal_tiny": {**_COMMON, **_TINY},
    "focal_tiny_conv": {**_COMMON, **_TINY, "use_conv_embed": True},
    "focal_small": {**_COMMON, **_SMALL},
    "focal_small_conv": {**_COMMON, **_SMALL, "use_conv_embed": True},
    "focal_base": {**_COMMON, **_BASE},
    "focal_base_conv": {**_COMMON, **_BASE, "use_conv_embed": True},
    # Focal-fast (SPEC section 9): the released configs use conv embedding and topK 128.
    "focalv2_tiny": {**_COMMON, **_TINY, "use_conv_embed": True, "version": 2, "focal_topK": 128},
    "focalv2_small": {**_COMMON, **_SMALL, "use_conv_embed": True, "version": 2, "focal_topK": 128},
    "focalv2_base": {**_COMMON, **_BASE, "use_conv_embed": True, "version": 2, "focal_topK": 128},
}

# Exact trainable parameter counts of the official models at 224 (SPEC section 1).
OFFICIAL_PARAM_COUNTS = {
    "focal_tiny": 28_880_380,
    "focal_tiny_conv": 30_825_244,
    "focal_small": 51_141_940,
    "focal_small_conv": 53_086_804,
    "focal_base": 89_815_400,
    "focal_base_conv": 93_268_712,
    "focalv2_tiny": 30_220_564,
    "focalv2_small": 51_526_540,
    "focalv2_base": 91_186_824,
}

_TUPLE_FIELDS = ("depths", "num_heads", "focal_stages", "focal_levels", "focal_windows",
                 "expand_stages", "expand_sizes")


def to_pair(value: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  pair = tuple(int(v) for v in value)
  if len(pair) != 2:
    raise ValueError(f"Expected an int or a (height, width) pair, got {value!r}.")
  return pair  # type: ignore[return-value]


def make_config(name: str | None = None, **overrides: Any) -> FocalConfig:
  """Variant defaults (if `name` is given) updated with official-name overrides, checked."""
  if name is not None and name not in VARIANTS:
    raise ValueError(f"Unknown model variant {name!r}. Expected one of: {', '.join(VARIANTS)}.")
  known = {f.name for f in dataclasses.fields(FocalConfig)}
  unknown = sorted(set(overrides) - known - {"norm_layer", "use_checkpoint"})
  if unknown:
    raise ValueError(
        f"Unknown model option(s) {unknown}. Options take the official constructor's names: "
        f"{', '.join(sorted(known))}.")
  if overrides.pop("use_checkpoint", False):
    overrides["remat"] = True  # the official name for per-block rematerialisation
  if overrides.pop("norm_layer", None) is not None:
    raise ValueError("norm_layer cannot be changed: the Focal Transformer uses LayerNorm(eps=1e-5).")
  values = dict(VARIANTS[name]) if name is not None else {}
  values.update(overrides)
  if "img_size" in values:
    values["img_size"] = to_pair(values["img_size"])
  for field in _TUPLE_FIELDS:
    if field in values:
      values[field] = tuple(int(v) for v in values[field])
  config = FocalConfig(**values)
  validate(config)
  return config


def validate(config: FocalConfig) -> None:
  """Raises ValueError naming the offending option and what it must be."""
  if config.version not in VERSIONS:
    raise ValueError(f"version={config.version!r}; expected 1 (Focal Transformer) or 2 (Focal-fast).")
  n = config.num_layers
  for field in ("num_heads", "focal_levels", "focal_windows", "expand_sizes"):
    if len(getattr(config, field)) != n:
      raise ValueError(f"{field} has {len(getattr(config, field))} entries but depths has {n}; "
                       "give one entry per stage.")
  for stage in range(n):
    dim, heads = config.stage_dim(stage), config.num_heads[stage]
    if dim % heads:
      raise ValueError(f"Stage {stage}: num_heads={heads} does not divide the embedding width "
                       f"{dim} (embed_dim={config.embed_dim} * 2**{stage}). Choose heads that divide it.")
    if config.focal_levels[stage] not in (1, 2, 3):
      raise ValueError(f"focal_levels[{stage}]={config.focal_levels[stage]}; expected 1, 2 or 3.")
    pooled = config.focal_levels[stage] > 1 and config.focal_pool != "none" and stage in config.focal_stages
    if config.version == 2:
      _validate_focal_fast_stage(config, stage, pooled)
    elif pooled and config.focal_windows[stage] % 2 == 0:
      raise ValueError(f"focal_windows[{stage}]={config.focal_windows[stage]} is even; pooled focal "
                       "levels need an odd focal window (the official code fails on even ones).")
  if config.focal_pool not in FOCAL_POOLS:
    raise ValueError(f"focal_pool={config.focal_pool!r}; expected one of {FOCAL_POOLS}.")
  if config.expand_layer not in EXPAND_LAYERS:
    raise ValueError(f"expand_layer={config.expand_layer!r}; expected one of {EXPAND_LAYERS}.")
  check_image_size(config, config.img_size)
  if config.version == 2:
    check_whole_windows(config, config.img_size,
                        [min(config.window_size, *config.stage_resolution(i)) for i in range(n)])


def _validate_focal_fast_stage(config: FocalConfig, stage: int, pooled: bool) -> None:
  """Focal-fast options the official Focal-fast code gets wrong or crashes on are refused."""
  level = config.focal_levels[stage]
  if level >= 3:
    raise ValueError(
        f"focal_levels[{stage}]={level}: Focal-fast (version 2) supports focal_levels 1 or 2. "
        "The official focal_transformer_v2.py runs level 3 against the wrong pooled grid "
        "(its key sets index the level-2 map as if it were the level-1 one).")
  if level == 2 and not pooled:
    raise ValueError(
        f"Stage {stage} has focal_levels 2 but no pooled map (focal_pool={config.focal_pool!r}, "
        f"focal_stages={list(config.focal_stages)}); the official focal_transformer_v2.py crashes "
        "there. Use a pooling method (fc, conv, mean, max) or focal_levels 1 for that stage.")
  if config.focal_topK < 1:
    raise ValueError(f"focal_topK={config.focal_topK}; expected a positive number of keys.")


def check_whole_windows(config: FocalConfig, size: Sequence[int], windows: Sequence[int]) -> None:
  """Focal-fast needs every stage grid to be whole windows (`windows[i]` for stage i).

  Its key sets are the nearest pixels to each window's centre; the official code has no
  padding for partial windows and crashes on such inputs, so they are refused here.
  """
  unit = math.lcm(*(config.patch_size * 2**stage * w for stage, w in enumerate(windows)))
  for stage, window in enumerate(windows):
    rows, cols = config.stage_resolution(stage, size)
    if rows % window or cols % window:
      height, width = size
      raise ValueError(
          f"Image size {height}x{width} gives a {rows}x{cols} grid in stage {stage + 1}, which is "
          f"not whole {window}x{window} windows: Focal-fast (version 2) needs height and width "
          f"that are multiples of {unit} (e.g. {unit}, {2 * unit}, {unit}x{2 * unit}). Resize or pad the images, "
          "or use a version-1 model, which pads partial windows.")


def check_image_size(config: FocalConfig, size: Sequence[int]) -> None:
  """Input sizes must give whole token grids at every stage."""
  multiple = config.size_multiple
  height, width = size
  if height % multiple or width % multiple or height <= 0 or width <= 0:
    raise ValueError(
        f"Image size {height}x{width} is not supported: height and width must be positive "
        f"multiples of {multiple} (patch_size {config.patch_size} times 2**{config.num_layers - 1} "
        f"downsamplings). Resize or pad the images, e.g. to "
        f"{max(multiple, round(height / multiple) * multiple)}x"
        f"{max(multiple, round(width / multiple) * multiple)}.")
