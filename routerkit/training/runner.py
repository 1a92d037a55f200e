"""Run a whole experiment: stages with progress bars, atomic checkpoints, resume, evaluation."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from routerkit.config import ConfigError, ExperimentConfig, dump_config, parse_config
from routerkit.config.build import Experiment, build_experiment
from routerkit.data import Split
from routerkit.flops import FLOP_CONVENTION
from routerkit.metrics import EvalResult, evaluate_router
from routerkit.rewards import Reward
from routerkit.routers import CascadeRouter, PaSeRRouter, create_router
from routerkit.training.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, read_latest, save_checkpoint
from routerkit.training.stages import (
    BaseModelPretraining,
    CascadeFitting,
    JointFineTuning,
    LargeModelPretraining,
    PolicyFineTuning,
    PolicyTraining,
    Stage,
    StageSettings,
    global_rng_state,
    set_global_rng_state,
)

STAGE_ORDER = ("pretrain_large", "pretrain_base", "policy", "finetune")


def _settings(section: Any) -> StageSettings:
    schedule = getattr(section, "lr_schedule", "constant")  # the cascade fit (one epoch) has none
    return StageSettings(section.epochs, section.lr, section.batch_size, section.weight_decay, schedule)


def policy_stage(
    exp: Experiment,
    router: PaSeRRouter,
    reward: Reward,
    seed: int,
    epochs: int | None = None,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> PolicyTraining:
    """Stage 2 on D_RL with the config's ``training.policy`` settings.

    Args:
        exp: The experiment.
        router: The PaSeR router to train.
        reward: Its reward (e.g. another lambda for a sweep).
        seed: Random seed.
        epochs: Epochs (default: ``training.policy.epochs``).
        cache: A prebuilt replay cache of D_RL.
    """
    p = exp.config.training.policy
    settings = StageSettings(p.epochs if epochs is None else epochs, p.lr, p.batch_size, p.weight_decay, p.lr_schedule)
    return PolicyTraining(
        exp.pipeline,
        router,
        reward,
        exp.accuracy,
        exp.parts["rl"],
        settings,
        seed,
        p.alpha_start,
        p.alpha_end,
        p.baseline,
        p.credit,
        p.entropy_coef,
        importance_weighting=p.importance_weighting,
        estimator=p.estimator,
        cache=cache,
    )


def model_training_data(exp: Experiment, index: int) -> Split:
    """D_PT, or the part of it selected by ``zoo.models[index].train_on`` (``{meta key: value}``)."""
    data, spec = exp.parts["pt"], exp.config.zoo.models[index].train_on
    if spec is None:
        return data
    ((key, value),) = spec.items()
    if key not in data.meta:
        raise ConfigError(
            f"zoo.models.{index}.train_on uses meta key {key!r} but the data plugin provides {sorted(data.meta) or 'no meta'}."
        )
    column = data.meta[key]
    if column.dim() != 1:
        raise ConfigError(f"zoo.models.{index}.train_on: meta {key!r} must hold one value per input, got {tuple(column.shape)}.")
    subset = data.subset(torch.nonzero(column == value).flatten())
    if len(subset) == 0:
        raise ConfigError(f"zoo.models.{index}.train_on: no input of D_PT has {key} == {value}.")
    return subset


def tvd_stage(
    exp: Experiment,
    router: PaSeRRouter,
    threshold: float,
    seed: int,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> PolicyFineTuning:
    """Stage 3 as policy-only fine-tuning on D_FT stopped at a TVD ``threshold`` (``training.finetune``)."""
    f = exp.config.training.finetune
    if f.lam_end is None:
        raise ConfigError("training.finetune.lam_end is needed for TVD-threshold fine-tuning.")
    return PolicyFineTuning(
        exp.pipeline,
        router,
        exp.reward,
        exp.accuracy,
        exp.parts["ft"],
        _settings(f),
        seed,
        threshold,
        f.lam_end,
        f.alpha_start,
        f.alpha_end,
        exp.config.training.policy.baseline,
        f.credit,
        f.entropy_coef,
        f.importance_weighting,
        cache,
    )


def build_stages(exp: Experiment) -> list[Stage]:
    """The stages of Algorithm 1 for ``exp`` (policy stages only for trainable routers)."""
    cfg, t = exp.config, exp.config.training
    seed, ignore = cfg.run.seed, exp.data.ignore_index
    specialists = {i: model_training_data(exp, i) for i, m in enumerate(cfg.zoo.models) if m.train_on is not None}
    stages: list[Stage] = [
        LargeModelPretraining(
            exp.pipeline,
            exp.parts["pt"],
            _settings(t.pretrain_large),
            seed,
            ignore,
            t.pretrain_large.augment,
            {i: d for i, d in specialists.items() if i > 0},
        ),
        BaseModelPretraining(
            exp.pipeline,
            specialists.get(0, exp.parts["pt"]),
            _settings(t.pretrain_base),
            seed + 1,
            t.pretrain_base.beta,
            ignore,
            t.pretrain_base.augment,
        ),
    ]
    if isinstance(exp.router, CascadeRouter):
        c = t.cascade
        stages.append(
            CascadeFitting(
                exp.pipeline,
                exp.router,
                exp.accuracy,
                exp.data.val if c.split == "val" else exp.parts["rl"],
                exp.data.num_classes,
                _settings(c),
                seed + 2,
                c.lam,
                c.method,
                c.iou_target,
                c.grid_steps,
                c.alpha,
                c.policy_epochs,
                c.loss,
                ignore,
            )
        )
    elif exp.router.is_trainable:
        if not isinstance(exp.router, PaSeRRouter):
            raise ConfigError(
                f"router {cfg.router.name!r} is trainable but routerkit only knows how to train PaSeR-style policies."
            )
        f = t.finetune
        stages.append(policy_stage(exp, exp.router, exp.reward, seed + 2))
        if f.tvd_threshold is not None:
            stages.append(tvd_stage(exp, exp.router, f.tvd_threshold, seed + 3))
            return stages
        stages.append(
            JointFineTuning(
                exp.pipeline,
                exp.router,
                exp.reward,
                exp.accuracy,
                exp.parts["ft"],
                _settings(f),
                seed + 3,
                f.alpha_start,
                f.alpha_end,
                f.baseline,
                f.credit,
                f.entropy_coef,
                f.large_lr,
                f.large_on,
                ignore,
                f.freeze_bn,
                f.importance_weighting,
            )
        )
    return stages


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/name``, with a numeric suffix if that folder already holds a run."""
    base = Path(cfg.run.output_dir) / cfg.run.name
    path, i = base, 1
    while (path / "config.yaml").exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _model_state(exp: Experiment) -> dict[str, Any]:
    return {"zoo": exp.zoo.state_dict(), "router": exp.router.state_dict()}


def _load_model_state(exp: Experiment, state: dict[str, Any]) -> None:
    exp.zoo.load_state_dict(state["zoo"])
    exp.router.load_state_dict(state["router"])


def train(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    run_dir: str | Path | None = None,
    plugin_dirs: list[str] | None = None,
) -> tuple[Path, list[EvalResult]]:
    """Train every stage, checkpointing after each epoch, then evaluate.

    Args:
        cfg: The experiment.
        resume: A run directory to continue from its latest checkpoint (its saved config is used).
        console: Where to print (default: a new rich console).
        run_dir: Explicit run directory for a new run.
        plugin_dirs: Folders holding the config's plugin packages (recorded for resume/evaluate).

    Returns:
        The run directory and the evaluation results.
    """
    console = console or Console()
    if resume is not None:
        path = Path(resume)
        if not (path / "config.yaml").exists():
            raise ConfigError(f"--resume {path}: not a run directory (no config.yaml).")
        _add_saved_plugin_dirs(path)
        cfg = parse_config(yaml.safe_load((path / "config.yaml").read_text()), str(path / "config.yaml"))
    else:
        path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / "config.yaml", dump_config(cfg).encode())
        atomic_write_json(path / "run.json", {"plugin_dirs": list(plugin_dirs or []), "routerkit_version": _version()})
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    console.print(
        f"[bold]routerkit[/bold] run [cyan]{path}[/cyan]: {len(exp.data.train)} train "
        f"(D_PT {len(exp.parts['pt'])} / D_RL {len(exp.parts['rl'])} / D_FT {len(exp.parts['ft'])}), "
        f"{len(exp.data.val)} val, {len(exp.data.test)} test; zoo "
        + ", ".join(f"{n} ({p:,} params)" for n, p in zip(exp.zoo.names, exp.zoo.num_parameters(), strict=True))
    )
    stages = build_stages(exp)
    done_stage, done_epoch = -1, -1
    if resume is not None and read_latest(path) is not None:
        state, meta = load_checkpoint(path)
        _load_model_state(exp, state["model"])
        done_stage, done_epoch = int(meta["stage_index"]), int(meta["epoch"])
        if meta.get("stage_complete"):
            done_stage, done_epoch = done_stage + 1, -1
        elif 0 <= done_stage < len(stages):
            stages[done_stage].load_state_dict(state["stage"])
        if "rng" in state:  # dropout and MC-dropout draws continue where the interrupted run was
            set_global_rng_state(state["rng"])
        console.print(f"Resuming from checkpoint {read_latest(path)!r} (stage {meta['stage']}, epoch {meta['epoch']}).")
    else:
        done_stage = 0
    log_path = path / "metrics" / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        for index, stage in enumerate(stages):
            epochs = stage.settings.epochs
            task = progress.add_task(f"{index + 1}/{len(stages)} {stage.name}", total=max(epochs, 1), info="")
            if index < done_stage:
                progress.update(task, completed=max(epochs, 1), info="(done before resume)")
                continue
            first = done_epoch + 1 if index == done_stage else 0
            progress.update(task, completed=first)
            for epoch in range(first, epochs):
                logs = stage.train_epoch(epoch)
                with log_path.open("a") as fh:
                    fh.write(json.dumps({"stage": stage.name, "epoch": epoch, **logs}) + "\n")
                complete = epoch == epochs - 1
                if not complete and (epoch + 1) % cfg.run.checkpoint_every:
                    progress.update(
                        task, advance=1, info="  ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in list(logs.items())[:3])
                    )
                    continue
                save_checkpoint(
                    path,
                    f"{index}-{stage.name}-e{epoch:04d}",
                    {"model": _model_state(exp), "stage": stage.state_dict(), "rng": global_rng_state()},
                    {"stage": stage.name, "stage_index": index, "epoch": epoch, "stage_complete": complete},
                )
                info = "  ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in list(logs.items())[:3])
                progress.update(task, advance=1, info=info)
            if epochs == 0:
                progress.update(task, completed=1, info="(0 epochs)")
                save_checkpoint(
                    path,
                    f"{index}-{stage.name}-skipped",
                    {"model": _model_state(exp), "stage": stage.state_dict(), "rng": global_rng_state()},
                    {"stage": stage.name, "stage_index": index, "epoch": -1, "stage_complete": True},
                )
    save_checkpoint(
        path,
        "final",
        {"model": _model_state(exp)},
        {"stage": "final", "stage_index": len(stages), "epoch": -1, "stage_complete": True},
    )
    train_seconds = time.perf_counter() - t0
    results = evaluate_experiment(exp, path, console)
    if cfg.evaluation.compare:
        from routerkit.compare import compare_strategies, print_report, write_report

        report = compare_strategies(exp, cfg.compare, console, run_dir=path)
        written = write_report(report, path / "compare")
        print_report(report, console)
        console.print("Comparison written: " + ", ".join(str(p) for p in written))
    atomic_write_json(
        path / "metrics" / "timing.json", {"train_and_eval_seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
    )
    return path, results


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
    write_results(run_dir, cfg.evaluation.split, results, exp.zoo.names)
    if split.images.dim() == 4 and split.targets.dim() == 3 and split.images.shape[1] in (1, 3):
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
        ["strategy", "mean_iou", "accuracy", "gflops_per_input", "iou_per_gflop", *[f"usage_{n}" for n in model_names]]
    )
    for r in results:
        writer.writerow(
            [
                r.name,
                f"{r.mean_iou:.6f}",
                f"{r.accuracy:.6f}",
                f"{r.gflops:.6f}",
                f"{r.iou_per_gflop:.6f}",
                *[f"{u:.4f}" for u in r.usage],
            ]
        )
    atomic_write_bytes(folder / f"{split}.csv", buf.getvalue().encode())


def results_table(results: list[EvalResult], model_names: list[str], split: str) -> Table:
    """A rich table of the results (GFLOPs per input, fvcore convention)."""
    table = Table(title=f"{split} split — GFLOPs per input, counting every pass that ran ({FLOP_CONVENTION})")
    table.add_column("strategy")
    table.add_column("mean IoU", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("GFLOPs", justify="right")
    table.add_column("IoU/GigaFlop", justify="right")
    for name in model_names:
        table.add_column(f"% {name}", justify="right")
    for r in results:
        table.add_row(
            r.name,
            f"{r.mean_iou:.4f}",
            f"{r.accuracy:.4f}",
            f"{r.gflops:.4f}",
            f"{r.iou_per_gflop:.2f}",
            *[f"{100 * u:.1f}" for u in r.usage],
        )
    return table


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routerkit")
    except PackageNotFoundError:
        return "unknown"


def _add_saved_plugin_dirs(run_dir: Path) -> None:
    from routerkit.config.build import add_plugin_path

    info = Path(run_dir) / "run.json"
    if info.exists():
        for folder in json.loads(info.read_text()).get("plugin_dirs", []):
            add_plugin_path(folder)


def load_run(run_dir: str | Path, checkpoint: str | None = None) -> Experiment:
    """Rebuild a run's experiment from its saved config and load its weights.

    Args:
        run_dir: The run directory.
        checkpoint: Checkpoint name (e.g. ``"calibrated"``); default: ``final``, else the latest.
    """
    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise ConfigError(f"{path} is not a run directory (no config.yaml).")
    _add_saved_plugin_dirs(path)
    cfg = parse_config(yaml.safe_load((path / "config.yaml").read_text()), str(path / "config.yaml"))
    exp = build_experiment(cfg)
    name = checkpoint or ("final" if (path / "checkpoints" / "final.json").exists() else None)
    if checkpoint is not None and not (path / "checkpoints" / f"{checkpoint}.json").exists():
        raise ConfigError(f"{path} has no checkpoint {checkpoint!r}.")
    state, _ = load_checkpoint(path, name)
    _load_model_state(exp, state["model"])
    return exp
