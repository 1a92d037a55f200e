"""Fitting a cascade router on replayed outputs of the frozen zoo (the stage after pre-training).

The stage builds the `UnitTable` of its split and hands it to the cascade's own fitting
procedure: IDK's threshold search, or optimal stopping's REINFORCE stop policies.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from routerkit.data import Split
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm
from routerkit.routers.base import Router
from routerkit.training.base import Stage, check_choice
from routerkit.training.schedules import StageSettings

if TYPE_CHECKING:
    from routerkit.config.schema import CascadeFitConfig

__all__ = ["CascadeFitting"]


class CascadeFitting(Stage):
    """Fit a cascade on replayed outputs of the frozen zoo (one epoch).

    - `IDKCascade`: grid search of the thresholds on ``data`` (the validation split) for
      ``CE + lam * C`` (``method="grid"``), or one offset tuned until the cascade's IoU matches
      ``iou_target`` (``method="iou_match"``).
    - `OptimalStoppingCascade`: REINFORCE on ``data`` (D_RL) with reward ``-loss - alpha * cost``.

    Args:
        pipeline: The routed pipeline (zoo frozen).
        router: The cascade to fit.
        accuracy: Per-unit accuracy term.
        data: The split the cascade is fitted on.
        settings: ``epochs`` (0 skips the fit), ``lr`` and ``batch_size`` of the stop policies.
        seed: Random seed.
        num_classes: Classes K.
        lam: IDK cost weight ``lambda_IDK``.
        method: ``"grid"`` or ``"iou_match"`` (IDK).
        iou_target: Target IoU of ``"iou_match"``.
        grid_steps: Grid points per stage (IDK).
        alpha: Cost weight of the optimal-stopping reward.
        policy_epochs: REINFORCE epochs of the stop policies.
        loss: ``"ce"`` or ``"acc"`` (optimal stopping).
        ignore_index: Label ignored.
    """

    name = "fit_cascade"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: Split,
        settings: StageSettings,
        seed: int,
        *,
        num_classes: int,
        lam: float = 0.1,
        method: str = "grid",
        iou_target: float | None = None,
        grid_steps: int = 21,
        alpha: float = 0.1,
        policy_epochs: int = 60,
        loss: str = "ce",
        ignore_index: int | None = None,
    ) -> None:
        from routerkit.routers import CascadeRouter

        super().__init__(settings, seed)
        if not isinstance(router, CascadeRouter):
            raise ValueError(f"CascadeFitting needs a cascade router but got {type(router).__name__}.")
        check_choice("method", method, ("grid", "iou_match"))
        if method == "iou_match" and iou_target is None:
            raise ValueError("method 'iou_match' needs an iou_target.")
        self.pipeline, self.router, self.accuracy, self.data = pipeline, router, accuracy, data
        self.num_classes, self.lam, self.method, self.iou_target = num_classes, lam, method, iou_target
        self.grid_steps, self.alpha, self.policy_epochs, self.loss = grid_steps, alpha, policy_epochs, loss
        self.ignore_index = ignore_index
        self.modules["router"] = router

    @classmethod
    def from_config(
        cls,
        config: CascadeFitConfig,
        *,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: Split,
        num_classes: int,
        seed: int,
        ignore_index: int | None = None,
    ) -> CascadeFitting:
        """The stage of a ``training.cascade`` section.

        Args:
            config: The section (``method``, ``lam``, ``grid_steps``, ``alpha``, ``policy_epochs``...).
            pipeline: The routed pipeline (zoo frozen).
            router: The cascade to fit.
            accuracy: Per-unit accuracy term.
            data: The split ``config.split`` names (validation or D_RL).
            num_classes: Classes K.
            seed: Random seed.
            ignore_index: Label ignored.
        """
        return cls(
            pipeline,
            router,
            accuracy,
            data,
            StageSettings.from_config(config),
            seed,
            num_classes=num_classes,
            lam=config.lam,
            method=config.method,
            iou_target=config.iou_target,
            grid_steps=config.grid_steps,
            alpha=config.alpha,
            policy_epochs=config.policy_epochs,
            loss=config.loss,
            ignore_index=ignore_index,
        )

    def run_epoch(self, epoch: int) -> dict[str, float]:
        from routerkit.replay import build_unit_table
        from routerkit.training.fitters import cascade_fitter

        device = next(iter(self.pipeline.zoo.parameters())).device
        table = build_unit_table(
            self.pipeline, self.accuracy, self.data, self.num_classes, self.settings.batch_size, self.ignore_index, device
        )
        fit = cascade_fitter(self.router)  # type: ignore[arg-type]
        settings = SimpleNamespace(
            method=self.method,
            lam=self.lam,
            grid_steps=self.grid_steps,
            iou_target=self.iou_target,
            alpha=self.alpha,
            policy_epochs=self.policy_epochs,
            lr=self.settings.lr,
            loss=self.loss,
        )
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        self.router.cpu()
        out = fit(self.router, table, settings, seed)  # type: ignore[arg-type]
        actions = self.router.decide_table(table)  # on the CPU, where the table is
        self.router.to(device)
        out["iou"] = table.mean_iou(actions)
        # charged as live routing charges it: every stage reached and its stop decisions
        out["gflops"] = table.flops(actions, cascade=True, decision_flops=self.router.decision_flops()) / 1e9
        return {f"fit/{k}": float(v) for k, v in out.items()}
