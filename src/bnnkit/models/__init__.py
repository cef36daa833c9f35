"""Model zoo and the folding wrappers."""

from __future__ import annotations

from ..errors import ConfigError, unknown_name
from ..options import Option, OptionTable
from .base import Folded, Normalize, Stacked, check_images, fold
from .deeplab import DeepLabV3Plus
from .placement import PlacementFallback
from .zoo import MLP, LeNet5, ResNet18, WideResNet28

MODELS = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "wrn28": WideResNet28,
    "deeplabv3plus": DeepLabV3Plus,
}


#: what each architecture predicts (bnnkit.methods.base.TASKS); absent: classification
MODEL_TASKS = {"deeplabv3plus": "segmentation"}


def model_task(name: str) -> str:
    """``"classification"`` or ``"segmentation"``: what the registered architecture predicts."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    return MODEL_TASKS.get(name, "classification")


def register_model(
    name: str, factory, options: OptionTable | None = None, task: str = "classification"
) -> None:
    """Make your own architecture usable by name in every method, ``train_run``, the bench and
    the search (e.g. a U-Net for segmentation).

    ``factory(input_shape, num_classes, mean=..., std=..., **options)`` returns an
    ``nn.Module`` mapping images in [0, 1] (it normalises them with ``mean`` / ``std`` itself)
    to logits: ``[B, C]`` for ``task="classification"``, ``[B, C, H, W]`` at the input's size
    for ``task="segmentation"`` (any height and width). ``options``: its options, declared
    once (type, range, default, help); a name already taken is refused."""
    if name in MODELS:
        raise ConfigError(f"model {name!r} is already registered; choose another name")
    if not callable(factory):
        raise ConfigError(f"factory for model {name!r} must be callable, got {factory!r}")
    if task not in ("classification", "segmentation"):
        raise ConfigError(f"task must be 'classification' or 'segmentation', got {task!r}")
    MODELS[name] = factory
    MODEL_OPTIONS[name] = options if options is not None else OptionTable(f"model {name!r}", [])
    MODEL_TASKS[name] = task


def _output_stride(o: dict) -> str | None:
    if o["output_stride"] not in (8, 16):
        return f"option 'output_stride' must be 8 or 16, got {o['output_stride']!r}"
    return None


#: every architecture option, declared once
MODEL_OPTIONS = {
    "mlp": OptionTable(
        "model 'mlp'", [Option("hidden", "int_list", [256, 256], "hidden layer widths", low=1)]
    ),
    "lenet5": OptionTable("model 'lenet5'", []),
    "resnet18": OptionTable(
        "model 'resnet18'", [Option("width", "int", 64, "channels of the first stage", low=1)]
    ),
    "wrn28": OptionTable(
        "model 'wrn28'",
        [
            Option("widen", "int", 10, "widening factor k", low=1),
            Option("dropout", "float", 0.0, "dropout rate inside the blocks", low=0.0, high=1.0,
                   high_open=True),
        ],
    ),
    "deeplabv3plus": OptionTable(
        "model 'deeplabv3plus'",
        [
            Option("width", "int", 16, "channels of the first backbone stage", low=1),
            Option("output_stride", "int", 8, "input size / backbone feature size: 8 or 16",
                   low=8, high=16),
            Option("dropout", "float", 0.1, "dropout rate before the classifier", low=0.0,
                   high=1.0, high_open=True),
        ],
        checks=[_output_stride],
    ),
}  # fmt: skip


def build_model(name: str, input_shape, num_classes: int, mean=0.0, std=1.0, **kwargs):
    """Build a registered architecture for images of ``input_shape`` (C, H, W)."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    kwargs = MODEL_OPTIONS[name].resolve(kwargs, fill=False)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if name == "lenet5" and min(input_shape[1:]) < 16:
        raise ConfigError(f"lenet5 needs images of at least 16x16, got {tuple(input_shape)}")
    return MODELS[name](input_shape, num_classes, mean=mean, std=std, **kwargs)


__all__ = [
    "MODEL_TASKS",
    "model_task",
    "register_model",
    "PlacementFallback",
    "MODELS",
    "MODEL_OPTIONS",
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
    "DeepLabV3Plus",
]
