"""PyTorch reference of the Focal Transformer (Yang et al., 2021).

A from-scratch re-implementation whose module tree, parameter and buffer names,
shapes, dtypes, initialisation and numerics follow the official
``classification/focal_transformer.py`` of microsoft/Focal-Transformer, so an
official ``{'model': state_dict}`` checkpoint loads with ``strict=True`` and gives
the official logits. It is the numerical ground truth for the JAX port and the
weight converter; it needs only ``torch`` (no timm).

Official behaviours kept on purpose (they matter for converted weights):

* the expanded-window "ring" is gathered with a *cyclic* ``torch.roll``, so windows
  on the border see tokens from the opposite border, unmasked;
* pooled levels gather neighbouring pooled windows with ``unfold`` and mark
  zero-padded positions with an additive -100 (not -inf);
* a stage whose resolution is <= the window uses one window of size
  ``min(resolution)``, no ring and no shift;
* ``fc`` pooling layers are set to the mean and then overwritten by the
  model-wide truncated-normal init of every ``nn.Linear``.

Our extension: :meth:`FocalTransformer.forward_stages` returns the four stage maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# Additive logit penalty the official code uses for every masked key.
MASK_VALUE = -100.0

POOL_METHODS = ("none", "fc", "conv", "mean", "max")
EXPAND_LAYERS = ("all", "even", "odd")


# ---------------------------------------------------------------------------
# Small helpers (stand-ins for the three timm utilities the official code uses)
# ---------------------------------------------------------------------------


def to_2tuple(value) -> tuple:
    """Returns ``value`` as a pair; sequences are passed through as tuples."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return (value, value)


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Normal(0, std) truncated to the absolute interval [-2, 2], in place."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of the residual branch in training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over all other dimensions.
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# ---------------------------------------------------------------------------
# Static index tables and masks (all built once, stored as buffers)
# ---------------------------------------------------------------------------


def relative_position_index(query_size: tuple[int, int], key_size: tuple[int, int]) -> torch.Tensor:
    """Index into a relative-position table for every (query, key) pair, int64.

    Queries lie on a ``query_size`` grid and keys on a ``key_size`` grid, both in
    the same unit; the table has (qh + kh - 1) * (qw + kw - 1) rows.
    Returns [qh * qw, kh * kw].
    """
    (qh, qw), (kh, kw) = query_size, key_size
    q_rows, q_cols = torch.meshgrid(torch.arange(qh), torch.arange(qw), indexing="ij")
    k_rows, k_cols = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    d_row = q_rows.reshape(-1, 1) - k_rows.reshape(1, -1) + (kh - 1)  # [Nq, Nk], >= 0
    d_col = q_cols.reshape(-1, 1) - k_cols.reshape(1, -1) + (kw - 1)
    return d_row * (qw + kw - 1) + d_col


def ring_shifts(expand_size: int) -> list[tuple[int, int]]:
    """The four (row, col) roll shifts that bring the ring around a window into it."""
    e = expand_size
    return [(-e, -e), (-e, e), (e, -e), (e, e)]


def ring_token_index(window_size: int, expand_size: int) -> torch.Tensor:
    """Positions kept from the 4 concatenated rolled windows (the ring), int64.

    For each roll of :func:`ring_shifts` the window is cut at the rolled map; the
    ``(ws - e) x (ws - e)`` corner that still lies inside the original window is
    dropped and the other tokens are kept. Returns [4 * (ws**2 - (ws - e)**2)].
    """
    ws, e = window_size, expand_size
    keep = torch.ones(4, ws, ws)
    inner = slice(None, -e), slice(e, None)  # rows/cols still inside for -e / +e rolls
    for i, (dr, dc) in enumerate(ring_shifts(e)):
        keep[i, inner[0] if dr < 0 else inner[1], inner[0] if dc < 0 else inner[1]] = 0
    return keep.flatten().nonzero().view(-1)


def unfold_kernel_size(focal_window: int, level: int) -> int:
    """Side of the unfold neighbourhood gathered at pooled level ``level`` (0-based)."""
    return 2 * (focal_window // 2) + 2 * 2**level - 1


def pooled_key_index(focal_window: int, level: int) -> torch.Tensor:
    """Positions kept from the unfolded neighbourhood at pooled level >= 1, int64.

    The first ``2**level - 1`` rows and columns of the kernel are dropped.
    """
    size = unfold_kernel_size(focal_window, level)
    keep = torch.zeros(size, size)
    keep[2**level - 1:, 2**level - 1:] = 1
    return keep.flatten().nonzero().view(-1)


def shift_attention_mask(resolution: tuple[int, int], window_size: int, shift_size: int) -> torch.Tensor:
    """Swin mask for a cyclically shifted map: 0 within a region, -100 across. [nW, N, N]."""
    height, width = resolution
    if height % window_size or width % window_size:
        raise ValueError(
            f"use_shift needs every stage resolution to be a multiple of window_size "
            f"({window_size}), found {height}x{width} (the official code fails here too); "
            f"use an image size whose stage maps divide by the window, or use_shift=False.")
    region = torch.zeros(1, height, width, 1)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    region = window_partition(region, window_size).view(-1, window_size * window_size)  # [nW, N]
    diff = region.unsqueeze(1) - region.unsqueeze(2)  # [nW, N, N]
    return diff.masked_fill(diff != 0, MASK_VALUE).masked_fill(diff == 0, 0.0)


# ---------------------------------------------------------------------------
# Window reshapes
# ---------------------------------------------------------------------------


def window_grid(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, H/ws, W/ws, ws, ws, C]."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous()


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, ws, ws, C], windows in row-major order per image."""
    return window_grid(x, window_size).view(-1, window_size, window_size, x.shape[-1])


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """[B * nW, ws, ws, C] -> [B, H, W, C]; inverse of :func:`window_partition`."""
    rows, cols = height // window_size, width // window_size
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(batch, height, width, -1)


def center_fit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crops or zero-pads [B, H, W, C] to [B, height, width, C], split evenly (extra at the end)."""
    h, w = x.shape[1:3]
    if h > height:
        top = (h - height) // 2
        x = x[:, top:top + height]
    elif h < height:
        top = (height - h) // 2
        x = F.pad(x, (0, 0, 0, 0, top, height - h - top))
    if w > width:
        left = (w - width) // 2
        x = x[:, :, left:left + width]
    elif w < width:
        left = (width - w) // 2
        x = F.pad(x, (0, 0, left, width - w - left))
    return x


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class Mlp(nn.Module):
    """Two-layer feed-forward network with exact GELU."""

    def __init__(self, in_features: int, hidden_features: int | None = None,
                 out_features: int | None = None, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class WindowAttention(nn.Module):
    """Focal self-attention of the tokens of each window.

    Every query window attends to (1) its own ``ws x ws`` tokens, (2) the ring of
    tokens around it (``expand_size`` > 0) and (3) for each pooled level a
    neighbourhood of pooled sub-windows. Each key group has its own learned
    relative-position bias.
    """

    def __init__(self, dim: int, expand_size: int, window_size, focal_window: int,
                 focal_level: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, pool_method: str = "none"):
        super().__init__()
        self.dim = dim
        self.expand_size = expand_size
        self.window_size = to_2tuple(window_size)
        self.focal_window = focal_window
        self.focal_level = focal_level
        self.num_heads = num_heads
        self.pool_method = pool_method
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        ws_h, ws_w = self.window_size
        self.has_ring = expand_size > 0 and focal_level > 0
        self.num_pooled_levels = max(focal_level - 1, 0) if pool_method != "none" else 0

        # In-window bias: one entry per relative offset, zero-initialised.
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * ws_h - 1) * (2 * ws_w - 1), num_heads))  # [(2Wh-1)(2Ww-1), nH]
        self.register_buffer("relative_position_index",
                             relative_position_index(self.window_size, self.window_size))

        if self.has_ring:
            ring_len = 4 * ws_h * ws_w - 4 * (ws_h - expand_size) * (ws_h - expand_size)
            # Dense bias between the window's tokens and each ring token.
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws_h * ws_w, ring_len))  # [1, nH, N, ring]
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
            self.register_buffer("valid_ind_rolled", ring_token_index(ws_h, expand_size))

        if self.num_pooled_levels > 0:
            self.relative_position_bias_table_to_windows = nn.ParameterList()
            self.unfolds = nn.ModuleList()
            for k in range(self.num_pooled_levels):
                kernel = unfold_kernel_size(focal_window, k)
                self.unfolds.append(nn.Unfold(kernel_size=(kernel, kernel), stride=2**k,
                                              padding=kernel // 2))
                span = focal_window + 2**k - 1  # pooled keys per side after index selection
                table = nn.Parameter(torch.zeros(num_heads, (ws_h + span - 1) * (ws_w + span - 1)))
                trunc_normal_(table, std=0.02)
                self.relative_position_bias_table_to_windows.append(table)
                self.register_buffer(f"relative_position_index_{k}",
                                     relative_position_index(self.window_size, (span, span)))
                if k > 0:
                    self.register_buffer(f"valid_ind_unfold_{k}", pooled_key_index(focal_window, k))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B', n, C] -> [B', nH, n, C / nH]."""
        b, n, c = tokens.shape
        return tokens.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _window_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B * nW, ws * ws, C]."""
        ws = self.window_size[0]
        return window_partition(x, ws).view(-1, ws * ws, x.shape[-1])

    def _ring_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens around each window, from cyclic rolls of the map. [B * nW, ring, C]."""
        rolled = [self._window_tokens(torch.roll(x, shifts=shift, dims=(1, 2)))
                  for shift in ring_shifts(self.expand_size)]
        return torch.cat(rolled, dim=1)[:, self.valid_ind_rolled]  # [B*nW, 4*ws*ws -> ring, C]

    def _pooled_tokens(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Neighbourhood of pooled windows around each window. [B * nW, K, C]."""
        unfold = self.unfolds[level]
        kernel = unfold.kernel_size[0]
        b, _, _, c = x.shape
        cols = unfold(x.permute(0, 3, 1, 2))  # [B, C * k * k, nW]
        cols = cols.view(b, c, kernel * kernel, -1).permute(0, 3, 2, 1)  # [B, nW, k*k, C]
        cols = cols.reshape(-1, kernel * kernel, c)  # [B*nW, k*k, C]
        if level > 0:
            cols = cols[:, getattr(self, f"valid_ind_unfold_{level}")]
        return cols

    def _pooled_mask(self, grid: torch.Tensor, level: int) -> torch.Tensor:
        """-100 for neighbourhood slots that fall on unfold padding. [nW, K]."""
        unfold = self.unfolds[level]
        kernel = unfold.kernel_size[0]
        ones = grid.new_ones(1, 1, grid.shape[1], grid.shape[2])
        valid = unfold(ones).view(kernel * kernel, -1).t()  # [nW, k*k]
        if level > 0:
            valid = valid[:, getattr(self, f"valid_ind_unfold_{level}")]
        return valid.masked_fill(valid == 0, MASK_VALUE).masked_fill(valid > 0, 0.0)

    def _position_bias(self) -> torch.Tensor:
        """Relative-position bias for all key groups, in key order. [nH, N, keys]."""
        n = self.window_size[0] * self.window_size[1]
        index = self.relative_position_index.view(-1)
        biases = [self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)]
        if self.has_ring:
            biases.append(self.relative_position_bias_table_to_neighbors[0])
        for k in range(self.num_pooled_levels):
            index = getattr(self, f"relative_position_index_{k}").view(-1)
            biases.append(self.relative_position_bias_table_to_windows[k][:, index].view(
                self.num_heads, n, -1))
        return torch.cat(biases, dim=-1)

    def forward(self, x: torch.Tensor, pooled: Sequence[torch.Tensor] = (),
                shift_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attends within windows of a padded (and shifted) map.

        x: [B, H, W, C] with H, W multiples of the window; pooled: one
        [B, nWh * 2**k, nWw * 2**k, C] map per pooled level; shift_mask: [nW, N, N].
        Returns [B * nW, N, C] with N = ws * ws.
        """
        b, h, w, c = x.shape
        n = self.window_size[0] * self.window_size[1]
        q, k, v = self.qkv(x).view(b, h, w, 3, c).unbind(3)  # each [B, H, W, C]

        keys, values = [self._window_tokens(k)], [self._window_tokens(v)]
        if self.has_ring:
            keys.append(self._ring_tokens(k))
            values.append(self._ring_tokens(v))
        pooled_masks = []
        for level, grid in enumerate(pooled):
            _, pk, pv = self.qkv(grid).view(*grid.shape[:3], 3, c).unbind(3)  # [B, h_k, w_k, C]
            keys.append(self._pooled_tokens(pk, level))
            values.append(self._pooled_tokens(pv, level))
            pooled_masks.append(self._pooled_mask(grid, level))

        q = self._split_heads(self._window_tokens(q)) * self.scale  # [B*nW, nH, N, hd]
        k_all = self._split_heads(torch.cat(keys, dim=1))  # [B*nW, nH, keys, hd]
        v_all = self._split_heads(torch.cat(values, dim=1))
        attn = q @ k_all.transpose(-2, -1) + self._position_bias().unsqueeze(0)  # [B*nW, nH, N, keys]

        if pooled_masks or shift_mask is not None:
            num_windows = attn.shape[0] // b
            local = (shift_mask if shift_mask is not None
                     else attn.new_zeros(num_windows, n, n))  # [nW, N, N]
            ring = attn.new_zeros(num_windows, n, k_all.shape[2] - n - sum(
                m.shape[1] for m in pooled_masks))
            mask = torch.cat([local, ring] + [m.unsqueeze(1).expand(-1, n, -1) for m in pooled_masks],
                             dim=-1)  # [nW, N, keys]
            attn = attn.view(b, num_windows, self.num_heads, n, -1) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, attn.shape[-1])

        attn = self.attn_drop(self.softmax(attn))
        out = (attn @ v_all).transpose(1, 2).reshape(attn.shape[0], n, c)  # [B*nW, N, C]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"

    def flops(self, N: int, window_size: int, unfold_size: int) -> int:
        """Official MAC count for one window of N query tokens (kept as published)."""
        head_dim = self.dim // self.num_heads
        pooled_keys = unfold_size * unfold_size if (
            self.pool_method != "none" and self.focal_level > 1) else 0
        ring_keys = (window_size + 2 * self.expand_size) ** 2 - window_size ** 2 if self.has_ring else 0
        flops = N * self.dim * 3 * self.dim  # qkv
        flops += self.num_heads * N * head_dim * N  # q @ k, in-window
        if pooled_keys:
            flops += self.num_heads * N * head_dim * pooled_keys
        if ring_keys:
            flops += self.num_heads * N * head_dim * ring_keys
        flops += self.num_heads * N * N * head_dim  # attn @ v, in-window
        if pooled_keys:
            flops += self.num_heads * N * head_dim * pooled_keys
        if ring_keys:
            flops += self.num_heads * N * head_dim * ring_keys
        flops += N * self.dim * self.dim  # proj
        return flops


class FocalTransformerBlock(nn.Module):
    """Pre-norm block: focal window attention and MLP, each with a residual."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int,
                 window_size: int = 7, expand_size: int = 0, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, pool_method: str = "none",
                 focal_level: int = 1, focal_window: int = 1, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4, **attention_options):
        super().__init__()
        if pool_method not in POOL_METHODS:
            raise ValueError(f"focal_pool must be one of {POOL_METHODS}, got {pool_method!r}.")
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.expand_size = expand_size
        self.mlp_ratio = mlp_ratio
        self.pool_method = pool_method
        self.focal_level = focal_level
        self.focal_window = focal_window
        self.use_layerscale = use_layerscale

        if min(self.input_resolution) <= self.window_size:
            # The whole (short side of the) map is one window: no ring, no shift.
            self.window_size = min(self.input_resolution)
            self.expand_size = 0
            self.shift_size = 0
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(f"shift_size must lie in [0, {self.window_size}), got {self.shift_size}.")
        self.window_size_glo = self.window_size
        num_pooled = max(focal_level - 1, 0) if pool_method != "none" else 0

        self.pool_layers = nn.ModuleList()
        for k in range(num_pooled):
            size = self.pooled_window_size(k)
            if pool_method == "fc":
                layer = nn.Linear(size * size, 1)
                # Mean pooling at construction; the model-wide init later overwrites it.
                layer.weight.data.fill_(1.0 / (size * size))
                layer.bias.data.fill_(0.0)
                self.pool_layers.append(layer)
            elif pool_method == "conv":
                self.pool_layers.append(nn.Conv2d(dim, dim, kernel_size=size, stride=size, groups=dim))

        self.norm1 = norm_layer(dim)
        self.attn = self.build_attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                         qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                                         **attention_options)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

        mask = (shift_attention_mask(self.input_resolution, self.window_size, self.shift_size)
                if self.shift_size > 0 else None)
        self.register_buffer("attn_mask", mask)  # [nW, N, N] or None

        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))

    def build_attention(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None,
                        attn_drop: float, proj_drop: float) -> nn.Module:
        """The block's attention (called once the window fallback has been applied)."""
        if self.pool_method != "none" and self.focal_level > 1 and self.focal_window % 2 == 0:
            raise ValueError(f"pooled focal levels need an odd focal_window, got {self.focal_window} "
                             "(the official code fails on even ones).")
        return WindowAttention(
            dim, expand_size=self.expand_size, window_size=to_2tuple(self.window_size),
            focal_window=self.focal_window, focal_level=self.focal_level, num_heads=num_heads,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop,
            pool_method=self.pool_method)

    def pooled_window_size(self, level: int) -> int:
        """Side of the sub-windows pooled into one token at pooled level ``level``."""
        return math.floor(self.window_size_glo / 2**level)

    def _pool(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Pools a padded map into sub-window tokens. [B, H, W, C] -> [B, nWh*2**k, nWw*2**k, C]."""
        b, h, w, c = x.shape
        size = self.pooled_window_size(level)
        rows = math.ceil(h / self.window_size) * 2**level
        cols = math.ceil(w / self.window_size) * 2**level
        grid = window_grid(center_fit(x, rows * size, cols * size).contiguous(), size)  # [B, r, c, s, s, C]
        if self.pool_method == "mean":
            return grid.mean([3, 4])
        if self.pool_method == "max":
            return grid.amax(dim=(3, 4))
        if self.pool_method == "fc":
            tokens = grid.view(b, rows, cols, size * size, c).transpose(3, 4)  # [B, r, c, C, s*s]
            return self.pool_layers[level](tokens).flatten(-2)
        # conv: one depthwise kernel per sub-window.
        patches = grid.view(-1, size, size, c).permute(0, 3, 1, 2).contiguous()  # [B*r*c, C, s, s]
        return self.pool_layers[level](patches).view(b, rows, cols, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H * W, C] -> [B, H * W, C]."""
        height, width = self.input_resolution
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"expected {height}x{width}={height * width} tokens, got {length}.")
        ws = self.window_size

        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        pad_b, pad_r = (ws - height % ws) % ws, (ws - width % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zero rows/cols at bottom/right
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        padded_h, padded_w = x.shape[1:3]

        pooled = [self._pool(x, k) for k in range(self.attn.num_pooled_levels)]  # coarse levels
        windows = self.attn(x, pooled, self.attn_mask)  # [B*nW, ws*ws, C]
        x = window_reverse(windows.view(-1, ws, ws, c), ws, padded_h, padded_w)  # [B, H', W', C]
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width].contiguous().view(b, height * width, c)

        if self.use_layerscale:
            x = shortcut + self.drop_path(self.gamma_1 * x)
            return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, shift_size={self.shift_size}, mlp_ratio={self.mlp_ratio}")

    def flops(self) -> float:
        """Official MAC count of the block (a float, from the unpadded resolution)."""
        height, width = self.input_resolution
        flops = self.dim * height * width  # norm1
        num_windows = height * width / self.window_size / self.window_size
        flops += num_windows * self.attn.flops(self.window_size * self.window_size, self.window_size,
                                               self.focal_window)
        if self.pool_method != "none" and self.focal_level > 1:
            for k in range(self.focal_level - 1):
                size = self.pooled_window_size(k)
                num_pooled = num_windows * 2**k  # as published (not 4**k)
                flops += num_pooled * self.dim * size * size  # pooling
                flops += num_pooled * self.dim * 3 * self.dim  # qkv of pooled tokens
        flops += 2 * height * width * self.dim * self.dim * self.mlp_ratio  # mlp
        flops += self.dim * height * width  # norm2
        return flops


class PatchEmbed(nn.Module):
    """Strided convolution from [B, C, H, W] to tokens [B, H' * W', D], optional norms.

    Used as the stem (patch_size 4, or 7x7/4 with ``use_conv_embed``) and as the
    downsampling between stages (2x2/2, or 3x3/2 with ``use_conv_embed``).
    """

    def __init__(self, img_size=(224, 224), patch_size=4, in_chans: int = 3, embed_dim: int = 96,
                 use_conv_embed: bool = False, norm_layer=None, use_pre_norm: bool = False,
                 is_stem: bool = False):
        super().__init__()
        img_size = to_2tuple(img_size)
        patch_size = to_2tuple(patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = [img_size[0] // patch_size[0], img_size[1] // patch_size[1]]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.use_pre_norm = use_pre_norm
        self.use_conv_embed = use_conv_embed

        if use_conv_embed:
            # Overlapping convolutions: 7x7/4 for the stem, 3x3/2 between stages.
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
            self.kernel_size = kernel
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        if use_pre_norm:
            self.pre_norm = nn.GroupNorm(1, in_chans) if norm_layer is not None else None
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        if (height, width) != tuple(self.img_size):
            raise ValueError(f"input size {height}x{width} does not match the model's "
                             f"{self.img_size[0]}x{self.img_size[1]}; build the model with that img_size.")
        if self.use_pre_norm:
            x = self.pre_norm(x)
        x = self.proj(x).flatten(2).transpose(1, 2)  # [B, H'*W', D]
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self) -> int:
        out_h, out_w = self.patches_resolution
        kernel_area = self.kernel_size ** 2 if self.use_conv_embed else self.patch_size[0] * self.patch_size[1]
        flops = out_h * out_w * self.embed_dim * self.in_chans * kernel_area
        if self.norm is not None:
            flops += out_h * out_w * self.embed_dim
        return flops


class BasicLayer(nn.Module):
    """One stage: ``depth`` focal blocks, then an optional downsampling PatchEmbed."""

    block_class = FocalTransformerBlock

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, expand_size: int, expand_layer: str = "all",
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, pool_method: str = "none", focal_level: int = 1,
                 focal_window: int = 1, use_conv_embed: bool = False, use_shift: bool = False,
                 use_pre_norm: bool = False, downsample=None, use_checkpoint: bool = False,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4, **block_options):
        super().__init__()
        if expand_layer not in EXPAND_LAYERS:
            raise ValueError(f"expand_layer must be one of {EXPAND_LAYERS}, got {expand_layer!r}.")
        self.dim = dim
        self.input_resolution = input_resolution
        self.depth = depth
        self.use_checkpoint = use_checkpoint

        def block_expand(i: int) -> int:
            # "even" expands blocks 1, 3, ...; "odd" expands blocks 0, 2, ...
            skip = {"even": i % 2 == 0, "odd": i % 2 == 1, "all": False}[expand_layer]
            return 0 if skip else expand_size

        self.blocks = nn.ModuleList([
            self.block_class(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads,
                window_size=window_size,
                shift_size=window_size // 2 if (use_shift and i % 2 == 1) else 0,
                expand_size=block_expand(i), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path[i] if isinstance(drop_path, list) else drop_path,
                norm_layer=norm_layer, pool_method=pool_method, focal_level=focal_level,
                focal_window=focal_window, use_layerscale=use_layerscale,
                layerscale_value=layerscale_value, **block_options)
            for i in range(depth)])

        if downsample is not None:
            self.downsample = downsample(
                img_size=input_resolution, patch_size=2, in_chans=dim, embed_dim=2 * dim,
                use_conv_embed=use_conv_embed, norm_layer=norm_layer, use_pre_norm=use_pre_norm,
                is_stem=False)
        else:
            self.downsample = None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the blocks only. [B, H * W, C] -> [B, H * W, C]."""
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Downsamples block output. [B, H * W, C] -> [B, H/2 * W/2, 2C] (identity if last)."""
        if self.downsample is None:
            return x
        height, width = self.input_resolution
        x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        return self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_downsample(self.forward_blocks(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}"

    def flops(self) -> float:
        flops = 0
        for block in self.blocks:
            flops += block.flops()
        if self.downsample is not None:
            flops += self.downsample.flops()
        return flops


class FocalTransformer(nn.Module):
    """Focal Transformer classifier with the official constructor signature and defaults.

    ``expand_stages`` is accepted but, as in the official code, has no effect
    (``expand_sizes`` applies to every stage). Unknown keyword arguments are ignored.
    """

    layer_class = BasicLayer

    @staticmethod
    def block_options(**kwargs) -> dict:
        """Extra block arguments taken from the constructor's other keywords (none here)."""
        return {}

    def __init__(self, img_size=224, patch_size=4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages=[0, 1, 2, 3], focal_levels=[1, 1, 1, 1], focal_windows=[7, 5, 3, 1],
                 focal_pool: str = "fc", expand_stages=[0, 1, 2, 3], expand_sizes=[3, 3, 3, 3],
                 expand_layer: str = "all", use_conv_embed: bool = False,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4,
                 use_pre_norm: bool = False, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio

        self.patch_embed = PatchEmbed(
            img_size=to_2tuple(img_size), patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, use_conv_embed=use_conv_embed, is_stem=True,
            norm_layer=norm_layer if patch_norm else None)
        self.patches_resolution = self.patch_embed.patches_resolution
        num_patches = self.patch_embed.num_patches

        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # Stochastic depth grows linearly over all blocks of all stages.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            first = sum(depths[:i])
            self.layers.append(self.layer_class(
                dim=int(embed_dim * 2**i),
                input_resolution=(self.patches_resolution[0] // 2**i, self.patches_resolution[1] // 2**i),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[first:first + depths[i]],
                norm_layer=norm_layer, pool_method=focal_pool if i in focal_stages else "none",
                downsample=PatchEmbed if i < self.num_layers - 1 else None,
                focal_level=focal_levels[i], focal_window=focal_windows[i],
                expand_size=expand_sizes[i], expand_layer=expand_layer,
                use_conv_embed=use_conv_embed, use_shift=use_shift, use_pre_norm=use_pre_norm,
                use_checkpoint=use_checkpoint, use_layerscale=use_layerscale,
                layerscale_value=layerscale_value, **self.block_options(**kwargs)))

        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Every Linear: trunc-normal(0.02) weight, zero bias; every LayerNorm: ones, zeros."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0.0)
            nn.init.constant_(module.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table", "relative_position_bias_table_to_neighbors",
                "relative_position_bias_table_to_windows"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> tokens [B, H/4 * W/4, D]."""
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        return self.pos_drop(x)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps before each downsample: [B, H_i, W_i, C_i] at strides 4, 8, 16, 32."""
        x = self._embed(x)
        stages = []
        for layer in self.layers:
            x = layer.forward_blocks(x)
            height, width = layer.input_resolution
            stages.append(x.view(x.shape[0], height, width, -1))  # [B, H_i, W_i, C_i]
            x = layer.forward_downsample(x)
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features after the final LayerNorm. [B, 3, H, W] -> [B, num_features]."""
        x = self._embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # [B, L, C]
        return torch.flatten(self.avgpool(x.transpose(1, 2)), 1)  # [B, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def flops(self) -> float:
        """Official multiply-accumulate count at the construction resolution."""
        flops = self.patch_embed.flops()
        for layer in self.layers:
            flops += layer.flops()
        flops += self.num_features * self.patches_resolution[0] * self.patches_resolution[1] // (2 ** self.num_layers)
        flops += self.num_features * self.num_classes
        return flops
