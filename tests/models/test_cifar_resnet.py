"""Tests of routerkit.models.CifarResNet: shapes, published parameter counts, FLOPs, validation, MC dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routerkit.flops import count_flops
from routerkit.models import CIFAR_RESNET_DEPTHS, CifarResNet, create_model, list_models
from routerkit.models.cifar_resnet import BasicBlock


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [8, 20])
@pytest.mark.parametrize(("num_classes", "in_channels", "size"), [(10, 3, 32), (4, 1, 28), (7, 3, 17)])
def test_output_shapes(depth: int, num_classes: int, in_channels: int, size: int) -> None:
    net = CifarResNet(depth, num_classes=num_classes, in_channels=in_channels).eval()
    assert net(torch.randn(3, in_channels, size, size)).shape == (3, num_classes)


def test_stage_layout() -> None:
    net = CifarResNet(20, width=8)
    blocks = [b for b in net.stages if isinstance(b, BasicBlock)]
    assert len(blocks) == 9  # n = 3 blocks in each of the three stages
    assert [b.conv2.out_channels for b in blocks] == [8] * 3 + [16] * 3 + [32] * 3
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    projections = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [3, 6]  # 1 x 1 projection only where the shape changes
    assert net.head.in_features == 32


@pytest.mark.parametrize(("depth", "published"), [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6), (110, 1.7e6)])
def test_parameter_counts_match_the_paper(depth: int, published: float) -> None:
    """He et al. 2016, Table 6 (option A shortcuts; the 1 x 1 projections add ~2.8k parameters)."""
    model = create_model(f"cifar_resnet{depth}")
    assert isinstance(model, CifarResNet) and model.depth == depth
    assert abs(num_params(model) - published) / published < 0.05


def test_registry_and_presets() -> None:
    names = list_models("cifar_resnet*")
    assert names == sorted(["cifar_resnet", *(f"cifar_resnet{d}" for d in CIFAR_RESNET_DEPTHS)])
    net = create_model("cifar_resnet8", num_classes=5, in_channels=1, dropout=0.2)
    assert isinstance(net, CifarResNet) and net.depth == 8 and net.dropout.p == 0.2
    assert net.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    generic = create_model("cifar_resnet", depth=14, width=4, num_classes=3)
    assert isinstance(generic, CifarResNet) and len(generic.stages) == 6
    assert num_params(create_model("cifar_resnet20")) == num_params(CifarResNet(20))


def test_flops_grow_with_depth() -> None:
    flops = {d: count_flops(create_model(f"cifar_resnet{d}"), (3, 32, 32)) for d in (8, 20, 56)}
    assert flops[8] < flops[20] < flops[56]
    # ResNet-20: about 41M multiply-adds (fvcore convention), ResNet-56 about 126M.
    assert flops[20] == pytest.approx(41e6, rel=0.05)
    assert flops[56] == pytest.approx(126e6, rel=0.05)
    assert count_flops(CifarResNet(20, width=8), (3, 32, 32)) < flops[20]


@pytest.mark.parametrize("depth", [0, 2, 7, 9, 21, -4])
def test_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=r"depth = 6n \+ 2"):
        CifarResNet(depth)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dropout"):
        CifarResNet(8, dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        CifarResNet(8, num_classes=0)


def test_dropout_makes_train_mode_stochastic() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    net = CifarResNet(8, dropout=0.3)
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.eval()
    assert torch.allclose(net(x), net(x))
    plain = CifarResNet(8).train()
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in plain.modules())
    # Deterministic in train mode without dropout (batch statistics of the same batch).
    assert torch.allclose(plain(x), plain(x))


def test_mc_dropout_estimator_accepts_it() -> None:
    from routerkit.uncertainty import MCDropoutEntropy

    net = CifarResNet(8, dropout=0.1).eval()
    out = MCDropoutEntropy(num_passes=3)(net, torch.randn(2, 3, 32, 32))
    assert out.probs.shape == (2, 10) and out.uncertainty.shape == (2,)
