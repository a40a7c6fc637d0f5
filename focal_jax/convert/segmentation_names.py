"""The name and layout map between a focal_jax Segmenter and mmsegmentation's state_dict.

Keys as in the UPerNet checkpoints Swin and FocalNet released for mmsegmentation:
`backbone.` + the official Focal Transformer or FocalNet names + `backbone.norm{i}`; `decode_head.` (`conv_seg`,
`psp_modules.{i}.1.{conv,bn}`, `bottleneck`, `lateral_convs.{i}`, `fpn_convs.{i}`,
`fpn_bottleneck`); `auxiliary_head.` (`conv_seg`, `convs.0`). Batch norms carry
`weight`, `bias`, `running_mean`, `running_var` and `num_batches_tracked` (int64). Paths
are into the whole `nnx.state(segmenter)` (parameters and batch statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from focal_jax.convert import focalnet_names
from focal_jax.convert.names import Entry, Path, _conv, _norm, official_entries
from focal_jax.models.conv_bn import ConvModule
from focal_jax.models.focalnet import FocalNet
from focal_jax.models.segmenter import Segmenter
from focal_jax.models.upernet import FCNHead, UPerHead

COUNTER = "num_batches_tracked"


def _conv_to_torch(a: np.ndarray) -> np.ndarray:
  return a.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]


def _conv_from_torch(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


def _counter_to_torch(a: np.ndarray) -> np.ndarray:
  return np.asarray(a, np.int64)


def _counter_from_torch(a: np.ndarray) -> np.ndarray:
  return np.asarray(a, np.int32)


def is_counter(entry: Entry) -> bool:
  """BatchNorm's `num_batches_tracked`: an integer, not a floating-point weight."""
  return entry.key.endswith(f".{COUNTER}")


def _batch_norm(key: str, path: Path) -> Iterator[Entry]:
  yield from _norm(key, path)
  yield Entry(f"{key}.running_mean", (*path, "mean"))
  yield Entry(f"{key}.running_var", (*path, "var"))
  yield Entry(f"{key}.{COUNTER}", (*path, COUNTER), _counter_to_torch, _counter_from_torch)


def _conv_module(key: str, path: Path) -> Iterator[Entry]:
  yield Entry(f"{key}.conv.weight", (*path, "conv", "kernel"), _conv_to_torch, _conv_from_torch)
  yield from _batch_norm(f"{key}.bn", (*path, "bn"))


def decode_head_entries(head: UPerHead) -> Iterator[Entry]:
  key, path = "decode_head", ("decode_head",)
  yield from _conv(f"{key}.conv_seg", (*path, "conv_seg"))
  for i, _ in enumerate(head.psp_modules):
    yield from _conv_module(f"{key}.psp_modules.{i}.1", (*path, "psp_modules", i, "conv_module"))
  yield from _conv_module(f"{key}.bottleneck", (*path, "bottleneck"))
  for name in ("lateral_convs", "fpn_convs"):
    modules: list[ConvModule] = list(getattr(head, name))
    for i, _ in enumerate(modules):
      yield from _conv_module(f"{key}.{name}.{i}", (*path, name, i))
  yield from _conv_module(f"{key}.fpn_bottleneck", (*path, "fpn_bottleneck"))


def auxiliary_head_entries(head: FCNHead) -> Iterator[Entry]:
  key, path = "auxiliary_head", ("auxiliary_head",)
  yield from _conv(f"{key}.conv_seg", (*path, "conv_seg"))
  for i, _ in enumerate(head.convs):
    yield from _conv_module(f"{key}.convs.{i}", (*path, "convs", i))


def segmentation_entries(segmenter: Segmenter) -> list[Entry]:
  """Every mmsegmentation state_dict entry of `segmenter`, in mmsegmentation's order."""
  backbone = segmenter.backbone
  backbone_entries = (focalnet_names.official_entries(backbone) if isinstance(backbone, FocalNet)
                      else official_entries(backbone))
  entries = [dataclasses.replace(e, key=f"backbone.{e.key}",
                                 path=None if e.path is None else ("backbone", *e.path))
             for e in backbone_entries]
  for i in segmenter.backbone.out_indices:
    entries.extend(_norm(f"backbone.norm{i}", ("backbone", f"norm{i}")))
  entries.extend(decode_head_entries(segmenter.decode_head))
  if segmenter.auxiliary_head is not None:
    entries.extend(auxiliary_head_entries(segmenter.auxiliary_head))
  return entries
