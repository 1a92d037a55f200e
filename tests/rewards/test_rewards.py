"""Tests of routerkit.rewards: PaSeR's reward and the per-unit accuracy terms."""

from __future__ import annotations

import math

import pytest
import torch

from routerkit.functional import per_region_iou
from routerkit.rewards import (
    Correctness,
    NegativeCrossEntropy,
    PaSeRReward,
    Reward,
    UnitIoU,
    create_accuracy,
    create_reward,
)


def test_paser_reward_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    acc_chosen, acc_base, cost = (torch.rand(3, 4, generator=gen) for _ in range(3))
    for lam in (0.0, 0.25, 0.5, 1.0):
        got = PaSeRReward(lam)(acc_chosen, acc_base, cost)
        assert torch.allclose(got, (1 - lam) * (acc_chosen - acc_base) - lam * cost)
    r = PaSeRReward(0.2)(torch.tensor([0.9]), torch.tensor([0.4]), torch.tensor([0.5]))
    assert r.item() == pytest.approx(0.8 * 0.5 - 0.2 * 0.5)


def test_paser_reward_lambda_override() -> None:
    reward = PaSeRReward(0.9)
    a, b, c = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])
    assert reward(a, b, c).item() == pytest.approx(0.1 - 0.9)
    assert reward(a, b, c, lam=0.0).item() == pytest.approx(1.0)
    assert reward(a, b, c, lam=1.0).item() == pytest.approx(-1.0)
    assert reward.lam == 0.9  # the override does not stick


def test_paser_reward_nan_gain_is_zero() -> None:
    acc_chosen = torch.tensor([[math.nan, 0.5]])
    acc_base = torch.tensor([[0.3, math.nan]])
    cost = torch.tensor([[0.2, 0.4]])
    got = PaSeRReward(0.5)(acc_chosen, acc_base, cost)
    assert got[0].tolist() == pytest.approx([-0.1, -0.2])


@pytest.mark.parametrize("lam", [-0.01, 1.01])
def test_paser_reward_lambda_range(lam: float) -> None:
    with pytest.raises(ValueError, match="lambda"):
        PaSeRReward(lam)
    with pytest.raises(ValueError, match="lambda"):
        PaSeRReward(0.5)(torch.zeros(1), torch.zeros(1), torch.zeros(1), lam=lam)


def test_reward_shape_check_and_registry() -> None:
    with pytest.raises(ValueError, match="of one shape"):
        PaSeRReward()(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
    reward = create_reward("paser", lam=0.3)
    assert isinstance(reward, PaSeRReward) and isinstance(reward, Reward) and reward.lam == 0.3


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_unit_iou_equals_per_region_iou(k: int, ignore_index: int | None) -> None:
    gen = torch.Generator().manual_seed(k)
    probs = torch.softmax(torch.randn(6, k, 4, 5, generator=gen), dim=1)
    targets = torch.randint(0, k, (6, 4, 5), generator=gen)
    if ignore_index is not None:
        targets[torch.rand(targets.shape, generator=gen) < 0.3] = ignore_index
    got = UnitIoU(k, ignore_index)(probs, targets)
    expected = per_region_iou(probs.argmax(1), targets, k, ignore_index)
    assert torch.allclose(got, expected, equal_nan=True)


def test_unit_iou_hand_example() -> None:
    # unit 0 perfect; unit 1: pred all 0, label half 0 half 1 -> class 0 IoU 1/2, class 1 IoU 0
    probs = torch.zeros(2, 2, 1, 4)
    probs[0, 0, 0, :2] = 1
    probs[0, 1, 0, 2:] = 1
    probs[1, 0] = 1
    targets = torch.tensor([[[0, 0, 1, 1]], [[0, 0, 1, 1]]])
    assert UnitIoU(2)(probs, targets).tolist() == pytest.approx([1.0, 0.25])


def test_correctness_hand_examples() -> None:
    # classification: one sample per unit
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    targets = torch.tensor([0, 0, 0])
    assert Correctness(2)(probs, targets).tolist() == [1.0, 0.0, 1.0]
    # segmentation: pixel accuracy with an ignored pixel
    seg = torch.tensor([[[[0.9, 0.9, 0.1, 0.1]], [[0.1, 0.1, 0.9, 0.9]]]])  # pred 0 0 1 1
    seg_t = torch.tensor([[[0, 1, 1, 9]]])
    assert Correctness(2)(seg, torch.tensor([[[0, 1, 1, 0]]])).tolist() == [0.5]
    assert Correctness(2, ignore_index=9)(seg, seg_t).tolist() == pytest.approx([2 / 3])


def test_negative_cross_entropy_hand_examples() -> None:
    probs = torch.tensor([[0.8, 0.2], [0.25, 0.75]])
    targets = torch.tensor([0, 0])
    got = NegativeCrossEntropy(2)(probs, targets)
    assert got.tolist() == pytest.approx([math.log(0.8), math.log(0.25)], abs=1e-6)
    seg = torch.tensor([[[[0.5, 0.9, 0.1]], [[0.5, 0.1, 0.9]]]])  # [1, 2, 1, 3]
    seg_t = torch.tensor([[[0, 1, 7]]])
    expected = (math.log(0.5) + math.log(0.1)) / 2
    assert NegativeCrossEntropy(2, ignore_index=7)(seg, seg_t).item() == pytest.approx(expected, abs=1e-6)
    # zero probability is clamped, not -inf
    assert math.isfinite(NegativeCrossEntropy(2)(torch.tensor([[1.0, 0.0]]), torch.tensor([1])).item())


def test_accuracy_terms_checks_and_registry() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        Correctness(1)
    with pytest.raises(ValueError, match="matching targets"):
        Correctness(2)(torch.zeros(2, 2, 3, 3), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="matching targets"):
        Correctness(2)(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    assert isinstance(create_accuracy("iou", num_classes=3), UnitIoU)
    assert isinstance(create_accuracy("correct", num_classes=3), Correctness)
    term = create_accuracy("neg_ce", num_classes=3, ignore_index=0)
    assert isinstance(term, NegativeCrossEntropy) and term.ignore_index == 0
