"""MLP, LeNet-5, ResNet-18 (CIFAR stem) and WideResNet-28-k.

Every model takes images in [0, 1] shaped ``[B, C, H, W]``, normalises them itself, and
records ``input_shape`` and ``num_classes``. Layers are plain ``nn.Linear`` / ``nn.Conv2d`` /
``nn.BatchNorm2d`` so that :func:`bnnkit.bayesify` can swap any of them by name.
"""

from __future__ import annotations

import math

from torch import nn

from .base import Normalize


class _Classifier(nn.Module):
    def __init__(self, input_shape, num_classes, mean, std) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)


class MLP(_Classifier):
    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, hidden=(256, 256)) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        dims = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.fc(self.features(self.normalize(x)))


class LeNet5(_Classifier):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, for 28x28 or 32x32 inputs."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(self.normalize(x))))
        x = self.pool(self.act(self.conv2(x)))
        x = x.flatten(1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """A ResNet basic block; its 3x3 convs may be dilated (DeepLabV3+'s last stages)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet18(_Classifier):
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), He et al., 2016."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width: int = 64) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.ReLU()
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks, cin = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False)
            if (stride != 1 or cin != cout)
            else nn.Identity()
        )

    def forward(self, x):
        out = self.conv1(self.act(self.bn1(x)))
        out = self.conv2(self.dropout(self.act(self.bn2(out))))
        return out + self.shortcut(x)


class WideResNet28(_Classifier):
    """WideResNet-28-k: 3 groups of 4 wide blocks, widths 16k, 32k, 64k."""

    def __init__(
        self, input_shape, num_classes, mean=0.0, std=1.0, widen: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__(input_shape, num_classes, mean, std)
        c = input_shape[0]
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        groups, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [
                WideBlock(cin if j == 0 else w, w, stride if j == 0 else 1, dropout)
                for j in range(4)
            ]
            groups.append(nn.Sequential(*blocks))
            cin = w
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.conv1(self.normalize(x))
        x = self.block3(self.block2(self.block1(x)))
        return self.fc(self.pool(self.act(self.bn(x))).flatten(1))
