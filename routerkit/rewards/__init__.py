"""Rewards: PaSeR's per-unit accuracy-minus-cost reward with a pluggable accuracy term."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from routerkit._registry import Registry
from routerkit.functional import class_argmax, per_region_iou

__all__ = [
    "ACCURACY_TERMS",
    "REWARDS",
    "AccuracyTerm",
    "Correctness",
    "NegativeCrossEntropy",
    "PaSeRReward",
    "Reward",
    "UnitIoU",
    "create_accuracy",
    "create_reward",
]


class AccuracyTerm(ABC):
    """Per-unit accuracy of predicted probabilities against targets, for a batch of units.

    Args:
        num_classes: Number of classes K.
        ignore_index: Target value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 2:
            raise ValueError(f"Expected num_classes >= 2 but got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, probs: Tensor, targets: Tensor) -> Tensor:
        """``probs [U, K, ...]``, ``targets [U, ...]`` -> accuracy ``[U]`` (higher is better)."""
        if probs.shape[0] != targets.shape[0] or probs.shape[2:] != targets.shape[1:]:
            raise ValueError(
                "Expected unit probs [U, K, ...] matching targets [U, ...] but got "
                f"{tuple(probs.shape)} and {tuple(targets.shape)}."
            )
        return self._score(probs, targets)

    @abstractmethod
    def _score(self, probs: Tensor, targets: Tensor) -> Tensor: ...


ACCURACY_TERMS: Registry[AccuracyTerm] = Registry("accuracy term", AccuracyTerm)


@ACCURACY_TERMS.register("iou")
class UnitIoU(AccuracyTerm):
    """Mean IoU (macro over classes present in label or prediction) of each unit.

    Computed from per-unit confusion counts in one batched ``bincount``. A unit with no valid
    pixel scores NaN, which `PaSeRReward` turns into a zero accuracy difference.
    """

    def _score(self, probs: Tensor, targets: Tensor) -> Tensor:
        return per_region_iou(class_argmax(probs, 1), targets, self.num_classes, self.ignore_index)


@ACCURACY_TERMS.register("correct")
class Correctness(AccuracyTerm):
    """Pixel (or sample) accuracy of each unit: 1 for a correct classification."""

    def _score(self, probs: Tensor, targets: Tensor) -> Tensor:
        pred = class_argmax(probs, 1)
        valid = torch.ones_like(targets, dtype=torch.bool) if self.ignore_index is None else targets != self.ignore_index
        hits = ((pred == targets) & valid).reshape(targets.shape[0], -1).float().sum(1)
        count = valid.reshape(targets.shape[0], -1).float().sum(1)
        return hits / count


@ACCURACY_TERMS.register("neg_ce")
class NegativeCrossEntropy(AccuracyTerm):
    """Negative mean cross-entropy of each unit (higher is better)."""

    def _score(self, probs: Tensor, targets: Tensor) -> Tensor:
        ignore = -100 if self.ignore_index is None else self.ignore_index
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), targets, ignore_index=ignore, reduction="none")
        valid = (targets != ignore).float()
        return -(loss * valid).reshape(targets.shape[0], -1).sum(1) / valid.reshape(targets.shape[0], -1).sum(1)


class Reward(ABC):
    """Per-unit reward of routing decisions. The public `__call__` checks shapes."""

    def __call__(self, acc_chosen: Tensor, acc_base: Tensor, cost_chosen: Tensor, lam: float | None = None) -> Tensor:
        """Reward per unit.

        Args:
            acc_chosen: ``[B, P]`` accuracy of the chosen model on each unit.
            acc_base: ``[B, P]`` accuracy of ``f_0`` on each unit.
            cost_chosen: ``[B, P]`` normalised cost of the chosen model.
            lam: Override of the trade-off (for schedules); ``None`` keeps the configured one.
        """
        if not (acc_chosen.shape == acc_base.shape == cost_chosen.shape):
            raise ValueError(
                "Expected acc_chosen, acc_base and cost_chosen of one shape but got "
                f"{tuple(acc_chosen.shape)}, {tuple(acc_base.shape)}, {tuple(cost_chosen.shape)}."
            )
        return self._reward(acc_chosen, acc_base, cost_chosen, lam)

    @abstractmethod
    def _reward(self, acc_chosen: Tensor, acc_base: Tensor, cost_chosen: Tensor, lam: float | None) -> Tensor: ...


REWARDS: Registry[Reward] = Registry("reward", Reward)


@REWARDS.register("paser")
class PaSeRReward(Reward):
    """PaSeR Eq. 2 per unit: ``(1 - lam) * (A(f_a) - A(f_0)) - lam * C(f_a)``.

    Args:
        lam: Trade-off ``lambda`` in [0, 1] (0 = accuracy only, 1 = cost only).
    """

    def __init__(self, lam: float = 0.5) -> None:
        _check_lambda(lam)
        self.lam = lam

    def _reward(self, acc_chosen: Tensor, acc_base: Tensor, cost_chosen: Tensor, lam: float | None) -> Tensor:
        lam = self.lam if lam is None else _check_lambda(lam)
        gain = torch.nan_to_num(acc_chosen - acc_base, nan=0.0)
        return (1.0 - lam) * gain - lam * cost_chosen


def _check_lambda(lam: float) -> float:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"Expected lambda in [0, 1] but got {lam}.")
    return lam


def create_reward(spec: str | Reward | type[Reward], **kwargs: Any) -> Reward:
    """Build a reward from a name (``"paser"``), class or instance."""
    return REWARDS.resolve(spec, **kwargs)


def create_accuracy(spec: str | AccuracyTerm | type[AccuracyTerm], **kwargs: Any) -> AccuracyTerm:
    """Build an accuracy term from a name (``"iou"``, ``"correct"``, ``"neg_ce"``), class or instance."""
    return ACCURACY_TERMS.resolve(spec, **kwargs)
