"""The name and layout map between this model and the official PyTorch state_dict.

`official_entries(model)` lists every key of the official state_dict in the official
order, each with the path of the matching NNX parameter (or the static value of a
buffer) and the layout change between the two. No PyTorch is needed here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from focal_jax.models.focal import index_tables
from focal_jax.models.focal_fast import key_sets
from focal_jax.models.focal_fast.attention import FocalFastAttention
from focal_jax.models.block import FocalTransformerBlock
from focal_jax.models.focal_transformer import FocalTransformer

Path = tuple[str | int, ...]


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _linear_to_torch(a: np.ndarray) -> np.ndarray:
  return a.T  # [in, out] -> [out, in]


def _conv_to_torch(a: np.ndarray) -> np.ndarray:
  return a.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]


def _conv_from_torch(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One official state_dict entry.

  A parameter has `path` (its place in the NNX Param state) and the two layout
  changes; a buffer has `buffer`, the exact value the official model registers.
  """

  key: str
  path: Path | None = None
  to_torch: Callable[[np.ndarray], np.ndarray] = _same
  from_torch: Callable[[np.ndarray], np.ndarray] = _same
  buffer: np.ndarray | None = None


def _linear(key: str, path: Path, bias: bool = True) -> Iterator[Entry]:
  yield Entry(f"{key}.weight", (*path, "kernel"), _linear_to_torch, _linear_to_torch)
  if bias:
    yield Entry(f"{key}.bias", (*path, "bias"))


def _conv(key: str, path: Path) -> Iterator[Entry]:
  yield Entry(f"{key}.weight", (*path, "kernel"), _conv_to_torch, _conv_from_torch)
  yield Entry(f"{key}.bias", (*path, "bias"))


def _norm(key: str, path: Path) -> Iterator[Entry]:
  yield Entry(f"{key}.weight", (*path, "scale"))
  yield Entry(f"{key}.bias", (*path, "bias"))


def _patch_embed(key: str, path: Path, embed) -> Iterator[Entry]:
  yield from _conv(f"{key}.proj", (*path, "proj"))
  if embed.pre_norm is not None:
    yield from _norm(f"{key}.pre_norm", (*path, "pre_norm"))
  if embed.norm is not None:
    yield from _norm(f"{key}.norm", (*path, "norm"))


def _block(key: str, path: Path, block: FocalTransformerBlock, resolution: tuple[int, int],
           qkv_bias: bool) -> Iterator[Entry]:
  # PyTorch lists a module's own parameters, then its buffers, then its children.
  if block.gamma_1 is not None:
    yield Entry(f"{key}.gamma_1", (*path, "gamma_1"))
    yield Entry(f"{key}.gamma_2", (*path, "gamma_2"))
  if block.shift_size > 0:
    ws = block.window_size  # the official model only builds this for whole windows
    padded = (-(-resolution[0] // ws) * ws, -(-resolution[1] // ws) * ws)
    mask = index_tables.shift_mask(padded, ws, block.shift_size)
    yield Entry(f"{key}.attn_mask", buffer=mask.reshape(-1, *mask.shape[2:]))
  for level in range(len(block.pool_layers)):
    pool_key, pool_path = f"{key}.pool_layers.{level}", (*path, "pool_layers", level)
    if block.pool_method == "fc":
      yield from _linear(pool_key, pool_path)
    else:
      yield from _conv(pool_key, pool_path)
  yield from _norm(f"{key}.norm1", (*path, "norm1"))
  attn, attn_key, attn_path = block.attn, f"{key}.attn", (*path, "attn")
  if isinstance(attn, FocalFastAttention):
    yield from _focal_fast_attention(attn_key, attn_path, attn, resolution, qkv_bias)
  else:
    yield from _focal_attention(attn_key, attn_path, attn, qkv_bias)
  yield from _norm(f"{key}.norm2", (*path, "norm2"))
  yield from _linear(f"{key}.mlp.fc1", (*path, "mlp", "fc1"))
  yield from _linear(f"{key}.mlp.fc2", (*path, "mlp", "fc2"))


def _focal_attention(attn_key: str, attn_path: Path, attn, qkv_bias: bool) -> Iterator[Entry]:
  ws = attn.window_size
  yield Entry(f"{attn_key}.relative_position_bias_table", (*attn_path, "relative_position_bias_table"))
  if attn.expand_size > 0:
    yield Entry(f"{attn_key}.relative_position_bias_table_to_neighbors",
                (*attn_path, "relative_position_bias_table_to_neighbors"))
  yield Entry(f"{attn_key}.relative_position_index",
              buffer=index_tables.relative_position_index((ws, ws), (ws, ws)))
  if attn.expand_size > 0:
    yield Entry(f"{attn_key}.valid_ind_rolled",
                buffer=index_tables.valid_ind_rolled(ws, attn.expand_size))
  for level in range(attn.pooled_levels):
    side = attn.focal_window + 2**level - 1
    yield Entry(f"{attn_key}.relative_position_index_{level}",
                buffer=index_tables.relative_position_index((ws, ws), (side, side)))
    if level > 0:
      yield Entry(f"{attn_key}.valid_ind_unfold_{level}",
                  buffer=index_tables.valid_ind_unfold(attn.focal_window, level))
  for level in range(attn.pooled_levels):
    yield Entry(f"{attn_key}.relative_position_bias_table_to_windows.{level}",
                (*attn_path, "relative_position_bias_table_to_windows", level))
  yield from _linear(f"{attn_key}.qkv", (*attn_path, "qkv"), bias=qkv_bias)
  yield from _linear(f"{attn_key}.proj", (*attn_path, "proj"))


def _focal_fast_attention(key: str, path: Path, attn, resolution: tuple[int, int],
                          qkv_bias: bool) -> Iterator[Entry]:
  ws = attn.window_size
  num_windows = (resolution[0] // ws, resolution[1] // ws)
  yield Entry(f"{key}.window_coords", buffer=key_sets.window_offsets(ws))
  for level in range(attn.focal_level):
    sets = (key_sets.pixel_key_sets(*resolution, ws, attn.top_k) if level == 0 else
            key_sets.window_key_sets(*num_windows, attn.top_k))
    yield Entry(f"{key}.topk_cloest_indice_{level}", buffer=sets)
    yield Entry(f"{key}.topk_cloest_coords_{level}",
                buffer=key_sets.key_coords(level, *resolution, ws, attn.top_k))
  yield from _linear(f"{key}.qkv", (*path, "qkv"), bias=qkv_bias)
  yield from _linear(f"{key}.proj", (*path, "proj"))
  for level in range(attn.focal_level):
    mlp_key, mlp_path = f"{key}.coord2rpb_all.{level}", (*path, "coord2rpb_all", level)
    yield from _linear(f"{mlp_key}.0", (*mlp_path, "fc1"))
    yield from _linear(f"{mlp_key}.2", (*mlp_path, "fc2"))


def official_entries(model: FocalTransformer) -> list[Entry]:
  """Every official state_dict entry of `model`, in the official order."""
  config = model.config
  entries: list[Entry] = []
  if model.absolute_pos_embed is not None:
    entries.append(Entry("absolute_pos_embed", ("absolute_pos_embed",)))
  entries.extend(_patch_embed("patch_embed", ("patch_embed",), model.patch_embed))
  for i, layer in enumerate(model.layers):
    resolution = config.stage_resolution(i)
    for j, block in enumerate(layer.blocks):
      entries.extend(_block(f"layers.{i}.blocks.{j}", ("layers", i, "blocks", j), block,
                            resolution, config.qkv_bias))
    if layer.downsample is not None:
      entries.extend(_patch_embed(f"layers.{i}.downsample", ("layers", i, "downsample"),
                                  layer.downsample))
  if model.norm is not None:  # a dense-prediction backbone has none
    entries.extend(_norm("norm", ("norm",)))
  if model.head is not None:
    entries.extend(_linear("head", ("head",)))
  return entries
