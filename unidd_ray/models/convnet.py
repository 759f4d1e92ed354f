"""ConvNet-W{width}-D{depth}: [conv3×3 → norm → ReLU → avg-pool 2] × depth → linear."""

from __future__ import annotations

from torch import nn

NORMS = ("batch", "instance", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, resolution: int = 32, width: int = 128,
                 depth: int = 3, norm: str = "batch"):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        if resolution >> depth < 1:
            raise ValueError(f"resolution {resolution} is too small for {depth} pooling stages; lower depth")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), _norm(norm, width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = resolution >> depth
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
