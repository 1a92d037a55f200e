"""Run a whole experiment: build the stages, train them with resume, then evaluate (and compare).

`train` is the entry point of ``routerkit train``. The pieces live by job: the stages come from
the config (`routerkit.training.recipe`), the loop and its callbacks (`routerkit.training.loop`),
the run directory (`routerkit.training.run_dir`), what a checkpoint holds of the models
(`routerkit.training.weights`) and the evaluation table (`routerkit.training.evaluation`).
`evaluate_experiment`, `load_run` and `new_run_dir` are importable from here as well.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from routerkit._io import atomic_write_json
from routerkit.config import ConfigError, ExperimentConfig
from routerkit.config.build import Experiment, build_experiment
from routerkit.metrics import EvalResult
from routerkit.training.base import Stage
from routerkit.training.checkpoint import load_checkpoint, read_latest, save_checkpoint
from routerkit.training.distributed import distributed, setup_distributed, teardown_distributed
from routerkit.training.evaluation import evaluate_experiment as evaluate_experiment  # re-exported: CLI, tests, docs
from routerkit.training.evaluation import results_table as results_table
from routerkit.training.evaluation import write_results as write_results
from routerkit.training.loop import Callback, Checkpoints, ProgressBar, SyncRanks, TrainLog, run_stages
from routerkit.training.recipe import build_stages, frozen_summary
from routerkit.training.recipe import model_training_data as model_training_data  # re-exported: callers of the runner
from routerkit.training.recipe import policy_stage as policy_stage
from routerkit.training.recipe import tvd_stage as tvd_stage
from routerkit.training.run_dir import checkpoint_file, prepare_new_run_dir, truncate_log, trusted_run_config, write_run_files
from routerkit.training.run_dir import load_run as load_run
from routerkit.training.run_dir import new_run_dir as new_run_dir
from routerkit.training.run_lock import RunLock
from routerkit.training.schedules import set_global_rng_state
from routerkit.training.weights import load_model_state, model_state

STAGE_ORDER = ("pretrain_large", "pretrain_base", "policy", "finetune")


def train(
    cfg: ExperimentConfig,
    resume: str | Path | None = None,
    console: Console | None = None,
    run_dir: str | Path | None = None,
    plugin_dirs: list[str] | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> tuple[Path, list[EvalResult]]:
    """Train every stage, checkpointing after each epoch, then evaluate.

    The run directory is locked while it trains (`RunLock`): a second process gets a clear error.
    A new run refuses a folder that already holds one unless ``overwrite``. A cost model that
    measures on this machine (``latency``) is measured once, when the new run is built; its
    numbers go into the run's ``config.yaml`` (``cost.params.seconds``) and are printed.

    Args:
        cfg: The experiment.
        resume: A run directory to continue from its latest checkpoint (its saved config is used).
        console: Where to print (default: a new rich console).
        run_dir: Explicit run directory for a new run.
        plugin_dirs: Folders holding the config's plugin packages (recorded for resume/evaluate).
        trust_remote_code: On resume, import the run's plugin code even when the run was not created
            here or its files changed (see `routerkit.training.trust`).
        overwrite: Start a new run in ``run_dir`` even if it holds one (its checkpoints and metrics are deleted).

    Returns:
        The run directory and the evaluation results.
    """
    console = console or Console()
    if resume is not None:
        path = Path(resume)
        if not (path / "config.yaml").exists():
            raise ConfigError(f"--resume {path}: not a run directory (no config.yaml).")
        cfg = trusted_run_config(path, trust_remote_code)
    dist = setup_distributed(cfg.run.device)  # under torchrun: join the group (gloo on the CPU, nccl on CUDA)
    if dist.enabled:
        if cfg.run.device.startswith("cuda"):  # one GPU per rank
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": f"cuda:{dist.local_rank}"})})
        if not dist.is_main:
            console = Console(quiet=True)  # rank 0 prints, writes and evaluates
    try:
        if resume is None:
            path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
            path = Path(dist.broadcast(str(path)))  # the run directory rank 0 chose
            if path.exists() and not path.is_dir():
                raise ConfigError(f"Run directory {path} is a file; choose another --run-dir.")
            if dist.is_main:
                path.mkdir(parents=True, exist_ok=True)
        with RunLock(path) if dist.is_main else contextlib.nullcontext():
            if resume is None and dist.is_main:
                prepare_new_run_dir(path, overwrite)
            if cfg.run.threads:
                torch.set_num_threads(cfg.run.threads)
            t0 = time.perf_counter()
            exp = _build_on_every_rank(cfg)  # a config or data error leaves no run behind to --overwrite
            if resume is None and dist.is_main:
                # exp.config: cfg plus what the cost model measured here (latency), reused by every later load
                write_run_files(path, exp.config, plugin_dirs, exp.data.spec)
                if exp.config.cost != cfg.cost:
                    console.print(f"cost [cyan]{cfg.cost.name}[/cyan]: " + exp.pipeline.cost_model.describe(exp.zoo.names))
            return _train_locked(exp, path, resume is not None, console, t0)
    finally:
        teardown_distributed()


def _build_on_every_rank(cfg: ExperimentConfig) -> Experiment:
    """`build_experiment`; under torch.distributed rank 0 measures a ``latency`` cost model and the others reuse its numbers.

    Each rank then draws dropout and MC-dropout masks from its own stream of the global generators.
    """
    dist = distributed()
    if not dist.enabled:
        return build_experiment(cfg)
    exp, failure = None, None
    if dist.is_main:
        try:
            exp = build_experiment(cfg)
        except Exception as err:  # every rank learns of it (the others would wait in the broadcast)
            failure = err
    cost, message = dist.broadcast((exp.config.cost if exp is not None else None, str(failure) if failure else None))
    if failure is not None:
        raise failure
    if message is not None:
        raise ConfigError(f"rank 0 could not build the experiment: {message}")
    if exp is None:  # the same config as rank 0, with what it measured (nothing is measured again)
        exp = build_experiment(cfg.model_copy(update={"cost": cost}))
    dist.split_global_rng()
    return exp


def _resume_point(exp: Experiment, stages: list[Stage], path: Path, console: Console) -> tuple[int, int]:
    """Load the latest checkpoint of a resumed run; return the first stage to run and its last finished epoch.

    Under torch.distributed every rank loads the checkpoint; rank 0 alone truncates the log.
    """
    log_path = path / "metrics" / "train_log.jsonl"
    main = distributed().is_main
    if read_latest(path) is None:  # resumed before the first checkpoint: start again from scratch
        if main:
            truncate_log(log_path, -1, -1)
        return 0, -1
    state, meta = load_checkpoint(path)
    load_model_state(exp, state.get("model"), checkpoint_file(path, None))
    done_stage, done_epoch = int(meta["stage_index"]), int(meta["epoch"])
    if meta.get("stage_complete"):
        done_stage, done_epoch = done_stage + 1, -1
    elif 0 <= done_stage < len(stages):
        stages[done_stage].load_state_dict(state["stage"])
    if "rng" in state:  # dropout and MC-dropout draws continue where the interrupted run was
        set_global_rng_state(state["rng"])
        distributed().split_global_rng()  # (rank 0's saved state: each rank derives its own stream from it)
    console.print(f"Resuming from checkpoint {read_latest(path)!r} (stage {meta['stage']}, epoch {meta['epoch']}).")
    if main:
        truncate_log(log_path, int(meta["stage_index"]), int(meta["epoch"]))
    return done_stage, done_epoch


def _train_locked(exp: Experiment, path: Path, resuming: bool, console: Console, t0: float) -> tuple[Path, list[EvalResult]]:
    """The body of `train`, run while holding the run directory's lock."""
    cfg, dist = exp.config, distributed()
    if dist.enabled:
        console.print(f"torch.distributed: {dist.world_size} processes ({dist.backend}); each global batch is split across them")
    console.print(
        f"[bold]routerkit[/bold] run [cyan]{path}[/cyan]: {len(exp.data.train)} train "
        f"(D_PT {len(exp.parts['pt'])} / D_RL {len(exp.parts['rl'])} / D_FT {len(exp.parts['ft'])}), "
        f"{len(exp.data.val)} val, {len(exp.data.test)} test; zoo "
        + ", ".join(f"{n} ({p:,} params)" for n, p in zip(exp.zoo.names, exp.zoo.num_parameters(), strict=True))
    )
    stages = build_stages(exp)
    frozen = frozen_summary(cfg)
    if frozen is not None:
        console.print(frozen, markup=False, soft_wrap=True)
    start_stage, done_epoch = _resume_point(exp, stages, path, console) if resuming else (0, -1)
    with Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        callbacks: list[Callback] = [SyncRanks(exp), Checkpoints(path, exp, cfg.run.checkpoint_every, write=dist.is_main)]
        if dist.is_main:  # the log before the checkpoint: see routerkit.training.loop
            callbacks = [TrainLog(path / "metrics" / "train_log.jsonl"), *callbacks, ProgressBar(progress, len(stages))]
        run_stages(stages, callbacks, start_stage, done_epoch)
    if not dist.is_main:  # rank 0 saves the final weights and evaluates
        dist.barrier()
        return path, []
    save_checkpoint(
        path,
        "final",
        {"model": model_state(exp)},
        {"stage": "final", "stage_index": len(stages), "epoch": -1, "stage_complete": True},
    )
    dist.barrier()
    teardown_distributed()  # the evaluation runs in this process alone
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
