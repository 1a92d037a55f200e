"""Cascades: the IDK cascade (Wang et al. 2017) and the optimal-stopping cascade (Guan et al. 2018).

A cascade runs ``f_0``, then sends each unit on to ``f_1``, ``f_2``, ... while a per-stage rule
says "forward"; the unit is answered by the last model it reached and pays for every stage it
ran. The stage rule sees per-unit features of that stage's output: the unit's mean class
probabilities and its mean uncertainty (``f_0``: the estimator's, e.g. MC-dropout entropy;
later stages: the softmax entropy).

A cascade only decides (`CascadeRouter.stop`); the executor runs the stages
(`routerkit.executor.Executor.run_cascade`, used by `RoutedPipeline.route`). It decides
identically from a replayed `UnitTable` (`CascadeRouter.decide_table`), which is how its
thresholds and stop policies are fitted in seconds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from routerkit.flops import count_flops
from routerkit.functional import paid_cost
from routerkit.routers.base import BudgetKnob, Router, register_router

if TYPE_CHECKING:
    from routerkit.unit_table import UnitTable


class CascadeRouter(Router):
    """Base class of cascades: subclasses implement `stop` for stages ``0..m-1``."""

    is_cascade = True

    def stop(self, stage: int, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        """Whether each unit stops at ``stage``.

        Args:
            stage: Stage index ``0..m-1`` (the last model always stops).
            unit_probs: ``[U, K]`` mean class probabilities of the stage's model on each unit.
            unit_uncertainty: ``[U]`` mean uncertainty of that output on each unit.

        Returns:
            ``[U]`` bool, True = answer with this stage's model.
        """
        raise NotImplementedError

    def decision_flops(self) -> list[int]:
        """FLOPs per unit of the stop decision after each stage ``0..m-1`` (fvcore convention).

        Charged for every unit that reached the stage. A threshold on the mean uncertainty (IDK)
        has no multiply-adds; a learned stop policy overrides this with its network's count.
        """
        return [0] * (self.num_actions - 1)

    @torch.no_grad()
    def decide_table(self, table: UnitTable) -> Tensor:
        """The cascade's decisions ``[N, P]`` from replayed per-unit outputs (no model runs)."""
        n, p, a = table.accuracy.shape
        if a != self.num_actions:
            raise ValueError(f"Expected a table of {self.num_actions} models but got {a}.")
        stops = torch.ones(n * p, a, dtype=torch.bool)
        for i in range(a - 1):
            probs = table.unit_probs[:, :, i].reshape(n * p, -1)
            stops[:, i] = self.stop(i, probs, table.uncertainty[:, :, i].reshape(-1)).cpu()
        return stops.long().argmax(-1).reshape(n, p)  # first stage that stops


@register_router("idk")
class IDKCascade(CascadeRouter):
    """IDK cascade: a unit moves on from stage ``i`` while its uncertainty exceeds ``thresholds[i]``.

    Thresholds come from `routerkit.training.fitters.fit_idk_grid` (grid search between mean - 1 std
    and mean + 1 std of each stage's uncertainty on a validation table, minimising
    ``CE + lambda_IDK * C``, the PaSeR paper's Eq. 5) or `~routerkit.training.fitters.fit_idk_iou`
    (one offset in std units shared by every stage, tuned until the cascade's IoU matches a target).

    Args:
        num_actions: Models m + 1.
        thresholds: One threshold per stage ``0..m-1``; ``None``: +inf (never forward) until fitted.
        **kwargs: `Router` arguments.
    """

    def __init__(self, num_actions: int, thresholds: list[float] | None = None, **kwargs: object) -> None:
        super().__init__(num_actions, **kwargs)  # type: ignore[arg-type]
        values = [math.inf] * (num_actions - 1) if thresholds is None else [float(t) for t in thresholds]
        if len(values) != num_actions - 1:
            raise ValueError(f"Expected {num_actions - 1} thresholds (one per stage but the last) but got {len(values)}.")
        self.thresholds: Tensor
        self.register_buffer("thresholds", torch.tensor(values, dtype=torch.float32))

    def stop(self, stage: int, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        return unit_uncertainty <= self.thresholds[stage].to(unit_uncertainty.device)

    def set_thresholds(self, values: Tensor | list[float]) -> None:
        """Replace the thresholds."""
        t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if t.shape != self.thresholds.shape:
            raise ValueError(f"Expected {self.thresholds.numel()} thresholds but got {t.numel()}.")
        self.thresholds.copy_(t)

    def budget_knob(self, table: UnitTable) -> BudgetKnob:
        """An offset ``o`` (std units): thresholds ``mean + o * std`` of each stage's uncertainty on ``table``."""

        def set_offset(o: float) -> None:
            self.set_thresholds(self.thresholds_at(table, o))

        return BudgetKnob("threshold_offset", set_offset, -10.0, 10.0)

    @staticmethod
    def stage_statistics(table: UnitTable) -> tuple[Tensor, Tensor]:
        """Mean and std of each stage's per-unit uncertainty ``([m], [m])``."""
        u = table.uncertainty[..., :-1].reshape(-1, table.num_actions - 1)
        return u.mean(0), u.std(0)

    @staticmethod
    def paid_costs(table: UnitTable, actions: Tensor) -> Tensor:
        """``[N, P]`` normalised cost of every stage each unit ran (``f_0`` included)."""
        return paid_cost(actions, table.costs, cascade=True)

    @torch.no_grad()
    def thresholds_at(self, table: UnitTable, offset: float) -> Tensor:
        """Thresholds ``mean + offset * std`` of every stage."""
        mean, std = self.stage_statistics(table)
        return mean + offset * std


class StopPolicy(nn.Module):
    """Guan et al.'s per-stage stop policy: a small MLP on ``[mean probs (K), uncertainty, max prob]``."""

    def __init__(self, num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        self.in_features = num_classes + 2
        self.net = nn.Sequential(nn.Linear(self.in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @staticmethod
    def features(unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        """``[U, K + 2]`` features of a stage's output."""
        return torch.cat([unit_probs, unit_uncertainty.unsqueeze(-1), unit_probs.max(-1, keepdim=True).values], -1)

    def forward(self, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        """Stop logit ``[U]``."""
        return self.net(self.features(unit_probs, unit_uncertainty)).squeeze(-1)


@register_router("optimal_stopping")
class OptimalStoppingCascade(CascadeRouter):
    """Guan et al. (2018) optimal-stopping cascade: after each stage a policy ``pi_t`` stops or forwards.

    The policies are trained by REINFORCE with a baseline on the reward
    ``-loss(final model) - alpha * sum of the costs paid``, from a replayed `UnitTable`
    (`routerkit.training.fitters.fit_optimal_stopping`).
    At evaluation a unit stops where ``pi_t(stop) > 0.5``.

    Args:
        num_actions: Models m + 1.
        num_classes: Classes K (the policies' input size is K + 2); default ``in_channels - 1``.
        hidden: Hidden width of each stop policy.
        **kwargs: `Router` arguments.
    """

    is_trainable = True

    def __init__(self, num_actions: int, num_classes: int | None = None, hidden: int = 16, **kwargs: object) -> None:
        super().__init__(num_actions, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
        num_classes = self.num_classes
        if num_classes < 1:
            raise ValueError(f"Expected num_classes >= 1 (or in_channels = K + 1 >= 2) but got {num_classes}.")
        self.num_classes = num_classes
        self.policies = nn.ModuleList(StopPolicy(num_classes, hidden) for _ in range(num_actions - 1))
        self._decision_flops: list[int] | None = None
        #: Added to every stop logit when deciding; set by budget calibration (``routerkit calibrate``).
        self.stop_bias: Tensor
        self.register_buffer("stop_bias", torch.zeros(()))

    def stop_logits(self, stage: int, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        """Stop logit of each unit at ``stage``."""
        if unit_probs.shape[-1] != self.num_classes:
            raise ValueError(f"Expected unit probabilities over {self.num_classes} classes but got {unit_probs.shape[-1]}.")
        return self.policies[stage](unit_probs.float(), unit_uncertainty.float())

    def stop(self, stage: int, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        return self.stop_logits(stage, unit_probs, unit_uncertainty) + self.stop_bias.to(unit_probs.device) > 0

    def budget_knob(self, table: UnitTable) -> BudgetKnob:
        """A bias ``b`` added to every stop logit: more units stop early as ``b`` grows."""

        def set_stop(b: float) -> None:
            self.stop_bias.fill_(b)

        return BudgetKnob("stop_bias", set_stop, -50.0, 50.0)

    def decision_flops(self) -> list[int]:
        """fvcore FLOPs of each stop policy on one unit's ``K + 2`` features (measured once)."""
        if self._decision_flops is None:
            policies = [cast(StopPolicy, p) for p in self.policies]
            self._decision_flops = [count_flops(p.net, (p.in_features,)) for p in policies]
        return list(self._decision_flops)
