"""Baseline routers: a random policy (PaSeR-RandPol), a single model for every unit, and the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from routerkit.routers.base import Router, register_router
from routerkit.uncertainty import BaseOutput

if TYPE_CHECKING:
    from routerkit.unit_table import UnitTable


@register_router("random")
class RandomRouter(Router):
    """PaSeR-RandPol: each unit goes to a model drawn from ``probs`` (uniform by default).

    Args:
        probs: Optional probability of each model; uniform when ``None``.
        seed: Seed of the router's own generator (decisions are reproducible).
        **kwargs: `Router` arguments.
    """

    uses_uncertainty = False

    def __init__(self, num_actions: int, probs: Sequence[float] | None = None, seed: int = 0, **kwargs: object) -> None:
        super().__init__(num_actions, **kwargs)  # type: ignore[arg-type]
        weights = torch.full((num_actions,), 1.0 / num_actions) if probs is None else torch.as_tensor(probs, dtype=torch.float64)
        if weights.shape != (num_actions,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"Expected {num_actions} non-negative probabilities but got {probs}.")
        self.weights: Tensor
        self.register_buffer("weights", (weights / weights.sum()).float())
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def reset(self) -> None:
        """Re-seed the router's generator: each evaluation draws the same decisions."""
        self._generator.manual_seed(self.seed)

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor:
        batch = state.probs.shape[0]
        gen = generator if generator is not None else self._generator
        draws = torch.multinomial(self.weights.cpu(), batch * self.num_units, replacement=True, generator=gen)
        return draws.reshape(batch, self.num_units).to(state.probs.device)


@register_router("single")
class SingleModelRouter(Router):
    """Sends every unit to model ``index`` (``0`` = the base model alone).

    Args:
        index: The model to use.
        **kwargs: `Router` arguments.
    """

    uses_uncertainty = False

    def __init__(self, num_actions: int, index: int = 0, **kwargs: object) -> None:
        super().__init__(num_actions, **kwargs)  # type: ignore[arg-type]
        if not 0 <= index < num_actions:
            raise ValueError(f"Expected index in [0, {num_actions}) but got {index}.")
        self.index = index
        #: f_0 only runs when it is the chosen model.
        self.uses_base = index == 0

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor:
        batch = state.probs.shape[0]
        return torch.full((batch, self.num_units), self.index, dtype=torch.long, device=state.probs.device)


@register_router("oracle")
class OracleRouter(Router):
    """The oracle: per unit, the model with the highest reward *with the labels known*.

    The upper bound of every router's reward on a split. It decides from every model's per-unit
    scores (`unit_scores` of each model's probabilities against the labels, `best_actions`), which
    the executor computes when `RoutedPipeline.route` is given ``targets`` (and the replay table
    holds); its reported FLOPs count only what a perfect router would run (one pass of ``f_0`` and
    the chosen models), not this look-ahead. It is an evaluation tool, not a deployable router.

    Args:
        num_actions: Models m + 1.
        num_classes: Classes K of the accuracy term; default ``in_channels - 1`` (at least 2).
        lam: Cost weight of PaSeR's reward.
        accuracy: Accuracy term name (``"iou"``, ``"correct"``, ``"neg_ce"``).
        ignore_index: Label ignored by the accuracy term.
        **kwargs: `Router` arguments.
    """

    uses_uncertainty = False
    needs_targets = True

    def __init__(
        self,
        num_actions: int,
        num_classes: int | None = None,
        lam: float = 0.5,
        accuracy: str = "iou",
        ignore_index: int | None = None,
        **kwargs: object,
    ) -> None:
        from routerkit.rewards import PaSeRReward, create_accuracy

        if num_classes is None and "in_channels" not in kwargs:
            kwargs["in_channels"] = 3  # K defaults to 2 without a spec
        super().__init__(num_actions, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
        self.reward = PaSeRReward(lam)
        classes = max(self.num_classes, 2)
        self.accuracy = create_accuracy(accuracy, num_classes=classes, ignore_index=ignore_index)

    def unit_scores(self, unit_probs: Tensor, unit_targets: Tensor) -> Tensor:
        """The accuracy term ``[U]`` of one model's per-unit probabilities."""
        return self.accuracy(unit_probs, unit_targets)

    def best_actions(self, scores: Tensor, costs: Tensor) -> Tensor:
        """Arg-max of the reward ``[N, P]`` from per-unit accuracies ``[N, P, A]`` (NaN counts as -inf)."""
        accuracy = scores
        rewards = self.reward(accuracy, accuracy[..., :1].expand_as(accuracy), costs.expand_as(accuracy))
        return torch.nan_to_num(rewards, nan=-torch.inf).argmax(-1)

    def decide_table(self, table: UnitTable) -> Tensor:
        """The oracle's decisions ``[N, P]`` on a replayed table (its accuracy term)."""
        return self.best_actions(table.accuracy, table.costs)
