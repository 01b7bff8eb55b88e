"""PyTorch twins of the benchmarked convlib models (same layer shapes), the optional reference of the training
suite. Imported only when PyTorch is; run eager, channels_last (ResNet-50: torchvision's, under bfloat16 autocast)."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn


def lenet5_modern(num_classes: int, in_channels: int) -> nn.Module:
    """conv 6@5x5 - ReLU - max 2 - conv 16@5x5 - ReLU - max 2 - FC 120 - FC 84 - FC (32x32 input)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (option A: strided, zero-padded channels), ReLU."""

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.stride, self.extra = stride, width - c_in

    def forward(self, x):
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return torch.relu(self.body(x) + shortcut)


def resnet20(num_classes: int, in_channels: int) -> nn.Module:
    """3x3 stem 16 - 3 stages of 3 basic blocks (16, 32, 64) - global average pool - FC."""
    layers, c_in = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for i, width in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(_BasicBlock(c_in, width, 2 if i and not j else 1))
            c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


def _classifier(in_features: int, hidden: int, num_classes: int) -> list:
    return [
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    ]


def vgg11_small(num_classes: int, in_channels: int) -> nn.Module:
    """VGG-11 (config A: 64, M, 128, M, 256x2, M, 512x2, M, 512x2, M) on 32x32, classifier 512."""
    layers, c_in = [], in_channels
    for widths in ((64,), (128,), (256, 256), (512, 512), (512, 512)):
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 3, 1, 1), nn.ReLU()]
            c_in = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, *_classifier(512, 512, num_classes))


def alexnet_small(num_classes: int, in_channels: int) -> nn.Module:
    """AlexNet on 32x32: conv1 48@5x5 - LRN - max 3/2 - conv2 128@5x5 g2 - LRN - max 3/2 - conv3 192 - conv4 192 g2
    - conv5 128 g2 - max 3/2 - classifier 1024 (LRN alpha n x ours, PyTorch's convention)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 48, 5, 1, 2),
        nn.ReLU(),
        nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(48, 128, 5, 1, 2, groups=2),
        nn.ReLU(),
        nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(128, 192, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(192, 192, 3, 1, 1, groups=2),
        nn.ReLU(),
        nn.Conv2d(192, 128, 3, 1, 1, groups=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        *_classifier(128 * 3 * 3, 1024, num_classes),
    )


def resnet50(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's ResNet-50 (3 input channels)."""
    import torchvision

    if in_channels != 3:
        raise ValueError(f"torchvision's resnet50 takes 3 input channels, got in_channels={in_channels}")
    return torchvision.models.resnet50(num_classes=num_classes)


MODELS = {
    "lenet5_modern": lenet5_modern,
    "resnet20": resnet20,
    "vgg11_small": vgg11_small,
    "alexnet_small": alexnet_small,
}
if importlib.util.find_spec("torchvision") is not None:  # the ResNet-50 reference only
    MODELS["resnet50"] = resnet50


def train_step(name: str, batch: int, in_channels: int, size: int = 32, bfloat16: bool = False):
    """A zero-argument function running one SGD-momentum step of model `name` on a fixed random batch; with
    `bfloat16`, forward and loss under `torch.autocast(bfloat16)` (parameters and their update in float32)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MODELS[name](10, in_channels).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, in_channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=bfloat16):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step
