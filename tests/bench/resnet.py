"""A ResNet-18-shaped model with random (seeded) weights, for the benchmarks in tests/bench.

BasicBlocks [2, 2, 2, 2] at widths 64/128/256/512, a 7x7 stride-2 stem and a max pool, as in
torchvision, written out here so the benchmarks need neither torchvision nor a download. At
the declared 112 x 112 RGB input, layer1..layer4 give 64x28x28, 128x14x14, 256x7x7, 512x4x4.

`tests` is not a package, and tests/bench must not go on sys.path (its scripts' names, such
as api.py, would shadow the project's `api` package), so the benchmarks load this file by its path
under the module name MODULE; for a subprocess they copy it alone into a folder on its
PYTHONPATH. The factory is then FACTORY, `actmap_bench_resnet:resnet18`.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.jobs import Preprocessing

__all__ = ["FACTORY", "LAYERS", "MODULE", "PREPROCESSING", "ResNet", "resnet18"]

MODULE = "actmap_bench_resnet"
FACTORY = f"{MODULE}:resnet18"
LAYERS = ("layer1", "layer2", "layer3", "layer4")
# ImageNet statistics, as a torchvision ResNet would declare them.
PREPROCESSING = Preprocessing(
    size=(112, 112), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: torch.Tensor = self.relu(y + identity)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        inplanes = 64
        stages = []
        for i, (width, blocks) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(inplanes, width, stride)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def resnet18() -> ResNet:
    """The factory FACTORY: the same random weights on every call (seed 0)."""
    torch.manual_seed(0)
    return ResNet().eval()


resnet18.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
