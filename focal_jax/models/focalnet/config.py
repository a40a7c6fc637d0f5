"""FocalNet configuration: the official constructor's arguments, the variant table, checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from focal_jax.models.config import StageGeometry, check_image_size, to_pair


@dataclasses.dataclass(frozen=True)
class FocalNetConfig(StageGeometry):
  """Hyperparameters of a FocalNet, named as in the official `FocalNet` constructor
  (microsoft/FocalNet, `classification/focalnet.py`).

  `focal_levels[i]` depthwise convolutions (kernel `focal_windows[i] + 2 * level`) plus a
  global level aggregate the context of stage i. `dtype`, `remat` and `scan_blocks` are this
  project's additions, as for the Focal Transformer.
  """

  img_size: tuple[int, int] = (224, 224)
  patch_size: int = 4
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  patch_norm: bool = True
  focal_levels: tuple[int, ...] = (2, 2, 2, 2)
  focal_windows: tuple[int, ...] = (3, 3, 3, 3)
  use_conv_embed: bool = False
  use_layerscale: bool = False
  layerscale_value: float = 1e-4
  use_postln: bool = False
  use_postln_in_modulation: bool = False
  normalize_modulator: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  scan_blocks: bool = True

  # What the shared stem, stages and head ask of every family: FocalNet has neither an
  # absolute position embedding nor a norm before the downsampling convolutions.
  ape = False
  use_pre_norm = False

  def official_kwargs(self) -> dict[str, Any]:
    """The official constructor's keyword arguments (sequences as lists)."""
    skip = ("dtype", "remat", "scan_blocks")
    kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
    return {k: list(v) if isinstance(v, tuple) and k != "img_size" else v
            for k, v in kwargs.items()}


_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), drop_path_rate=0.5)
_SRF = dict(focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3))
_LRF = dict(focal_levels=(3, 3, 3, 3), focal_windows=(3, 3, 3, 3))
_ISO = dict(depths=(12,), patch_size=16, focal_levels=(3,), focal_windows=(3,), drop_path_rate=0.2)
# The large models (ImageNet-22K, 21,842 classes in the released weights).
_LARGE = dict(depths=(2, 2, 18, 2), drop_path_rate=0.5, use_conv_embed=True, use_postln=True,
              use_layerscale=True)
_FL3 = dict(focal_levels=(3, 3, 3, 3), focal_windows=(5, 5, 5, 5))
_FL4 = dict(focal_levels=(4, 4, 4, 4), focal_windows=(3, 3, 3, 3))

# name -> the registered function's arguments plus its released config (configs/NAME.yaml).
VARIANTS: dict[str, dict[str, Any]] = {
    "focalnet_tiny_srf": {**_TINY, **_SRF},
    "focalnet_tiny_lrf": {**_TINY, **_LRF},
    "focalnet_small_srf": {**_SMALL, **_SRF},
    "focalnet_small_lrf": {**_SMALL, **_LRF},
    "focalnet_base_srf": {**_BASE, **_SRF},
    "focalnet_base_lrf": {**_BASE, **_LRF},
    "focalnet_tiny_iso": {**_ISO, "embed_dim": 192},
    "focalnet_small_iso": {**_ISO, "embed_dim": 384},
    "focalnet_base_iso": {**_ISO, "embed_dim": 768, "use_layerscale": True, "use_postln": True},
    "focalnet_large_fl3": {**_LARGE, **_FL3, "embed_dim": 192},
    "focalnet_large_fl4": {**_LARGE, **_FL4, "embed_dim": 192, "normalize_modulator": True},
    "focalnet_xlarge_fl3": {**_LARGE, **_FL3, "embed_dim": 256},
    "focalnet_xlarge_fl4": {**_LARGE, **_FL4, "embed_dim": 256},
    "focalnet_huge_fl3": {**_LARGE, **_FL3, "focal_windows": (3, 3, 3, 3), "embed_dim": 352,
                          "use_postln_in_modulation": True},
    "focalnet_huge_fl4": {**_LARGE, **_FL4, "embed_dim": 352, "use_postln_in_modulation": True},
}

# Exact trainable parameter counts of the official models: (count, num_classes), read by
# instantiating the official classes (the large ones with the 21,842 ImageNet-22K classes
# of their released weights).
OFFICIAL_PARAM_COUNTS: dict[str, tuple[int, int]] = {
    "focalnet_tiny_srf": (28_427_116, 1000),
    "focalnet_tiny_lrf": (28_647_928, 1000),
    "focalnet_small_srf": (49_891_216, 1000),
    "focalnet_small_lrf": (50_342_440, 1000),
    "focalnet_base_srf": (88_148_144, 1000),
    "focalnet_base_lrf": (88_749_768, 1000),
    "focalnet_large_fl3": (239_134_898, 21842),
    "focalnet_large_fl4": (239_315_402, 21842),
    "focalnet_xlarge_fl3": (408_787_378, 21842),
    "focalnet_xlarge_fl4": (409_028_042, 21842),
    "focalnet_huge_fl3": (745_276_338, 21842),
    "focalnet_huge_fl4": (747_989_578, 21842),
    "focalnet_tiny_iso": (5_880_280, 1000),
    "focalnet_small_iso": (22_376_344, 1000),
    "focalnet_base_iso": (87_237_400, 1000),
}

_TUPLE_FIELDS = ("depths", "focal_levels", "focal_windows")


def make_focalnet_config(name: str | None = None, **overrides: Any) -> FocalNetConfig:
  """Variant defaults (if `name` is given) updated with official-name overrides, checked.

  As officially, `focal_levels` and `focal_windows` may list more stages than `depths`
  (the constructor's defaults have four); the extra entries are ignored.
  """
  if name is not None and name not in VARIANTS:
    raise ValueError(f"Unknown FocalNet variant {name!r}. Expected one of: {', '.join(VARIANTS)}.")
  known = {f.name for f in dataclasses.fields(FocalNetConfig)}
  unknown = sorted(set(overrides) - known - {"norm_layer", "use_checkpoint"})
  if unknown:
    raise ValueError(
        f"Unknown FocalNet option(s) {unknown}. Options take the official constructor's names: "
        f"{', '.join(sorted(known))}.")
  if overrides.pop("use_checkpoint", False):
    overrides["remat"] = True
  if overrides.pop("norm_layer", None) is not None:
    raise ValueError("norm_layer cannot be changed: FocalNet uses LayerNorm(eps=1e-5).")
  values = dict(VARIANTS[name]) if name is not None else {}
  values.update(overrides)
  if "img_size" in values:
    values["img_size"] = to_pair(values["img_size"])
  for field in _TUPLE_FIELDS:
    if field in values:
      values[field] = tuple(int(v) for v in values[field])
  depths = values.get("depths", FocalNetConfig.depths)
  for field in ("focal_levels", "focal_windows"):
    given = values.get(field, getattr(FocalNetConfig, field))
    if len(given) < len(depths):
      raise ValueError(f"{field}={list(given)} has fewer entries than depths={list(depths)}; "
                       "give one per stage.")
    values[field] = tuple(given[:len(depths)])
  config = FocalNetConfig(**values)
  validate(config)
  return config


def validate(config: FocalNetConfig) -> None:
  """Raises ValueError naming the offending option and what it must be."""
  for stage, (level, window) in enumerate(zip(config.focal_levels, config.focal_windows)):
    if level < 0:
      raise ValueError(f"focal_levels[{stage}]={level}; expected 0 or more levels.")
    if window < 1 or window % 2 == 0:
      raise ValueError(f"focal_windows[{stage}]={window}; expected an odd kernel size (the "
                       "official 'same' padding kernel//2 keeps the grid only for odd kernels).")
  if min(config.depths, default=0) < 0 or not config.depths:
    raise ValueError(f"depths={list(config.depths)}; expected one or more non-negative entries.")
  check_image_size(config, config.img_size)


# The backbone options of microsoft/FocalNet's released ADE20K UPerNet configs
# (`segmentation/configs/focalnet/upernet_focalnet_{tiny,small,base}_patch4_512x512_160k_
# ade20k_{srf,lrf}.py`): focal kernels from 9 (levels 9, 11 [, 13]) in every stage and drop
# path 0.3, on top of the variant's depths, width and focal levels.
SEGMENTATION_OPTIONS: dict[str, Any] = {"focal_windows": (9, 9, 9, 9), "drop_path_rate": 0.3}
SEGMENTATION_VARIANTS = tuple(f"focalnet_{size}_{field}" for size in ("tiny", "small", "base")
                              for field in ("srf", "lrf"))
# Options the official segmentation backbone (`segmentation/mmseg/models/backbones/
# focalnet.py`) does not have, or builds differently (its convolutional stem pads by 3).
_NOT_IN_SEGMENTATION_BACKBONE = ("use_conv_embed", "use_postln", "use_postln_in_modulation",
                                 "normalize_modulator")


def make_focalnet_segmentation_config(name: str | None, **overrides: Any) -> FocalNetConfig:
  """The backbone config of a FocalNet UPerNet: the released segmentation options for the
  six T/S/B SRF/LRF names (overridable), no classifier; checked against what the official
  segmentation backbone can build."""
  if name is not None and name not in SEGMENTATION_VARIANTS:
    raise ValueError(
        f"FocalNet {name!r} has no segmentation backbone: microsoft/FocalNet's segmentation "
        f"code builds four-stage models without post-norm or convolutional stem; expected one "
        f"of {', '.join(SEGMENTATION_VARIANTS)} (or name=None with explicit options).")
  defaults = dict(SEGMENTATION_OPTIONS) if name is not None else {}
  config = make_focalnet_config(name, **{**defaults, **overrides})
  unsupported = [option for option in _NOT_IN_SEGMENTATION_BACKBONE if getattr(config, option)]
  if unsupported or config.num_layers != 4:
    raise ValueError(
        f"FocalNet segmentation backbone: {', '.join(unsupported) or 'depths'}="
        f"{[getattr(config, o) for o in unsupported] or list(config.depths)} is not what the "
        "official segmentation FocalNet builds (four stages; no use_conv_embed, use_postln, "
        "use_postln_in_modulation or normalize_modulator).")
  return config
