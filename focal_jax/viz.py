"""Pictures of focal attention and of training runs (plot_* functions return matplotlib Figures).

    keys = focal_keys(model, stage=0, block=0, query=(120, 80))   # query pixel (row, col)
    plot_focal_attention(image, keys)                             # geometry only
    probs = attention_probabilities(model, normalised_images, keys)
    plot_focal_attention(image, keys, probs.mean(axis=0))         # weighted by the real softmax
    plot_receptive_fields(model)                                   # region side per level, stage
    plot_training_curves(workdir)                                  # from <workdir>/metrics.jsonl
    plot_focal_attention(image, focal_fast_keys(224, stage=0, query=(120, 80)))  # Focal-fast

The geometry comes from the model's static index tables and the public attributes of a
block, in the official key order: the query's window, the expanded ring from four cyclic
rolls (border windows take ring tokens from the opposite border), then each pooled level's
unfolded neighbourhood of sub-windows. `attention_probabilities` recomputes the softmax of
one query from the block's own parameters; nothing here changes the model.

Focal-fast keys come from `models.focal_fast.key_sets` alone (`focal_fast_keys`): the query's
window takes the `top_k` stage pixels nearest to its centre (a disc, with the official
tie order at its rim) and the `top_k` nearest pooled windows, whatever query of the
window asks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from focal_jax.models.focal import index_tables
from focal_jax.models.focal_fast import key_sets
from focal_jax.models.config import to_pair
# The one reader of metrics.jsonl (also gs://) and the one figure of a run's curves.
from focal_jax.training.metrics import plot_training_curves, read_metrics  # noqa: F401

LEVEL_COLORS = ("#e6194b", "#f58231", "#3cb4ff", "#4363d8", "#911eb4")


@dataclasses.dataclass(frozen=True)
class KeyGroup:
  """The keys one focal level contributes, in the official order.

  boxes: int [n, 4] (row0, col0, row1, col1), half-open, in tokens of the stage's padded
    grid; a box may reach past the grid only through the cyclic shift (wrap it modulo
    the grid to draw it).
  valid: bool [n]; False for keys the additive -100 mask removes (unfold padding, shift).
  wrapped: bool [n]; True for ring keys the cyclic roll brings across the image border.
  """

  name: str
  boxes: np.ndarray
  valid: np.ndarray
  wrapped: np.ndarray

  @property
  def size(self) -> int:
    return len(self.boxes)


@dataclasses.dataclass(frozen=True)
class FocalKeys:
  """Everything one query token of one block attends to (see `focal_keys`)."""

  stage: int
  block: int
  query: tuple[int, int]  # token (row, col) in the stage grid
  stride: int  # input pixels per token side in this stage
  grid: tuple[int, int]  # stage token grid of the input
  padded_grid: tuple[int, int]  # grid padded to whole windows
  window_size: int
  expand_size: int
  shift_size: int
  focal_window: int
  groups: tuple[KeyGroup, ...]
  version: int = 1  # 2: Focal-fast key sets (geometry only; see `focal_fast_keys`)

  @property
  def num_keys(self) -> int:
    return sum(group.size for group in self.groups)

  @property
  def image_size(self) -> tuple[int, int]:
    return self.grid[0] * self.stride, self.grid[1] * self.stride

  def split(self, values: np.ndarray) -> list[np.ndarray]:
    """Cuts a per-key vector (last axis = keys, official order) into one part per group."""
    bounds = np.cumsum([0] + [group.size for group in self.groups])
    return [values[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _block(model: Any, stage: int, block: int) -> Any:
  layers = model.layers
  if not 0 <= stage < len(layers):
    raise ValueError(f"stage={stage} is out of range: the model has stages 0..{len(layers) - 1}.")
  blocks = layers[stage].blocks
  if not 0 <= block < len(blocks):
    raise ValueError(f"block={block} is out of range: stage {stage} has blocks "
                     f"0..{len(blocks) - 1}.")
  return blocks[block]


def _fit_origin(size: int, target: int) -> int:
  """Where row 0 of a map centrally trimmed / padded from `size` to `target` lies in the
  original map (the block's `windows.fit_centrally`: the smaller half goes on top)."""
  if size >= target:
    return (size - target) // 2
  return -((target - size) // 2)


def focal_keys(model: Any, stage: int, block: int = 0, query: Sequence[int] = (0, 0),
               img_size: Any = None) -> FocalKeys:
  """The regions one query token of `model.layers[stage].blocks[block]` attends to.

  Args:
    model: a FocalTransformer (an abstract one from `nnx.eval_shape` works too).
    stage, block: which block, 0-based as in `model.layers[stage].blocks[block]` (stage 0
      is the summary's and the pictures' "stage 1").
    query: the query as an input-image pixel (row, col); the token holding it is used.
    img_size: the input size (default: the size the model was built for).
  """
  config = model.config
  height, width = to_pair(img_size) if img_size is not None else config.img_size
  blk = _block(model, stage, block)
  if getattr(config, "version", 1) == 2:
    return focal_fast_keys((height, width), stage, block, query, top_k=config.focal_topK,
                           window_size=config.window_size, patch_size=config.patch_size,
                           use_shift=config.use_shift)
  stride = config.patch_size * 2**stage
  grid = config.stage_resolution(stage, (height, width))
  ws, expand, shift = blk.window_size, blk.expand_size, blk.shift_size
  focal_window = blk.attn.focal_window
  padded = (-(-grid[0] // ws) * ws, -(-grid[1] // ws) * ws)
  row, col = int(query[0]) // stride, int(query[1]) // stride
  if not (0 <= row < grid[0] and 0 <= col < grid[1]):
    raise ValueError(f"query pixel {tuple(query)} lies outside the {height}x{width} input.")

  # The block rolls its map by -shift before windowing: work in that frame, report in the
  # image frame (+shift, wrapped when drawn).
  srow, scol = (row - shift) % padded[0], (col - shift) % padded[1]
  wrow, wcol = srow // ws, scol // ws
  n_windows = (padded[0] // ws, padded[1] // ws)

  def cell_boxes(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.stack([rows + shift, cols + shift, rows + shift + 1, cols + shift + 1], axis=-1)

  groups = []
  # 1. The window itself, row-major.
  rows, cols = np.meshgrid(wrow * ws + np.arange(ws), wcol * ws + np.arange(ws), indexing="ij")
  valid = np.ones(ws * ws, bool)
  if shift:
    mask = index_tables.shift_mask(padded, ws, shift)[wrow, wcol]  # [ws*ws, ws*ws]
    valid = mask[(srow - wrow * ws) * ws + (scol - wcol * ws)] == 0
  groups.append(KeyGroup(f"window {ws}x{ws}", cell_boxes(rows.ravel(), cols.ravel()), valid,
                         np.zeros(ws * ws, bool)))

  # 2. The ring: window (wrow, wcol) of each map rolled by (row_sign*e, col_sign*e), keeping
  #    the official fixed subset; jnp.roll(x, s)[i] = x[(i - s) mod n] (cyclic).
  if expand > 0:
    keep = index_tables.ring_keep_mask(ws, expand)  # [4, ws, ws]
    local_r, local_c = np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")
    all_rows, all_cols = [], []
    for r, (row_sign, col_sign) in enumerate(index_tables.RING_ROLL_SIGNS):
      all_rows.append((wrow * ws + local_r - row_sign * expand)[keep[r]])
      all_cols.append((wcol * ws + local_c - col_sign * expand)[keep[r]])
    rows, cols = np.concatenate(all_rows), np.concatenate(all_cols)
    wrapped = (rows < 0) | (rows >= padded[0]) | (cols < 0) | (cols >= padded[1])
    boxes = cell_boxes(rows % padded[0], cols % padded[1])
    groups.append(KeyGroup(f"ring (expand {expand})", boxes, np.ones(len(rows), bool), wrapped))

  # 3. Pooled levels: sub-windows of side floor(ws / 2**k) of the centrally fitted map,
  #    unfolded with stride 2**k around the window (zero padding -> masked keys).
  for level in range(blk.pooled_levels):
    step = 2**level
    side = blk.pool_window(level)
    pooled = (n_windows[0] * step, n_windows[1] * step)
    origin = (_fit_origin(padded[0], pooled[0] * side), _fit_origin(padded[1], pooled[1] * side))
    kernel = index_tables.unfold_kernel_size(focal_window, level)
    offsets = np.arange(step - 1, kernel) - kernel // 2
    prow, pcol = np.meshgrid(wrow * step + offsets, wcol * step + offsets, indexing="ij")
    prow, pcol = prow.ravel(), pcol.ravel()
    valid = (prow >= 0) & (prow < pooled[0]) & (pcol >= 0) & (pcol < pooled[1])
    # A sub-window's rows in the padded map; parts in the central padding hold zeros.
    r0 = np.clip(origin[0] + prow * side, 0, padded[0])
    c0 = np.clip(origin[1] + pcol * side, 0, padded[1])
    r1 = np.clip(origin[0] + (prow + 1) * side, 0, padded[0])
    c1 = np.clip(origin[1] + (pcol + 1) * side, 0, padded[1])
    boxes = np.stack([r0 + shift, c0 + shift, r1 + shift, c1 + shift], axis=-1)
    groups.append(KeyGroup(f"pooled k={level}: {side}x{side} sub-windows", boxes, valid,
                           np.zeros(len(boxes), bool)))
  return FocalKeys(stage=stage, block=block, query=(row, col), stride=stride, grid=grid,
                   padded_grid=padded, window_size=ws, expand_size=expand, shift_size=shift,
                   focal_window=focal_window, groups=tuple(groups))


def focal_fast_keys(img_size: Any, stage: int, block: int = 0, query: Sequence[int] = (0, 0), *,
                    top_k: int = 128, window_size: int = 7, patch_size: int = 4,
                    use_shift: bool = False) -> FocalKeys:
  """The Focal-fast keys of the window holding `query` (an input pixel), from the static
  key sets alone: level 0, the `top_k` nearest stage pixels; level 1, the `top_k` nearest
  pooled windows (each drawn as the window it pools).

  `stage`, `block` as in `focal_keys` (the block matters only with `use_shift`: odd blocks
  roll the map by window_size // 2 and the sets, which ignore the roll, move with it, so
  border windows reach across the opposite border). Defaults are the released models'.
  """
  height, width = to_pair(img_size)
  stride = patch_size * 2**stage
  grid = (height // stride, width // stride)
  ws = window_size if min(grid) > window_size else min(grid)  # the official stage fallback
  shift = ws // 2 if use_shift and block % 2 == 1 and min(grid) > window_size else 0
  row, col = int(query[0]) // stride, int(query[1]) // stride
  if not (0 <= row < grid[0] and 0 <= col < grid[1]):
    raise ValueError(f"query pixel {tuple(query)} lies outside the {height}x{width} input.")
  n_ww = grid[1] // ws
  srow, scol = (row - shift) % grid[0], (col - shift) % grid[1]  # the block's rolled frame
  window = (srow // ws) * n_ww + scol // ws

  def boxes_of(rows: np.ndarray, cols: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.stack([rows + shift, cols + shift, rows + shift + side, cols + shift + side], -1)
    wrapped = (boxes[:, 2] > grid[0]) | (boxes[:, 3] > grid[1])  # cross the image border
    return boxes, wrapped

  pixels = key_sets.pixel_key_sets(grid[0], grid[1], ws, top_k)[window]  # [K0]
  windows = key_sets.window_key_sets(grid[0] // ws, n_ww, top_k)[window]  # [K1]
  groups = []
  for name, rows, cols, side in (
      (f"level 0: {len(pixels)} nearest pixels", pixels // grid[1], pixels % grid[1], 1),
      (f"level 1: {len(windows)} nearest windows", windows // n_ww * ws, windows % n_ww * ws, ws)):
    boxes, wrapped = boxes_of(rows, cols, side)
    groups.append(KeyGroup(name, boxes, np.ones(len(boxes), bool), wrapped))
  return FocalKeys(stage=stage, block=block, query=(row, col), stride=stride, grid=grid,
                   padded_grid=grid, window_size=ws, expand_size=0, shift_size=shift,
                   focal_window=0, groups=tuple(groups), version=2)


def _wrapped_rects(box: np.ndarray, padded: tuple[int, int], grid: tuple[int, int]
                   ) -> list[tuple[int, int, int, int]]:
  """The parts of a token box inside the image, wrapping modulo the padded grid."""
  rects = []
  for dr in (-padded[0], 0, padded[0]):
    for dc in (-padded[1], 0, padded[1]):
      r0, c0 = max(box[0] + dr, 0), max(box[1] + dc, 0)
      r1, c1 = min(box[2] + dr, grid[0]), min(box[3] + dc, grid[1])
      if r0 < r1 and c0 < c1:
        rects.append((r0, c0, r1, c1))
  return rects


def key_density(keys: FocalKeys, weights: np.ndarray | None = None) -> np.ndarray:
  """Attention mass per stage token: each key's weight spread evenly over its region.

  `weights` is one value per key (official order; default: 1 per valid key). Returns
  float [grid rows, grid cols]; with softmax probabilities it sums to the mass that falls
  inside the image (padding takes the rest).
  """
  if weights is None:
    weights = np.concatenate([g.valid.astype(np.float64) for g in keys.groups])
  weights = np.asarray(weights, np.float64)
  if weights.shape != (keys.num_keys,):
    raise ValueError(f"Expected one weight per key ({keys.num_keys}), got shape {weights.shape}.")
  density = np.zeros(keys.grid, np.float64)
  index = 0
  for group in keys.groups:
    for box in group.boxes:
      area = max(int((box[2] - box[0]) * (box[3] - box[1])), 1)
      for r0, c0, r1, c1 in _wrapped_rects(box, keys.padded_grid, keys.grid):
        density[r0:r1, c0:c1] += weights[index] / area
      index += 1
  return density


def _stage_input(model: Any, images: jnp.ndarray, stage: int, block: int) -> jnp.ndarray:
  """The input of `model.layers[stage].blocks[block]` (eval mode)."""
  x = model.patch_embed(images.astype(model.config.dtype))
  if model.absolute_pos_embed is not None:
    b, h, w, c = x.shape
    x = x + model.absolute_pos_embed[...].reshape(1, h, w, c).astype(x.dtype)
  for index, layer in enumerate(model.layers):
    for blk in layer.blocks[: block if index == stage else None]:
      x = blk(x)
    if index == stage:
      return x
    x = layer.downsample(x)
  raise AssertionError("unreachable")


def attention_probabilities(model: Any, images: Any, keys: FocalKeys) -> np.ndarray:
  """The softmax over the keys of `keys.query` for the first image: float [heads, keys].

  Recomputes the block's logits for that one query from its parameters (qkv, the three
  relative-position tables, the static masks), in the official key order; call
  `model.eval()` first so that dropout is off. `images`: normalised [B, H, W, C] or [H, W, C].
  """
  return query_attention(model, images, keys)["probabilities"]


def query_attention(model: Any, images: Any, keys: FocalKeys) -> dict[str, np.ndarray]:
  """`attention_probabilities` with what it is built from (float64 NumPy):

  probabilities [nH, keys], values [keys, C] (the v of every key, heads side by side),
  logits [nH, keys] (bias and masks included) and block_input [C] at the query token.
  """
  if keys.version != 1:
    raise ValueError("query_attention covers the Focal Transformer (v1); Focal-fast keys from "
                     "focal_fast_keys give the geometry only (plot_focal_attention(image, keys)).")
  images = jnp.asarray(images)
  if images.ndim == 3:
    images = images[None]
  images = images[:1]
  expected = keys.image_size
  if tuple(images.shape[1:3]) != expected:
    raise ValueError(f"`keys` were computed for {expected[0]}x{expected[1]} inputs, the images "
                     f"are {images.shape[1]}x{images.shape[2]}: call focal_keys with img_size.")
  blk = _block(model, keys.stage, keys.block)
  attn = blk.attn
  x = _stage_input(model, images, keys.stage, keys.block)
  dim, heads = x.shape[-1], attn.num_heads
  ws, shift = keys.window_size, keys.shift_size
  padded = keys.padded_grid
  y = blk.norm1(x)
  y = jnp.pad(y, ((0, 0), (0, padded[0] - y.shape[1]), (0, padded[1] - y.shape[2]), (0, 0)))
  if shift:
    y = jnp.roll(y, (-shift, -shift), axis=(1, 2))  # the block's cyclic shift
  qkv = np.asarray(attn.qkv(y)[0], np.float64)  # [Hp, Wp, 3C], shifted frame
  srow, scol = (keys.query[0] - shift) % padded[0], (keys.query[1] - shift) % padded[1]
  q = qkv[srow, scol, :dim].reshape(heads, -1) * attn.scale  # [nH, hd]
  q_index = (srow % ws) * ws + scol % ws  # the query's place in its window

  kv_parts, bias_parts, mask_parts = [], [], []
  window, *rest = keys.groups
  for group in [window] + ([rest.pop(0)] if keys.expand_size > 0 else []):
    rows = (group.boxes[:, 0] - shift) % padded[0]  # back to the shifted frame
    cols = (group.boxes[:, 1] - shift) % padded[1]
    kv_parts.append(qkv[rows, cols, dim:])  # [n, 2C]
    mask_parts.append(np.where(group.valid, 0.0, index_tables.MASK_VALUE))
  table = np.asarray(attn.relative_position_bias_table[...], np.float64)
  bias_parts.append(table[index_tables.relative_position_index((ws, ws), (ws, ws))[q_index]].T)
  if keys.expand_size > 0:
    neighbors = np.asarray(attn.relative_position_bias_table_to_neighbors[...], np.float64)
    bias_parts.append(neighbors[0, :, q_index])  # [nH, ring]
  for level, group in enumerate(rest):
    kv_map = np.asarray(attn.qkv(blk.pool(y, level))[0, ..., dim:], np.float64)  # [gh, gw, 2C]
    step = 2**level
    kernel = index_tables.unfold_kernel_size(keys.focal_window, level)
    offsets = np.arange(step - 1, kernel) - kernel // 2
    prow, pcol = np.meshgrid((srow // ws) * step + offsets, (scol // ws) * step + offsets,
                             indexing="ij")
    prow, pcol = prow.ravel(), pcol.ravel()
    kv = np.zeros((group.size, 2 * dim))  # the unfold pads with zeros
    kv[group.valid] = kv_map[prow[group.valid], pcol[group.valid]]
    kv_parts.append(kv)
    side = keys.focal_window + step - 1
    table_k = np.asarray(attn.relative_position_bias_table_to_windows[level][...], np.float64)
    index = index_tables.relative_position_index((ws, ws), (side, side))[q_index]
    bias_parts.append(table_k[:, index])  # [nH, side*side]
    mask_parts.append(np.where(group.valid, 0.0, index_tables.MASK_VALUE))
  kv = np.concatenate(kv_parts)  # [keys, 2C]
  k = kv[:, :dim].reshape(-1, heads, dim // heads)  # [keys, nH, hd]
  logits = np.einsum("hd,khd->hk", q, k) + np.concatenate(bias_parts, axis=1)
  logits = logits + np.concatenate(mask_parts)[None]
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  return {"probabilities": probs, "values": kv[:, dim:], "logits": logits,
          "block_input": np.asarray(x[0, keys.query[0], keys.query[1]], np.float64)}


def _plt():
  import matplotlib.pyplot as plt  # noqa: PLC0415 (only the pictures need matplotlib)

  return plt


def _as_display_image(image: Any) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 4:
    image = image[0]
  if image.dtype == np.uint8:
    return image
  lo, hi = float(image.min()), float(image.max())
  return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def _draw_box(ax: Any, keys: FocalKeys, box: np.ndarray, **style: Any) -> None:
  from matplotlib.patches import Rectangle  # noqa: PLC0415

  s = keys.stride
  for r0, c0, r1, c1 in _wrapped_rects(box, keys.padded_grid, keys.grid):
    ax.add_patch(Rectangle((c0 * s - 0.5, r0 * s - 0.5), (c1 - c0) * s, (r1 - r0) * s, **style))


def _mark_query(ax: Any, keys: FocalKeys) -> None:
  s = keys.stride
  box = np.array([keys.query[0], keys.query[1], keys.query[0] + 1, keys.query[1] + 1])
  _draw_box(ax, keys, box, facecolor="white", edgecolor="black", linewidth=1.0)
  ax.plot((keys.query[1] + 0.5) * s - 0.5, (keys.query[0] + 0.5) * s - 0.5, marker="*",
          markersize=11, color="white", markeredgecolor="black", markeredgewidth=0.8)


def plot_focal_attention(image: Any, keys: FocalKeys, weights: np.ndarray | None = None, *,
                         axes: Sequence[Any] | None = None, title: str | None = None) -> Any:
  """Draws what the query of `keys` attends to over `image`: one panel per focal level
  (window, ring, each pooled level) and one with all of them.

  `image`: [H, W, 3] (uint8, or floats of any range) of the size the keys were computed
  for. `weights`: optional per-key values (e.g. `attention_probabilities(...).mean(0)`);
  each key's region is then shaded by its weight, else every valid key equally. Ring keys
  that wrap around the border are hatched; masked keys are dotted. Returns the Figure.
  """
  plt = _plt()
  image = _as_display_image(image)
  if tuple(image.shape[:2]) != keys.image_size:
    raise ValueError(f"The image is {image.shape[0]}x{image.shape[1]} but the keys were computed "
                     f"for {keys.image_size[0]}x{keys.image_size[1]}.")
  panels = len(keys.groups) + 1
  if axes is None:
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
  else:
    axes = list(axes)
    if len(axes) != panels:
      raise ValueError(f"Expected {panels} axes (one per focal level plus a summary), got "
                       f"{len(axes)}.")
    fig = axes[0].figure
  parts = keys.split(np.asarray(weights, np.float64)) if weights is not None else None
  s = keys.stride

  for index, (ax, group) in enumerate(zip(axes, keys.groups)):
    color = LEVEL_COLORS[index % len(LEVEL_COLORS)]
    ax.imshow(image)
    top = float(parts[index].max()) if parts is not None and parts[index].size else 1.0
    for k, box in enumerate(group.boxes):
      if not group.valid[k]:
        _draw_box(ax, keys, box, fill=False, edgecolor="0.6", linestyle=":", linewidth=0.6)
        continue
      alpha = 0.55 * (parts[index][k] / top if parts is not None and top > 0 else 1.0)
      _draw_box(ax, keys, box, facecolor=color, alpha=max(alpha, 0.03), edgecolor="none")
      _draw_box(ax, keys, box, fill=False, edgecolor=color, linewidth=0.5,
                hatch="////" if group.wrapped[k] else None)
    _mark_query(ax, keys)
    label = f"{group.name}\n{group.size} keys"
    if group.wrapped.any():
      label += f", {int(group.wrapped.sum())} wrapped"
    if not group.valid.all():
      label += f", {int((~group.valid).sum())} masked"
    if parts is not None:
      label += f", mass {parts[index].sum():.2f}"
    ax.set_title(label, fontsize=9)

  ax = axes[-1]
  ax.imshow(image)
  density = key_density(keys, weights)
  if weights is not None:
    heat = np.kron(density, np.ones((s, s)))
    ax.imshow(np.ma.masked_less_equal(heat, 0), cmap="magma", alpha=0.6,
              extent=(-0.5, heat.shape[1] - 0.5, heat.shape[0] - 0.5, -0.5))
  for index in reversed(range(len(keys.groups))):
    group = keys.groups[index]
    color = LEVEL_COLORS[index % len(LEVEL_COLORS)]
    for k, box in enumerate(group.boxes):
      if group.valid[k]:
        _draw_box(ax, keys, box, fill=weights is None, facecolor=color,
                  alpha=0.35 if weights is None else 1.0, edgecolor=color, linewidth=0.4)
  _mark_query(ax, keys)
  suffix = "\n(attention per pixel)" if weights is not None else ""
  ax.set_title(f"all levels: {keys.num_keys} keys{suffix}", fontsize=9)
  for ax in axes:
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
  if title is None:
    title = (f"stage {keys.stage + 1}, block {keys.block}: query token {keys.query}\n"
             f"({s}x{s} px tokens, grid {keys.grid[0]}x{keys.grid[1]})")
  if title:
    axes[0].set_ylabel(title, fontsize=9)
  return fig


def receptive_fields(model: Any, img_size: Any = None) -> list[dict[str, Any]]:
  """Region each focal level covers around a window, per stage (first block of each).

  One dict per (stage, level): stage (1-based), level name, side in tokens and in input
  pixels (before clipping at the border), and the number of keys it contributes. For
  Focal-fast models, the box around each level's key set of the central window.
  """
  config = model.config
  size = to_pair(img_size) if img_size is not None else config.img_size
  if getattr(config, "version", 1) == 2:
    return _focal_fast_receptive_fields(config, size, len(model.layers))
  rows = []
  for stage, layer in enumerate(model.layers):
    blk = layer.blocks[0]
    stride = config.patch_size * 2**stage
    ws, expand = blk.window_size, blk.expand_size
    levels = [("window", ws, ws * ws)]
    if expand > 0:
      levels.append(("ring", ws + 2 * expand, index_tables.ring_size(ws, expand)))
    for level in range(blk.pooled_levels):
      side = (blk.attn.focal_window + 2**level - 1) * blk.pool_window(level)
      levels.append((f"pooled k={level}", side,
                     index_tables.pooled_keys_per_window(blk.attn.focal_window, level)))
    for name, side, count in levels:
      rows.append(dict(stage=stage + 1, level=name, tokens=side, pixels=side * stride,
                       keys=count, image=size))
  return rows


def _focal_fast_receptive_fields(config: Any, size: tuple[int, int], stages: int
                                 ) -> list[dict[str, Any]]:
  """`receptive_fields` of Focal-fast: the side of the box around the key set of the
  window nearest the image centre, per level."""
  rows = []
  for stage in range(stages):
    stride = config.patch_size * 2**stage
    query = (size[0] // 2, size[1] // 2)
    keys = focal_fast_keys(size, stage, 0, query, top_k=config.focal_topK,
                           window_size=config.window_size, patch_size=config.patch_size)
    for name, group in zip(("level 0 (pixels)", "level 1 (windows)"), keys.groups):
      side = int(max(group.boxes[:, 2].max() - group.boxes[:, 0].min(),
                     group.boxes[:, 3].max() - group.boxes[:, 1].min()))
      rows.append(dict(stage=stage + 1, level=name, tokens=side, pixels=side * stride,
                       keys=group.size, image=size))
  return rows


def plot_receptive_fields(model: Any, img_size: Any = None, *, ax: Any = None) -> Any:
  """Grouped bars: the side (input pixels) of the region each focal level covers, per stage,
  labelled with its keys; the dashed line is the image size. Returns the Figure."""
  plt = _plt()
  rows = receptive_fields(model, img_size)
  if ax is None:
    fig, ax = plt.subplots(figsize=(8, 4))
  else:
    fig = ax.figure
  names = list(dict.fromkeys(r["level"] for r in rows))
  stages = sorted({r["stage"] for r in rows})
  width = 0.8 / len(names)
  for i, name in enumerate(names):
    points = [r for r in rows if r["level"] == name]
    xs = [r["stage"] - 0.4 + width * (i + 0.5) for r in points]
    bars = ax.bar(xs, [r["pixels"] for r in points], width, label=name,
                  color=LEVEL_COLORS[i % len(LEVEL_COLORS)])
    for bar, r in zip(bars, points):
      ax.annotate(f"{r['keys']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                  ha="center", va="bottom", fontsize=7)
  image = rows[0]["image"]
  ax.axhline(max(image), color="black", linestyle="--", linewidth=1,
             label=f"image side ({max(image)} px)")
  ax.set_xticks(stages, [f"stage {s}" for s in stages])
  ax.set_ylabel("region side (input pixels)")
  ax.set_title(f"Region each focal level covers around a window at {image[0]}x{image[1]}"
               " (bar label: keys)", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
