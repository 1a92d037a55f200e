"""Tests of routerkit.costs: PaSeR's parameter-share cost (Eq. 3) and fvcore FLOP costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routerkit.costs import CostModel, FlopCost, ParamShareCost, create_cost, list_costs
from routerkit.flops import count_flops
from routerkit.models import ToySegmenter, UNet, Zoo


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def zoo3() -> Zoo:
    torch.manual_seed(0)
    return Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=8), UNet(1, 2, base_channels=2, depth=1)])


def test_param_share_is_eq3(zoo3: Zoo) -> None:
    costs = ParamShareCost().costs(zoo3, (1, 8, 8))
    params = [n_params(m) for m in zoo3]
    denom = params[1] + params[2]
    assert costs.dtype == torch.float32 and costs.shape == (3,)
    assert costs.tolist() == pytest.approx([p / denom for p in params], rel=1e-6)
    assert costs[1:].sum().item() == pytest.approx(1.0, abs=1e-6)
    # Parameter shares do not depend on the unit shape.
    assert torch.equal(costs, ParamShareCost().costs(zoo3, (1, 32, 16)))


def test_param_share_two_models() -> None:
    zoo = Zoo([ToySegmenter(width=2), ToySegmenter(width=6)])
    costs = ParamShareCost().costs(zoo, (1, 4, 4))
    assert costs[1].item() == pytest.approx(1.0)
    assert costs[0].item() == pytest.approx(n_params(zoo[0]) / n_params(zoo[1]))


def test_base_cost_zero(zoo3: Zoo) -> None:
    share = ParamShareCost().costs(zoo3, (1, 8, 8))
    zero = ParamShareCost(base_cost="zero").costs(zoo3, (1, 8, 8))
    assert zero[0].item() == 0.0
    assert torch.equal(zero[1:], share[1:])
    assert ParamShareCost(base_cost="zero").config() == {"base_cost": "zero"}
    with pytest.raises(ValueError, match="base_cost"):
        ParamShareCost(base_cost="free")


def test_flop_cost_uses_fvcore_on_unit_shape(zoo3: Zoo) -> None:
    unit = (1, 8, 12)
    raw = [count_flops(m, unit) for m in zoo3]
    assert all(r > 0 for r in raw)
    assert FlopCost()._raw(zoo3, unit) == [float(r) for r in raw]
    costs = FlopCost().costs(zoo3, unit)
    assert costs.tolist() == pytest.approx([r / (raw[1] + raw[2]) for r in raw], rel=1e-6)
    assert costs[1:].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_flop_cost_scales_with_unit_area() -> None:
    zoo = Zoo([ToySegmenter(width=2), ToySegmenter(width=8)])
    small = FlopCost()._raw(zoo, (1, 4, 4))
    big = FlopCost()._raw(zoo, (1, 8, 8))
    wide = FlopCost()._raw(zoo, (1, 4, 12))
    for s, b, w in zip(small, big, wide, strict=True):
        assert b == 4 * s
        assert w == 3 * s
    # Normalised costs of fully-convolutional models are shape-invariant ratios.
    assert torch.allclose(FlopCost().costs(zoo, (1, 4, 4)), FlopCost().costs(zoo, (1, 8, 8)))


def test_costs_errors() -> None:
    zoo = Zoo([ToySegmenter(width=2), nn.ReLU()])  # the only costlier model has no parameters
    with pytest.raises(ValueError, match="positive total cost"):
        ParamShareCost().costs(zoo, (1, 4, 4))

    class Negative(CostModel):
        def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
            return [1.0, -1.0]

    with pytest.raises(RuntimeError, match="invalid raw costs"):
        Negative().costs(Zoo([ToySegmenter(), ToySegmenter()]), (1, 4, 4))

    class WrongLength(CostModel):
        def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
            return [1.0]

    with pytest.raises(RuntimeError, match="invalid raw costs"):
        WrongLength().costs(Zoo([ToySegmenter(), ToySegmenter()]), (1, 4, 4))


def test_cost_registry() -> None:
    assert {"param_share", "flops"} <= set(list_costs())
    assert isinstance(create_cost("flops"), FlopCost)
    assert create_cost("param_share", base_cost="zero").base_cost == "zero"
    cost = ParamShareCost()
    assert create_cost(cost) is cost
