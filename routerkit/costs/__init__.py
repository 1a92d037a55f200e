"""Cost models: the price of running each task model on one routing unit."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from routerkit._registry import Registry
from routerkit.flops import count_flops
from routerkit.models import Zoo

__all__ = ["COSTS", "CostModel", "FlopCost", "ParamShareCost", "create_cost", "list_costs"]


class CostModel(ABC):
    """Normalised per-unit cost ``C(f_i)`` of each model, used in rewards.

    Costs are normalised as PaSeR's Eq. 3: divided by the sum over the costlier models
    ``f_1..f_m`` of the same raw quantity, so ``sum_{i>=1} C(f_i) = 1``. The base model ``f_0``
    is priced by the same ratio (``base_cost="share"``, as Eq. 3 written for ``i = 0``) or at
    zero (``base_cost="zero"``: it ran anyway). Absolute GFLOPs are always reported separately
    by the accountant, whatever the cost model.

    Args:
        base_cost: ``"share"`` or ``"zero"``.
    """

    def __init__(self, base_cost: str = "share") -> None:
        if base_cost not in ("share", "zero"):
            raise ValueError(f"Expected base_cost 'share' or 'zero' but got {base_cost!r}.")
        self.base_cost = base_cost

    def costs(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> Tensor:
        """``[m + 1]`` normalised costs of the zoo's models on a unit of ``unit_shape``."""
        raw = torch.as_tensor(self._raw(zoo, unit_shape), dtype=torch.float64)
        if raw.shape != (len(zoo),) or bool((raw < 0).any()):
            raise RuntimeError(f"{type(self).__name__} returned invalid raw costs {raw.tolist()}.")
        denom = raw[1:].sum()
        if denom <= 0:
            raise ValueError(f"Expected the costlier models f_1..f_m to have a positive total cost but got {raw.tolist()}.")
        costs = raw / denom
        if self.base_cost == "zero":
            costs[0] = 0.0
        return costs.float()

    @abstractmethod
    def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
        """Un-normalised cost of each model (parameters, FLOPs, seconds, ...)."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments (for run metadata)."""
        return {"base_cost": self.base_cost}


COSTS: Registry[CostModel] = Registry("cost model", CostModel)


@COSTS.register("param_share")
class ParamShareCost(CostModel):
    """PaSeR Eq. 3: ``C(f_i) = numParams(f_i) / sum_{j=1..m} numParams(f_j)``."""

    def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
        return [float(n) for n in zoo.num_parameters()]


@COSTS.register("flops")
class FlopCost(CostModel):
    """FLOPs of each model on one unit of the actual unit shape, measured with fvcore."""

    def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
        return [float(count_flops(model, unit_shape)) for model in zoo]


def create_cost(spec: str | CostModel | type[CostModel], **kwargs: Any) -> CostModel:
    """Build a cost model from a name (``"param_share"``, ``"flops"``), class or instance."""
    return COSTS.resolve(spec, **kwargs)


def list_costs(pattern: str | None = None) -> list[str]:
    """Registered cost-model names."""
    return COSTS.names(pattern)
