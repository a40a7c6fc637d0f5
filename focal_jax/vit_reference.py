"""A plain ViT-S/16, compiled by `focal_jax.aot` as a yardstick for the Focal steps' bytes.

ViT-S/16 (Dosovitskiy et al. 2021; DeiT-S) does the FLOPs of Focal-T (4.6 against 4.9
GMACs per 224x224 image) with nothing but dense products over 197 tokens, so its step is
the compute-bound reference a Focal step's FLOP per byte is read against. It runs in the
project's own training step (optimiser, mixup targets, soft-target loss), with the same
compute dtype and float32 parameters; it is no model of the package (no weights, no
registry entry): only `python -m focal_jax.aot --model vit_s16_reference` builds it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from focal_jax.training import train_state as ts

NAME = "vit_s16_reference"
PATCH, DIM, DEPTH, HEADS, MLP_RATIO = 16, 384, 12, 6, 4


def softmax_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T / sqrt(d)) v with float32 logits. q, k, v: [B, heads, N, d]."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


class Attention(nnx.Module):
  def __init__(self, dim: int, heads: int, dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, n, c = x.shape
    # [B, N, 3C] -> [3, B, heads, N, C/heads]
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
    out = softmax_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, d]
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class Mlp(nnx.Module):
  def __init__(self, dim: int, hidden: int, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  def __init__(self, dim: int, heads: int, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, heads, dtype, rngs)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, MLP_RATIO * dim, dtype, rngs)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
  def __init__(self, dim: int, dtype: Any, rngs: nnx.Rngs):
    self.proj = nnx.Linear(PATCH * PATCH * 3, dim, dtype=dtype, rngs=rngs)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = images.shape
    # [B, H, W, 3] -> [B, H/16 * W/16, 16*16*3]: a 16x16 stride-16 convolution as a product
    patches = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2,
                                                                                   4, 5)
    return self.proj(patches.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c))


class VitReference(nnx.Module):
  """ViT-S/16 with a class token, learned position embeddings and a linear head."""

  def __init__(self, num_classes: int, img_size: int, dtype: Any = jnp.float32, seed: int = 0):
    rngs = nnx.Rngs(params=seed, dropout=seed)
    self.dtype = dtype
    self.patch_embed = PatchEmbed(DIM, dtype, rngs)
    tokens = (img_size // PATCH) ** 2 + 1
    self.cls_token = nnx.Param(jnp.zeros((1, 1, DIM)))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, DIM)))
    self.blocks = nnx.List([Block(DIM, HEADS, dtype, rngs) for _ in range(DEPTH)])
    self.norm = nnx.LayerNorm(DIM, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(DIM, num_classes, dtype=dtype, rngs=rngs)
    self.rngs = rngs  # the training step reseeds its dropout stream (none is drawn)

  def forward_head(self, x: jnp.ndarray) -> jnp.ndarray:
    return self.head(self.norm(x)[:, 0]).astype(jnp.float32)

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    x = self.patch_embed(images.astype(self.dtype))  # [B, N, C]
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, DIM))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    return self.forward_head(x)


@dataclasses.dataclass(frozen=True)
class VitSpec(ts.ModelSpec):
  """A ModelSpec whose model is the reference ViT (the training step needs nothing else)."""

  def create(self) -> VitReference:
    return VitReference(self.num_classes, self.img_size, self.overrides.get("dtype", jnp.float32),
                        self.seed)


def model_spec(num_classes: int, img_size: int, dtype: Any, seed: int = 0) -> ts.ModelSpec:
  """The reference's spec, built abstractly like `train_state.model_spec`."""
  overrides = {} if dtype == jnp.float32 else {"dtype": dtype}
  partial = VitSpec(NAME, num_classes, img_size, overrides, seed, None, None, None, None)
  model = nnx.eval_shape(partial.create)
  model.train()
  train_graphdef, abstract_params, abstract_rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  abstract_rest = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                               nnx.to_pure_dict(abstract_rest))
  return dataclasses.replace(partial, train_graphdef=train_graphdef,
                             eval_graphdef=nnx.graphdef(model), abstract_params=abstract_params,
                             abstract_rest=abstract_rest)


def official_macs(img_size: int = 224, num_classes: int = 1000) -> float:
  """Multiply-adds of one image's forward pass (products only, as the official counts)."""
  tokens = (img_size // PATCH) ** 2 + 1
  per_block = (tokens * DIM * 3 * DIM + 2 * tokens * tokens * DIM + tokens * DIM * DIM
               + 2 * tokens * DIM * MLP_RATIO * DIM)
  return ((tokens - 1) * PATCH * PATCH * 3 * DIM + DEPTH * per_block + DIM * num_classes)
