"""Baseline routers: a random policy (PaSeR-RandPol) and a single model for every unit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from routerkit.routers.base import Router, register_router
from routerkit.uncertainty import BaseOutput


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
