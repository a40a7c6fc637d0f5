"""PyTorch references of the model families, with the official module trees, names and
numerics: `focal` (the Focal Transformer, v1), `fast` (Focal-fast, which subclasses
`focal`'s stage, block and model) and `focalnet` (FocalNet); `upernet` (the UPerNet
segmenter on `focal`, in mmsegmentation's layout). They need torch; nothing else in
focal_jax imports them.

    from focal_jax.convert.reference import reference_model
    model = reference_model(focal_jax.make_config("focalv2_tiny"))
"""

from __future__ import annotations

from torch import nn

from focal_jax.convert.reference import fast, focal, focalnet


def reference_model(config) -> nn.Module:
    """The PyTorch reference of a config's family, built from the official constructor
    arguments: FocalNet (a `FocalNetConfig`), Focal-fast (`version` 2, `fast`) or the Focal
    Transformer (`focal`)."""
    if hasattr(config, "normalize_modulator"):  # a FocalNetConfig
        return focalnet.FocalNet(**config.official_kwargs())
    if getattr(config, "version", 1) == 2:
        return fast.FocalTransformer(**config.official_kwargs())
    return focal.FocalTransformer(**config.official_kwargs())


__all__ = ["fast", "focal", "focalnet", "reference_model"]
