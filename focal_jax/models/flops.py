"""FLOPs: the official `flops()` count (multiply-accumulates) and XLA's cost analysis."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.focal_fast.attention import FocalFastAttention
from focal_jax.models.block import FocalTransformerBlock
from focal_jax.models.config import to_pair
from focal_jax.models.focal_transformer import FocalTransformer
from focal_jax.models.focalnet import FocalNet
from focal_jax.models.focalnet import flops as focalnet_flops


def _attention_macs(block: FocalTransformerBlock, dim: int) -> float:
  """Official WindowAttention.flops for one window (N = window**2 queries)."""
  attn = block.attn
  ws, heads, head_dim = attn.window_size, attn.num_heads, dim // attn.num_heads
  n = ws * ws
  pooled = attn.pooled_levels > 0
  ring = (ws + 2 * attn.expand_size) ** 2 - ws * ws if attn.expand_size > 0 else 0
  macs = n * dim * 3 * dim + n * dim * dim  # qkv and proj
  for _ in range(2):  # q @ k and attn @ v
    macs += heads * n * head_dim * n
    if pooled:
      macs += heads * n * head_dim * attn.focal_window**2
    macs += heads * n * head_dim * ring
  return macs


def _focal_fast_attention_macs(block: FocalTransformerBlock, dim: int,
                               resolution: tuple[int, int]) -> float:
  """Official Focal-fast WindowAttention.flops for one window: products over each level's topK
  keys and the position-bias MLP (per query at level 0, once per window at level 1)."""
  attn = block.attn
  n, heads, head_dim = attn.window_size**2, attn.num_heads, dim // attn.num_heads
  macs = n * dim * 3 * dim + n * dim * dim  # qkv and proj
  for level, keys in enumerate(attn.key_counts(resolution)):
    queries = n if level == 0 else n // attn.window_size**2
    macs += 2 * heads * n * head_dim * keys  # q @ k and attn @ v
    macs += queries * keys * (2 * head_dim + head_dim * heads)  # coord2rpb
  return macs


def block_macs(block: FocalTransformerBlock, dim: int, resolution: tuple[int, int],
               mlp_ratio: float) -> float:
  """Official FocalTransformerBlock.flops (its approximations kept, e.g. nW * 2**k)."""
  height, width = resolution
  ws = block.window_size
  num_windows = height * width / ws / ws
  macs = 2 * dim * height * width  # norm1, norm2
  if isinstance(block.attn, FocalFastAttention):
    macs += num_windows * _focal_fast_attention_macs(block, dim, resolution)
  else:
    macs += num_windows * _attention_macs(block, dim)
  for level in range(block.pooled_levels):
    side = block.pool_window(level)
    pooled_windows = num_windows * 2**level
    macs += pooled_windows * dim * side * side + pooled_windows * dim * 3 * dim
  macs += 2 * height * width * dim * dim * mlp_ratio
  return macs


def stage_macs(model: FocalTransformer, img_size: Sequence[int]) -> list[float]:
  """Official count per stage (blocks and the stage's downsample)."""
  config = model.config
  result = []
  for stage, layer in enumerate(model.layers):
    dim = config.stage_dim(stage)
    resolution = config.stage_resolution(stage, img_size)
    macs = sum(block_macs(block, dim, resolution, config.mlp_ratio) for block in layer.blocks)
    if layer.downsample is not None:
      out_h, out_w = resolution[0] // 2, resolution[1] // 2
      kernel = layer.downsample.kernel_size
      macs += out_h * out_w * 2 * dim * (dim * kernel * kernel + 1)  # conv + LayerNorm
    result.append(macs)
  return result


def official_macs(model: FocalTransformer, img_size: Any = None) -> float:
  """The official `FocalTransformer.flops()` (or `FocalNet.flops()`) for this model at `img_size`."""
  if isinstance(model, FocalNet):
    return focalnet_flops.official_macs(model, img_size)
  config = model.config
  size = to_pair(img_size) if img_size is not None else config.img_size
  height, width = config.stage_resolution(0, size)
  kernel = model.patch_embed.kernel_size
  macs = height * width * config.embed_dim * config.in_chans * kernel * kernel
  if model.patch_embed.norm is not None:
    macs += height * width * config.embed_dim
  macs += sum(stage_macs(model, size))
  macs += config.num_features * height * width // 2**config.num_layers  # final norm
  macs += config.num_features * config.num_classes
  return macs


def xla_flops(model: FocalTransformer, img_size: Any = None, batch: int = 1) -> float:
  """FLOPs of the compiled eval forward pass, from XLA's cost analysis (a multiply-add is 2).

  Counted with every block unrolled: the cost analysis counts a scanned loop body once.
  """
  size = to_pair(img_size) if img_size is not None else model.config.img_size
  graphdef, state = nnx.split(model)

  def forward(state, images):
    module = nnx.merge(graphdef, state)
    module.eval()
    for stage in module.layers:
      stage.block_runs = tuple((i, i + 1) for i in range(len(stage.blocks)))
    return module(images)

  images = jax.ShapeDtypeStruct((batch, *size, model.config.in_chans), jnp.float32)
  abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  compiled = jax.jit(forward).lower(abstract_state, images).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def count_flops(model: FocalTransformer, img_size: Any = None) -> dict[str, float]:
  """{'official': MACs as the official flops() counts them, 'xla': compiled forward FLOPs}."""
  return {"official": official_macs(model, img_size), "xla": xla_flops(model, img_size)}


def keys_per_query(model: FocalTransformer) -> list[int]:
  """Keys each query attends to in the first block of every stage."""
  return [layer.blocks[0].attn.keys_per_query for layer in model.layers]

