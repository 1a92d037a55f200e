"""Tests of routerkit.config.build: the zoo gets the data's channels and classes where it takes them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from routerkit.config import ConfigError, parse_config
from routerkit.config.build import build_zoo


class ClassesOnly(nn.Module):
    """A user model that takes ``num_classes`` but not ``in_channels``."""

    def __init__(self, num_classes: int, hidden: int = 4) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.LazyLinear(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(x.flatten(1))
        return out


def _cfg(models: list[dict[str, Any]]) -> Any:
    return parse_config(
        {
            "run": {"name": "build"},
            "data": {"factory": "my_plugin.data:make_bundle"},
            "zoo": {"models": models},
            "uncertainty": {"name": "softmax_entropy"},
        }
    )


def test_channels_and_classes_filled_by_signature() -> None:
    cfg = _cfg(
        [
            {"name": "r8", "model": "cifar_resnet8"},
            {"name": "unet", "model": "unet", "params": {"base_channels": 4, "depth": 1}},
            {"name": "user", "model": f"{__name__}:ClassesOnly"},
        ]
    )
    zoo = build_zoo(cfg, in_channels=1, num_classes=7)
    x = torch.rand(2, 1, 16, 16)
    assert zoo[0](x).shape == (2, 7)
    assert zoo[1](x).shape == (2, 7, 16, 16)
    assert zoo[2].num_classes == 7


def test_explicit_params_win() -> None:
    cfg = _cfg(
        [
            {"name": "r8", "model": "cifar_resnet8", "params": {"num_classes": 4, "in_channels": 3}},
            {"name": "r20", "model": "cifar_resnet20"},
        ]
    )
    zoo = build_zoo(cfg, in_channels=1, num_classes=7)
    assert zoo[0](torch.rand(1, 3, 8, 8)).shape == (1, 4)


def test_unknown_model_names_the_field() -> None:
    cfg = _cfg([{"name": "r8", "model": "cifar_resnet8"}, {"name": "r9", "model": "cifar_resnet9"}])
    with pytest.raises(ConfigError, match=r"zoo.models.1 \('r9'\).*cifar_resnet8"):
        build_zoo(cfg, in_channels=3, num_classes=10)
