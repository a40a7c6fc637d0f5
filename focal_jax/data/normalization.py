"""The per-channel normalisation of input images (RGB in [0, 1]): ImageNet's mean and
standard deviation, which the official models were trained with. Plain tuples, so that
inference code and notebooks use them without loading TensorFlow."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]
