"""The ``routerkit`` command line: train, evaluate, validate, list."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from routerkit.config import ExperimentConfig

app = typer.Typer(
    name="routerkit",
    help="Route every input (or patch) to the right model of a zoo. Train PaSeR pipelines, evaluate runs, check configs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file, e.g. examples/battery.yaml.", show_default=False)]
OverridesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config value: section.key=value (repeatable), e.g. -s training.policy.epochs=5."
    ),
]


def _fail(message: str) -> NoReturn:
    from rich.markup import escape

    console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    from routerkit.config import ConfigError, load_config
    from routerkit.config.build import add_plugin_path

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    add_plugin_path(config.parent)
    return cfg


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML file, e.g. examples/battery.yaml.", show_default=False)
    ] = None,
    overrides: OverridesOpt = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint (uses its saved config).")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: run.output_dir/run.name, suffixed if taken).")
    ] = None,
) -> None:
    """Train every stage of the experiment (PaSeR's Algorithm 1), then print the test table.

    Writes a run directory with the resolved config, atomic safetensors checkpoints after every
    epoch, a training log and metrics/<split>.json|csv.
    """
    from routerkit.config import ConfigError
    from routerkit.training.runner import train as run_train

    if resume is not None:
        cfg = None  # the run's saved config is used
    elif config is None:
        _fail("give a CONFIG file to train, or --resume RUN_DIR to continue a run.")
        return
    else:
        cfg = _load(config, overrides)
    plugin_dirs = [str(config.parent.resolve())] if config is not None else []
    try:
        path, _ = run_train(cfg, resume=resume, console=console, run_dir=run_dir, plugin_dirs=plugin_dirs)  # type: ignore[arg-type]
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
        return
    console.print(f"Run directory: [cyan]{path}[/cyan]  (re-evaluate with: routerkit evaluate {path})")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    split: Annotated[str | None, typer.Option(help="'val' or 'test' (default: the config's evaluation.split).")] = None,
) -> None:
    """Re-compute the results table of a saved run from its config and final checkpoint."""
    from routerkit.config import ConfigError
    from routerkit.training.runner import evaluate_experiment, load_run

    try:
        exp = load_run(run_dir)
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
        return
    if split is not None:
        if split not in ("val", "test"):
            _fail(f"--split must be 'val' or 'test', got {split!r}.")
        exp.config.evaluation.split = split  # type: ignore[assignment]
    evaluate_experiment(exp, run_dir, console)


@app.command()
def validate(config: ConfigArg, overrides: OverridesOpt = None) -> None:
    """Check a config file (schema, cross-field rules, registered names) without building anything."""
    from routerkit.costs import COSTS
    from routerkit.models import MODELS
    from routerkit.partitioners import PARTITIONERS
    from routerkit.rewards import ACCURACY_TERMS, REWARDS
    from routerkit.routers import ROUTERS
    from routerkit.uncertainty import ESTIMATORS

    cfg = _load(config, overrides)
    problems = []
    checks = [
        ("partitioner.name", PARTITIONERS, cfg.partitioner.name),
        ("uncertainty.name", ESTIMATORS, cfg.uncertainty.name),
        ("cost.name", COSTS, cfg.cost.name),
        ("reward.name", REWARDS, cfg.reward.name),
        ("reward.accuracy", ACCURACY_TERMS, cfg.reward.accuracy),
        ("router.name", ROUTERS, cfg.router.name),
    ] + [(f"zoo.models.{i}.model", MODELS, m.model) for i, m in enumerate(cfg.zoo.models)]
    registry: Any
    for field, registry, name in checks:
        if name not in registry and ":" not in name:
            try:
                registry.get(name)
            except KeyError as err:
                problems.append(f"{field}: {err}")
    if problems:
        _fail("\n".join(problems))
    console.print(
        f"[green]OK[/green] {config}: {len(cfg.zoo.models)} task models, router {cfg.router.name!r}, lambda {cfg.reward.lam}."
    )


@app.command("list")
def list_components(
    kind: Annotated[
        str | None, typer.Argument(help="routers, models, estimators, costs, rewards, accuracy, partitioners.")
    ] = None,
) -> None:
    """List registered component names (what a config's `name:` fields accept)."""
    from routerkit.costs import COSTS
    from routerkit.models import MODELS
    from routerkit.partitioners import PARTITIONERS
    from routerkit.rewards import ACCURACY_TERMS, REWARDS
    from routerkit.routers import ROUTERS
    from routerkit.uncertainty import ESTIMATORS

    registries = {
        "routers": ROUTERS,
        "models": MODELS,
        "estimators": ESTIMATORS,
        "costs": COSTS,
        "rewards": REWARDS,
        "accuracy": ACCURACY_TERMS,
        "partitioners": PARTITIONERS,
    }
    if kind is not None and kind not in registries:
        _fail(f"unknown kind {kind!r}; choose from {', '.join(registries)}.")
    reg: Any
    for name, reg in registries.items():
        if kind in (None, name):
            console.print(f"[bold]{name}[/bold]: {', '.join(reg.names())}")


if __name__ == "__main__":  # pragma: no cover
    app()
