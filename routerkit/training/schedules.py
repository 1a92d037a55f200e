"""What changes over a stage's epochs: optimisation settings, learning-rate schedules, global RNG state.

The explore/exploit ``alpha`` and the TVD stage's ``lambda`` follow
`routerkit.functional.linear_schedule`; the learning rate follows `lr_factor`, set by
`Stage.train_epoch` at the start of every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from routerkit.functional import linear_schedule

if TYPE_CHECKING:
    from routerkit.config.schema import CascadeFitConfig, OptimConfig

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PER_STEP_SCHEDULES",
    "PRECISIONS",
    "StageSettings",
    "global_rng_state",
    "linear_schedule",
    "lr_factor",
    "make_optimizer",
    "set_global_rng_state",
]

LR_SCHEDULES = ("constant", "cosine", "onecycle")
#: Schedules whose rate changes at every optimisation step (the others change once per epoch).
PER_STEP_SCHEDULES = ("onecycle",)
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "bf16")
#: One-cycle: share of the stage spent warming up, and the starting / final rates as fractions of ``lr``.
ONECYCLE_WARMUP, ONECYCLE_START, ONECYCLE_END = 0.15, 1.0 / 25.0, 1.0 / 25.0 / 1e4


@dataclass
class StageSettings:
    """Common optimisation settings of a stage."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    #: ``"constant"``, ``"cosine"`` (each optimiser's rate annealed from its initial value to 0
    #: over the stage's epochs, set at the start of every epoch) or ``"onecycle"`` (Smith's
    #: one-cycle policy, set at every step: a linear warm-up from ``lr / 25`` to ``lr`` over the
    #: first 15% of the steps, then a cosine down to ``lr / 25 / 1e4``).
    lr_schedule: str = "constant"
    #: ``"adam"``, or ``"sgd"`` (with ``momentum`` and, if ``nesterov``, Nesterov's update): the
    #: pre-training stages (the other stages' optimisers are Adam).
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = True
    #: ``"fp32"``, or ``"bf16"``: forward passes under ``torch.autocast`` in bfloat16 (weights,
    #: gradients and optimiser state stay float32); pre-training stages only.
    precision: str = "fp32"
    #: Convolution weights and training batches in channels-last memory (faster on oneDNN CPUs).
    channels_last: bool = False

    @classmethod
    def from_config(cls, section: OptimConfig | CascadeFitConfig, epochs: int | None = None) -> StageSettings:
        """The settings of a ``training.*`` config section.

        Args:
            section: The stage's section (the cascade fit, one epoch, has no ``lr_schedule``: constant).
            epochs: Overrides ``section.epochs`` (e.g. the shorter policies of a sweep).
        """
        schedule = getattr(section, "lr_schedule", "constant")
        return cls(
            section.epochs if epochs is None else epochs,
            section.lr,
            section.batch_size,
            section.weight_decay,
            schedule,
            optimizer=getattr(section, "optimizer", "adam"),
            momentum=getattr(section, "momentum", 0.9),
            nesterov=getattr(section, "nesterov", True),
            precision=getattr(section, "precision", "fp32"),
            channels_last=getattr(section, "channels_last", False),
        )


def lr_factor(schedule: str, epoch: float, epochs: int) -> float:
    """Multiplier of the initial learning rate at ``epoch`` (0-based; a fraction for per-step schedules) of ``epochs``."""
    if schedule == "constant" or (epochs <= 1 and schedule == "cosine"):
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "onecycle":
        progress = min(max(epoch / max(epochs, 1), 0.0), 1.0)
        if progress < ONECYCLE_WARMUP:
            return ONECYCLE_START + (1.0 - ONECYCLE_START) * progress / ONECYCLE_WARMUP
        tail = (progress - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)
        return ONECYCLE_END + (1.0 - ONECYCLE_END) * 0.5 * (1.0 + math.cos(math.pi * tail))
    raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES} but got {schedule!r}.")


def make_optimizer(params: Iterable[nn.Parameter], settings: StageSettings) -> torch.optim.Optimizer:
    """The optimiser ``settings.optimizer`` names, at ``settings.lr`` with ``settings.weight_decay``.

    Raises:
        ValueError: An optimiser other than `OPTIMIZERS`.
    """
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            nesterov=settings.nesterov and settings.momentum > 0,
            weight_decay=settings.weight_decay,
        )
    raise ValueError(f"Expected optimizer in {OPTIMIZERS} but got {settings.optimizer!r}.")


def global_rng_state() -> dict[str, Tensor]:
    """torch's global generator states: the CPU one and, where CUDA is initialised, the current device's.

    Dropout (stage 1, MC-dropout states) draws from them; the runner checkpoints them so that a
    resumed run continues with the same draws.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_global_rng_state(state: dict[str, Tensor]) -> None:
    """Restore states saved by `global_rng_state`."""
    torch.set_rng_state(state["cpu"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))
