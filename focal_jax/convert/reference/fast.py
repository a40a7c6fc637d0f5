"""PyTorch reference of Focal-fast, the official `focal_transformer_v2.py` model.

A from-scratch re-implementation of the official ``classification/focal_transformer_v2.py``
(microsoft/Focal-Transformer) with its module tree, parameter and buffer names, shapes,
dtypes, initialisation order and numerics, so an official Focal-fast state_dict loads with
``strict=True`` and gives the official logits. It shares the patch embedding, MLP,
pooling, stage, head and drop path with the v1 reference (:mod:`.focal`); only the
attention differs:

* each query window attends to a fixed key set per level: at level 0 the
  ``min(focal_topK, H*W)`` stage pixels nearest to the window's centre pixel, at level 1
  the ``min(focal_topK, nWh*nWw)`` nearest pooled windows (k, v from the block's own
  ``qkv`` applied to the pooled map). The sets come from
  :mod:`focal_jax.models.focal_fast.key_sets`, built on a replica of the official
  ``torch.topk`` tie order (:mod:`focal_jax.models.focal_fast.torch_topk`),
  so they are the official buffers at every size the official code builds;
* the position bias of each level is an MLP ``coord2rpb_all.{l}`` (Linear(2, head_dim),
  ReLU, Linear(head_dim, heads)) of the (row, col) coordinates query minus key, evaluated
  every forward;
* no masks: with ``use_shift`` the map is rolled in odd blocks and an ``attn_mask``
  buffer is saved, but it is never applied (as officially).

Refused with a clear error where the official code fails or is silently wrong:
``focal_levels`` other than 1 or 2, a pooled level without pooling (``focal_pool
"none"`` or a stage outside ``focal_stages``), stage grids that are not whole windows.

Measured against the official model from the same state_dict (torch 2.14.1, CPU; weights
moved well away from init, logits of magnitude 2-8): bit-identical logits (max abs
difference 0.0) in float64 for focalv2_tiny at 224 and for small models with use_shift,
layerscale, pre-norm, conv embedding off, ape without patch norm, qk_scale, fc / conv /
mean / max pooling, focal_levels 1, focal_topK 37 / 64 / 128 / 200, at 224, 448, 896 and
non-square 224x448, 448x224, 224x672, in eval and in train mode (drop path and dropouts,
same seed); 0.0 in float32 and for all parameter gradients too. Same seed, same initial weights and buffers as the official
constructor for the three released variants.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from focal_jax.convert.reference import focal
from focal_jax.models.focal_fast import key_sets

class WindowAttention(nn.Module):
    """Focal-fast attention: every window's queries attend to its static key sets."""

    def __init__(self, dim: int, input_resolution, expand_size: int, shift_size: int, window_size,
                 window_size_glo, focal_window: int, focal_level: int, num_heads: int,
                 qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pool_method: str = "none", topK: int = 64):
        super().__init__()
        if focal_level not in (1, 2):
            raise ValueError(
                f"Focal-fast supports focal_levels 1 or 2, got {focal_level} (the official Focal-fast "
                "code indexes the wrong pooled grid for 3 and fails for 0).")
        if focal_level > 1 and pool_method == "none":
            raise ValueError(
                "Focal-fast with focal_levels 2 needs a pooled level: focal_pool is 'none' (or the "
                "stage is not in focal_stages), which the official Focal-fast code fails on. Use 'fc', "
                "'conv', 'mean' or 'max', or focal_levels 1.")
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.expand_size = expand_size
        self.shift_size = shift_size
        self.window_size = focal.to_2tuple(window_size)
        self.window_size_glo = focal.to_2tuple(window_size_glo)
        self.focal_window = focal_window
        self.focal_level = focal_level
        self.num_heads = num_heads
        self.pool_method = pool_method
        self.topK = topK
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.num_pooled_levels = focal_level - 1
        height, width = self.input_resolution
        ws = self.window_size[0]
        self.nWh, self.nWw = height // ws, width // ws

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

        self.register_buffer("window_coords", torch.from_numpy(key_sets.window_offsets(ws).copy()))
        self.coord2rpb_all = nn.ModuleList()
        self.topks = []
        for level in range(focal_level):
            if level == 0:
                indices = key_sets.pixel_key_sets(height, width, ws, topK)  # [nW, K0]
            else:
                indices = key_sets.window_key_sets(self.nWh, self.nWw, topK)  # [nW, K1]
            coords = key_sets.key_coords(level, height, width, ws, topK)  # [nW, N, K, 2]
            self.topks.append(indices.shape[1])
            self.register_buffer(f"topk_cloest_indice_{level}", torch.from_numpy(indices.copy()))
            self.register_buffer(f"topk_cloest_coords_{level}", torch.from_numpy(coords.copy()))
            self.coord2rpb_all.append(nn.Sequential(
                nn.Linear(2, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, num_heads)))

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, L, nH, hd]."""
        b, length, c = tokens.shape
        return tokens.view(b, length, self.num_heads, c // self.num_heads)

    def _selected(self, tokens: torch.Tensor, level: int) -> torch.Tensor:
        """Each window's keys of one level. [B, L, C] -> [B * nW, nH, K, hd]."""
        indices = getattr(self, f"topk_cloest_indice_{level}")  # [nW, K]
        b = tokens.shape[0]
        picked = self._heads(tokens).index_select(1, indices.reshape(-1))  # [B, nW*K, nH, hd]
        picked = picked.view(b, *indices.shape, self.num_heads, -1).transpose(2, 3)  # [B, nW, nH, K, hd]
        return picked.reshape(-1, self.num_heads, indices.shape[1], picked.shape[-1])

    def position_bias(self) -> torch.Tensor:
        """The coordinate-MLP bias of all levels, in key order. [nW, nH, N, keys]."""
        biases = [self.coord2rpb_all[level](getattr(self, f"topk_cloest_coords_{level}"))
                  for level in range(self.focal_level)]  # each [nW, N, K_l, nH]
        return torch.cat(biases, dim=2).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, pooled=(), shift_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, H, W, C] (shifted map); pooled: one [B, nWh, nWw, C] map per pooled level;
        shift_mask is accepted and, as officially, not applied. Returns [B * nW, N, C]."""
        b, h, w, c = x.shape
        ws = self.window_size[0]
        n = ws * ws
        q, k, v = self.qkv(x).view(b, h, w, 3, c).unbind(3)  # each [B, H, W, C]
        q = focal.window_partition(q, ws).view(-1, n, self.num_heads, c // self.num_heads)
        q = q.transpose(1, 2) * self.scale  # [B*nW, nH, N, hd]

        keys = [self._selected(k.reshape(b, h * w, c), 0)]
        values = [self._selected(v.reshape(b, h * w, c), 0)]
        for level, grid in enumerate(pooled, start=1):
            _, pk, pv = self.qkv(grid).view(b, -1, 3, c).unbind(2)  # each [B, nWh*nWw, C]
            keys.append(self._selected(pk, level))
            values.append(self._selected(pv, level))
        k_all = torch.cat(keys, dim=2)  # [B*nW, nH, keys, hd]
        v_all = torch.cat(values, dim=2)

        attn = q @ k_all.transpose(-2, -1)  # [B*nW, nH, N, keys]
        attn = attn + self.position_bias().unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(attn.shape)
        attn = self.attn_drop(self.softmax(attn))
        out = (attn @ v_all).transpose(1, 2).flatten(2)  # [B*nW, N, C]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"

    def flops(self, N: int, window_size: int, unfold_size: int) -> int:
        """Official MAC count for one window of N query tokens (kept as published)."""
        head_dim = self.dim // self.num_heads
        flops = N * self.dim * 3 * self.dim  # qkv
        for level, keys in enumerate(self.topks):
            flops += self.num_heads * N * head_dim * keys  # q @ k
            if level == 0:
                queries = N
            else:
                pooled = math.floor(self.window_size[0] / 2 ** (level - 1))
                queries = N // (pooled ** 2)
            flops += queries * keys * (2 * head_dim + head_dim * self.num_heads)  # coordinate MLP
        for keys in self.topks:
            flops += self.num_heads * N * head_dim * keys  # attn @ v
        flops += N * self.dim * self.dim  # proj
        return flops


class FocalTransformerBlock(focal.FocalTransformerBlock):
    """The v1 block (norms, pooling, shift, MLP, layerscale) around Focal-fast attention."""

    def __init__(self, *args, topK: int = 64, **kwargs):
        super().__init__(*args, topK=topK, **kwargs)

    def build_attention(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None,
                        attn_drop: float, proj_drop: float, topK: int = 64) -> nn.Module:
        height, width = self.input_resolution
        if height % self.window_size or width % self.window_size:
            raise ValueError(
                f"Focal-fast needs stage grids of whole windows: {height}x{width} is not a multiple "
                f"of window_size {self.window_size} (the official Focal-fast code fails here). Use an "
                f"image size whose stage grids divide by the window, e.g. 224, 448 or 896.")
        return WindowAttention(
            dim, input_resolution=self.input_resolution, expand_size=self.expand_size,
            shift_size=self.shift_size, window_size=self.window_size,
            window_size_glo=self.window_size_glo, focal_window=self.focal_window,
            focal_level=self.focal_level, num_heads=num_heads, qkv_bias=qkv_bias,
            qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop,
            pool_method=self.pool_method, topK=topK)


class BasicLayer(focal.BasicLayer):
    block_class = FocalTransformerBlock


class FocalTransformer(focal.FocalTransformer):
    """Focal-fast classifier with the official Focal-fast constructor signature and defaults
    (``focal_topK`` 64 as in the constructor; the released models use 128).

    ``expand_stages``, ``expand_sizes``, ``expand_layer`` and ``focal_windows`` are
    accepted and, as officially, have no effect. Unknown keyword arguments are ignored.
    """

    layer_class = BasicLayer

    @staticmethod
    def block_options(focal_topK: int = 64, **kwargs) -> dict:
        return {"topK": focal_topK}

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages=[0, 1, 2, 3], focal_levels=[1, 1, 1, 1], focal_windows=[7, 5, 3, 1],
                 focal_topK: int = 64, focal_pool: str = "fc", expand_stages=[0, 1, 2, 3],
                 expand_sizes=[3, 3, 3, 3], expand_layer: str = "all", use_conv_embed: bool = False,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4,
                 use_pre_norm: bool = False, **kwargs):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_layer=norm_layer,
            ape=ape, patch_norm=patch_norm, use_checkpoint=use_checkpoint, use_shift=use_shift,
            focal_stages=focal_stages, focal_levels=focal_levels, focal_windows=focal_windows,
            focal_pool=focal_pool, expand_stages=expand_stages, expand_sizes=expand_sizes,
            expand_layer=expand_layer, use_conv_embed=use_conv_embed,
            use_layerscale=use_layerscale, layerscale_value=layerscale_value,
            use_pre_norm=use_pre_norm, focal_topK=focal_topK)
        self.focal_topK = focal_topK

    def no_weight_decay_keywords(self) -> set[str]:
        return set()  # officially empty: the coord2rpb and pooling weights decay
