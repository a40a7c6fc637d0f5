"""Full-size checks of the UPerNet segmenter (the tests run reduced variants).

  python scripts/segmentation_check.py parity --model focal_tiny --size 512 512 --size 480 640
  python scripts/segmentation_check.py table

parity: the PyTorch reference (float64, randomised weights and BN statistics) against
focal_jax (float32, highest matmul precision) converted from its state_dict; prints the
largest absolute difference of the decode and auxiliary logits per image size.
table:  parameters (150 classes, built for 512 crops) and MACs as mmsegmentation counts
them (decode path at 2048x512) for Focal-T/S/B, beside the official figures, for the
classification settings and for the settings that come nearest to them; then FocalNet-T/S/B
SRF/LRF with the backbone options of FocalNet's released ADE20K configs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import focal_jax  # noqa: E402
from focal_jax.models.segmenter_flops import segmenter_macs  # noqa: E402

OFFICIAL = {"focal_tiny": (62e6, 998e9), "focal_small": (85e6, 1130e9), "focal_base": (126e6, 1354e9)}
# microsoft/FocalNet's README, UPerNet on ADE20K (160k): params, FLOPs at 2048x512.
OFFICIAL_FOCALNET = {"focalnet_tiny_srf": (61e6, 944e9), "focalnet_tiny_lrf": (61e6, 949e9),
                     "focalnet_small_srf": (83e6, 1035e9), "focalnet_small_lrf": (84e6, 1044e9),
                     "focalnet_base_srf": (124e6, 1180e9), "focalnet_base_lrf": (126e6, 1192e9)}


def parity(model: str, sizes: list[tuple[int, int]], num_classes: int) -> None:
  import torch  # noqa: PLC0415

  from focal_jax import convert  # noqa: PLC0415
  from focal_jax.convert.reference import upernet as reference_upernet  # noqa: PLC0415
  from focal_jax.models.segmenter import segmenter_config  # noqa: PLC0415

  for size in sizes:
    config = segmenter_config(model, img_size=size)
    reference = reference_upernet.reference_segmenter(config, num_classes)
    reference_upernet.randomise_(reference)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    seg = convert.from_torch_state_dict(state_dict, model, task="segmentation", img_size=size)
    seg.eval()
    reference.double().eval()
    images = (0.5 * np.random.default_rng(0).standard_normal((1, *size, 3))).astype(np.float32)
    start = time.time()
    with jax.default_matmul_precision("highest"):
      ours = nnx.jit(lambda m, x: m.forward_train(x))(seg, jnp.asarray(images))
    ours = [np.asarray(o) for o in ours]
    middle = time.time()
    with torch.no_grad():
      theirs = reference.forward_train(torch.from_numpy(images).double().permute(0, 3, 1, 2))
    theirs = [t.permute(0, 2, 3, 1).numpy() for t in theirs]
    for what, a, b in zip(("decode", "auxiliary"), ours, theirs):
      print(f"{model} {size[0]}x{size[1]} {what} {tuple(a.shape)}: max |logit| {np.abs(b).max():.2f}, "
            f"max abs difference {np.abs(a - b).max():.2e}, mean {np.abs(a - b).mean():.2e}")
    print(f"  (focal_jax {middle - start:.0f} s with compile, reference {time.time() - middle:.0f} s)")


def table() -> None:
  rows = [("classification settings", {}), ("ape=True (position embedding for 512)", {"ape": True}),
          ("use_conv_embed=True", {"use_conv_embed": True})]
  print("| backbone | setting | params | official | MACs 512x512 (hooks) | MACs 2048x512 (hooks / "
        "official flops()) | padded to 2240x672 (official flops()) | official |")
  print("|---|---|---|---|---|---|---|---|")
  for name, (official_params, official_macs) in OFFICIAL.items():
    for label, options in rows:
      seg = nnx.eval_shape(lambda n=name, o=options: focal_jax.create_segmenter(n, 150, 512, **o))
      params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(seg, nnx.Param)))
      square = segmenter_macs(seg, (512, 512), backbone="hooks")["total"]
      hooks = segmenter_macs(seg, (2048, 512), backbone="hooks")["total"]
      formula = segmenter_macs(seg, (2048, 512), backbone="official")["total"]
      head = segmenter_macs(seg, (2048, 512))["decode_head"]
      padded = segmenter_macs(seg, (2240, 672), backbone="official")["backbone"] + head
      print(f"| {name} | {label} | {params / 1e6:.2f}M | {official_params / 1e6:.0f}M | "
            f"{square / 1e9:.1f}G | {hooks / 1e9:.1f}G / {formula / 1e9:.1f}G | {padded / 1e9:.1f}G | "
            f"{official_macs / 1e9:.0f}G |")


def focalnet_table() -> None:
  """FocalNet UPerNets with the released ADE20K backbone options (focal_windows 9)."""
  print("| backbone | params | official | MACs 512x512 (hooks) | MACs 2048x512 (hooks / "
        "official flops()) | official |")
  print("|---|---|---|---|---|---|")
  for name, (official_params, official_macs) in OFFICIAL_FOCALNET.items():
    seg = nnx.eval_shape(lambda n=name: focal_jax.create_segmenter(n, 150, 512))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(seg, nnx.Param)))
    square = segmenter_macs(seg, (512, 512), backbone="hooks")["total"]
    hooks = segmenter_macs(seg, (2048, 512), backbone="hooks")["total"]
    formula = segmenter_macs(seg, (2048, 512), backbone="official")["total"]
    print(f"| {name} | {params / 1e6:.2f}M | {official_params / 1e6:.0f}M | {square / 1e9:.1f}G | "
          f"{hooks / 1e9:.1f}G / {formula / 1e9:.1f}G | {official_macs / 1e9:.0f}G |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  check = commands.add_parser("parity")
  check.add_argument("--model", default="focal_tiny")
  check.add_argument("--size", type=int, nargs=2, action="append", metavar=("HEIGHT", "WIDTH"))
  check.add_argument("--num-classes", type=int, default=150)
  commands.add_parser("table")
  args = parser.parse_args()
  if args.command == "parity":
    parity(args.model, [tuple(s) for s in (args.size or [(512, 512)])], args.num_classes)
  else:
    table()
    print()
    focalnet_table()


if __name__ == "__main__":
  main()
