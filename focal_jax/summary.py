"""Per-stage summary of a Focal Transformer or a FocalNet: resolution, window (Focal) or
focal levels and kernels (FocalNet), keys, parameters, FLOPs.

    python -m focal_jax.summary --model focal_tiny --img-size 224
    python -m focal_jax.summary --model focalnet_tiny_srf
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
from flax import nnx

from focal_jax.models import ALL_VARIANTS, create_model
from focal_jax.models.config import to_pair
from focal_jax.models.flops import keys_per_query, official_macs, stage_macs
from focal_jax.models.focal_transformer import FocalTransformer
from focal_jax.models.focalnet import FocalNet
from focal_jax.models.focalnet import flops as focalnet_flops


def _count(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def stage_rows(model: FocalTransformer, img_size: Any = None) -> list[dict[str, Any]]:
  """One dict per stage: resolution, window, expand, keys per query, params, MACs (for a
  FocalNet: focal levels and kernel sizes instead of heads, window, expand and keys)."""
  config = model.config
  size = to_pair(img_size) if img_size is not None else config.img_size
  if isinstance(model, FocalNet):
    return _focalnet_rows(model, size)
  rows = []
  for stage, (layer, keys, macs) in enumerate(
      zip(model.layers, keys_per_query(model), stage_macs(model, size))):
    block = layer.blocks[0]
    rows.append(dict(
        stage=stage + 1, resolution=config.stage_resolution(stage, size),
        dim=config.stage_dim(stage), depth=len(layer.blocks), heads=config.num_heads[stage],
        window=block.window_size, expand=block.expand_size, keys_per_query=keys,
        params=_count(nnx.state(layer, nnx.Param)), macs=macs))
  return rows


def _focalnet_rows(model: FocalNet, size: tuple[int, int]) -> list[dict[str, Any]]:
  config = model.config
  rows = []
  for stage, (layer, macs) in enumerate(zip(model.layers, focalnet_flops.stage_macs(model, size))):
    modulation = layer.blocks[0].modulation
    rows.append(dict(
        stage=stage + 1, resolution=config.stage_resolution(stage, size),
        dim=config.stage_dim(stage), depth=len(layer.blocks), levels=modulation.focal_level,
        kernels=modulation.kernel_sizes, params=_count(nnx.state(layer, nnx.Param)), macs=macs))
  return rows


def _focalnet_lines(model: FocalNet, size: tuple[int, int]) -> tuple[str, list[str]]:
  header = (f"{'stage':>5} {'grid':>9} {'dim':>5} {'depth':>5} {'levels':>6} {'kernels':>12} "
            f"{'params':>12} {'GMACs':>7}")
  lines = []
  for row in stage_rows(model, size):
    grid = f"{row['resolution'][0]}x{row['resolution'][1]}"
    kernels = ",".join(str(k) for k in row["kernels"]) or "-"
    lines.append(f"{row['stage']:>5} {grid:>9} {row['dim']:>5} {row['depth']:>5} "
                 f"{row['levels']:>6} {kernels:>12} {row['params']:>12,} {row['macs'] / 1e9:>7.3f}")
  return header, lines


def format_summary(model: FocalTransformer, name: str = "", img_size: Any = None) -> str:
  """A plain-text table of `stage_rows` plus totals."""
  config = model.config
  size = to_pair(img_size) if img_size is not None else config.img_size
  if isinstance(model, FocalNet):
    header, rows = _focalnet_lines(model, size)
  else:
    header = (f"{'stage':>5} {'grid':>9} {'dim':>5} {'depth':>5} {'heads':>5} {'window':>6} "
              f"{'expand':>6} {'keys/query':>10} {'params':>12} {'GMACs':>7}")
    rows = []
    for row in stage_rows(model, size):
      grid = f"{row['resolution'][0]}x{row['resolution'][1]}"
      rows.append(
          f"{row['stage']:>5} {grid:>9} {row['dim']:>5} {row['depth']:>5} {row['heads']:>5} "
          f"{row['window']:>6} {row['expand']:>6} {row['keys_per_query']:>10} "
          f"{row['params']:>12,} {row['macs'] / 1e9:>7.3f}")
  lines = [f"{name or 'model'} at {size[0]}x{size[1]}", header, "-" * len(header), *rows]
  total = _count(nnx.state(model, nnx.Param))
  lines.append("-" * len(header))
  lines.append(f"parameters: {total:,}   official flops(): {official_macs(model, size) / 1e9:.2f} G "
               "(multiply-accumulates)")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="focal_tiny", choices=sorted(ALL_VARIANTS))
  parser.add_argument("--img-size", type=int, nargs="+", default=[224],
                      help="input size: one value, or height width")
  parser.add_argument("--num-classes", type=int, default=1000)
  args = parser.parse_args(argv)
  size = to_pair(args.img_size[0] if len(args.img_size) == 1 else args.img_size)
  # Shapes only: no parameter is materialised, so even Focal-B prints instantly.
  model = nnx.eval_shape(lambda: create_model(args.model, num_classes=args.num_classes, img_size=size))
  print(format_summary(model, args.model, size))


if __name__ == "__main__":
  main()
