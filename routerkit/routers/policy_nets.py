"""Policy networks mapping the router state to per-unit action logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ConvPolicy(nn.Module):
    """PaSeR's small ResNet policy on a full-size state map -> ``[B, P, A]`` logits.

    A stride-2 stem and three residual stages (strides 1, 2, 2) are pooled to the unit grid
    with adaptive average pooling, then a 1x1 convolution gives each unit's action logits, so
    any image size and grid work. ``width=12`` gives about 15k parameters for a 4-channel
    state and 3 actions (PaSeR: 14,736).

    Args:
        in_channels: State channels (K probabilities + 1 uncertainty).
        num_actions: Models m + 1.
        grid_shape: ``(rows, cols)`` unit grid.
        width: Channels of the first stage (doubled in the last).
    """

    def __init__(self, in_channels: int, num_actions: int, grid_shape: tuple[int, int], width: int = 12) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"Expected width >= 1 but got {width}.")
        self.grid_shape = grid_shape
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.stages = nn.Sequential(_BasicBlock(width, width, 1), _BasicBlock(width, width, 2), _BasicBlock(width, 2 * width, 2))
        self.head = nn.Conv2d(2 * width, num_actions, 1)

    def forward(self, state: Tensor) -> Tensor:
        y = self.stages(self.stem(state))
        y = F.adaptive_avg_pool2d(y, self.grid_shape)
        logits: Tensor = self.head(y)  # [B, A, rows, cols]
        return logits.flatten(2).transpose(1, 2)


class MLPPolicy(nn.Module):
    """Policy for vector states (whole-input classification): ``[B, D]`` -> ``[B, 1, A]``.

    Args:
        in_channels: State size (K probabilities + 1 uncertainty).
        num_actions: Models m + 1.
        hidden: Hidden width.
    """

    def __init__(self, in_channels: int, num_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
        )

    def forward(self, state: Tensor) -> Tensor:
        logits: Tensor = self.net(state.flatten(1))
        return logits.unsqueeze(1)
