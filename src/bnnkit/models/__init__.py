"""Model zoo and the folding wrappers."""

from __future__ import annotations

from ..errors import ConfigError, unknown_name
from .base import Folded, Normalize, Stacked, check_images, fold
from .zoo import MLP, LeNet5, ResNet18, WideResNet28

MODELS = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "wrn28": WideResNet28,
}


def build_model(name: str, input_shape, num_classes: int, mean=0.0, std=1.0, **kwargs):
    """Build a registered architecture for images of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if name == "lenet5" and min(input_shape[1:]) < 16:
        raise ConfigError(f"lenet5 needs images of at least 16x16, got {tuple(input_shape)}")
    return MODELS[name](input_shape, num_classes, mean=mean, std=std, **kwargs)


__all__ = [
    "MODELS",
    "build_model",
    "Folded",
    "Stacked",
    "Normalize",
    "check_images",
    "fold",
    "MLP",
    "LeNet5",
    "ResNet18",
    "WideResNet28",
]
