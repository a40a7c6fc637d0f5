"""Command line: move weights between focal_jax checkpoints and the official format.

  python -m focal_jax.convert to-torch   --model NAME --checkpoint CKPT --output out.pth
  python -m focal_jax.convert from-torch --model NAME --checkpoint in.pth --output CKPT_DIR

CKPT is a training workdir (its latest checkpoint; `--ema` takes the EMA parameters) or a
parameter export (a directory with model.json and params/). `.safetensors` works wherever
`.pth` does, without PyTorch. FocalNet weights may also come in timm's or transformers'
layout (`FocalNetForImageClassification`'s .safetensors or .bin); to-torch writes the
official one. Official-name options (`--set use_conv_embed=True`) and
`--img-size` describe the PyTorch model for from-torch. `--task segmentation` reads and
writes UPerNet segmenters in mmsegmentation's layout (`{"meta", "state_dict"}` files,
`--num-classes`, `--img-size` 512 by default); to-torch reads the task from the export.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from focal_jax import storage, weights
from focal_jax.convert.api import TASKS, from_torch_state_dict, to_torch_state_dict
from focal_jax.convert.segmentation import checkpoint_meta
from focal_jax.models import MODEL_NAMES
from focal_jax.weights import segmenter_exports


def _parse_override(text: str) -> tuple[str, Any]:
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE with an official option name, got {text!r}")
  key, value = text.split("=", 1)
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def load_checkpoint_model(path: str, ema: bool = False):
  """(model, description) from a training workdir or a parameter export."""
  if weights.is_export(path):
    return weights.load_exported_model(path), weights.read_description(path)
  directory = os.path.join(path, weights.CHECKPOINT_DIR)
  if not storage.isdir(directory):
    raise FileNotFoundError(
        f"{path!r} is neither a training workdir (no checkpoints/ inside) nor a parameter "
        "export (model.json and params/). Pass the --workdir of a training run or an export.")
  return weights.load_workdir_model(path, ema=ema)


def to_torch(args: argparse.Namespace) -> None:
  if weights.is_export(args.checkpoint) and segmenter_exports.is_segmenter_description(
      weights.read_description(args.checkpoint)):
    return segmentation_to_torch(args)
  if args.task == "segmentation":
    raise SystemExit(f"error: {args.checkpoint} holds no segmenter export (model.json without "
                     '"task": "segmentation").')
  model, description = load_checkpoint_model(args.checkpoint, ema=args.ema)
  saved = description.get("model")
  if args.model and saved and args.model != saved:
    raise SystemExit(f"error: {args.checkpoint} holds a {saved} model, not {args.model}; "
                     f"pass --model {saved}.")
  state_dict = to_torch_state_dict(model)
  weights.save_weights_file(state_dict, args.output)
  print(f"wrote {len(state_dict)} entries ({sum(v.size for v in state_dict.values()):,} values) "
        f"of {saved or 'the model'} to {args.output}")


def segmentation_to_torch(args: argparse.Namespace) -> None:
  segmenter = segmenter_exports.load_exported_segmenter(args.checkpoint)
  saved = weights.read_description(args.checkpoint)["model"]
  if args.model and saved and args.model != saved:
    raise SystemExit(f"error: {args.checkpoint} holds a {saved} segmenter, not {args.model}; "
                     f"pass --model {saved}.")
  state_dict = to_torch_state_dict(segmenter)
  weights.save_weights_file(state_dict, args.output, meta=checkpoint_meta(segmenter, saved))
  print(f"wrote {len(state_dict)} entries ({sum(v.size for v in state_dict.values()):,} values) "
        f"of UPerNet {saved or 'the model'} (mmsegmentation layout) to {args.output}")


def segmentation_from_torch(args: argparse.Namespace, state_dict: Any, img_size: Any,
                            overrides: dict[str, Any]) -> None:
  segmenter = from_torch_state_dict(state_dict, args.model, img_size=img_size,
                                    source=args.checkpoint, task="segmentation",
                                    num_classes=args.num_classes, **overrides)
  description = segmenter_exports.segmenter_description(
      args.model, segmenter.num_classes, img_size,
      {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})
  segmenter_exports.export_segmenter(args.output, segmenter, description)
  count = sum(np.size(v) for v in jax.tree.leaves(nnx.state(segmenter, nnx.Param)))
  print(f"wrote {count:,} parameters and the BatchNorm statistics of UPerNet {args.model} to "
        f"{args.output}")


def from_torch(args: argparse.Namespace) -> None:
  if storage.exists(args.output) and storage.listdir(args.output) and not args.overwrite:
    raise SystemExit(f"error: {args.output} exists and is not empty; choose a new directory "
                     "or pass --overwrite.")
  state_dict = weights.load_weights_file(args.checkpoint)
  overrides = dict(args.set or [])
  sizes = args.img_size or [512 if args.task == "segmentation" else 224]
  img_size = sizes[0] if len(sizes) == 1 else tuple(sizes)
  if args.task == "segmentation":
    return segmentation_from_torch(args, state_dict, img_size, overrides)
  model = from_torch_state_dict(state_dict, args.model, img_size=img_size,
                                source=args.checkpoint, **overrides)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  description = weights.model_description(args.model, model.config.num_classes, img_size,
                                          {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in overrides.items()})
  weights.export_params(args.output, params, description)
  count = sum(np.size(v) for v in jax.tree.leaves(params))
  print(f"wrote {count:,} parameters of {args.model} to {args.output}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m focal_jax.convert",
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  out = commands.add_parser("to-torch", help="focal_jax checkpoint -> official .pth/.safetensors")
  out.add_argument("--model", choices=sorted(MODEL_NAMES), help="expected variant (checked)")
  out.add_argument("--checkpoint", required=True, help="training workdir or parameter export")
  out.add_argument("--output", required=True, help="out.pth or out.safetensors")
  out.add_argument("--ema", action="store_true", help="export the EMA parameters of a workdir")
  out.add_argument("--task", choices=TASKS, help="expected task (read from the export)")
  out.set_defaults(run=to_torch)
  into = commands.add_parser("from-torch", help="official .pth/.safetensors -> parameter export")
  into.add_argument("--model", required=True, choices=sorted(MODEL_NAMES))
  into.add_argument("--checkpoint", required=True, help="in.pth or in.safetensors")
  into.add_argument("--output", required=True, help="directory for the parameter export")
  into.add_argument("--img-size", type=int, nargs="+",
                    help="size the PyTorch model was built for: one value, or height width "
                    "(default 224; 512 for segmentation)")
  into.add_argument("--task", choices=TASKS, default="classification",
                    help="segmentation: an mmsegmentation UPerNet checkpoint")
  into.add_argument("--num-classes", type=int,
                    help="segmentation: classes of the heads (default: read from the weights)")
  into.add_argument("--set", type=_parse_override, action="append", metavar="KEY=VALUE",
                    help="official constructor option, e.g. --set focal_levels=[3,3,3,3]")
  into.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
  into.set_defaults(run=from_torch)
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
