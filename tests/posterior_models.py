"""Small networks shared by the posterior tests: an MLP, conv + BatchNorm + Flatten over spatial
maps, a torchvision-style ResNet (in-place ReLU, ``out += identity``, downsample), LeNet-5."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnnkit.models import build_model
from test_laplace_models import BasicBlock  # torchvision-style: in-place ReLU, out += identity


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5)
        self.fc1, self.fc2 = nn.Linear(5 * 3 * 3, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.drop(torch.flatten(x, 1))  # Flatten over spatial maps: channel blocks of 9
        return self.fc2(F.relu(self.fc1(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1))
        self.layer2 = nn.Sequential(BasicBlock(4, 6, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).view(x.size(0), -1))


def _randomise_bn(model, g):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))


CASES = {
    "mlp": (mlp, (4, 5), 2),
    "conv_bn_flatten": (ConvBN, (4, 2, 10, 10), 3),
    "resnet": (TinyResNet, (4, 3, 8, 8), 5),
    "lenet5": (lambda: build_model("lenet5", (1, 28, 28), 10), (4, 1, 28, 28), 4),
}


def _model(name, seed=0):
    torch.manual_seed(seed)
    build, shape, _ = CASES[name]
    model = build().double().eval()
    with torch.no_grad():
        _randomise_bn(model, torch.Generator().manual_seed(seed))
    return model, torch.randn(*shape, dtype=torch.float64)


def _load(model, state):
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other
