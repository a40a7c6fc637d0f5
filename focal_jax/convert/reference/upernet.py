"""PyTorch reference of UPerNet with a Focal Transformer or FocalNet backbone, in
mmsegmentation's layout.

A from-scratch re-implementation of what mmsegmentation's `EncoderDecoder` computes with
the `upernet_swin` heads (UPerHead over stages 1-4, FCNHead on stage 3), with its module
names, so its `state_dict()` is an mmsegmentation checkpoint's `state_dict` (`backbone.`,
`decode_head.`, `auxiliary_head.`). Pooling and upsampling use PyTorch's own
`adaptive_avg_pool2d` and `interpolate(bilinear, align_corners=False)`: the ground truth
for the static matrices of `focal_jax.models.resize`. Needs only torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from focal_jax.convert.reference import focal as focal_reference
from focal_jax.convert.reference import focalnet as focalnet_reference


class ConvModule(nn.Module):
    """mmcv's ConvModule as the heads use it: conv (no bias) -> BatchNorm2d -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UPerHead(pool_scales=(1, 2, 3, 6), channels=512, dropout 0.1) on NCHW stage maps."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        # psp_modules.{i} is Sequential(AdaptiveAvgPool2d, ConvModule): parameters at `.1.`
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1))
            for s in self.pool_scales)
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        top = inputs[-1]
        pooled = [upsample(module(top), top.shape[2:]) for module in self.psp_modules]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.bottleneck(torch.cat([top] + pooled, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + upsample(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [upsample(x, outs[0].shape[2:]) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """FCNHead(num_convs=1, concat_input=False, channels=256, dropout 0.1)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class FocalBackbone(focal_reference.FocalTransformer):
    """The reference Focal Transformer without classifier and final norm, with `norm{i}` on
    each stage map (as Swin's and FocalNet's mmsegmentation backbones); NCHW outputs."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "num_classes": 0})
        del self.norm, self.avgpool, self.head
        for i in range(self.num_layers):
            self.add_module(f"norm{i}", nn.LayerNorm(self.embed_dim * 2**i))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self.forward_stages(x)
        return [getattr(self, f"norm{i}")(s).permute(0, 3, 1, 2) for i, s in enumerate(stages)]


class FocalNetBackbone(focalnet_reference.FocalNet):
    """The reference FocalNet as microsoft/FocalNet's segmentation backbone computes it: no
    classifier or final norm, `norm{i}` on each stage map; the image padded at the bottom
    and right to a multiple of the patch size and each odd stage map to even before its
    downsampling (zeros); NCHW outputs."""

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "num_classes": 0})
        del self.norm, self.avgpool, self.head
        self.patch_size = kwargs.get("patch_size", 4)
        for i in range(len(self.layers)):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features // 2**(len(self.layers) - 1 - i)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.pad(x, (0, -x.shape[3] % self.patch_size, 0, -x.shape[2] % self.patch_size))
        x, height, width = self.patch_embed(x)
        x = self.pos_drop(x)
        outputs = []
        for i, layer in enumerate(self.layers):
            for block in layer.blocks:
                block.H, block.W = height, width
                x = block(x)
            y = getattr(self, f"norm{i}")(x)  # [B, H*W, C]
            outputs.append(y.transpose(1, 2).reshape(y.shape[0], -1, height, width))
            if layer.downsample is not None:
                x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
                x, height, width = layer.downsample(F.pad(x, (0, width % 2, 0, height % 2)))
        return outputs


class Segmenter(nn.Module):
    """mmsegmentation's EncoderDecoder: backbone, decode_head, auxiliary_head. `forward`
    returns the decode logits [B, K, ceil(H/4), ceil(W/4)] for NCHW images of any size
    (zero-padded at the bottom and right to multiples of `size_multiple`, logits cropped)."""

    def __init__(self, num_classes: int, size_multiple: int = 32,
                 backbone_class: type[nn.Module] = FocalBackbone, **backbone_kwargs):
        super().__init__()
        self.size_multiple = size_multiple
        self.backbone = backbone_class(**backbone_kwargs)
        depths = backbone_kwargs.get("depths", (2, 2, 6, 2))
        widths = [backbone_kwargs.get("embed_dim", 96) * 2**i for i in range(len(depths))]
        self.decode_head = UPerHead(widths, num_classes)
        self.auxiliary_head = FCNHead(widths[2], num_classes)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        height, width = images.shape[2:]
        unit = self.size_multiple
        pad_h, pad_w = -height % unit, -width % unit
        return self.backbone(F.pad(images, (0, pad_w, 0, pad_h)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[2:]
        logits = self.decode_head(self._features(images))
        return logits[:, :, :-(-height // 4), :-(-width // 4)]

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[2:]
        features = self._features(images)
        decode = self.decode_head(features)[:, :, :-(-height // 4), :-(-width // 4)]
        auxiliary = self.auxiliary_head(features[2])[:, :, :-(-height // 16), :-(-width // 16)]
        return decode, auxiliary


def randomise_(model: nn.Module, seed: int = 0) -> None:
    """Moves weights and BatchNorm statistics well away from their initial values (for
    parity checks: position tables large, norms and BN scales around 1, logits O(5))."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(noise(p, 0.5))
            elif name.endswith("weight") and ("norm" in name or ".bn." in name):
                p.copy_(1.0 + noise(p, 0.2))
            elif name.endswith("bias"):
                p.copy_(noise(p, 0.05))
            else:
                p.add_(noise(p, float(p.std()) if p.numel() > 1 else 0.02))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(noise(b, 0.1))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator, dtype=b.dtype))
            elif name.endswith("num_batches_tracked"):
                b.fill_(160_000)


def reference_segmenter(config, num_classes: int) -> Segmenter:
    """The reference of `focal_jax.create_segmenter` for a (version-1) `FocalConfig` or a
    `FocalNetConfig`."""
    backbone_kwargs = {k: v for k, v in config.official_kwargs().items() if k != "num_classes"}
    if "normalize_modulator" in backbone_kwargs:  # FocalNet: pads inside, from the patch size
        return Segmenter(num_classes, size_multiple=config.patch_size,
                         backbone_class=FocalNetBackbone, **backbone_kwargs)
    if getattr(config, "version", 1) != 1:
        raise ValueError("The UPerNet reference covers the Focal Transformer (version 1) and "
                         "FocalNet.")
    return Segmenter(num_classes, size_multiple=config.size_multiple, **backbone_kwargs)
