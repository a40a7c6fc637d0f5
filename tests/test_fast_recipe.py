"""The Focal-fast training recipe: config files and the official weight-decay rule."""

import pathlib

import jax
import numpy as np
import pytest
import torch

from focal_jax.convert.reference import fast, focal
from focal_jax.training import optim
from focal_jax.training.config import load_config_file

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
SMALL = dict(embed_dim=16, depths=[2, 1, 2, 1], num_heads=[1, 2, 2, 4], focal_levels=[2, 2, 2, 2],
             num_classes=5, use_conv_embed=True, ape=True, use_layerscale=True)


def load_config(name):
  return load_config_file(CONFIGS / f"{name}.py")


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_fast_configs_are_the_conv_recipe(size):
  """The official focalv2 yaml files are the useconv ones with focal_topK 128 (which the
  focalv2 variants carry): same recipe, another model."""
  v2 = load_config(f"focalv2_{size}").to_dict()
  v1 = load_config(f"focal_{size}_conv").to_dict()
  assert v2["model"]["name"] == f"focalv2_{size}"
  v2["model"]["name"] = v1["model"]["name"]
  assert v2 == v1


def official_no_decay(model: torch.nn.Module) -> set[str]:
  """The official `set_weight_decay` split: names that get no weight decay."""
  skip, keywords = model.no_weight_decay(), model.no_weight_decay_keywords()
  return {name for name, p in model.named_parameters()
          if len(p.shape) == 1 or name.endswith(".bias") or name in skip
          or any(k in name for k in keywords)}


@pytest.mark.parametrize("module", [focal, fast], ids=["focal", "fast"])
def test_decay_rule_is_official_for_both_families(module):
  model = module.FocalTransformer(img_size=224, **SMALL)
  ours = {name for name, p in model.named_parameters() if not optim.decays(name, tuple(p.shape))}
  assert ours == official_no_decay(model)
  decayed = {name for name, _ in model.named_parameters()} - ours
  if module is fast:
    assert model.no_weight_decay_keywords() == set()
    for name in ("layers.0.blocks.0.attn.coord2rpb_all.0.0.weight",
                 "layers.0.blocks.0.attn.coord2rpb_all.1.2.weight",
                 "layers.0.blocks.0.pool_layers.0.weight", "layers.0.blocks.0.attn.qkv.weight"):
      assert name in decayed, name
    for name in ("layers.0.blocks.0.attn.coord2rpb_all.0.0.bias", "layers.0.blocks.0.gamma_1",
                 "absolute_pos_embed", "layers.0.blocks.0.pool_layers.0.bias"):
      assert name in ours, name
  else:
    assert "layers.0.blocks.0.attn.relative_position_bias_table_to_neighbors" in ours


def test_mask_on_a_focal_fast_like_parameter_tree():
  """weight_decay_mask over a tree shaped like the JAX Focal-fast parameters."""
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  block = {
      "attn": {"qkv": {"kernel": leaf(16, 48), "bias": leaf(48)},
               "proj": {"kernel": leaf(16, 16), "bias": leaf(16)},
               "coord2rpb_all": {0: {"fc1": {"kernel": leaf(2, 16), "bias": leaf(16)},
                                     "fc2": {"kernel": leaf(16, 1), "bias": leaf(1)}}}},
      "pool_layers": {0: {"kernel": leaf(49, 1), "bias": leaf(1)}},
      "norm1": {"scale": leaf(16), "bias": leaf(16)}, "gamma_1": leaf(16)}
  params = {"layers": {0: {"blocks": {0: block}}}, "absolute_pos_embed": leaf(1, 3136, 16),
            "head": {"kernel": leaf(128, 5), "bias": leaf(5)}}
  mask = {jax.tree_util.keystr(k, simple=True, separator="."): bool(v)
          for k, v in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  prefix = "layers.0.blocks.0."
  assert {k for k, v in mask.items() if v} == {
      prefix + "attn.qkv.kernel", prefix + "attn.proj.kernel",
      prefix + "attn.coord2rpb_all.0.fc1.kernel", prefix + "attn.coord2rpb_all.0.fc2.kernel",
      prefix + "pool_layers.0.kernel", "head.kernel"}
