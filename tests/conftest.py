"""Shared helpers for the tests: a small Focal Transformer that compiles fast on 2 cores."""

import os

# Eight CPU devices for the mesh tests. Eigen's intra-op thread pool is turned off: with more
# devices than cores, concurrent collectives can wedge that pool (XLA aborts after a
# rendezvous timeout), and the single-threaded path is as fast on 2 cores.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false")

# triton (PyTorch's compiler, which timm and torchvision import) crashes the process when it
# is loaded after TensorFlow (both carry LLVM); loaded first, before any test imports TensorFlow,
# both work. The reference tests (FocalNet against timm) need both in one process.
try:
  import triton  # noqa: F401
except ImportError:  # no PyTorch with triton: nothing to order
  pass

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Narrow and shallow but structurally complete: at img_size 224 the stage grids are
# 56/28/14/7, so stages 1-3 have rings and pooled levels and stage 4 falls back to one
# window, exactly as in the full-size variants.
SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), focal_levels=(2, 2, 2, 2),
             expand_sizes=(3, 3, 3, 3), focal_windows=(7, 5, 3, 1), window_size=7,
             drop_path_rate=0.1)


# The official options, one case each (tests add their own cases on top).
OFFICIAL_OPTIONS = {
    "levels_1": dict(focal_levels=(1, 1, 1, 1)),
    "levels_3": dict(focal_levels=(3, 3, 3, 3)),
    "pool_conv": dict(focal_pool="conv"),
    "pool_mean": dict(focal_pool="mean"),
    "pool_max": dict(focal_pool="max"),
    "pool_none": dict(focal_pool="none"),
    "expand_even": dict(expand_layer="even"),
    "expand_odd": dict(expand_layer="odd"),
    "shift": dict(use_shift=True),
    "layerscale": dict(use_layerscale=True, layerscale_value=0.1),
    "pre_norm": dict(use_pre_norm=True),
    "ape": dict(ape=True),
    "no_patch_norm": dict(patch_norm=False),
    "conv_embed": dict(use_conv_embed=True),
}


def images(batch=2, height=224, width=224, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def walk_primitives(jaxpr):
  """All primitive names in a closed jaxpr, nested jaxprs included."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names.extend(walk_primitives(sub))
  return names
