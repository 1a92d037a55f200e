"""What changes over a stage's epochs: optimisation settings, learning-rate schedules, global RNG state.

The explore/exploit ``alpha`` and the TVD stage's ``lambda`` follow
`routerkit.functional.linear_schedule`; the learning rate follows `lr_factor`, set by
`Stage.train_epoch` at the start of every epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from routerkit.functional import linear_schedule

if TYPE_CHECKING:
    from routerkit.config.schema import CascadeFitConfig, OptimConfig

__all__ = ["LR_SCHEDULES", "StageSettings", "global_rng_state", "linear_schedule", "lr_factor", "set_global_rng_state"]

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class StageSettings:
    """Common optimisation settings of a stage."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    #: ``"constant"`` or ``"cosine"`` (each optimiser's rate annealed from its initial value to 0
    #: over the stage's epochs, set at the start of every epoch).
    lr_schedule: str = "constant"

    @classmethod
    def from_config(cls, section: OptimConfig | CascadeFitConfig, epochs: int | None = None) -> StageSettings:
        """The settings of a ``training.*`` config section.

        Args:
            section: The stage's section (the cascade fit, one epoch, has no ``lr_schedule``: constant).
            epochs: Overrides ``section.epochs`` (e.g. the shorter policies of a sweep).
        """
        schedule = getattr(section, "lr_schedule", "constant")
        return cls(section.epochs if epochs is None else epochs, section.lr, section.batch_size, section.weight_decay, schedule)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the initial learning rate during ``epoch`` (0-based) of ``epochs``."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES} but got {schedule!r}.")


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
