"""The replay table: per-unit outputs of every frozen model on one split.

A `UnitTable` holds, for each input and unit, what every model of the zoo would give: its
accuracy term, its mean cross-entropy, its mean entropy, its mean class probabilities (the
features of a stop policy) and its confusion counts. Any routing decision ``actions [N, P]`` is
then scored exactly (split-level macro IoU from the summed confusion counts, FLOPs by the one
charging rule `routerkit.functional.paid_counts`) without running a model again.
`routerkit.replay.build_unit_table` fills it; this module runs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from routerkit.functional import iou_from_confusion, paid_counts
from routerkit.rewards import Reward
from routerkit.uncertainty.base import BaseOutput

__all__ = ["UnitTable"]


@dataclass
class UnitTable:
    """Replayed per-unit outputs of every model on one split.

    Attributes:
        base: ``f_0``'s state on the whole inputs (probabilities ``[N, K, ...]``, uncertainty and the inputs).
        accuracy: ``[N, P, A]`` accuracy term of each model on each unit.
        loss: ``[N, P, A]`` mean cross-entropy of each model on each unit.
        uncertainty: ``[N, P, A]`` mean uncertainty of each model on each unit: the estimator's
            (e.g. MC-dropout entropy) for ``f_0``, the softmax entropy for the others.
        unit_probs: ``[N, P, A, K]`` class probabilities of each model averaged over the unit.
        confusion: ``[N, P, A, K, K]`` confusion counts (rows = label) of each model on each unit.
        unit_flops: ``[A]`` FLOPs of each model on one unit (``f_0``: 0, it runs on the whole input).
        base_flops: FLOPs of one deterministic pass of ``f_0`` on one whole input.
        state_flops: FLOPs of ``f_0`` for the estimator's state on one input (all MC passes).
        costs: ``[A]`` normalised costs of the cost model.
    """

    base: BaseOutput
    accuracy: Tensor
    loss: Tensor
    uncertainty: Tensor
    unit_probs: Tensor
    confusion: Tensor
    unit_flops: Tensor
    base_flops: float
    state_flops: float
    costs: Tensor

    @property
    def num_inputs(self) -> int:
        """Inputs N."""
        return int(self.accuracy.shape[0])

    @property
    def num_units(self) -> int:
        """Units P per input."""
        return int(self.accuracy.shape[1])

    @property
    def num_actions(self) -> int:
        """Models A = m + 1."""
        return int(self.accuracy.shape[2])

    def to(self, device: torch.device | str) -> UnitTable:
        """The table with its per-input tensors on ``device`` (costs and per-model FLOPs stay as they are)."""
        return UnitTable(
            self.base.to(device),
            self.accuracy.to(device),
            self.loss.to(device),
            self.uncertainty.to(device),
            self.unit_probs.to(device),
            self.confusion.to(device),
            self.unit_flops,
            self.base_flops,
            self.state_flops,
            self.costs,
        )

    def subset(self, index: Tensor) -> UnitTable:
        """The rows ``index`` of the table (inputs)."""
        return UnitTable(
            self.base.select(index),
            self.accuracy[index],
            self.loss[index],
            self.uncertainty[index],
            self.unit_probs[index],
            self.confusion[index],
            self.unit_flops,
            self.base_flops,
            self.state_flops,
            self.costs,
        )

    def gather(self, values: Tensor, actions: Tensor) -> Tensor:
        """Pick ``values[..., a]`` per unit for ``actions [N, P]``."""
        self._check_actions(actions)
        return values.gather(2, actions.unsqueeze(-1)).squeeze(-1)

    def rewards(self, reward: Reward, lam: float | None = None) -> Tensor:
        """``[N, P, A]`` reward of every action on every unit."""
        acc = self.accuracy
        return reward(acc, acc[..., :1].expand_as(acc), self.costs.to(acc).expand_as(acc), lam=lam)

    def mean_iou(self, actions: Tensor) -> float:
        """Split-level macro mean IoU (classes present in label or prediction) of ``actions``."""
        self._check_actions(actions)
        idx = actions.reshape(*actions.shape, 1, 1, 1).expand(*actions.shape, 1, *self.confusion.shape[-2:])
        confusion = self.confusion.gather(2, idx).sum((0, 1, 2))
        return float(torch.nanmean(iou_from_confusion(confusion)))

    def flops(
        self,
        actions: Tensor,
        cascade: bool = False,
        base_flops: float | None = None,
        policy_flops: float = 0.0,
        decision_flops: Sequence[float] | None = None,
    ) -> float:
        """Mean FLOPs per input of ``actions`` (fvcore convention: one multiply-add = one flop).

        Args:
            actions: ``[N, P]`` final model per unit.
            cascade: Whether a unit that ended at model ``a`` also paid for models ``1..a-1``.
            base_flops: FLOPs of ``f_0`` charged per input (default: the estimator's, ``state_flops``).
            policy_flops: FLOPs of the router's own networks per input.
            decision_flops: For a cascade, FLOPs per unit of the stop decision after each stage
                ``0..m-1``, charged for every unit that reached the stage.
        """
        self._check_actions(actions)
        paid = paid_counts(actions, self.num_actions, cascade).double()
        routed = (paid * self.unit_flops.double()).sum((1, 2))
        if cascade and decision_flops:
            per_stage = torch.tensor([*decision_flops, 0.0], dtype=torch.float64)
            routed = routed + (paid * per_stage).sum((1, 2))
        base = self.state_flops if base_flops is None else base_flops
        return float(routed.mean()) + base + policy_flops

    def usage(self, actions: Tensor) -> list[float]:
        """Share of units sent to each model."""
        counts = torch.bincount(actions.reshape(-1), minlength=self.num_actions).double()
        return (counts / counts.sum()).tolist()

    def _check_actions(self, actions: Tensor) -> None:
        if actions.shape != self.accuracy.shape[:2]:
            raise ValueError(f"Expected actions of shape {tuple(self.accuracy.shape[:2])} but got {tuple(actions.shape)}.")
