"""The base of the resumable training stages: named modules and optimisers, the epoch hooks, stage names.

A stage fills in `Stage.run_epoch` (one epoch, returning the scalars to log); callers use
`Stage.train_epoch`, which first sets the epoch's learning rates from ``settings.lr_schedule``.
`Stage.state_dict` / `Stage.load_state_dict` (modules, optimisers, the stage's generator) let the
runner checkpoint after every epoch and resume with the same random draws.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from routerkit.training.distributed import distributed
from routerkit.training.schedules import (
    LR_SCHEDULES,
    OPTIMIZERS,
    PER_STEP_SCHEDULES,
    PRECISIONS,
    StageSettings,
    global_rng_state,
    lr_factor,
    set_global_rng_state,
)

__all__ = ["Stage", "check_choice", "valid_count"]


def valid_count(targets: torch.Tensor, ignore_index: int | None) -> float:
    """Pixels (or labels) of ``targets`` that a loss counts: all, less those equal to ``ignore_index``."""
    return float(targets.numel() if ignore_index is None else int((targets != ignore_index).sum()))


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError("Expected <what> 'a', 'b' or 'c' but got ...")`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 else repr(choices[0])
        raise ValueError(f"Expected {what} {listed} but got {value!r}.")


class Stage:
    """Base of the resumable stages: named optimisers and modules, epoch loop hooks.

    Every concrete stage has its own `name` (it names the stage's checkpoints and log rows);
    defining a second stage class with a name already taken raises ``ValueError``.

    Args:
        settings: Optimisation settings (epochs, learning rate, batch size, schedule).
        seed: Seed of the stage's own generator (shuffling, augmentation, sampled actions).
    """

    name: str = "stage"
    #: Stage name -> the class that took it (``module:qualname``).
    _names: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:  # an intermediate base, or a variant keeping its parent's name
            return
        owner = f"{cls.__module__}:{cls.__qualname__}"
        taken = Stage._names.setdefault(cls.name, owner)
        if taken != owner:
            raise ValueError(f"Expected a unique stage name but {owner} takes {cls.name!r}, the name of {taken}.")

    def __init__(self, settings: StageSettings, seed: int) -> None:
        if settings.epochs < 0 or settings.batch_size < 1 or settings.lr <= 0:
            raise ValueError(f"Expected epochs >= 0, batch_size >= 1 and lr > 0 for stage {self.name!r} but got {settings}.")
        if settings.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES} for stage {self.name!r} but got {settings.lr_schedule!r}.")
        check_choice(f"stage {self.name!r}'s optimizer", settings.optimizer, OPTIMIZERS)
        check_choice(f"stage {self.name!r}'s precision", settings.precision, PRECISIONS)
        self.settings = settings
        #: The stage's generator: the shuffled order of every epoch (the same on every rank) and, in one
        #: process, every other random draw.
        self.generator = torch.Generator().manual_seed(seed)
        #: This process's place in a distributed run (`routerkit.training.distributed`; rank 0 of 1 alone).
        self.dist = distributed()
        #: Random draws per sample (augmentation, sampled actions): the stage's generator in one process,
        #: a per-rank generator under torch.distributed (so the ranks' shuffled orders stay the same).
        self.draws = self.dist.draws(seed) or self.generator
        self._wrapped: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.modules: dict[str, nn.Module] = {}
        self._initial_lrs: dict[str, list[float]] = {}
        #: Messages for the user (a model far worse in eval mode, below f_0, ...); the runner prints them.
        self.warnings: list[str] = []

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of training (0-based ``epoch``); returns the scalars to log."""
        raise NotImplementedError

    def valid_share(self, targets: torch.Tensor, ignore_index: int | None, total: int) -> float:
        """Factor of this rank's mean loss over the valid pixels of ``targets`` (its share of a global batch of ``total``).

        Under torch.distributed DDP averages the ranks' gradients; weighting each rank's mean by
        ``world * its valid pixels / every rank's valid pixels`` makes that the mean over the global
        batch's valid pixels, as in one process (an ignore index leaves unequal counts). 1 in one process.
        """
        if not self.dist.enabled:
            return 1.0
        mine = valid_count(targets, ignore_index) if self.dist.local_count(total) else 0.0
        return mine * self.dist.world_size / max(self.dist.all_sum(mine), 1.0)

    def same_global_rng(self) -> None:
        """Under torch.distributed, give every rank rank 0's global generator states (no-op in one process).

        For work every rank repeats and that must come out the same everywhere (a replay table's
        MC-dropout draws before a fit that every rank runs whole).
        """
        if self.dist.enabled:
            set_global_rng_state(self.dist.broadcast(global_rng_state()))

    def trainable(self, key: str, module: nn.Module) -> nn.Module:
        """What a training step calls for ``module``: itself, or its ``DistributedDataParallel`` wrapper.

        Use it for modules every rank runs on every step; the wrapper is made once per stage.
        """
        if key not in self._wrapped:
            self._wrapped[key] = self.dist.wrap(module)
        return self._wrapped[key]

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Set the epoch's learning rates from ``settings.lr_schedule``, then `run_epoch`."""
        self._record_initial_lrs()
        factor = lr_factor(self.settings.lr_schedule, epoch, self.settings.epochs)
        for key, optimizer in self.optimizers.items():
            for group, initial in zip(optimizer.param_groups, self._initial_lrs[key], strict=True):
                group["lr"] = initial * factor
        return self.run_epoch(epoch)

    def step_lr(self, key: str, epoch: int, step: int, steps: int) -> None:
        """Set optimiser ``key``'s rates for ``step`` of ``steps`` in ``epoch`` under a per-step schedule.

        A no-op for per-epoch schedules (`train_epoch` sets those); stages call it before every step.
        """
        if self.settings.lr_schedule not in PER_STEP_SCHEDULES:
            return
        self._record_initial_lrs()
        factor = lr_factor(self.settings.lr_schedule, epoch + step / max(steps, 1), self.settings.epochs)
        for group, initial in zip(self.optimizers[key].param_groups, self._initial_lrs[key], strict=True):
            group["lr"] = initial * factor

    def _record_initial_lrs(self) -> None:
        """Remember each optimiser's rates as built (before a resume overwrites them with scheduled ones)."""
        for key, optimizer in self.optimizers.items():
            self._initial_lrs.setdefault(key, [float(g["lr"]) for g in optimizer.param_groups])

    def num_steps(self) -> int:
        """Optimisation steps per epoch (for progress bars)."""
        return 1

    def state_dict(self) -> dict[str, Any]:
        """Modules, optimisers and the generator's state (and every rank's generator of draws, when distributed).

        Under torch.distributed every rank must call it (it gathers the ranks' generators).
        """
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
        }
        if self.dist.enabled:
            state["draws"] = self.dist.gather(self.draws.get_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` (the optimisers' initial rates are kept for the schedule)."""
        self._record_initial_lrs()
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.generator.set_state(state["generator"].to(torch.uint8))
        draws = state.get("draws")
        if self.dist.enabled and isinstance(draws, list) and len(draws) == self.dist.world_size:
            self.draws.set_state(draws[self.dist.rank].to(torch.uint8))
