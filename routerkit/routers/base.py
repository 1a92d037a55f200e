"""The `Router` interface, its capability flags and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from routerkit._registry import Registry
from routerkit.uncertainty import BaseOutput


class Router(nn.Module, ABC):
    """Decides, per routing unit, which model of the zoo answers.

    `route` is the public entry point and is not overridden: it checks the state and the
    decisions. Pick-first routers implement `_route`.

    Capability flags (read by the trainer, the accountant and the contract tests):

    - ``is_trainable``: has parameters trained by the policy stages.
    - ``is_cascade``: decides stage by stage and pays every stage it ran.
    - ``uses_uncertainty``: needs the estimator's state; if False, ``f_0`` runs a single
      deterministic pass and no MC-dropout passes are charged.

    Args:
        num_actions: Number of models m + 1.
        grid_shape: ``(rows, cols)`` of the unit grid (``(1, 1)`` for whole inputs).
        in_channels: Channels of the state (K class probabilities + 1 uncertainty).
        spatial: Whether the state has spatial dimensions (segmentation) or is a vector.
    """

    is_trainable: bool = False
    is_cascade: bool = False
    uses_uncertainty: bool = True

    def __init__(
        self, num_actions: int, grid_shape: tuple[int, int] = (1, 1), in_channels: int = 1, spatial: bool = True
    ) -> None:
        super().__init__()
        if num_actions < 2:
            raise ValueError(f"Expected num_actions >= 2 (f_0 and at least one costlier model) but got {num_actions}.")
        if len(grid_shape) != 2 or min(grid_shape) < 1:
            raise ValueError(f"Expected grid_shape (rows >= 1, cols >= 1) but got {grid_shape}.")
        self.num_actions = num_actions
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.in_channels = in_channels
        self.spatial = spatial

    @property
    def num_units(self) -> int:
        """Units P per input."""
        return self.grid_shape[0] * self.grid_shape[1]

    def route(self, state: BaseOutput, greedy: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Choose a model per unit.

        Args:
            state: The base model's output for the batch.
            greedy: Arg-max decisions (evaluation) rather than sampling.
            generator: Random generator for stochastic decisions.

        Returns:
            ``[B, P]`` int64 actions in ``{0..m}``.
        """
        batch = state.probs.shape[0]
        actions = self._route(state, greedy, generator)
        if actions.shape != (batch, self.num_units):
            raise RuntimeError(
                f"{type(self).__name__} returned actions {tuple(actions.shape)}, expected {(batch, self.num_units)}."
            )
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.num_actions):
            raise RuntimeError(f"{type(self).__name__} returned actions outside [0, {self.num_actions}).")
        return actions.long()

    @abstractmethod
    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor: ...

    def flops_module(self) -> nn.Module | None:
        """The network that runs per input (for FLOP accounting), or ``None``."""
        return None

    def reset(self) -> None:
        """Restore the router's own random state before a pass over a split.

        Evaluation calls it first, so a stochastic router (the random policy) takes the same
        decisions every time it is evaluated on the same split. Deterministic routers need nothing.
        """


ROUTERS: Registry[Router] = Registry("router", Router)


def register_router(name: str) -> Any:
    """Decorator registering a router class under ``name``."""
    return ROUTERS.register(name)


def create_router(spec: str | Router | type[Router], **kwargs: Any) -> Router:
    """Build a router from a name (``"paser"``, ``"random"``, ``"single"``), class or instance."""
    return ROUTERS.resolve(spec, **kwargs)


def list_routers(pattern: str | None = None) -> list[str]:
    """Registered router names, optionally filtered by a shell pattern."""
    return ROUTERS.names(pattern)
