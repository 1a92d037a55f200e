"""The harness: every strategy evaluated on the same trained zoo, split and cost accounting.

`compare_strategies` builds each strategy with `routerkit.routers.create_router` from the
pipeline's `RouterSpec`, fits the cascades on replayed tables (`routerkit.training.fitters`), evaluates every strategy by live
routed inference (`evaluate_router`) and scores its decisions on the replayed split against the
oracle (rewards, assignment matrices) and, when the data has them, the expert labels.

The optimal-stopping cascade trained jointly with ``f_1..f_m`` (`joint_stopping`) changes its
classifiers, so it is trained on a deep copy of the zoo and evaluated with its own pipeline and
replayed table (`Strategy.pipeline`, `Strategy.table`); its oracle share and agreement are
against the oracle of that zoo.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console
from torch import Tensor

from routerkit.compare.results import (
    IDK_GRID,
    IDK_IOU_MATCH,
    OPTIMAL_STOPPING,
    OPTIMAL_STOPPING_JOINT,
    ORACLE,
    PASER,
    RANDOM,
    CompareReport,
    ParetoPoint,
    StrategyRow,
    single_key,
)
from routerkit.compare.sweeps import build_router, pareto_sweep, router_spec, train_paser_on_table, tvd_sweep
from routerkit.config.build import Experiment
from routerkit.config.schema import CompareConfig
from routerkit.frontier import Frontier, sweep_summary
from routerkit.metrics import evaluate_router, seeded_rng
from routerkit.pipeline import RoutedPipeline
from routerkit.replay import UnitTable, build_unit_table, decide
from routerkit.rewards import PaSeRReward
from routerkit.routers import (
    IDKCascade,
    OptimalStoppingCascade,
    OracleRouter,
    PaSeRRouter,
    RandomRouter,
    Router,
    SingleModelRouter,
)
from routerkit.training.cascade_fitting import JointCascadeTraining
from routerkit.training.fitters import fit_idk_grid, fit_idk_iou, fit_optimal_stopping
from routerkit.training.recipe import frozen_models


class Strategy(NamedTuple):
    """One compared strategy before evaluation: its row's key, display name and kind, and the router.

    ``pipeline`` and ``table`` (the evaluation split replayed through that pipeline) are set for a
    strategy with its own models (the joint optimal-stopping cascade); ``None``: the run's zoo.
    """

    key: str
    name: str
    kind: str
    router: Router
    pipeline: RoutedPipeline | None = None
    table: UnitTable | None = None


def joint_stopping(
    exp: Experiment, policy_only: OptimalStoppingCascade, alpha: float, epochs: int
) -> tuple[RoutedPipeline, OptimalStoppingCascade]:
    """The optimal-stopping cascade trained jointly with ``f_1..f_m`` on D_RL, from ``policy_only``, on a copy of the zoo.

    `JointCascadeTraining` with ``training.cascade``'s ``joint_lr``, ``lr``, ``loss`` and ``batch_size``,
    cost weight ``alpha``, ``epochs`` epochs; the models with ``train: false`` stay frozen. The run's
    zoo and ``policy_only`` are untouched, and so is torch's global RNG (the training runs under
    `seeded_rng` with ``run.seed``).

    Returns:
        The pipeline on the jointly trained copy of the zoo (eval mode) and its cascade (on the CPU).
    """
    cfg = exp.config
    pipeline, router = copy.deepcopy(exp.pipeline), copy.deepcopy(policy_only)
    device = next(iter(pipeline.zoo.parameters())).device
    stage = JointCascadeTraining.from_config(
        cfg.training.cascade,
        pipeline=pipeline,
        router=router.to(device),
        accuracy=exp.accuracy,
        data=exp.parts["rl"],
        seed=cfg.run.seed,
        ignore_index=exp.data.ignore_index,
        frozen=frozen_models(cfg),
        epochs=epochs,
        score_split=False,  # compare replays the evaluation split through the trained copy instead
    )
    with seeded_rng(cfg.run.seed, cfg.run.device):
        for epoch in range(epochs):
            stage.train_epoch(epoch)
    pipeline.zoo.eval()
    return pipeline, router.cpu().eval()


def _assignment(oracle: Tensor, chosen: Tensor, num_actions: int) -> tuple[list[list[int]], float]:
    flat = oracle.reshape(-1) * num_actions + chosen.reshape(-1)
    counts = torch.bincount(flat, minlength=num_actions * num_actions).reshape(num_actions, num_actions)
    return counts.tolist(), float((oracle == chosen).double().mean())


def expert_units(split: Any, key: str, grid_units: int) -> Tensor:
    """Per-unit expert labels ``[N, P]`` from the split's per-input (``[N]``) or per-unit (``[N, P]``) meta ``key``."""
    if key not in split.meta:
        raise ValueError(
            f"evaluation.expert_key is {key!r} but the data plugin's splits carry meta {sorted(split.meta) or 'none'}."
        )
    labels = split.meta[key].long().cpu()
    if labels.dim() == 1:
        return labels.unsqueeze(1).expand(-1, grid_units)
    if labels.dim() == 2 and labels.shape[1] == grid_units:
        return labels
    raise ValueError(f"Expected meta[{key!r}] of shape [N] or [N, {grid_units}] but got {tuple(labels.shape)}.")


def pareto_frontier(points: list[ParetoPoint]) -> dict[str, Any]:
    """APGR / AIQ of each swept family against the frontier of the single models' points (same replayed split)."""
    singles = [(p.gflops, p.mean_iou) for p in points if p.key.startswith("single:")]
    if not singles:
        return {}
    families: dict[str, tuple[str, list[tuple[float, float]]]] = {}
    for p in points:
        if not p.key.startswith("single:"):
            families.setdefault(p.key, (p.family, []))[1].append((p.gflops, p.mean_iou))
    return sweep_summary(families, singles)


def compare_strategies(
    exp: Experiment, settings: CompareConfig, console: Console | None = None, run_dir: str | Path | None = None
) -> CompareReport:
    """Evaluate every strategy on ``exp``'s trained zoo (see `routerkit.compare`).

    Args:
        exp: A trained experiment (e.g. from `routerkit.training.runner.load_run`).
        settings: The ``compare`` section of the config.
        console: Where progress is printed.
        run_dir: The run directory (needed by ``settings.tvd_thresholds``: the stage-2 policy checkpoint).

    Returns:
        The report (also see `write_report`).
    """
    console = console or Console()
    cfg, data, pipe = exp.config, exp.data, exp.pipeline
    device = cfg.run.device
    split = data.splits()[settings.split]
    k, num_actions, spec = data.num_classes, len(exp.zoo), router_spec(exp)
    lam = cfg.reward.lam
    reward = PaSeRReward(lam)
    exp.zoo.eval()

    def table_of(part: Any) -> UnitTable:
        with seeded_rng(cfg.run.seed, device):  # the same MC-dropout states at every compare of the run
            return build_unit_table(pipe, exp.accuracy, part, k, settings.batch_size, data.ignore_index, device)

    console.print("Replaying the frozen zoo on the validation, D_RL and evaluation splits ...")
    val_t, rl_t, test_t = table_of(data.val), table_of(exp.parts["rl"]), table_of(split)

    if isinstance(exp.router, PaSeRRouter):
        paser = exp.router
    else:
        console.print("The run's router is not PaSeR: training a PaSeR policy on the replayed D_RL ...")
        paser = train_paser_on_table(exp, rl_t, lam, cfg.training.policy.epochs, cfg.run.seed)
    paser.eval()
    paser_val_iou = val_t.mean_iou(decide(paser.cpu(), val_t))

    # Built and fitted in this order: the stop policies' initial weights draw from the global RNG.
    idk = build_router("idk", IDKCascade, spec)
    idk_fit = fit_idk_grid(idk, val_t, settings.idk_lambda, settings.idk_grid_steps)
    idk_match = build_router("idk", IDKCascade, spec)
    match_fit = fit_idk_iou(idk_match, val_t, paser_val_iou)
    stopping = build_router("optimal_stopping", OptimalStoppingCascade, spec)
    stop_alpha = lam if settings.stop_alpha is None else settings.stop_alpha
    fit_optimal_stopping(stopping, rl_t, stop_alpha, settings.stop_epochs, seed=cfg.run.seed)
    joint: list[Strategy] = []
    if settings.stop_joint_epochs > 0:
        console.print(
            f"Training the optimal-stopping cascade jointly with {', '.join(exp.zoo.names[1:])} on D_RL "
            f"({settings.stop_joint_epochs} epochs, on a copy of the zoo) ..."
        )
        joint_pipe, joint_router = joint_stopping(exp, stopping, stop_alpha, settings.stop_joint_epochs)
        with seeded_rng(cfg.run.seed, device):  # the same MC-dropout states as the run's own table
            joint_t = build_unit_table(joint_pipe, exp.accuracy, split, k, settings.batch_size, data.ignore_index, device)
        name = f"Optimal stopping (joint, alpha={stop_alpha:g})"
        joint.append(Strategy(OPTIMAL_STOPPING_JOINT, name, "cascade", joint_router, joint_pipe, joint_t))
    oracle = build_router("oracle", OracleRouter, spec, lam=lam, accuracy=cfg.reward.accuracy, ignore_index=data.ignore_index)
    random = build_router("random", RandomRouter, spec, seed=cfg.evaluation.random_seed)
    strategies = [
        Strategy(PASER, "PaSeR", "pick-first", paser),
        Strategy(IDK_GRID, f"IDK cascade (grid, lambda_IDK={settings.idk_lambda:g})", "cascade", idk),
        Strategy(IDK_IOU_MATCH, "IDK cascade (IoU match)", "cascade", idk_match),
        Strategy(OPTIMAL_STOPPING, f"Optimal stopping (alpha={stop_alpha:g})", "cascade", stopping),
        *joint,
        Strategy(RANDOM, "PaSeR-RandPol", "baseline", random),
    ]
    for i, name in enumerate(exp.zoo.names):
        single = build_router("single", SingleModelRouter, spec, index=i)
        strategies.append(Strategy(single_key(name), f"{name} alone", "baseline", single))
    strategies.append(Strategy(ORACLE, "Oracle", "oracle", oracle))

    expert_key = cfg.evaluation.expert_key
    experts = expert_units(split, expert_key, test_t.num_units) if expert_key else None

    def oracle_scores(table: UnitTable) -> tuple[Tensor, Tensor, float, float]:
        """A table's rewards ``[N, P, A]``, the oracle's actions on it, the oracle's and ``f_0``'s mean reward."""
        rewards = table.rewards(reward)
        best = oracle.decide_table(table)
        return rewards, best, float(table.gather(rewards, best).nanmean()), float(rewards[..., 0].nanmean())

    all_rewards, oracle_actions, r_oracle, r_base = oracle_scores(test_t)
    rows: list[StrategyRow] = []
    for key, name, kind, router, own_pipe, own_table in strategies:
        table = test_t if own_table is None else own_table
        if own_table is not None:  # its own classifiers: rewards and oracle of its own zoo
            all_rewards, oracle_actions, r_oracle, r_base = oracle_scores(own_table)
        router.to(device)
        console.print(f"Evaluating {name} ...")
        result = evaluate_router(
            own_pipe or pipe, router, split, k, name, cfg.evaluation.batch_size, data.ignore_index, device, seed=cfg.run.seed
        )
        router.cpu()
        actions = decide(router, table)
        r = float(table.gather(all_rewards, actions).nanmean())
        share = (r - r_base) / (r_oracle - r_base) if r_oracle > r_base else float("nan")
        matrix, agreement = _assignment(oracle_actions, actions, num_actions)
        row = StrategyRow(key, name, kind, result, r, share, matrix, agreement)
        if experts is not None:
            row.expert_assignment, row.expert_accuracy = _assignment(experts, actions.cpu(), num_actions)
        rows.append(row)
        if own_table is not None:
            all_rewards, oracle_actions, r_oracle, r_base = oracle_scores(test_t)
    paser.to(device)

    singles = [row.result for row in rows if row.key.startswith("single:")]
    if singles:  # every row against the single models and their input-level mixes (live results)
        frontier = Frontier.of([(r.gflops, r.mean_iou) for r in singles])
        for row in rows:
            row.result.against(frontier)
    report = CompareReport(settings.split, rows, {}, [], list(exp.zoo.names), expert_key)
    p_row, m_row = report.row(PASER), report.row(IDK_IOU_MATCH)
    report.table2 = {
        "target_val_iou": paser_val_iou,
        "idk_val_iou": match_fit["iou"],
        "matched_within_1e-3": bool(match_fit["matched"]),
        "idk_offset_std": match_fit["offset"],
        "paser": {"mean_iou": p_row.result.mean_iou, "gflops": p_row.result.gflops},
        "idk_iou_match": {"mean_iou": m_row.result.mean_iou, "gflops": m_row.result.gflops},
        # A cost ratio means something only at equal quality: None when the IoU match failed.
        "gflops_ratio_idk_over_paser": (
            m_row.result.gflops / p_row.result.gflops if match_fit["matched"] and p_row.result.gflops > 0 else None
        ),
        "idk_grid_fit": idk_fit,
    }
    if settings.pareto:
        report.pareto = pareto_sweep(exp, settings, rl_t, val_t, test_t, paser, console)
        report.frontier = pareto_frontier(report.pareto)
    if settings.tvd_thresholds:
        if run_dir is None:
            raise ValueError("compare.tvd_thresholds needs a trained run directory (its stage-2 policy checkpoint).")
        ft_t = table_of(exp.parts["ft"])
        report.tvd = tvd_sweep(exp, Path(run_dir), settings.tvd_thresholds, ft_t, test_t, experts, console)
    return report
