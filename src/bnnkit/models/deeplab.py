"""DeepLabV3+ (Chen et al., 2018) on a ResNet-18-style backbone, for semantic segmentation.

``DeepLabV3Plus(input_shape, num_classes, width=16, output_stride=8, dropout=0.1)`` maps images
``[B, 3, H, W]`` in [0, 1] to logits ``[B, num_classes, H, W]`` for any ``H, W`` (``input_shape``
records the training size). Parts, as named submodules so a placement plan can address them
(``{"decoder.*": "batch_ensemble", "classifier": "batch_ensemble"}``):

* ``backbone``: a ResNet-18 layout (7x7 stride-2 stem, 3x3 max-pool, four stages of two basic
  blocks, widths ``width x (1, 2, 4, 8)``); stride 4 after ``layer1`` (the low-level features),
  and the last stages dilated instead of strided so the output stride is 8 (``layer3`` and
  ``layer4`` dilated 2 and 4) or 16 (``layer4`` dilated 2);
* ``aspp``: a 1x1 branch, three dilated 3x3 branches (rates 6, 12, 18 at output stride 16,
  doubled at 8) and an image-pooling branch, concatenated and projected to ``4 x width``;
* ``decoder``: the low-level features reduced by a 1x1 conv to ``3 x width`` channels,
  concatenated with the upsampled ASPP output, two 3x3 convs;
* ``dropout`` then ``classifier`` (a 1x1 conv), and a bilinear upsample to the input size.

At ``width=64`` the channel counts are the paper's (ASPP 256, low-level 48) on ResNet-18;
``width=16`` has about 1M weights. Layers are plain ``nn.Conv2d`` / ``nn.BatchNorm2d``, so
:func:`bnnkit.bayesify` swaps any of them. Trained from scratch here: no pretrained weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Normalize
from .zoo import BasicBlock


def _conv_bn(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ResNetBackbone(nn.Module):
    """ResNet-18 layout returning ``(low, high)``: stride-4 and stride-``output_stride``
    features."""

    def __init__(self, cin: int, width: int, output_stride: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(cin, width, 7, 2, 3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        # (stride, dilation) of layer2..layer4
        plan = {16: [(2, 1), (2, 1), (1, 2)], 8: [(2, 1), (1, 2), (1, 4)]}[output_stride]
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        stages = []
        for (stride, dil), cin_, cout in zip(plan, widths[:-1], widths[1:]):
            stages.append(
                nn.Sequential(BasicBlock(cin_, cout, stride, dil), BasicBlock(cout, cout, 1, dil))
            )
        self.layer2, self.layer3, self.layer4 = stages
        self.channels = (width, widths[-1])

    def forward(self, x):
        low = self.layer1(self.stem(x))
        return low, self.layer4(self.layer3(self.layer2(low)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        self.branch1 = _conv_bn(cin, cout, 1)
        self.branch2 = _conv_bn(cin, cout, 3, rates[0])
        self.branch3 = _conv_bn(cin, cout, 3, rates[1])
        self.branch4 = _conv_bn(cin, cout, 3, rates[2])
        # no BatchNorm on the pooled 1x1 features: a batch of one image has no batch statistic
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_conv = nn.Conv2d(cin, cout, 1)
        self.act = nn.ReLU()
        self.project = _conv_bn(5 * cout, cout, 1)

    def forward(self, x):
        pooled = self.act(self.pool_conv(self.pool(x))).expand(-1, -1, x.shape[-2], x.shape[-1])
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x), pooled]
        return self.project(torch.cat(branches, dim=1))


class Decoder(nn.Module):
    """DeepLabV3+ decoder: reduced low-level features beside the upsampled ASPP output."""

    def __init__(self, low_channels: int, aspp_channels: int, reduced: int, out: int) -> None:
        super().__init__()
        self.reduce = _conv_bn(low_channels, reduced, 1)
        self.conv1 = _conv_bn(reduced + aspp_channels, out, 3)
        self.conv2 = _conv_bn(out, out, 3)

    def forward(self, low, high):
        low = self.reduce(low)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(torch.cat([low, high], dim=1)))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with a ResNet-18-style backbone (module docstring)."""

    def __init__(
        self,
        input_shape,
        num_classes: int,
        mean=0.0,
        std=1.0,
        width: int = 16,
        output_stride: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ConfigError(f"output_stride must be 8 or 16, got {output_stride!r}")
        if width < 1 or num_classes < 2:
            raise ConfigError(f"need width >= 1 and num_classes >= 2, got {width}, {num_classes}")
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.output_stride = output_stride
        base = 2 if output_stride == 8 else 1
        rates = (6 * base, 12 * base, 18 * base)
        self.backbone = ResNetBackbone(input_shape[0], width, output_stride)
        low_ch, high_ch = self.backbone.channels
        self.aspp = ASPP(high_ch, 4 * width, rates)
        self.decoder = Decoder(low_ch, 4 * width, 3 * width, 4 * width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x):
        size = x.shape[-2:]
        low, high = self.backbone(self.normalize(x))
        feats = self.decoder(low, self.aspp(high))
        logits = self.classifier(self.dropout(feats))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
