"""PyTorch reference of FocalNet (Yang et al., "Focal Modulation Networks", 2022).

A from-scratch re-implementation whose module tree, parameter names, shapes, initialisation
and numerics follow the official ``classification/focalnet.py`` of microsoft/FocalNet, so
an official ``{'model': state_dict}`` checkpoint loads with ``strict=True`` and gives the
official logits. It needs only ``torch``; the benchmark times it as the official model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from focal_jax.convert.reference.focal import DropPath, trunc_normal_


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class FocalModulation(nn.Module):
    """q * h(sum of gated depthwise-conv contexts and a global one), then proj; on (B, H, W, C)."""

    def __init__(self, dim: int, focal_window: int, focal_level: int, focal_factor: int = 2,
                 proj_drop: float = 0.0, use_postln_in_modulation: bool = False,
                 normalize_modulator: bool = False):
        super().__init__()
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.focal_layers = nn.ModuleList()
        for level in range(focal_level):
            kernel = focal_factor * level + focal_window
            self.focal_layers.append(nn.Sequential(
                nn.Conv2d(dim, dim, kernel, groups=dim, padding=kernel // 2, bias=False), nn.GELU()))
        if use_postln_in_modulation:
            self.ln = nn.LayerNorm(dim)
        self.use_postln_in_modulation = use_postln_in_modulation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        x = self.f(x).permute(0, 3, 1, 2).contiguous()
        q, ctx, gates = torch.split(x, (dim, dim, self.focal_level + 1), 1)
        ctx_all = 0
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_global = self.act(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.focal_level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        out = (q * self.h(ctx_all)).permute(0, 2, 3, 1).contiguous()
        if self.use_postln_in_modulation:
            out = self.ln(out)
        return self.proj_drop(self.proj(out))


class FocalNetBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop: float, drop_path: float,
                 focal_level: int, focal_window: int, use_layerscale: bool,
                 layerscale_value: float, use_postln: bool, use_postln_in_modulation: bool,
                 normalize_modulator: bool):
        super().__init__()
        self.use_postln = use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(dim, focal_window, focal_level, proj_drop=drop,
                                          use_postln_in_modulation=use_postln_in_modulation,
                                          normalize_modulator=normalize_modulator)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.gamma_1 = self.gamma_2 = 1.0
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        self.H = self.W = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        shortcut = x
        y = x if self.use_postln else self.norm1(x)
        y = self.modulation(y.view(batch, self.H, self.W, dim)).view(batch, tokens, dim)
        y = self.norm1(y) if self.use_postln else y
        x = shortcut + self.drop_path(self.gamma_1 * y)
        y = self.norm2(self.mlp(x)) if self.use_postln else self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool,
                 use_norm: bool, is_stem: bool):
        super().__init__()
        if use_conv_embed:
            kernel, padding, stride = (7, 2, 4) if is_stem else (3, 1, 2)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if use_norm else None

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        height, width = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, height, width


class BasicLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int | None, depth: int, drop_path: Sequence[float],
                 use_conv_embed: bool, **block_options):
        super().__init__()
        self.blocks = nn.ModuleList([FocalNetBlock(dim, drop_path=rate, **block_options)
                                     for rate in drop_path[:depth]])
        self.downsample = (PatchEmbed(2, dim, out_dim, use_conv_embed, True, False)
                           if out_dim is not None else None)

    def forward(self, x: torch.Tensor, height: int, width: int):
        for block in self.blocks:
            block.H, block.W = height, width
            x = block(x)
        if self.downsample is not None:
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            x, height, width = self.downsample(x)
        return x, height, width


class FocalNet(nn.Module):
    """The official constructor's arguments (`img_size` only sizes nothing here: FocalNet
    builds the same parameters for every input size)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96,
                 depths=(2, 2, 6, 2), mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1,
                 patch_norm=True, focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3),
                 use_conv_embed=False, use_layerscale=False, layerscale_value=1e-4,
                 use_postln=False, use_postln_in_modulation=False, normalize_modulator=False,
                 **unused):
        super().__init__()
        del img_size, unused
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, dims[0], use_conv_embed, patch_norm, True)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                dims[i], dims[i + 1] if i < len(depths) - 1 else None, depth,
                rates[start:start + depth], use_conv_embed, mlp_ratio=mlp_ratio, drop=drop_rate,
                focal_level=focal_levels[i], focal_window=focal_windows[i],
                use_layerscale=use_layerscale, layerscale_value=layerscale_value,
                use_postln=use_postln, use_postln_in_modulation=use_postln_in_modulation,
                normalize_modulator=normalize_modulator))
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def no_weight_decay(self) -> set[str]:
        return {""}

    def no_weight_decay_keywords(self) -> set[str]:
        """As officially: the empty keyword is in every name, so no parameter decays."""
        return {""}

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, height, width = self.patch_embed(x)
        x = self.pos_drop(x)
        for layer in self.layers:
            x, height, width = layer(x, height, width)
        x = self.avgpool(self.norm(x).transpose(1, 2))
        return self.head(torch.flatten(x, 1))
