"""The CIFAR ResNets of He et al. 2016 (ResNet-8/20/32/56/110) for whole-input classification."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CIFAR_RESNET_DEPTHS", "BasicBlock", "CifarResNet"]

#: Depths of the published CIFAR ResNets (6n + 2 with n = 1, 3, 5, 9, 18).
CIFAR_RESNET_DEPTHS: tuple[int, ...] = (8, 20, 32, 56, 110)


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions with batch norm and an identity (or 1 x 1 projection) shortcut.

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + self.shortcut(x))
        return result


class CifarResNet(nn.Module):
    """ResNet for 32 x 32 images (He et al. 2016, Sec. 4.2): 3 stages of ``n`` basic blocks each.

    Stage widths are ``width, 2 width, 4 width`` (16 / 32 / 64 in the paper) and the depth is
    ``6 n + 2``. Where the shape changes the shortcut is a 1 x 1 convolution with batch norm
    (option B), so the parameter counts are a little above the paper's option-A figures
    (ResNet-20: 272k vs 0.27M). Any input size works (global average pooling before the head).

    Args:
        depth: ``6 n + 2`` with ``n >= 1``: 8, 20, 32, 44, 56, 110, ...
        num_classes: Output classes (logits).
        in_channels: Input channels.
        width: Channels of the first stage.
        dropout: Dropout probability before the final linear layer; used by Monte-Carlo-dropout
            uncertainty (0 disables it).

    Example:
        >>> import torch
        >>> net = CifarResNet(depth=8, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"Expected depth = 6n + 2 with n >= 1 (8, 20, 32, 44, 56, 110, ...) but got depth={depth}.")
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(f"Expected num_classes, in_channels and width >= 1 but got {num_classes}, {in_channels}, {width}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Expected dropout in [0, 1) but got {dropout}.")
        self.depth = depth
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The deterministic trunk (timm's split): ``[B, 4 width, H / 4, W / 4]`` feature maps."""
        out: Tensor = self.stages(self.stem(x))
        return out

    def forward_head(self, features: Tensor) -> Tensor:
        """Pooling, dropout and the linear classifier: logits ``[B, num_classes]``.

        Monte-Carlo dropout runs the trunk once and only this head ``N`` times.
        """
        logits: Tensor = self.head(self.dropout(self.pool(features).flatten(1)))
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
