"""Cost models: the price of running each task model on one routing unit."""

from __future__ import annotations

import math
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from routerkit._registry import Registry
from routerkit.flops import count_flops
from routerkit.models import Zoo

__all__ = ["COSTS", "CostModel", "FlopCost", "LatencyCost", "ParamShareCost", "create_cost", "list_costs"]


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

    def measure(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> dict[str, Any]:
        """Measure, once, what this cost model measures on this machine, and check given params against the zoo.

        `routerkit.config.build.build_experiment` calls it after the zoo is on the run's device and
        records what it returns in the experiment's config (``cost.params``), which `routerkit train`
        saves in the run's ``config.yaml``: loading the run then builds the cost model with those
        params and measures nothing again.

        Args:
            zoo: The task models, on the run's device.
            unit_shape: Shape of one routing unit, without batch.

        Returns:
            The params measured now (``{}``, the default: nothing is measured, or it was given).

        Raises:
            ValueError: Given params do not fit the zoo; the message names the field.
        """
        return {}

    def describe(self, names: Sequence[str]) -> str:
        """One line on the raw costs for the train log, naming the models ``names`` (``""``: nothing to say)."""
        return ""

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


@COSTS.register("latency")
class LatencyCost(CostModel):
    """Measured seconds per unit of each model on the run's device, so that lambda trades real time.

    ``raw(f_i)`` is the median, over ``repeats`` timed forwards of a batch of ``batch_size``
    random units of the unit shape (after ``warmup`` untimed ones), of the forward's seconds
    divided by ``batch_size``. Each model runs in eval mode under `torch.inference_mode`, on the
    device and dtype of its own parameters (CPU and the default dtype when it has none), with
    CUDA (or MPS) synchronised around each forward; the models' train/eval flags are restored
    afterwards and the global RNG is not touched. The costs are then normalised like the others
    (PaSeR Eq. 3).

    **Measured once, stored in the run.** Timings depend on the machine and vary from one call
    to the next, so a run never times twice. Without ``seconds`` the first `measure` (or
    `costs`) times the zoo and keeps the values (`seconds`, `config`). `build_experiment`
    calls `measure` once the zoo is on ``run.device`` and writes the values into the
    experiment's config as ``cost.params.seconds``; `routerkit train` saves that config as the
    run's ``config.yaml`` (atomically, before the trust store records its hash) and prints the
    milliseconds per unit. Every later use of the run (``routerkit evaluate``, ``--resume``,
    ``compare``, ``calibrate``, `load_run`) builds this cost model from that file with
    ``seconds`` given, and then uses them as they are, with no forward. A run moved to another
    machine keeps the times it was trained with; to time again, train a new run from a config
    without ``cost.params.seconds``.

    Args:
        base_cost: ``"share"`` or ``"zero"`` (see `CostModel`).
        batch_size: Units per timed forward.
        repeats: Timed forwards per model; their median is taken.
        warmup: Untimed forwards per model before the timed ones (allocations, cuDNN autotuning).
        seconds: Seconds per unit already measured, one finite non-negative value per zoo model
            (``f_0`` first), used as they are with no timing; ``None`` measures them.

    Raises:
        ValueError: A param is out of range; the message names it (``cost.params.<name>``).

    Example:
        >>> from routerkit.models import ToySegmenter, Zoo
        >>> zoo = Zoo([ToySegmenter(width=2), ToySegmenter(width=8)])
        >>> LatencyCost(seconds=[1e-5, 4e-5]).costs(zoo, (1, 8, 8)).tolist()
        [0.25, 1.0]
    """

    def __init__(
        self,
        base_cost: str = "share",
        batch_size: int = 32,
        repeats: int = 7,
        warmup: int = 2,
        seconds: Sequence[float] | None = None,
    ) -> None:
        super().__init__(base_cost)
        self.batch_size = _int_param("batch_size", batch_size, minimum=1)
        self.repeats = _int_param("repeats", repeats, minimum=1)
        self.warmup = _int_param("warmup", warmup, minimum=0)
        self.seconds: list[float] | None = None if seconds is None else _seconds_param(seconds)
        self.measured_on: str | None = None

    def measure(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> dict[str, Any]:
        """Time every model once (when ``seconds`` is not given) and return ``{"seconds": [...]}``.

        Args:
            zoo: The task models, each on the device it is timed on.
            unit_shape: Shape of one routing unit, without batch.

        Returns:
            ``{"seconds": [...]}`` when measured now; ``{}`` when ``seconds`` was given or already measured.

        Raises:
            ValueError: The given ``seconds`` do not hold one value per zoo model.
        """
        if self.seconds is not None:
            if len(self.seconds) != len(zoo):
                raise ValueError(
                    f"Expected cost.params.seconds to hold {len(zoo)} values (one per zoo model, "
                    f"{', '.join(zoo.names)}) but got {len(self.seconds)}: {self.seconds}."
                )
            return {}
        self.seconds = [_seconds_per_unit(model, unit_shape, self.batch_size, self.repeats, self.warmup) for model in zoo]
        self.measured_on = ", ".join(sorted({str(_device_and_dtype(model)[0]) for model in zoo}))
        return {"seconds": list(self.seconds)}

    def _raw(self, zoo: Zoo, unit_shape: tuple[int, ...]) -> list[float]:
        self.measure(zoo, unit_shape)
        assert self.seconds is not None  # set by measure
        return list(self.seconds)

    def describe(self, names: Sequence[str]) -> str:
        """The milliseconds per unit of each model, and where they were measured."""
        if self.seconds is None:
            return ""
        times = ", ".join(f"{name} {s * 1e3:.4g} ms" for name, s in zip(names, self.seconds, strict=True))
        if self.measured_on is None:
            return f"{times} per unit (given in cost.params.seconds)"
        how = f"median of {self.repeats} forwards of {self.batch_size} units"
        return f"{times} per unit (measured on {self.measured_on}, {how}; recorded as cost.params.seconds)"

    def config(self) -> dict[str, Any]:
        """Constructor arguments, with the measured ``seconds`` once measured."""
        return {
            **super().config(),
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "seconds": None if self.seconds is None else list(self.seconds),
        }


def _int_param(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"Expected cost.params.{name} to be {what} but got {value!r}.")
    return value


def _seconds_param(seconds: Any) -> list[float]:
    expected = "a list of finite, non-negative seconds per unit, one per zoo model (f_0 first)"
    if isinstance(seconds, (str, bytes)) or not isinstance(seconds, Sequence):
        raise ValueError(f"Expected cost.params.seconds to be {expected} but got {seconds!r}.")
    for value in seconds:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Expected cost.params.seconds to be {expected} but got {list(seconds)!r} ({value!r}).")
    return [float(value) for value in seconds]


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which floating dtype ``model`` runs: its first parameter's (CPU, default dtype without)."""
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return param.device, param.dtype if param.is_floating_point() else torch.get_default_dtype()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _seconds_per_unit(model: nn.Module, unit_shape: tuple[int, ...], batch_size: int, repeats: int, warmup: int) -> float:
    """Median seconds per unit of ``repeats`` forwards of ``model`` on ``batch_size`` random units (after ``warmup``).

    The model runs in eval mode under `torch.inference_mode` on its own device; the modules' train/eval
    flags are restored afterwards. The inputs come from a private generator (the global RNG is untouched).
    """
    device, dtype = _device_and_dtype(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *unit_shape), generator=generator).to(device=device, dtype=dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                _synchronize(device)
                start = time.perf_counter()
                model(x)
                _synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        for m, training in modes:
            m.training = training
    return statistics.median(times) / batch_size


def create_cost(spec: str | CostModel | type[CostModel], **kwargs: Any) -> CostModel:
    """Build a cost model from a name (``"param_share"``, ``"flops"``, ``"latency"``), class or instance."""
    return COSTS.resolve(spec, **kwargs)


def list_costs(pattern: str | None = None) -> list[str]:
    """Registered cost-model names."""
    return COSTS.names(pattern)
