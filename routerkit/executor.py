"""Batched execution of routing decisions and FLOP accounting.

The executor is the only place that runs the costlier models. It groups units by the model
chosen for them, runs each model **once** on its stacked units and scatters the outputs back
(the only Python loop is over the m models; a model with a ``submit(units)`` method returning a
callable that gives its outputs, such as `routerkit.serve.ray_backend.RemoteModel`, gets its
units before any model runs, so remote models work in parallel); it runs cascades stage by stage (`run_cascade`),
asking the router which units stop; and it scores the whole zoo on a batch (`all_unit_probs`)
for the replay table and the oracle.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from routerkit.flops import count_flops
from routerkit.functional import entropy, unit_mean, unit_mean_probs
from routerkit.models import Zoo
from routerkit.partitioners import Partitioner
from routerkit.routers.base import Router
from routerkit.uncertainty.base import UncertaintyEstimator


@dataclass
class Execution:
    """Result of running routed units.

    Attributes:
        unit_probs: ``[B * P, K, ...]`` probabilities of every unit (from its chosen model).
        logits: For each model index ``i >= 1`` that ran, ``(unit_index, logits)``; the logits
            keep their autograd graph when the executor ran with gradients.
    """

    unit_probs: Tensor
    logits: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


class Executor:
    """Runs each chosen model once per batch on the units routed to it.

    Args:
        zoo: The task models.
        partitioner: How inputs are cut into units.
        max_units: Optional cap on units per forward (memory); larger groups are chunked.
    """

    def __init__(self, zoo: Zoo, partitioner: Partitioner, max_units: int | None = None) -> None:
        if max_units is not None and max_units < 1:
            raise ValueError(f"Expected max_units >= 1 or None but got {max_units}.")
        self.zoo = zoo
        self.partitioner = partitioner
        self.max_units = max_units

    def run(self, units: Tensor, actions: Tensor, base_unit_probs: Tensor | None) -> Execution:
        """Execute decisions on already-split units.

        Args:
            units: ``[B * P, C, ...]`` inputs of the units.
            actions: ``[B, P]`` chosen model per unit.
            base_unit_probs: ``[B * P, K, ...]`` probabilities of ``f_0`` per unit (used for action
                0), or ``None`` when no unit chose ``f_0``.

        Returns:
            The per-unit probabilities and the logits of each model that ran.
        """
        flat = actions.reshape(-1)
        if flat.shape[0] != units.shape[0]:
            raise ValueError(f"Expected one action per unit ({units.shape[0]}) but got {flat.shape[0]}.")
        if base_unit_probs is None and bool((flat == 0).any()):
            raise ValueError("Some units chose f_0 but no base-model output was given.")
        out: Tensor | None = None if base_unit_probs is None else base_unit_probs.clone()
        logits: dict[int, tuple[Tensor, Tensor]] = {}
        groups = [(i, torch.nonzero(flat == i, as_tuple=True)[0]) for i in range(1, len(self.zoo))]
        groups = [(i, idx) for i, idx in groups if idx.numel() > 0]
        # models served elsewhere (`submit`, e.g. Ray Serve deployments) get their units first, so that they run
        # at the same time as each other and as the local models
        pending: dict[int, Callable[[], Tensor]] = {}
        for i, idx in groups:
            submit: Any = getattr(self.zoo[i], "submit", None)
            if callable(submit):
                pending[i] = submit(units[idx])
        for index, idx in groups:
            z = self.partitioner.crop(pending[index]()) if index in pending else self.forward(self.zoo[index], units[idx])
            logits[index] = (idx, z)
            probs = torch.softmax(z.detach().float(), dim=1)
            if out is None:
                out = probs.new_zeros((units.shape[0], *probs.shape[1:]))
            out[idx] = probs
        if out is None:
            raise ValueError("No unit was routed anywhere (empty batch?).")
        return Execution(out, logits)

    def all_unit_probs(self, units: Tensor, base_unit_probs: Tensor) -> list[Tensor]:
        """Every model's probabilities on every unit: ``[f_0's (given), f_1's, ..., f_m's]``, each ``[U, K, ...]``.

        The one place that scores the whole zoo on a batch, shared by the replay table
        (`routerkit.replay.build_unit_table`) and the oracle's live decisions.
        """
        return [base_unit_probs, *(torch.softmax(self.forward(self.zoo[i], units).float(), 1) for i in range(1, len(self.zoo)))]

    @torch.no_grad()
    def run_cascade(
        self, units: Tensor, base_unit_probs: Tensor, base_unit_uncertainty: Tensor, router: Router
    ) -> tuple[Tensor, Tensor]:
        """Run a cascade stage by stage, asking ``router.stop`` after each stage which units stop.

        Stage 0 is ``f_0`` (already run on the whole input); a unit that goes on is run by ``f_1``,
        and so on; the last model always answers. The stop rule sees each unit's mean class
        probabilities and mean uncertainty (``f_0``: the estimator's; later stages: the softmax
        entropy), as in `CascadeRouter.decide_table`.

        Args:
            units: ``[U, C, ...]`` inputs of the units.
            base_unit_probs: ``[U, K, ...]`` ``f_0``'s probabilities per unit.
            base_unit_uncertainty: ``[U, ...]`` ``f_0``'s uncertainty per unit.
            router: A cascade (``router.is_cascade``).

        Returns:
            ``(actions [U], unit_probs [U, K, ...])``: the last model each unit reached and its output.
        """
        if not router.is_cascade:
            raise ValueError(f"Expected a cascade router but got {type(router).__name__}.")
        probs = base_unit_probs.clone()
        actions = torch.zeros(units.shape[0], dtype=torch.long, device=units.device)
        active = ~router.stop(0, unit_mean_probs(probs), unit_mean(base_unit_uncertainty))
        num_models = len(self.zoo)
        for i in range(1, num_models):
            idx = torch.nonzero(active, as_tuple=True)[0]
            if idx.numel() == 0:
                break
            p = torch.softmax(self.forward(self.zoo[i], units[idx]).float(), 1)
            probs[idx] = p.to(probs.dtype)
            actions[idx] = i
            if i == num_models - 1:
                break
            go_on = ~router.stop(i, unit_mean_probs(p), unit_mean(entropy(p)))
            active = torch.zeros_like(active)
            active[idx[go_on]] = True
        return actions, probs

    def forward(self, model: nn.Module, units: Tensor) -> Tensor:
        """``model`` on ``units`` (as `Partitioner.split_inputs` cut them), in chunks of at most ``max_units``,
        its output cropped back to the units (`Partitioner.crop`: a context margin is cut away)."""
        step = self.max_units or units.shape[0]
        outs: list[Tensor] = [self.partitioner.crop(model(units[i : i + step])) for i in range(0, units.shape[0], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class FlopAccountant:
    """Counts, with fvcore, the FLOPs of everything that runs for one input.

    Per input: what ``f_0`` ran for the state (``estimator_flops``: N full MC-dropout passes, or one
    trunk + N heads; one pass for routers without uncertainty) + ``FLOPs(policy on the state)``
    + ``sum_i units_i x FLOPs(f_i on one unit)``. fvcore convention: one multiply-add = one flop.

    Args:
        zoo: The task models.
        partitioner: The unit partitioner.
        input_shape: Shape of one input (no batch dim).
    """

    def __init__(self, zoo: Zoo, partitioner: Partitioner, input_shape: tuple[int, ...]) -> None:
        self.zoo = zoo
        self.partitioner = partitioner
        self.input_shape = tuple(input_shape)
        self.unit_shape = partitioner.model_unit_shape(self.input_shape)  # with its context margin, if any
        self._unit_flops: list[int] | None = None
        self._base_flops: int | None = None
        self._module_flops: dict[int, int] = {}
        # per estimator object (weakly: a freed estimator's id can be reused), with the settings it was counted for
        self._estimator_flops: weakref.WeakKeyDictionary[UncertaintyEstimator, tuple[str, int]] = weakref.WeakKeyDictionary()

    @property
    def base_flops(self) -> int:
        """FLOPs of one pass of ``f_0`` on one whole input."""
        if self._base_flops is None:
            self._base_flops = count_flops(self.zoo.base, self.input_shape)
        return self._base_flops

    @property
    def unit_flops(self) -> list[int]:
        """FLOPs of each model on one unit (with the partitioner's context margin: what the model runs on)."""
        if self._unit_flops is None:
            self._unit_flops = [count_flops(m, self.unit_shape) for m in self.zoo]
        return self._unit_flops

    def estimator_flops(self, estimator: UncertaintyEstimator) -> int:
        """FLOPs per input of ``estimator`` on ``f_0`` (all its passes); cached per estimator and its settings."""
        settings = repr(sorted(estimator.config().items())) + f"|{estimator.num_passes}"
        cached = self._estimator_flops.get(estimator)
        if cached is None or cached[0] != settings:
            cached = (settings, estimator.flops(self.zoo.base, self.input_shape))
            self._estimator_flops[estimator] = cached
        return cached[1]

    def module_flops(self, module: nn.Module | None, input_shape: tuple[int, ...]) -> int:
        """FLOPs of an extra per-input module (a policy network); cached per module."""
        if module is None:
            return 0
        key = id(module)
        if key not in self._module_flops:
            self._module_flops[key] = count_flops(module, input_shape)
        return self._module_flops[key]

    def per_input(self, base_flops: float, policy_flops: float | Tensor, unit_counts: Tensor) -> Tensor:
        """FLOPs of each input.

        Args:
            base_flops: FLOPs of ``f_0`` per input for the state (0, one pass, or the estimator's).
            policy_flops: FLOPs of the router's networks per input (a number, or ``[B]`` when they
                depend on the decisions, as a cascade's stop policies do).
            unit_counts: ``[B, m + 1]`` units per input sent to each model (column 0 is free:
                ``f_0`` already ran on the whole input).

        Returns:
            ``[B]`` float64 FLOPs.
        """
        per_unit = torch.tensor(self.unit_flops, dtype=torch.float64)
        per_unit[0] = 0.0
        routed = (unit_counts.double().cpu() * per_unit).sum(-1)
        policy = policy_flops.double().cpu() if isinstance(policy_flops, Tensor) else float(policy_flops)
        return routed + float(base_flops) + policy
