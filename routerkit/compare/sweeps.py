"""Policies retrained on replayed tables: PaSeR at another lambda, the Pareto sweep and the TVD sweep.

Every sweep point is trained and scored on the replayed outputs of the frozen zoo
(`routerkit.replay`), so a point costs seconds, not a pass of the zoo.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console
from torch import Tensor

from routerkit.compare.results import IDK, OPTIMAL_STOPPING, ORACLE, PASER, ParetoPoint, TVDPoint, single_key
from routerkit.config.build import Experiment
from routerkit.config.schema import CompareConfig
from routerkit.replay import UnitTable, decide, routed_flops
from routerkit.rewards import PaSeRReward
from routerkit.routers import (
    IDKCascade,
    OptimalStoppingCascade,
    OracleRouter,
    PaSeRRouter,
    Router,
    SingleModelRouter,
    create_router,
)
from routerkit.routers.base import RouterSpec
from routerkit.training.fitters import fit_optimal_stopping
from routerkit.training.recipe import policy_stage, tvd_stage

R = TypeVar("R", bound=Router)


def router_spec(exp: Experiment) -> RouterSpec:
    """The spec every compared strategy is built from: ``exp``'s pipeline, classes and state layout."""
    return exp.pipeline.router_spec(exp.data.num_classes, exp.router.spatial)


def build_router(name: str, cls: type[R], spec: RouterSpec, **kwargs: Any) -> R:
    """`create_router` for a strategy whose class compare relies on (an IDK cascade it fits, ...)."""
    router = create_router(name, router_spec=spec, **kwargs)
    if not isinstance(router, cls):
        raise TypeError(f"Expected router {name!r} to build a {cls.__name__} but got {type(router).__name__}.")
    return router


def train_paser_on_table(
    exp: Experiment, table: UnitTable, lam: float, epochs: int, seed: int, template: PaSeRRouter | None = None
) -> PaSeRRouter:
    """A fresh PaSeR policy trained by REINFORCE on a replayed table with cost weight ``lam``."""
    torch.manual_seed(seed)
    if template is not None:
        router = copy.deepcopy(template).cpu()
        for module in router.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    else:
        router = build_router("paser", PaSeRRouter, router_spec(exp), spatial=table.base.probs.dim() > 2)
    stage = policy_stage(
        exp,
        router,
        PaSeRReward(lam),
        seed,
        epochs=epochs,
        cache=table,
    )
    for epoch in range(epochs):
        stage.train_epoch(epoch)
    return router.eval()


def _table_point(exp: Experiment, router: Router, table: UnitTable) -> tuple[float, float, list[float]]:
    actions = decide(router, table)
    return table.mean_iou(actions), routed_flops(exp.pipeline, router, table, actions) / 1e9, table.usage(actions)


def pareto_sweep(
    exp: Experiment,
    settings: CompareConfig,
    rl_t: UnitTable,
    val_t: UnitTable,
    test_t: UnitTable,
    paser: PaSeRRouter,
    console: Console,
) -> list[ParetoPoint]:
    """Cost/quality points of every family on the replayed evaluation split."""
    spec = router_spec(exp)
    points: list[ParetoPoint] = []

    def add(key: str, family: str, parameter: str, value: float, router: Router) -> None:
        iou, gflops, usage = _table_point(exp, router, test_t)
        points.append(ParetoPoint(key, family, parameter, float(value), iou, gflops, usage))

    console.print(f"Pareto sweep: PaSeR over lambda {settings.sweep_lambdas} (replayed outputs) ...")
    for value in settings.sweep_lambdas:
        router = train_paser_on_table(exp, rl_t, value, settings.sweep_policy_epochs, exp.config.run.seed, paser)
        add(PASER, "PaSeR", "lambda", value, router)
    idk = build_router("idk", IDKCascade, spec)
    for offset in settings.idk_offsets:
        idk.set_thresholds(idk.thresholds_at(val_t, offset))
        add(IDK, "IDK cascade", "threshold offset (std)", offset, idk)
    for alpha in settings.stop_alphas:
        stopping = build_router("optimal_stopping", OptimalStoppingCascade, spec)
        fit_optimal_stopping(stopping, rl_t, alpha, settings.stop_epochs, seed=exp.config.run.seed)
        add(OPTIMAL_STOPPING, "Optimal stopping", "alpha", alpha, stopping)
    for i, name in enumerate(exp.zoo.names):
        add(single_key(name), f"{name} alone", "model", i, build_router("single", SingleModelRouter, spec, index=i))
    for value in settings.sweep_lambdas:
        oracle = build_router("oracle", OracleRouter, spec, lam=value, accuracy=exp.config.reward.accuracy)
        add(ORACLE, "Oracle", "lambda", value, oracle)
    return points


def stage_policy(exp: Experiment, run_dir: Path) -> PaSeRRouter:
    """A copy of ``exp``'s router with the weights it had at the end of stage 2 (policy training), read once."""
    from routerkit.training.checkpoint import load_checkpoint

    names = sorted(p.stem for p in (run_dir / "checkpoints").glob("*-policy-e*.json"))
    if not names:
        raise ValueError(f"{run_dir} has no stage-2 policy checkpoint (checkpoints/*-policy-e*.json).")
    state, _ = load_checkpoint(run_dir, names[-1])
    if not isinstance(exp.router, PaSeRRouter):
        raise ValueError(f"The TVD sweep needs a PaSeR router but the run's router is {type(exp.router).__name__}.")
    router = copy.deepcopy(exp.router).cpu()
    router.load_state_dict(state["model"]["router"])
    return router


def tvd_sweep(
    exp: Experiment,
    run_dir: Path,
    thresholds: list[float],
    ft_t: UnitTable,
    test_t: UnitTable,
    experts: Tensor | None,
    console: Console,
) -> list[TVDPoint]:
    """PaSeR Fig. 12: fine-tune the stage-2 policy with the lambda schedule up to each TVD threshold."""
    if exp.config.training.finetune.lam_end is None:
        raise ValueError("compare.tvd_thresholds needs training.finetune.lam_end (the lambda schedule's end).")
    console.print(f"TVD sweep: fine-tuning the stage-2 policy up to TVD {thresholds} (replayed D_FT) ...")
    points = []
    cache = ft_t
    start = stage_policy(exp, run_dir)
    for threshold in thresholds:
        router = copy.deepcopy(start)
        stage = tvd_stage(exp, router, threshold, exp.config.run.seed + 3, cache)
        for epoch in range(stage.settings.epochs):
            stage.train_epoch(epoch)
            if stage.stopped:
                break
        router.eval()
        actions = decide(router, test_t)
        point = TVDPoint(
            threshold,
            stage.tvd,
            stage.lam,
            stage.step,
            test_t.mean_iou(actions),
            routed_flops(exp.pipeline, router, test_t, actions) / 1e9,
            test_t.usage(actions),
        )
        if experts is not None:
            point.expert_accuracy = float((experts == actions.cpu()).double().mean())
        points.append(point)
    return points
