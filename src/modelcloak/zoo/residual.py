"""A small residual CNN with branches, for the soft lock on graphs (tests and benchmarks).

Two ResNet-style basic blocks (conv-BN-ReLU-conv-BN plus the input or a strided 1x1
projection of it, then ReLU), an Inception-style concatenation of a 1x1 and a 3x3 branch, max
pooling, global average pooling and a linear head: the shapes torch's ONNX exporter turns into
Add, Concat, MaxPool, ReduceMean, Reshape and Gemm, with BatchNorm folded into the convs.
torch is an optional extra, imported when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelcloak.training import import_torch

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["residual_cnn"]


def residual_cnn(*, in_channels: int = 1, classes: int = 10, width: int = 8, seed: int = 0) -> torch.nn.Module:
    """The residual CNN for inputs of `in_channels` x H x W (H, W even), initialised from `seed`.

    The caller's global torch RNG is left as it was.
    """
    torch = import_torch()
    nn = torch.nn

    # Classes built on the torch imported at call time: mypy cannot see their base.
    class BasicBlock(nn.Module):  # type: ignore[name-defined,misc]
        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            projection = stride != 1 or cin != cout
            self.shortcut = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if projection
                else nn.Identity()
            )
            self.relu2 = nn.ReLU()

        def forward(self, x: Any) -> Any:
            inner = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            return self.relu2(inner + self.shortcut(x))

    class ResidualNet(nn.Module):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.block = BasicBlock(width, width)
            self.narrow, self.wide = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 3, padding=1)
            self.head = nn.Sequential(
                nn.ReLU(),
                nn.MaxPool2d(2),
                BasicBlock(2 * width, 2 * width),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, classes),
            )

        def forward(self, x: Any) -> Any:
            x = self.block(self.stem(x))
            return self.head(torch.cat([self.narrow(x), self.wide(x)], 1))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResidualNet()
