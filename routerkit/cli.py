"""The ``routerkit`` command line: train, evaluate, compare, calibrate, robustness, predict, export, serve, validate, list."""

from __future__ import annotations

import os
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


def _make_console() -> Console:
    """The CLI's console. Output that is not a terminal (a log file, a pipe) gets 150 columns, so the
    result tables are not truncated; ``COLUMNS`` still wins where it is set."""
    probe = Console()
    return probe if probe.is_terminal or "COLUMNS" in os.environ else Console(width=150)


console = _make_console()

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file, e.g. examples/battery.yaml.", show_default=False)]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Import the plugin code a run directory names (dotted paths in its config.yaml, run.json plugin_dirs) even "
        "when the run was not created here by `routerkit train` or was changed since. Only for runs you trust: that code runs.",
    ),
]
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
    trust_remote_code: TrustOpt = False,
    overwrite: Annotated[
        bool, typer.Option(help="Start again in a --run-dir that already holds a run (deletes its checkpoints and metrics).")
    ] = False,
    nproc: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes to train in on this machine (torch.distributed: DDP, each global batch split across them; "
            "gloo on the CPU, one GPU each with nccl). 1: this process.",
        ),
    ] = 1,
) -> None:
    """Train every stage of the experiment (PaSeR's Algorithm 1), then print the test table.

    Writes a run directory with the resolved config, atomic safetensors checkpoints after every
    epoch, a training log and metrics/<split>.json|csv. The run directory is locked while it trains.
    With --nproc N (or under `torchrun --nproc-per-node N -m routerkit train ...`) every stage runs
    in N processes; rank 0 writes the run.
    """
    from routerkit.config import ConfigError
    from routerkit.training.runner import train as run_train

    if resume is not None:
        extra = {"CONFIG": config is not None, "-s/--set": bool(overrides), "--run-dir": run_dir is not None}
        given = [name for name, present in {**extra, "--overwrite": overwrite}.items() if present]
        if given:
            _fail(
                f"--resume continues {resume} with the config saved in it; {', '.join(given)} would be ignored. "
                "Drop them to resume, or start a new run from the config without --resume."
            )
        cfg = None  # the run's saved config is used
    elif config is None:
        _fail("give a CONFIG file to train, or --resume RUN_DIR to continue a run.")
        return
    else:
        cfg = _load(config, overrides)  # with --nproc: a bad config fails here, once, not in every rank
    if nproc > 1:  # the same command in nproc processes, under torchrun
        if resume is not None and not (resume / "config.yaml").exists():
            _fail(f"--resume {resume}: not a run directory (no config.yaml).")
        argv = ["train"] + ([str(config)] if config is not None else [])
        argv += [a for item in overrides or [] for a in ("-s", item)]
        argv += ["--resume", str(resume)] if resume is not None else []
        argv += ["--run-dir", str(run_dir)] if run_dir is not None else []
        argv += ["--trust-remote-code"] * trust_remote_code + ["--overwrite"] * overwrite
        _launch_distributed(nproc, argv)
        return
    plugin_dirs = [str(config.parent.resolve())] if config is not None else []
    try:
        path, _ = run_train(
            cfg,  # type: ignore[arg-type]
            resume=resume,
            console=console,
            run_dir=run_dir,
            plugin_dirs=plugin_dirs,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
        )
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
        return
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        console.print(f"Run directory: [cyan]{path}[/cyan]  (re-evaluate with: routerkit evaluate {path})")


def _launch_distributed(nproc: int, argv: list[str]) -> None:
    """Run ``routerkit <argv>`` under torchrun in ``nproc`` processes on this machine; exit with its status."""
    import subprocess

    from routerkit.training.distributed import launch_command

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _fail("--nproc under torchrun: torchrun already started the processes; drop --nproc.")
    command = launch_command(nproc, argv)
    console.print(f"torchrun: {nproc} processes", soft_wrap=True)
    raise typer.Exit(subprocess.call(command))


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    split: Annotated[str | None, typer.Option(help="'val' or 'test' (default: the config's evaluation.split).")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name, e.g. 'calibrated' (default: the final one).")] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Re-compute the results table of a saved run from its config and final checkpoint."""
    from routerkit.training.runner import evaluate_experiment

    exp = _load_run_or_fail(run_dir, checkpoint, trust_remote_code)
    if split is not None:
        if split not in ("val", "test"):
            _fail(f"--split must be 'val' or 'test', got {split!r}.")
        exp.config.evaluation.split = split  # type: ignore[assignment]
    evaluate_experiment(exp, run_dir, console)


def _load_run_or_fail(run_dir: Path, checkpoint: str | None = None, trust_remote_code: bool = False) -> Any:
    from routerkit.config import ConfigError
    from routerkit.training.runner import load_run

    try:
        return load_run(run_dir, checkpoint, trust_remote_code=trust_remote_code)
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))


def _apply_compare_overrides(exp: Any, overrides: list[str] | None) -> None:
    """Apply ``compare.*`` / ``reward.lam``-free overrides to a loaded run's config."""
    from routerkit.config import ConfigError, apply_overrides, config_to_dict, parse_config

    if not overrides:
        return
    bad = [o for o in overrides if not o.startswith("compare.")]
    if bad:
        _fail(f"on a saved run only compare.* settings can be overridden, got: {', '.join(bad)}")
    try:
        raw = apply_overrides(config_to_dict(exp.config), overrides)
        exp.config = parse_config(raw, "overrides")
    except ConfigError as err:
        _fail(str(err))


@app.command()
def compare(
    config_or_run: Annotated[
        Path, typer.Argument(help="A run directory, or an experiment YAML to train first.", show_default=False)
    ],
    overrides: OverridesOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/compare).")] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Compare every strategy on the same trained zoo: PaSeR, IDK cascade, optimal stopping, baselines, oracle.

    Prints and writes (markdown, CSV, JSON) Table 1 (IoU, GFLOPs, IoU/GigaFlop), Table 2 (IDK in
    IoU-match mode against PaSeR), the assignment matrices against the oracle and pareto.png.
    """
    from routerkit.compare import compare_strategies, print_report, write_report
    from routerkit.config import ConfigError
    from routerkit.training.runner import train as run_train

    if (config_or_run / "config.yaml").exists():
        run_dir = config_or_run
        exp = _load_run_or_fail(run_dir, trust_remote_code=trust_remote_code)
        _apply_compare_overrides(exp, overrides)
    elif config_or_run.is_file():
        cfg = _load(config_or_run, overrides)
        cfg.evaluation.compare = False  # compared below
        try:
            run_dir, _ = run_train(cfg, console=console, plugin_dirs=[str(config_or_run.parent.resolve())])
        except (ConfigError, FileNotFoundError) as err:
            _fail(str(err))
        exp = _load_run_or_fail(run_dir, trust_remote_code=True)  # trained just now from the user's own config
    else:
        _fail(f"{config_or_run} is neither a run directory (with config.yaml) nor a config file.")
    try:
        report = compare_strategies(exp, exp.config.compare, console, run_dir=run_dir)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    folder = out or Path(run_dir) / "compare"
    written = write_report(report, folder)
    print_report(report, console)
    console.print(f"Wrote {len(written)} files to [cyan]{folder}[/cyan] (table1.md, table2.md, assignment.md, pareto.png, ...)")


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    target_gflops: Annotated[float | None, typer.Option(help="Target GFLOPs per input on the validation split.")] = None,
    target_share: Annotated[float | None, typer.Option(help="Target share (0-1) of units sent to models other than f_0.")] = None,
    tolerance: Annotated[float, typer.Option(help="Relative tolerance on the validation split.")] = 0.02,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Adjust the trained router (policy bias / IDK thresholds / stop bias) to hit a compute budget.

    Saves the calibrated router as checkpoint 'calibrated' and calibration.json; evaluate it with
    `routerkit evaluate RUN_DIR --checkpoint calibrated`.
    """
    from routerkit._io import atomic_write_json
    from routerkit.calibrate import calibrate as run_calibrate
    from routerkit.training.checkpoint import save_checkpoint
    from routerkit.training.weights import model_state

    if (target_gflops is None) == (target_share is None):
        _fail("give exactly one of --target-gflops X or --target-share S.")
    exp = _load_run_or_fail(run_dir, trust_remote_code=trust_remote_code)
    metric, target = ("gflops", target_gflops) if target_gflops is not None else ("share", target_share)
    assert target is not None
    try:
        result = run_calibrate(exp, target, metric, tolerance)
    except ValueError as err:
        _fail(str(err))
    save_checkpoint(
        run_dir,
        "calibrated",
        {"model": model_state(exp)},
        {"stage": "calibrated", "calibration": result.to_dict()},
        update_latest=False,
    )
    atomic_write_json(Path(run_dir) / "calibration.json", result.to_dict())
    unit = "GFLOPs per input" if metric == "gflops" else "share of units past f_0"
    status = "[green]within tolerance[/green]" if result.within_tolerance else "[red]NOT within tolerance[/red]"
    console.print(
        f"{result.router}: {result.knob} = {result.value:.4f}. Target {target:.4f} {unit}; "
        f"validation {result.val:.4f} ({status}, {100 * tolerance:.0f}%), test {result.test:.4f}. "
        f"Mean IoU: validation {result.val_mean_iou:.4f}, test {result.test_mean_iou:.4f}. ({result.flop_convention})"
    )


@app.command()
def robustness(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    amount: Annotated[float, typer.Option(help="Share of test pixels hit by salt-and-pepper noise.")] = 0.01,
    epochs: Annotated[int | None, typer.Option(help="Epochs of the noise-aware large models (default: pretrain_large).")] = None,
    init: Annotated[str, typer.Option(help="'scratch' or 'continue' (from the run's large models).")] = "scratch",
    seed: Annotated[int, typer.Option(help="Seed of the noise and the retraining.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/robustness).")] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """PaSeR R3: salt-and-pepper test inputs, large models swapped for clean + noisy variants, f_0 and policy unaware.

    Reports the IoU degradation of PaSeR and of the random policy and the change in the share of
    units sent to the large models; writes robustness.md and robustness.json.
    """
    from routerkit.robustness import noise_robustness, robustness_markdown, write_robustness

    exp = _load_run_or_fail(run_dir, trust_remote_code=trust_remote_code)
    try:
        report = noise_robustness(exp, amount, epochs, init, seed, console)
    except ValueError as err:
        _fail(str(err))
    folder = out or Path(run_dir) / "robustness"
    write_robustness(report, folder)
    console.print(robustness_markdown(report))
    console.print(f"Wrote robustness.md and robustness.json to [cyan]{folder}[/cyan]")


_MAX_LISTED_PREDICTIONS = 50


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files (PNG, TIFF, JPEG; 8 or 16-bit; .npy), folders (their image files) or quoted globs.",
            show_default=False,
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/predictions).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows routed together (large files are tiled).")] = 32,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name, e.g. 'calibrated' (default: the final one).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the files of an earlier predict in the output folder.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Route image files with a trained run; write a mask and a routing overlay PNG per file and predictions.csv.

    Files are read with the run's normalisation; files of another size than the trained inputs
    are tiled into windows (larger) or padded (smaller). Classification runs write only
    predictions.csv (label, class, model). A file that cannot be read is reported and skipped;
    the exit code is then 1.
    """
    from rich.markup import escape
    from rich.table import Table

    from routerkit.config import ConfigError
    from routerkit.deploy import load
    from routerkit.deploy.writers import GFLOPS_COLUMN, collect_inputs, predict_files

    try:
        paths = collect_inputs(inputs)
    except ValueError as err:
        _fail(str(err))
    try:
        model = load(run_dir, checkpoint, trust_remote_code=trust_remote_code)
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    folder = out if out is not None else Path(run_dir) / "predictions"
    try:
        report = predict_files(model, paths, folder, batch_size=batch_size, overwrite=overwrite, console=console)
    except (ValueError, OSError) as err:  # FileExistsError: an earlier predict's files
        _fail(str(err))
    for path, stem in report.renamed:
        console.print(
            f"[yellow]note:[/yellow] another input has the stem {escape(path.stem)!r}: "
            f"{escape(str(path))} is written as {escape(stem)}_mask.png / {escape(stem)}_routing.png."
        )
    spatial = report.task == "segmentation"
    table = Table(
        title=f"{len(report.rows)} file(s) predicted",
        caption="GFLOPs: every pass that ran, per file (fvcore convention: one multiply-add = one flop)",
    )
    table.add_column("file", overflow="fold")
    columns = ["size", "windows", *(f"% {name}" for name in report.model_names)] if spatial else ["class", "model"]
    for column in [*columns, "GFLOPs"]:
        table.add_column(column, justify="right")
    for row in report.rows[:_MAX_LISTED_PREDICTIONS]:
        if spatial:
            cells = [f"{row['height']} x {row['width']}", str(row["windows"])]
            cells += [f"{100 * row[f'share_{name}']:.1f}" for name in report.model_names]
        else:
            cells = [f"{row['label']} {row['class']}", row["model"]]
        table.add_row(escape(row["file"]), *cells, f"{row[GFLOPS_COLUMN]:.4g}")
    if report.rows:
        console.print(table)
    if len(report.rows) > _MAX_LISTED_PREDICTIONS:
        console.print(f"... and {len(report.rows) - _MAX_LISTED_PREDICTIONS} more in predictions.csv.")
    if spatial and report.rows:
        counts: dict[int, int] = {}
        for row in report.rows:
            counts[row["windows"]] = counts.get(row["windows"], 0) + 1
        tiled = ", ".join(f"{n} file(s) {w} window(s)" for w, n in sorted(counts.items()))
        console.print(f"Windows of the trained size {list(model.spec.input_shape[1:])}: {tiled}.")
    if report.csv is not None:
        written = f"{len(report.rows)} mask(s), {len(report.rows)} routing overlay(s) and " if spatial else ""
        console.print(f"Wrote {written}{report.csv.name} to [cyan]{escape(str(report.out_dir))}[/cyan]")
    if report.failed:
        lines = [msg if str(path) in msg else f"{path}: {msg}" for path, msg in report.failed]
        listed = "\n".join(f"  {escape(line)}" for line in lines)
        console.print(
            f"[bold red]error:[/bold red] {len(report.failed)} of {len(report.failed) + len(report.rows)} file(s) "
            f"could not be predicted and were skipped:\n{listed}",
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


def _export_weights(run_dir: Path, out: Path | None, checkpoint: str | None, trust: bool, overwrite: bool) -> None:
    """``routerkit export --format safetensors``: the zoo's weights and ``zoo.json``, with a table."""
    from rich.markup import escape
    from rich.table import Table

    from routerkit.config import ConfigError
    from routerkit.deploy.weights import export_weights

    try:
        result = export_weights(run_dir, out, checkpoint, trust, overwrite)
    except (ConfigError, FileExistsError, ImportError) as err:
        _fail(str(err))
    table = Table(title="Zoo weights (safetensors)")
    for column in ("file", "model", "parameters", "val accuracy", "test accuracy", "sha256"):
        table.add_column(column, justify="right" if column in ("parameters", "val accuracy", "test accuracy") else "left")
    for entry in result.index["models"]:
        accuracy = [f"{entry[s]['accuracy']:.4f}" if s in entry and "accuracy" in entry[s] else "-" for s in ("val", "test")]
        table.add_row(entry["file"], escape(entry["model"]), f"{entry['num_parameters']:,}", *accuracy, entry["sha256"][:12])
    console.print(table)
    console.print(
        f"Wrote {len(result.files)} files to [cyan]{escape(str(result.out_dir))}[/cyan]; load them in a config with "
        "zoo.models[].weights: <file> and train: false"
    )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="'onnx' (the routed bundle for edge runtimes) or 'safetensors' (each zoo model's weights and zoo.json, "
            "for zoo.models[].weights in another config).",
        ),
    ] = "onnx",
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN_DIR/export/<format>).")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name, e.g. 'calibrated' (default: the final one).")] = None,
    mask_seed: Annotated[int, typer.Option(help="Seed of the MC-dropout masks baked into the edge graph.")] = 0,
    opset: Annotated[int, typer.Option(help="ONNX opset of the graphs.")] = 18,
    exporter: Annotated[
        str,
        typer.Option(
            help="'auto' (TorchScript, dynamo for a graph it cannot export), 'torchscript' (torch.onnx.export dynamo=False; "
            "fast) or 'dynamo' (torch.export; needs onnxscript)."
        ),
    ] = "auto",
    atol: Annotated[float, typer.Option(help="Largest onnxruntime-vs-PyTorch difference allowed on the check batch.")] = 1e-4,
    overwrite: Annotated[bool, typer.Option(help="safetensors: replace files already in --out.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Export a run for edge runtimes: the edge graph (f_0 with its MC-dropout state and the router: input -> per-unit
    actions and f_0's probabilities), one ONNX file per costlier model and manifest.json.

    MC-dropout masks are drawn once from --mask-seed and baked in; routerkit.load(run, mask_seed=...) runs the same
    state in PyTorch. Run a bundle with routerkit.deploy.OnnxPipeline (onnxruntime: routerkit's 'deploy' extra). Exportable
    routers: paser, single, idk, optimal_stopping (random draws from torch's generator, the oracle needs labels).

    --format safetensors writes each zoo model's weights instead (<name>.safetensors and zoo.json), for
    zoo.models[].weights and train: false in another config.
    """
    from rich.markup import escape
    from rich.table import Table

    from routerkit.config import ConfigError
    from routerkit.deploy.export import EXPORTERS, ExportError, export_onnx

    if format == "safetensors":
        _export_weights(run_dir, out, checkpoint, trust_remote_code, overwrite)
        return
    if format != "onnx":
        _fail(f"--format must be 'onnx' or 'safetensors', got {format!r}.")
    if exporter not in EXPORTERS:
        _fail(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}.")
    try:
        result = export_onnx(run_dir, out, checkpoint, mask_seed, opset, exporter, trust_remote_code, atol)
    except (ConfigError, ExportError, ImportError, FileNotFoundError) as err:
        _fail(str(err))
    m = result.manifest
    table = Table(title=f"ONNX bundle (opset {m['onnx_opset']}, {m['exporter']})")
    for column in ("file", "graph", "KiB", "max |onnxruntime - PyTorch|"):
        table.add_column(column, justify="right" if column == "KiB" else "left")

    def worst(diffs: dict[str, float]) -> str:
        values = [v for k, v in diffs.items() if not k.endswith("mismatches") and not k.endswith("pipeline")]
        mismatched = sum(int(v) for k, v in diffs.items() if k.endswith("mismatches") and "pipeline" not in k)
        return f"{max(values):.2g}" + (f" ({mismatched} decisions differ)" if mismatched else "")

    edge = m["edge"]
    graph = f"{m['models'][0]['name']} state + {m['router']['name']} -> actions [B, {m['partitioner']['num_units']}]"
    size = (result.out_dir / edge["file"]).stat().st_size / 1024
    table.add_row(edge["file"], escape(graph), f"{size:.0f}", worst(edge["max_abs_diff"]))
    for entry in m["models"][1:]:
        what = f"{entry['name']} on units {entry['inputs']['units'][1:]}" + (" + stop" if "stop" in entry["outputs"] else "")
        size = (result.out_dir / entry["file"]).stat().st_size / 1024
        table.add_row(entry["file"], escape(what), f"{size:.0f}", worst(entry["max_abs_diff"]))
    console.print(table)
    state = m["state"]
    if state["masks"] == "fixed":
        trunk = "shared trunk, " if state["shared_trunk"] else ""
        console.print(
            f"State: {state['num_passes']} MC-dropout passes ({trunk}masks fixed with seed {state['mask_seed']}; "
            f"PyTorch equivalent: routerkit.load(run, mask_seed={state['mask_seed']}))."
        )
    console.print(f"Wrote {len(result.files)} files to [cyan]{escape(str(result.out_dir))}[/cyan] (manifest.json, *.onnx)")


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `routerkit train`.", show_default=False)],
    backend: Annotated[
        str | None, typer.Option(help="'local' (one process: FastAPI + uvicorn) or 'ray' (Ray Serve; the 'ray' extra).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="A YAML file with a 'serve:' section (settings over the run's own serve: section; flags win)."
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (0.0.0.0: every interface). [default: 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="TCP port. [default: 8000]")] = None,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="Most concurrent inputs routed together in one model call. [default: 32]")
    ] = None,
    max_wait_ms: Annotated[
        float | None,
        typer.Option(min=0.0, help="Longest wait for more inputs after the first of a batch (milliseconds). [default: 10]"),
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option(min=1, help="Largest request body in bytes (larger: 413). [default: 20000000]")
    ] = None,
    max_pixels: Annotated[
        int | None, typer.Option(min=1, help="Largest input in pixels, H x W (larger: 413). [default: 16777216]")
    ] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Checkpoint name, e.g. 'calibrated' (default: the final one).")] = None,
    mask_seed: Annotated[
        int | None, typer.Option(help="Seed of f_0's fixed MC-dropout masks (answers independent of batching). [default: 0]")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch CPU threads (default: torch's; 1 is best on a busy small machine).")
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a serve setting, e.g. -s ray.models.f2_large.num_replicas=2 (repeatable)."),
    ] = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Serve a trained run over HTTP: in one process (FastAPI + uvicorn; routerkit's 'serve' extra), or with
    --backend ray as a Ray Serve application whose costlier models are deployments of their own (the 'ray' extra).

    POST /v1/predict routes one input (a raw image body, a multipart 'file' field, or JSON {"input": nested array} in
    model space); concurrent requests are batched (--max-batch, --max-wait-ms). GET /v1/info describes the run, GET
    /healthz and GET /metrics (Prometheus) watch the server, GET / is a page to drop images on. f_0's MC-dropout
    masks are fixed (--mask-seed) so that an answer does not depend on the batch it was routed in. Settings: the run's
    serve: section, then --config's, then -s and the flags.
    """
    from rich.markup import escape

    from routerkit.config import ConfigError, load_serve_config, merge_serve_config
    from routerkit.config.schema import ServeConfig
    from routerkit.deploy import load
    from routerkit.training.run_dir import trusted_run_config

    flags = {
        "backend": backend,
        "host": host,
        "port": port,
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "max_bytes": max_bytes,
        "max_pixels": max_pixels,
        "mask_seed": mask_seed,
        "threads": threads,
    }
    try:
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"{run_dir} is not a run directory (no config.yaml).")
        cfg: ServeConfig = trusted_run_config(run_dir, trust_remote_code).serve
        if config is not None:
            cfg = load_serve_config(config, cfg)
        cfg = merge_serve_config(cfg, {}, "--set", setting or [])
        given = {k: v for k, v in flags.items() if v is not None}
        cfg = merge_serve_config(cfg, given, "the command line")  # the flags win over -s
    except ConfigError as err:
        _fail(str(err))
    if cfg.backend == "ray":
        _serve_ray(run_dir, cfg, checkpoint, trust_remote_code)
        return
    try:
        from routerkit.serve import ServeSettings, create_app, run_server
    except ImportError as err:
        _fail(str(err))
    settings = ServeSettings(cfg.max_batch, cfg.max_wait_ms, cfg.max_bytes, cfg.max_pixels, cfg.max_queue)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    try:
        model = load(run_dir, checkpoint, trust_remote_code=trust_remote_code, mask_seed=cfg.mask_seed)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    source = {"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint}
    api = create_app(model, settings, source)
    url = f"http://{cfg.host}:{cfg.port}"
    console.print(
        f"Serving [cyan]{escape(str(run_dir))}[/cyan] ({', '.join(model.model_names)}) on {url}: page {url}/, "
        f"API {url}/v1/predict, {url}/v1/info, {url}/healthz, {url}/metrics. Batches of up to {cfg.max_batch} inputs "
        f"within {cfg.max_wait_ms:g} ms; MC-dropout masks fixed with seed {cfg.mask_seed}. Ctrl-C stops."
    )
    try:
        run_server(api, cfg.host, cfg.port)
    except ImportError as err:
        _fail(str(err))


def _serve_ray(run_dir: Path, cfg: Any, checkpoint: str | None, trust: bool) -> None:
    """``routerkit serve --backend ray``: deploy on a Ray cluster and serve until Ctrl-C."""
    from rich.markup import escape

    from routerkit.config import ConfigError

    try:
        from routerkit.serve.ray_backend import model_settings, start_ray_server
    except ImportError as err:
        _fail(str(err))
    where = cfg.ray.address or f"a local Ray cluster ({cfg.ray.num_cpus or 'all'} CPUs)"
    url = f"http://{cfg.host}:{cfg.port}"
    console.print(
        f"Deploying [cyan]{escape(str(run_dir))}[/cyan] on {escape(str(where))} as Ray Serve app {cfg.ray.app_name!r} ..."
    )
    try:
        start_ray_server(
            run_dir,
            cfg,
            checkpoint,
            trust,
            blocking=True,
            on_ready=lambda names: console.print(
                f"Serving on {url} (page {url}/, API {url}/v1/predict): ingress ({names[0]} + router, "
                f"{_replicas(cfg.ray.ingress)}), "
                + ", ".join(f"{n} ({_replicas(model_settings(cfg, n))})" for n in names[1:])
                + ". Ctrl-C stops."
            ),
        )
    except ConfigError as err:
        _fail(str(err))
    except (ValueError, RuntimeError, ConnectionError) as err:  # Ray's own: a cluster not reached, a deployment that failed
        _fail(f"Ray Serve could not serve {run_dir}: {type(err).__name__}: {err}")


def _replicas(settings: Any) -> str:
    a = settings.autoscaling
    count = f"{a.min_replicas}-{a.max_replicas} replicas, autoscaled" if a is not None else f"{settings.num_replicas} replica(s)"
    return f"{count}, {settings.num_cpus:g} CPU / {settings.num_gpus:g} GPU each"


@app.command()
def validate(config: ConfigArg, overrides: OverridesOpt = None) -> None:
    """Check a config file without training or loading data: schema, cross-field rules, registered names and
    dotted paths (imported, not called), component params against their signatures, task models built on the
    meta device, and the device."""
    from routerkit.config.checks import config_problems

    cfg = _load(config, overrides)
    problems = config_problems(cfg)
    if problems:
        _fail("\n".join(problems))
    console.print(
        f"[green]OK[/green] {config}: {len(cfg.zoo.models)} task models, router {cfg.router.name!r}, lambda {cfg.reward.lam}."
    )


@app.command("list")
def list_components(
    kind: Annotated[
        str | None, typer.Argument(help="routers, models, estimators, costs, rewards, accuracy, partitioners, data.")
    ] = None,
) -> None:
    """List registered component names (what a config's `name:` fields accept)."""
    from routerkit.costs import COSTS
    from routerkit.data import DATASETS
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
        "data": DATASETS,
    }
    if kind is not None and kind not in registries:
        _fail(f"unknown kind {kind!r}; choose from {', '.join(registries)}.")
    reg: Any
    for name, reg in registries.items():
        if kind in (None, name):
            console.print(f"[bold]{name}[/bold]: {', '.join(reg.names())}")


if __name__ == "__main__":  # pragma: no cover
    app()
