"""Factories for "python:infscaled.models.zoo:NAME" sources, from plain torch layers.

Each returns an nn.Sequential carrying `input_shape`. Submodule names follow torchvision's
VGG (features.N, avgpool, classifier.N), so its parameter names line up with torchvision's
state dict; the explicit Flatten sits between avgpool and classifier, where torchvision's
forward calls torch.flatten.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

# VGG16 ("configuration D"): output channels of each conv3x3, "M" = 2x2 max pool.
VGG16_LAYERS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")
# The same 13 convs and 5 pools with few channels.
VGG_TINY_LAYERS: tuple[int | str, ...] = (8, 8, "M", 16, 16, "M", 32, 32, 32, "M",
                                          64, 64, 64, "M", 64, 64, 64, "M")


def _vgg(layers: Sequence[int | str], pool: int, hidden: int, num_classes: int, image_size: int,
         dropout: float) -> nn.Sequential:
    # ReLU(inplace=False): a ReLU can start a stage, and must not overwrite the tensor it received.
    features: list[nn.Module] = []
    channels = 3
    for spec in layers:
        if spec == "M":
            features.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(spec, int)
            features += [nn.Conv2d(channels, spec, kernel_size=3, padding=1), nn.ReLU()]
            channels = spec
    classifier = nn.Sequential(
        nn.Linear(channels * pool * pool, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*features),
        avgpool=nn.AdaptiveAvgPool2d(pool),
        flatten=nn.Flatten(),
        classifier=classifier,
    ))
    model.input_shape = (3, image_size, image_size)  # type: ignore[assignment]
    return model


def vgg16(num_classes: int = 1000, image_size: int = 224) -> nn.Sequential:
    """VGG16: 13 conv3x3+ReLU, 5 max pools, 7x7 average pool, 4096-4096-classes MLP (138.4M parameters)."""
    if image_size < 32:
        raise ValueError(f"vgg16 needs image_size >= 32 (five 2x2 pools), got {image_size}")
    return _vgg(VGG16_LAYERS, pool=7, hidden=4096, num_classes=num_classes, image_size=image_size, dropout=0.5)


def vgg_tiny(num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """VGG16's shape with 8..64 channels and a 128-wide MLP on 32x32 inputs; milliseconds on a CPU."""
    if image_size < 32:
        raise ValueError(f"vgg_tiny needs image_size >= 32 (five 2x2 pools), got {image_size}")
    return _vgg(VGG_TINY_LAYERS, pool=1, hidden=128, num_classes=num_classes, image_size=image_size, dropout=0.5)
