"""The Focal Transformer as a dense-prediction backbone (mmsegmentation's backbone mode).

As the Swin and FocalNet backbones for mmsegmentation: the classifier head and the final
norm are gone; each stage in `out_indices` gets its own LayerNorm `norm{i}`, applied to the
stage map before downsampling; `frozen_stages` freezes the stem and early stages.

`frozen_stages` follows Swin's and FocalNet's mmsegmentation code: -1 freezes nothing;
0 freezes `patch_embed`; 1 also `absolute_pos_embed` (ape models); k >= 2 also stages
1..k-1 (`layers.0` .. `layers.{k-2}`, each with its downsample). Frozen parts pass their
output through `stop_gradient` (no gradient reaches them) and their dropout and stochastic
depth are off (PyTorch's frozen modules stay in eval mode). An optimiser must still leave
them alone (weight decay would move them): build it over `trainable_filter()`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.models.config import FocalConfig
from focal_jax.models.focal_transformer import FocalTransformer
from focal_jax.models.layers import layer_norm

Path = tuple[Any, ...]


class FocalBackbone(FocalTransformer):
  """Stage maps [B, H/s, W/s, C_i] (s = 4, 8, 16, 32) for the stages in `out_indices`,
  each normalised by its `norm{i}`. Parameter names: the official ones plus `norm{i}`."""

  def __init__(self, config: FocalConfig, *, out_indices: Sequence[int] = (0, 1, 2, 3),
               frozen_stages: int = -1, rngs: nnx.Rngs):
    if config.num_classes:
      raise ValueError(f"A backbone has no classifier: got num_classes={config.num_classes}, "
                       "expected 0.")
    out_indices = tuple(int(i) for i in out_indices)
    if not out_indices or any(not 0 <= i < config.num_layers for i in out_indices):
      raise ValueError(f"out_indices={list(out_indices)}: expected stage indices in "
                       f"0..{config.num_layers - 1}.")
    if not -1 <= frozen_stages <= config.num_layers + 1:
      raise ValueError(f"frozen_stages={frozen_stages}: expected -1 (none) up to "
                       f"{config.num_layers + 1} (the stem and all {config.num_layers} stages).")
    super().__init__(config, rngs=rngs)
    self.norm = None  # no final norm: one norm per output stage instead
    self.out_indices = out_indices
    self.frozen_stages = frozen_stages
    for i in out_indices:
      setattr(self, f"norm{i}", layer_norm(config.stage_dim(i), dtype=config.dtype, rngs=rngs))
    for module in self._frozen_modules():
      for _, child in nnx.iter_modules(module):
        if isinstance(child, nnx.Dropout):
          child.rate = 0.0  # frozen modules stay in eval mode, as in PyTorch

  @property
  def frozen_layers(self) -> int:
    """How many stages (`layers.i`) are frozen."""
    return max(self.frozen_stages - 1, 0)

  def _frozen_modules(self) -> list[nnx.Module]:
    modules = [self.patch_embed] if self.frozen_stages >= 0 else []
    if self.frozen_stages >= 2:
      modules.append(self.pos_drop)
    return modules + [self.layers[i] for i in range(self.frozen_layers)]

  def frozen_paths(self) -> list[Path]:
    """Path prefixes (from this module) of the frozen parameters."""
    paths: list[Path] = [("patch_embed",)] if self.frozen_stages >= 0 else []
    if self.frozen_stages >= 1 and self.absolute_pos_embed is not None:
      paths.append(("absolute_pos_embed",))
    return paths + [("layers", i) for i in range(self.frozen_layers)]

  def trainable_filter(self, prefix: Path = ()) -> Callable[[Path, Any], bool]:
    """An NNX filter: parameters not frozen (`prefix`: this module's path in the tree the
    filter is applied to), e.g. `nnx.Optimizer(model, tx, wrt=...)`."""
    frozen = [prefix + path for path in self.frozen_paths()]

    def trainable(path: Path, value: Any) -> bool:
      if not isinstance(value, nnx.Param):
        return False
      return not any(tuple(path[:len(f)]) == f for f in frozen)

    return trainable

  def _prepare_input(self, images: jnp.ndarray) -> jnp.ndarray:
    """Checks the images (a family whose backbone pads inside overrides this)."""
    self._check_input(images)
    return images

  def _downsample(self, layer: nnx.Module, x: jnp.ndarray) -> jnp.ndarray:
    """The stage's downsampling of its map [B, H, W, C] -> [B, H/2, W/2, 2C]."""
    return layer.downsample(x)

  def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    """Normalised stage maps of `out_indices`; H and W as `forward_features` accepts them."""
    images = self._prepare_input(images)
    x = self.patch_embed(images.astype(self.config.dtype))  # [B, H/4, W/4, C]
    if self.frozen_stages >= 0:
      x = jax.lax.stop_gradient(x)
    if self.absolute_pos_embed is not None:
      batch, height, width, dim = x.shape
      x = x + self.absolute_pos_embed[...].reshape(1, height, width, dim).astype(x.dtype)
      if self.frozen_stages >= 1:
        x = jax.lax.stop_gradient(x)
    x = self.pos_drop(x)
    outputs = []
    for i, layer in enumerate(self.layers):
      frozen = i < self.frozen_layers
      x = layer(x)
      x = jax.lax.stop_gradient(x) if frozen else x
      if i in self.out_indices:
        outputs.append(getattr(self, f"norm{i}")(x))
      if layer.downsample is not None:
        x = self._downsample(layer, x)
        x = jax.lax.stop_gradient(x) if frozen else x
    return outputs
