"""Model registry: ``--model.name resnet18``. A user registers their own with
``@MODELS.register("my_net")`` on a function ``(num_classes, in_channels, image_size) -> nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedbench.registry import Registry

ModelFactory = Callable[[int, int, int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


@dataclass
class ModelConfig:
    """Args:
    name: a registered model (simple_cnn, resnet18, or one of your own).
    """

    name: str = "simple_cnn"

    def problems(self) -> list[tuple[str, object, str]]:
        return MODELS.problems("model.name", self.name)


class SimpleCNN(nn.Module):
    """The backbone of the published SDFC/FDCR code.

    conv(c,6,5)-relu-maxpool2, conv(6,16,5)-relu-maxpool2, fc(400,120)-relu,
    fc(120,84)-relu, linear(84,84)-relu, linear(84,256), linear(256,classes).
    The flattened size (400 for 3x32x32) follows the configured input size.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.l1 = nn.Linear(84, 84)
        self.l2 = nn.Linear(84, 256)
        self.cls = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.l1(x))
        x = self.l2(x)
        return self.cls(x)


@MODELS.register("simple_cnn")
def simple_cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SimpleCNN(num_classes, in_channels, image_size)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MODELS.resolve(name)(num_classes, in_channels, image_size)
