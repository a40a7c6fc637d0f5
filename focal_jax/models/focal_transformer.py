"""The Focal Transformer: patch embedding, four stages of focal blocks, classifier head."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.batch_split import keep_batch_split
from focal_jax.models.block import FocalTransformerBlock, stage_block_options
from focal_jax.models.config import (FocalConfig, check_image_size, check_whole_windows,
                                     make_config)
from focal_jax.models.layers import PatchEmbed, axes, dense, layer_norm, trunc_normal


# Runs of at least this many structurally identical blocks are run under `lax.scan`:
# XLA then compiles one block instead of each of them (Focal-S/B stage 3 has 18). Shorter
# runs (Focal-T stage 3 has 6) stay unrolled: stacking their parameters for the scan costs
# more at run time (12 % of a Focal-T forward on a 2-core CPU) than it saves in compile time.
SCAN_MIN_BLOCKS = 8


def _block_signature(block: nnx.Module) -> Any:
  """Everything that decides a block's program except its stochastic-depth rate."""
  state = nnx.state(block)
  shapes = tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(state))
  return (block.static_options(), block.drop_path is None, jax.tree.structure(state), shapes)


def identical_runs(blocks: list[nnx.Module]) -> tuple[tuple[int, int], ...]:
  """[start, stop) ranges of consecutive blocks with the same signature."""
  runs, start = [], 0
  signatures = [_block_signature(b) for b in blocks]
  for i in range(1, len(blocks) + 1):
    if i == len(blocks) or signatures[i] != signatures[start]:
      runs.append((start, i))
      start = i
  return tuple(runs)


def scan_blocks(blocks: list[nnx.Module], x: jnp.ndarray, remat: bool) -> jnp.ndarray:
  """Runs identical blocks one after another under `lax.scan` over their stacked state.

  Parameters stay in the blocks (the module tree and the checkpoint names do not change);
  they are stacked for the scan, so gradients flow back to each block's own parameters.
  Each block keeps its stochastic-depth rate (passed as data) and its RNG streams, whose
  advanced counters are written back.
  """
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b) for b in blocks])
  rates = (None if blocks[0].drop_path is None else
           jnp.asarray([b.drop_path.rate for b in blocks], jnp.float32))

  def body(y, inputs):
    state, rate = inputs
    block = nnx.merge(graphdef, state)
    y = keep_batch_split(block(y, drop_rate=rate))
    return y, nnx.state(block, nnx.Not(nnx.Param))  # RNG counters advance in training

  if remat:
    body = jax.checkpoint(body)
  x, updated = jax.lax.scan(body, x, (stacked, rates))
  for i, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda a, i=i: jax.lax.index_in_dim(a, i, keepdims=False), updated))
  return x


class FocalStage(nnx.Module):
  """A stage (the official `BasicLayer`): `depth` blocks, then an optional downsample."""

  def __init__(self, config: FocalConfig, stage: int, drop_path_rates: list[float],
               rngs: nnx.Rngs):
    dim = config.stage_dim(stage)
    blocks = self.build_blocks(config, stage, drop_path_rates, rngs)
    self.blocks = nnx.List(blocks)
    self.remat = config.remat
    self.block_runs = identical_runs(blocks) if config.scan_blocks else tuple(
        (i, i + 1) for i in range(len(blocks)))
    if stage < config.num_layers - 1:
      self.downsample = PatchEmbed(
          dim, 2 * dim, patch_size=2, is_stem=False, use_conv_embed=config.use_conv_embed,
          use_norm=True, use_pre_norm=config.use_pre_norm, dtype=config.dtype, rngs=rngs)
    else:
      self.downsample = None

  @staticmethod
  def build_blocks(config: FocalConfig, stage: int, drop_path_rates: list[float],
                   rngs: nnx.Rngs) -> list[nnx.Module]:
    """The stage's focal self-attention blocks (another family's stage overrides this)."""
    dim = config.stage_dim(stage)
    resolution = config.stage_resolution(stage)
    pool_method = config.focal_pool if stage in config.focal_stages else "none"
    blocks = []
    for i in range(config.depths[stage]):
      expand, shift = stage_block_options(i, config.window_size, config.expand_sizes[stage],
                                          config.expand_layer, config.use_shift)
      blocks.append(FocalTransformerBlock(
          dim, resolution, config.num_heads[stage], window_size=config.window_size,
          expand_size=expand, shift_size=shift, mlp_ratio=config.mlp_ratio,
          qkv_bias=config.qkv_bias, qk_scale=config.qk_scale, drop=config.drop_rate,
          attn_drop=config.attn_drop_rate, drop_path_rate=drop_path_rates[i],
          pool_method=pool_method, focal_level=config.focal_levels[stage],
          focal_window=config.focal_windows[stage], use_layerscale=config.use_layerscale,
          layerscale_value=config.layerscale_value, dtype=config.dtype, rngs=rngs,
          version=config.version, focal_topK=config.focal_topK))
    return blocks

  @property
  def scanned_runs(self) -> tuple[tuple[int, int], ...]:
    """The [start, stop) runs of blocks that run under `lax.scan`."""
    return tuple(run for run in self.block_runs if run[1] - run[0] >= SCAN_MIN_BLOCKS)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Runs the blocks on [B, H, W, C]; returns the stage map before downsampling."""
    scanned = self.scanned_runs
    for start, stop in self.block_runs:
      run = [self.blocks[i] for i in range(start, stop)]
      if (start, stop) in scanned:
        x = scan_blocks(run, x, self.remat)
        continue
      for block in run:
        if self.remat:
          x = nnx.remat(lambda blk, y: blk(y))(block, x)
        else:
          x = block(x)
        x = keep_batch_split(x)
    return x


class FocalTransformer(nnx.Module):
  """Focal Transformer (Yang et al., 2021) for NHWC images.

  `model(images)` gives logits [B, num_classes] (or pooled features when num_classes is
  0); `model.forward_features(images)` gives the four stage maps (strides 4, 8, 16, 32)
  for dense-prediction heads. Parameter names mirror the official PyTorch module tree.
  """

  stage_class = FocalStage  # the family's stage: its blocks are what differs

  def __init__(self, config: FocalConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.dtype
    self.patch_embed = PatchEmbed(
        config.in_chans, config.embed_dim, patch_size=config.patch_size, is_stem=True,
        use_conv_embed=config.use_conv_embed, use_norm=config.patch_norm,
        use_pre_norm=False, dtype=dtype, rngs=rngs)  # officially only downsamples pre-norm
    if config.ape:
      height, width = config.stage_resolution(0)
      self.absolute_pos_embed = nnx.Param(
          trunc_normal()(rngs.params(), (1, height * width, config.embed_dim)),
          **axes(None, None, "embed"))
    else:
      self.absolute_pos_embed = None
    self.pos_drop = nnx.Dropout(config.drop_rate, rngs=rngs)
    rates = config.drop_path_rates()
    layers = []
    for stage in range(config.num_layers):
      start = sum(config.depths[:stage])
      layers.append(self.stage_class(config, stage, rates[start:start + config.depths[stage]],
                                     rngs))
    self.layers = nnx.List(layers)
    self.norm = layer_norm(config.num_features, dtype=dtype, rngs=rngs)
    self.head = (dense(config.num_features, config.num_classes, "embed", "classes",
                       dtype=dtype, rngs=rngs) if config.num_classes > 0 else None)

  def _check_input(self, images: jnp.ndarray) -> None:
    config = self.config
    if images.ndim != 4 or images.shape[-1] != config.in_chans:
      raise ValueError(
          f"Expected images of shape [batch, height, width, {config.in_chans}] (NHWC), got "
          f"{tuple(images.shape)}. Convert NCHW arrays with x.transpose(0, 2, 3, 1).")
    check_image_size(config, images.shape[1:3])
    if config.version == 2:
      check_whole_windows(config, images.shape[1:3],
                          [layer.blocks[0].window_size for layer in self.layers])
    if config.ape and tuple(images.shape[1:3]) != config.img_size:
      raise ValueError(
          f"This model uses an absolute position embedding (ape=True) built for "
          f"{config.img_size[0]}x{config.img_size[1]} inputs, got {images.shape[1]}x"
          f"{images.shape[2]}. Build the model with img_size={tuple(images.shape[1:3])}.")

  def forward_features(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    """Stage maps [B, H/s, W/s, C_i] for s = 4, 8, 16, 32 (before each downsample)."""
    self._check_input(images)
    x = self.patch_embed(images.astype(self.config.dtype))  # [B, H/4, W/4, C]
    if self.absolute_pos_embed is not None:
      batch, height, width, dim = x.shape
      x = x + self.absolute_pos_embed[...].reshape(1, height, width, dim).astype(x.dtype)
    x = self.pos_drop(x)
    features = []
    for layer in self.layers:
      x = layer(x)
      features.append(x)
      if layer.downsample is not None:
        x = layer.downsample(x)
    return features

  def forward_head(self, last_stage: jnp.ndarray) -> jnp.ndarray:
    """Final LayerNorm, mean over tokens, linear classifier: [B, H, W, C] -> [B, classes]."""
    features = self.norm(last_stage)
    wide = jnp.promote_types(features.dtype, jnp.float32)  # float32 outputs for bfloat16 runs
    pooled = features.astype(wide).mean(axis=(1, 2))  # [B, C]
    if self.head is None:
      return pooled
    return self.head(pooled.astype(self.config.dtype)).astype(wide)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, num_classes] for normalised NHWC images [B, H, W, in_chans]."""
    return self.forward_head(self.forward_features(images)[-1])


def create_model(name: str | None = "focal_tiny", num_classes: int = 1000, img_size: Any = 224,
                 seed: int = 0, **overrides: Any) -> FocalTransformer:
  """Builds a Focal Transformer variant (see `VARIANTS`) with official-name overrides.

  `img_size` decides the parameter structure exactly as the official constructor does;
  the model still accepts other sizes (multiples of 32) at call time. Parameters are
  created unsharded; their logical axis names are kept as `out_sharding` metadata.
  """
  config = make_config(name, num_classes=num_classes, img_size=img_size, **overrides)
  with nnx.use_eager_sharding(False):
    return FocalTransformer(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
