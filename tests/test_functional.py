"""Tests of routerkit.functional against direct per-region Python computations."""

from __future__ import annotations

import math

import pytest
import torch

from routerkit.functional import (
    confusion_counts,
    entropy,
    explore_exploit_sample,
    iou_from_confusion,
    linear_schedule,
    mean_iou_from_confusion,
    per_region_iou,
    reinforce_loss,
    total_variation_distance,
)


def reference_region_miou(pred: torch.Tensor, target: torch.Tensor, k: int, ignore_index: int | None) -> float:
    """Macro mean IoU of one region over the classes present in its label or prediction."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    ious = []
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        tp = int((p & t).sum())
        fp = int((p & ~t).sum())
        fn = int((~p & t).sum())
        union = tp + fp + fn
        if union > 0:
            ious.append(tp / union)
    return sum(ious) / len(ious) if ious else math.nan


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_per_region_iou_matches_reference(k: int, ignore_index: int | None) -> None:
    gen = torch.Generator().manual_seed(k)
    regions = 12
    preds = torch.randint(0, k, (regions, 5, 6), generator=gen)
    # Few classes per region so some classes are absent from both label and prediction.
    target = torch.randint(0, k, (regions, 5, 6), generator=gen)
    target[:4] = torch.randint(0, min(k, 2), (4, 5, 6), generator=gen)
    preds[:4] = torch.randint(0, min(k, 2), (4, 5, 6), generator=gen)
    if ignore_index is not None:
        target[torch.rand(target.shape, generator=gen) < 0.2] = ignore_index
        target[5] = ignore_index  # an entirely ignored region -> union empty everywhere -> NaN
    got = per_region_iou(preds, target, k, ignore_index)
    assert got.shape == (regions,)
    for r in range(regions):
        expected = reference_region_miou(preds[r], target[r], k, ignore_index)
        if math.isnan(expected):
            assert torch.isnan(got[r])
        else:
            assert got[r].item() == pytest.approx(expected, abs=1e-6)
    if ignore_index is not None:
        assert torch.isnan(got[5])


def test_absent_class_is_excluded_from_mean() -> None:
    # K = 4 but only classes 0 and 1 appear: the mean is over those two, not four.
    pred = torch.tensor([[0, 0, 1, 1]])
    target = torch.tensor([[0, 1, 1, 1]])
    # class 0: tp 1, fp 1 -> 1/2; class 1: tp 2, fn 1 -> 2/3
    assert per_region_iou(pred, target, 4).item() == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_empty_union_is_nan() -> None:
    pred = torch.zeros(1, 3, 3, dtype=torch.long)
    target = torch.full((1, 3, 3), 9)
    assert torch.isnan(per_region_iou(pred, target, 2, ignore_index=9)).all()
    assert torch.isnan(iou_from_confusion(torch.zeros(2, 2, dtype=torch.long))).all()


def test_confusion_counts_shape_and_row_is_label() -> None:
    preds = torch.tensor([[0, 1, 1, 2], [2, 2, 2, 2]])
    target = torch.tensor([[0, 0, 1, 1], [0, 1, 2, 2]])
    conf = confusion_counts(preds, target, 3)
    assert conf.shape == (2, 3, 3) and conf.dtype == torch.int64
    # region 0: label 0 predicted 0 once and 1 once; label 1 predicted 1 once and 2 once
    assert conf[0].tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert conf[1].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 2]]
    assert int(conf.sum()) == preds.numel()


def test_confusion_counts_ignore_index_and_errors() -> None:
    preds = torch.tensor([[0, 1, 1]])
    target = torch.tensor([[0, 255, 1]])
    assert confusion_counts(preds, target, 2, ignore_index=255)[0].tolist() == [[1, 0], [0, 1]]
    with pytest.raises(ValueError, match="found 255"):
        confusion_counts(preds, target, 2)
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(preds, target[:, :2], 2)


def test_mean_iou_from_confusion_hand_example() -> None:
    conf = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    # class 0: 5 / (5 + 1 + 2) ; class 1: 3 / (3 + 2 + 1) ; class 2 absent -> excluded
    expected = (5 / 8 + 3 / 6) / 2
    assert mean_iou_from_confusion(conf).item() == pytest.approx(expected)
    per_class = iou_from_confusion(conf)
    assert per_class[:2].tolist() == pytest.approx([5 / 8, 3 / 6])
    assert torch.isnan(per_class[2])
    batched = mean_iou_from_confusion(torch.stack([conf, conf.T.contiguous()]))
    assert batched.shape == (2,)
    assert batched[1].item() == pytest.approx(expected)  # IoU is symmetric in label/prediction


def test_entropy() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert entropy(probs).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)


def test_total_variation_distance() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    assert total_variation_distance(p, q).tolist() == pytest.approx([0.5, 0.0])
    assert total_variation_distance(p.T, q.T, dim=0).tolist() == pytest.approx([0.5, 0.0])
    disjoint = total_variation_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert disjoint.item() == pytest.approx(1.0)


def test_explore_exploit_alpha_one_follows_peaked_policy() -> None:
    logits = torch.tensor([-20.0, 20.0, -20.0]).expand(50, 40, 3)
    actions = explore_exploit_sample(logits, 1.0, torch.Generator().manual_seed(0))
    assert actions.shape == (50, 40)
    assert bool((actions == 1).all())


def test_explore_exploit_alpha_zero_is_uniform() -> None:
    a = 4
    logits = torch.tensor([30.0, -30.0, -30.0, -30.0]).expand(20_000, a)
    actions = explore_exploit_sample(logits, 0.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(actions, minlength=a).double() / actions.numel()
    # 5 standard deviations of a binomial share with n = 20000, p = 1/4
    tol = 5 * math.sqrt(0.25 * 0.75 / actions.numel())
    assert torch.allclose(freq, torch.full((a,), 0.25, dtype=torch.float64), atol=tol)


def test_explore_exploit_mixture() -> None:
    logits = torch.tensor([30.0, -30.0]).expand(20_000, 2)
    actions = explore_exploit_sample(logits, 0.6, torch.Generator().manual_seed(2))
    # P(action 0) = alpha + (1 - alpha) / 2
    assert (actions == 0).double().mean().item() == pytest.approx(0.8, abs=0.02)


def test_explore_exploit_reproducible_with_generator() -> None:
    logits = torch.randn(8, 16, 3)
    a1 = explore_exploit_sample(logits, 0.5, torch.Generator().manual_seed(3))
    a2 = explore_exploit_sample(logits, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_explore_exploit_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        explore_exploit_sample(torch.zeros(2, 3), alpha)


def test_linear_schedule() -> None:
    assert linear_schedule(0.7, 0.95, 0, 10) == pytest.approx(0.7)
    assert linear_schedule(0.7, 0.95, 9, 10) == pytest.approx(0.95)
    assert linear_schedule(0.0, 1.0, 2, 5) == pytest.approx(0.5)
    assert linear_schedule(0.0, 1.0, 100, 5) == pytest.approx(1.0)  # clamped
    assert linear_schedule(0.0, 1.0, -3, 5) == pytest.approx(0.0)
    assert linear_schedule(0.3, 0.9, 0, 1) == pytest.approx(0.9)


def test_reinforce_loss_value_and_gradient_sign() -> None:
    logits = torch.zeros(1, 3, requires_grad=True)
    actions = torch.tensor([1])
    log_probs = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
    advantages = torch.tensor([2.0])
    loss = reinforce_loss(log_probs, advantages)
    assert loss.item() == pytest.approx(-(math.log(1 / 3) * 2.0))
    loss.backward()
    # A gradient step lowers the loss by raising the positively-advantaged action's log-prob.
    assert logits.grad[0, 1] < 0 and logits.grad[0, 0] > 0 and logits.grad[0, 2] > 0
    with torch.no_grad():
        stepped = logits - 0.5 * logits.grad
    assert torch.softmax(stepped, -1)[0, 1] > 1 / 3


def test_reinforce_loss_negative_advantage_and_detach() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    log_probs = torch.log_softmax(logits, -1)[:, :1]
    advantages = torch.tensor([[-1.0]], requires_grad=True)
    reinforce_loss(log_probs, advantages).backward()
    assert logits.grad[0, 0] > 0  # descending lowers the probability of the bad action
    assert advantages.grad is None  # advantages are detached
    with pytest.raises(ValueError, match="same shape"):
        reinforce_loss(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("shape, dim", [((8, 3, 16, 20), 1), ((3, 16, 20), 0), ((50, 10), 1), ((2, 19, 8, 8), 1)])
def test_class_argmax_is_argmax_with_ties_and_nans(shape: tuple[int, ...], dim: int) -> None:
    from routerkit.functional import class_argmax

    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, shape, generator=g).float()  # many equal maxima: the first one wins in both
    assert torch.equal(class_argmax(ties, dim), ties.argmax(dim))
    nans = torch.rand(shape, generator=g)
    nans.view(-1)[::7] = float("nan")
    assert torch.equal(class_argmax(nans, dim), nans.argmax(dim))
    if len(shape) == 4:
        cl = torch.rand(shape, generator=g).contiguous(memory_format=torch.channels_last)
        assert torch.equal(class_argmax(cl, dim), cl.argmax(dim))
