"""The `Router` interface, its capability flags and its registry."""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from routerkit._registry import Registry
from routerkit.uncertainty import BaseOutput

if TYPE_CHECKING:
    from routerkit.unit_table import UnitTable


@dataclass(frozen=True)
class BudgetKnob:
    """One scalar of a trained router that moves its cost monotonically (`routerkit.calibrate`).

    Attributes:
        name: What is moved (``logit_bias``, ``threshold_offset``, ``stop_bias``).
        set: Sets the router's decisions to the knob value.
        low: Lowest value searched.
        high: Highest value searched.
        increasing: Whether a higher value means a higher cost.
    """

    name: str
    set: Callable[[float], None]
    low: float
    high: float
    increasing: bool = False


@dataclass(frozen=True)
class RouterSpec:
    """What every router is built from, given by the pipeline (`RoutedPipeline.router_spec`).

    Attributes:
        num_actions: Models m + 1.
        grid_shape: ``(rows, cols)`` of the unit grid (``(1, 1)`` for whole inputs).
        num_classes: Classes K of the task (the state has K probabilities + 1 uncertainty).
        spatial: Whether the state has spatial dimensions (segmentation) or is a vector.
    """

    num_actions: int
    grid_shape: tuple[int, int] = (1, 1)
    num_classes: int = 2
    spatial: bool = True

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Router.__init__`."""
        return {
            "num_actions": self.num_actions,
            "grid_shape": self.grid_shape,
            "num_classes": self.num_classes,
            "spatial": self.spatial,
        }


class Router(nn.Module, ABC):
    """Decides, per routing unit, which model of the zoo answers. A router never runs a model.

    Three kinds, each with its hook:

    - **pick-first** (PaSeR, random, single): `_route` maps ``f_0``'s state to one action per
      unit; the public `route` checks the state and the decisions.
    - **cascade** (``is_cascade``; IDK, optimal stopping): `stop` says after each stage which
      units stop; the executor runs the stages (`routerkit.executor.Executor.run_cascade`).
    - **oracle** (``needs_targets``): `unit_scores` and `best_actions` pick from every model's
      per-unit scores with the labels known; the executor computes those outputs.

    Capabilities are declared here with their defaults and read by the pipeline, the trainer,
    the accountant and the contract tests:

    - ``is_trainable``: has parameters trained by a training stage.
    - ``is_cascade``: decides stage by stage and pays every stage it ran (`routerkit.functional.paid_counts`).
    - ``uses_uncertainty``: needs the estimator's state; if False, ``f_0`` runs a single
      deterministic pass and no MC-dropout passes are charged.
    - ``uses_base``: ``f_0`` runs at all (False only for a single costlier model everywhere).
    - ``needs_targets``: decides from the labels (the oracle; an evaluation tool).

    Args:
        num_actions: Number of models m + 1.
        grid_shape: ``(rows, cols)`` of the unit grid (``(1, 1)`` for whole inputs).
        in_channels: Channels of the state (K class probabilities + 1 uncertainty); ignored when
            ``num_classes`` is given.
        spatial: Whether the state has spatial dimensions (segmentation) or is a vector.
        num_classes: Classes K (default ``in_channels - 1``).
    """

    is_trainable: bool = False
    is_cascade: bool = False
    uses_uncertainty: bool = True
    uses_base: bool = True
    needs_targets: bool = False

    def __init__(
        self,
        num_actions: int,
        grid_shape: tuple[int, int] = (1, 1),
        in_channels: int = 1,
        spatial: bool = True,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if num_actions < 2:
            raise ValueError(f"Expected num_actions >= 2 (f_0 and at least one costlier model) but got {num_actions}.")
        if len(grid_shape) != 2 or min(grid_shape) < 1:
            raise ValueError(f"Expected grid_shape (rows >= 1, cols >= 1) but got {grid_shape}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"Expected num_classes >= 1 but got {num_classes}.")
        self.num_actions = num_actions
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.in_channels = in_channels if num_classes is None else num_classes + 1
        self.num_classes = self.in_channels - 1 if num_classes is None else num_classes
        self.spatial = spatial

    @property
    def num_units(self) -> int:
        """Units P per input."""
        return self.grid_shape[0] * self.grid_shape[1]

    def route(self, state: BaseOutput, greedy: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Choose a model per unit from ``f_0``'s state (pick-first routers).

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

    def _route(self, state: BaseOutput, greedy: bool, generator: torch.Generator | None) -> Tensor:
        """Pick-first routers: ``[B, P]`` actions from the state."""
        kind = "a cascade (it decides stage by stage with `stop`)" if self.is_cascade else "not a pick-first router"
        raise NotImplementedError(
            f"{type(self).__name__} is {kind}: route it with RoutedPipeline.route(x, router), or implement _route."
        )

    def stop(self, stage: int, unit_probs: Tensor, unit_uncertainty: Tensor) -> Tensor:
        """Cascades: whether each unit stops at ``stage`` (``[U]`` bool), from its mean probabilities ``[U, K]``
        and mean uncertainty ``[U]`` after that stage."""
        raise NotImplementedError(f"{type(self).__name__} is not a cascade (is_cascade is False): it has no stop rule.")

    def policy_input(self, state: BaseOutput) -> Tensor:
        """What the router's own network reads (for FLOP accounting): by default ``state.state()``."""
        return state.state()

    def flops_module(self) -> nn.Module | None:
        """The network that runs per input on `policy_input` (for FLOP accounting), or ``None``."""
        return None

    def decision_flops(self) -> list[int]:
        """FLOPs per unit of a cascade's stop decision after each stage ``0..m-1`` (empty: none)."""
        return []

    @torch.no_grad()
    def decide_table(self, table: UnitTable) -> Tensor:
        """Greedy decisions ``[N, P]`` on a replayed table; pick-first routers decide from its ``f_0`` state."""
        return self.route(table.base, greedy=True)

    def unit_scores(self, unit_probs: Tensor, unit_targets: Tensor) -> Tensor:
        """Oracle routers: the score ``[U]`` of one model's per-unit probabilities against the labels."""
        raise NotImplementedError(f"{type(self).__name__} does not decide from labelled scores (needs_targets is False).")

    def best_actions(self, scores: Tensor, costs: Tensor) -> Tensor:
        """Oracle routers: actions ``[N, P]`` from every model's scores ``[N, P, A]`` and the costs ``[A]``."""
        raise NotImplementedError(f"{type(self).__name__} does not decide from labelled scores (needs_targets is False).")

    def budget_knob(self, table: UnitTable) -> BudgetKnob | None:
        """The scalar that calibration moves to hit a compute budget (``None``: the router has none).

        Args:
            table: The replayed validation split (for knobs defined relative to its statistics).
        """
        return None

    def optional_state_keys(self) -> set[str]:
        """State-dict keys that may be missing from an older checkpoint (the load hook fills in a default)."""
        return set()

    def reset(self) -> None:
        """Restore the router's own random state before a pass over a split.

        Evaluation calls it first, so a stochastic router (the random policy) takes the same
        decisions every time it is evaluated on the same split. Deterministic routers need nothing.
        """


ROUTERS: Registry[Router] = Registry("router", Router)


def register_router(name: str) -> Any:
    """Decorator registering a router class under ``name``."""
    return ROUTERS.register(name)


def create_router(spec: str | Router | type[Router], router_spec: RouterSpec | None = None, **kwargs: Any) -> Router:
    """Build a router from a name (``"paser"``, ``"random"``, ``"single"``), class or instance.

    Args:
        spec: Registered name, dotted path, class or instance.
        router_spec: The pipeline's `RouterSpec` (number of models, grid, classes, spatial); its
            values are passed as keywords, ``kwargs`` win.
        **kwargs: Router arguments.
    """
    if router_spec is not None:
        kwargs = {**router_spec.kwargs(), **kwargs}
    return ROUTERS.resolve(spec, **kwargs)


def list_routers(pattern: str | None = None) -> list[str]:
    """Registered router names, optionally filtered by a shell pattern."""
    return ROUTERS.names(pattern)
