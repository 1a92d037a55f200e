"""A trained run's evaluation table: the router and the baselines on the configured split.

`evaluate_experiment` evaluates by live routed inference, writes ``metrics/<split>.{json,csv}``
(`write_results`) and the routing overlay, and prints `results_table`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from routerkit._io import atomic_write_bytes, atomic_write_json
from routerkit.config.build import Experiment
from routerkit.flops import FLOP_CONVENTION
from routerkit.frontier import Frontier, format_gain, format_saving
from routerkit.metrics import EvalResult, evaluate_router
from routerkit.routers import SingleModelRouter, create_router

__all__ = ["evaluate_experiment", "results_table", "write_results"]


def evaluate_experiment(exp: Experiment, run_dir: Path, console: Console | None = None) -> list[EvalResult]:
    """Evaluate the router and the baselines on the configured split; write JSON/CSV; print the table."""
    console = console or Console()
    cfg = exp.config
    split = exp.data.splits()[cfg.evaluation.split]
    num_actions, grid = len(exp.zoo), exp.pipeline.partitioner.grid_shape
    strategies: list[tuple[str, Any]] = [(cfg.router.name if cfg.router.name != "paser" else "PaSeR", exp.router)]
    if "single" in cfg.evaluation.baselines:
        for i, name in enumerate(exp.zoo.names):
            strategies.append((f"{name} alone", create_router("single", num_actions=num_actions, index=i, grid_shape=grid)))
    if "random" in cfg.evaluation.baselines:
        strategies.append(
            ("PaSeR-RandPol", create_router("random", num_actions=num_actions, grid_shape=grid, seed=cfg.evaluation.random_seed))
        )
    results = [
        evaluate_router(
            exp.pipeline,
            router,
            split,
            exp.data.num_classes,
            name,
            cfg.evaluation.batch_size,
            exp.data.ignore_index,
            cfg.run.device,
            seed=cfg.run.seed,
        )
        for name, router in strategies
    ]
    singles = [r for (_, router), r in zip(strategies, results, strict=True) if isinstance(router, SingleModelRouter)]
    if singles:  # every strategy against the single models and their input-level mixes
        frontier = Frontier.of([(r.gflops, r.mean_iou) for r in singles])
        for r in results:
            r.against(frontier)
    write_results(run_dir, cfg.evaluation.split, results, exp.zoo.names)
    if len(split.input_shape) == 3 and len(split.target_shape) == 2 and split.input_shape[0] in (1, 3):
        from routerkit.plots import routing_overlay

        figure = routing_overlay(
            exp.pipeline,
            exp.router,
            split,
            Path(run_dir) / "figures" / "routing.png",
            exp.zoo.names,
            num_classes=exp.data.num_classes,
            ignore_index=exp.data.ignore_index,
        )
        console.print(f"Routing overlay: {figure}")
    console.print(results_table(results, exp.zoo.names, cfg.evaluation.split))
    return results


def write_results(run_dir: Path, split: str, results: list[EvalResult], model_names: list[str]) -> None:
    """``metrics/<split>.json`` and ``metrics/<split>.csv`` (atomic)."""
    folder = Path(run_dir) / "metrics"
    atomic_write_json(
        folder / f"{split}.json", {"split": split, "flop_convention": FLOP_CONVENTION, "results": [r.to_dict() for r in results]}
    )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "strategy",
            "mean_iou",
            "accuracy",
            "gflops_per_input",
            "state_gflops",
            "iou_per_gflop",
            "hull_quality",
            "hull_gain",
            "hull_saving",
            *[f"usage_{n}" for n in model_names],
        ]
    )
    for r in results:
        writer.writerow(
            [
                r.name,
                f"{r.mean_iou:.6f}",
                f"{r.accuracy:.6f}",
                f"{r.gflops:.6f}",
                f"{r.state_gflops:.6f}",
                f"{r.iou_per_gflop:.6f}",
                *["" if v is None else f"{v:.6f}" for v in (r.hull_quality, r.hull_gain, r.hull_saving)],
                *[f"{u:.4f}" for u in r.usage],
            ]
        )
    atomic_write_bytes(folder / f"{split}.csv", buf.getvalue().encode())


def results_table(results: list[EvalResult], model_names: list[str], split: str) -> Table:
    """A rich table of the results (GFLOPs per input, fvcore convention)."""
    table = Table(
        title=f"{split} split — GFLOPs per input, counting every pass that ran ({FLOP_CONVENTION}); "
        "frontier = the single models and their input-level mixes at the same GFLOPs",
        caption="vs frontier: mean IoU minus the frontier's, in IoU points; saving: share of the frontier's GFLOPs "
        "saved at the same mean IoU",
    )
    table.add_column("strategy")
    table.add_column("mean IoU", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("state", justify="right")
    table.add_column("IoU/GigaFlop", justify="right")
    table.add_column("vs frontier", justify="right")
    table.add_column("saving", justify="right")
    for name in model_names:
        table.add_column(f"% {name}", justify="right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.mean_iou:.4f}",
            f"{r.accuracy:.4f}",
            f"{r.gflops:.4f}",
            f"{r.state_gflops:.4f}",
            f"{r.iou_per_gflop:.2f}",
            format_gain(r.hull_gain),
            format_saving(r.hull_saving),
            *[f"{100 * u:.1f}" for u in r.usage],
        )
    return table
