"""Run a whole experiment: stages with progress bars, atomic checkpoints, resume, evaluation."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from routerkit.config import ConfigError, ExperimentConfig, dump_config, parse_config
from routerkit.config.build import Experiment, build_experiment
from routerkit.data import Split
from routerkit.flops import FLOP_CONVENTION
from routerkit.metrics import EvalResult, evaluate_router
from routerkit.rewards import Reward
from routerkit.routers import CascadeRouter, PaSeRRouter, create_router
from routerkit.training.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    read_latest,
    save_checkpoint,
)
from routerkit.training.run_lock import RunLock
from routerkit.training.stages import (
    BaseModelPretraining,
    CascadeFitting,
    JointFineTuning,
    LargeModelPretraining,
    PolicyFineTuning,
    PolicyTraining,
    PretrainChecks,
    Stage,
    StageSettings,
    global_rng_state,
    set_global_rng_state,
)
from routerkit.training.trust import check_run_trust, new_run_id, record_trusted_run

STAGE_ORDER = ("pretrain_large", "pretrain_base", "policy", "finetune")


def _settings(section: Any) -> StageSettings:
    schedule = getattr(section, "lr_schedule", "constant")  # the cascade fit (one epoch) has none
    return StageSettings(section.epochs, section.lr, section.batch_size, section.weight_decay, schedule)


def _checks(exp: Experiment, section: Any) -> PretrainChecks:
    """Per-epoch validation (on the validation split), batch-norm recalibration and best epoch of a pre-training stage."""
    return PretrainChecks(
        validation=exp.data.val,
        num_classes=exp.data.num_classes,
        precise_bn=section.precise_bn,
        bn_batches=section.bn_batches,
        keep_best=section.keep_best,
        batch_size=exp.config.evaluation.batch_size,
    )


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
            checks=_checks(exp, t.pretrain_large),
        ),
        BaseModelPretraining(
            exp.pipeline,
            specialists.get(0, exp.parts["pt"]),
            _settings(t.pretrain_base),
            seed + 1,
            t.pretrain_base.beta,
            ignore,
            t.pretrain_base.augment,
            checks=_checks(exp, t.pretrain_base),
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


def _load_model_state(exp: Experiment, state: Any, checkpoint: str = "the checkpoint") -> None:
    """Load a checkpoint's ``model`` entry into the zoo and the router built from the run's config.

    Args:
        exp: The experiment rebuilt from the run's ``config.yaml``.
        state: The checkpoint's ``model`` entry, ``{"zoo": state dict, "router": state dict}``.
        checkpoint: The checkpoint file, for the error messages.

    Raises:
        CheckpointError: When a state dict misses keys, has unexpected ones or a tensor of another
            shape than the module's (the message names the checkpoint, the zoo model or the router
            and the keys), or when a floating-point tensor holds NaN or inf (it names the tensors).
    """
    modules: dict[str, torch.nn.Module] = {"zoo": exp.zoo, "router": exp.router}
    if not isinstance(state, dict) or not all(isinstance(state.get(part), dict) for part in modules):
        got = f"keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"Checkpoint {checkpoint}: expected a model state with 'zoo' and 'router' state dicts but got {got}."
        )
    problems = [p for part, module in modules.items() for p in _state_mismatches(exp, part, module, state[part])]
    if problems:
        raise CheckpointError(
            f"Checkpoint {checkpoint} does not fit the models built from the run's config.yaml: "
            + "; ".join(problems)
            + ". Was config.yaml edited after training, or the checkpoint taken from another run?"
        )
    bad = [name for part, module in modules.items() for name in _non_finite(exp, part, module, state[part])]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(
            f"Checkpoint {checkpoint}: expected finite weights but got NaN or inf in {len(bad)} tensor(s): {shown}. "
            "The training diverged or the file was overwritten; resume from an earlier checkpoint or retrain."
        )
    for part, module in modules.items():
        try:
            module.load_state_dict(state[part])
        except RuntimeError as err:  # a module's own load hook refused it
            raise CheckpointError(f"Checkpoint {checkpoint}: loading the {part} state failed: {err}") from None


def _module_label(exp: Experiment, part: str, key: str) -> str:
    """``zoo model 'f1_medium'`` for a zoo key ``members.1.<...>``, ``router (PaSeRRouter)`` for the router's."""
    if part != "zoo":
        return f"router ({type(exp.router).__name__})"
    head, _, rest = key.partition(".")
    index = rest.partition(".")[0]
    if head == "members" and index.isdigit() and int(index) < len(exp.zoo.names):
        return f"zoo model {exp.zoo.names[int(index)]!r}"
    return "zoo"


def _first(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _state_mismatches(exp: Experiment, part: str, module: torch.nn.Module, given: dict[str, Any]) -> list[str]:
    """What keeps ``given`` from loading into ``module``, one line per zoo model (or the router)."""
    from torch.nn.parameter import is_lazy

    expected = module.state_dict()
    found: dict[str, list[list[str]]] = {}  # label -> [missing, unexpected, wrong shapes]

    def note(key: str, kind: int, text: str) -> None:
        found.setdefault(_module_label(exp, part, key), [[], [], []])[kind].append(text)

    for key, value in expected.items():
        got = given.get(key)
        if key not in given:
            note(key, 0, repr(key))
        elif isinstance(value, torch.Tensor) and not is_lazy(value):
            if not isinstance(got, torch.Tensor):
                note(key, 2, f"expected {key!r} to be a tensor but got {type(got).__name__}")
            elif got.shape != value.shape:
                note(key, 2, f"expected {key!r} of shape {list(value.shape)} but got {list(got.shape)}")
    for key in given:
        if key not in expected:
            note(key, 1, repr(key))
    lines = []
    for label, (missing, unexpected, shapes) in found.items():
        what = [f"missing keys {_first(missing)}"] if missing else []
        what += [f"unexpected keys {_first(unexpected)}"] if unexpected else []
        what += [_first(shapes, 3)] if shapes else []
        lines.append(f"{label}: " + "; ".join(what))
    return lines


def _non_finite(exp: Experiment, part: str, module: torch.nn.Module, given: dict[str, Any]) -> list[str]:
    """Floating-point tensors of ``given`` holding NaN or inf (inf is allowed in router buffers: IDK's unfitted thresholds)."""
    parameters = {name for name, _ in module.named_parameters()}
    bad = []
    for key, value in given.items():
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        inf_allowed = part == "router" and key not in parameters  # an IDK threshold of +inf: "never forward"
        broken = value.isnan().any() if inf_allowed else ~torch.isfinite(value).all()
        if bool(broken):
            bad.append(f"{_module_label(exp, part, key)} {key!r}")
    return bad


def _checkpoint_file(run_dir: Path, name: str | None) -> str:
    """The ``.safetensors`` file of checkpoint ``name`` (default: the latest), for messages."""
    return str(Path(run_dir) / "checkpoints" / f"{name or read_latest(run_dir)}.safetensors")


def _read_run_config(path: Path) -> ExperimentConfig:
    """Parse a run directory's saved ``config.yaml``.

    Raises:
        ConfigError: When the file is unreadable, not YAML, not a mapping or not a valid config;
            the message names the file.
    """
    file = path / "config.yaml"
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(
            f"Run config {file} is corrupted: expected the YAML that `routerkit train` saved but got unreadable content ({err})."
        ) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a YAML {type(raw).__name__}"
        raise ConfigError(f"Run config {file} is corrupted: expected a mapping of config sections but got {got}.")
    return parse_config(raw, str(file))


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
    A new run refuses a folder that already holds one unless ``overwrite``.

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
        check_run_trust(path, trust_remote_code)  # before any of its code is imported or put on sys.path
        _add_saved_plugin_dirs(path)
        cfg = _read_run_config(path)
    else:
        path = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"Run directory {path} is a file; choose another --run-dir.")
        path.mkdir(parents=True, exist_ok=True)
    with RunLock(path):
        if resume is None:
            _prepare_new_run_dir(path, overwrite)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        t0 = time.perf_counter()
        exp = build_experiment(cfg)  # a config or data error leaves no run behind to --overwrite
        if resume is None:
            atomic_write_bytes(path / "config.yaml", dump_config(cfg).encode())
            run_info = {"plugin_dirs": list(plugin_dirs or []), "routerkit_version": _version(), "run_id": new_run_id()}
            atomic_write_json(path / "run.json", run_info)
            record_trusted_run(path)  # created here by this user: evaluate/compare/resume need no --trust-remote-code
        return _train_locked(exp, path, resume is not None, console, t0)


def _prepare_new_run_dir(path: Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite`` (then clear its outputs)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Run directory {path} is a file; choose another --run-dir.")
    held = [p.name for p in (path / "config.yaml", path / "checkpoints", path / "metrics") if p.exists()]
    if not held:
        return
    if not overwrite:
        raise ConfigError(
            f"Run directory {path} already holds a run ({', '.join(held)}): continue it with `routerkit train --resume "
            f"{path}`, choose another --run-dir, or pass --overwrite to delete its checkpoints and metrics and start again."
        )
    for name in ("checkpoints", "metrics", "figures", "compare", "robustness"):
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    for name in ("config.yaml", "run.json", "calibration.json"):
        (path / name).unlink(missing_ok=True)


def _truncate_log(log_path: Path, stage_index: int, epoch: int) -> None:
    """Drop log rows after (``stage_index``, ``epoch``): epochs a killed run logged but did not checkpoint.

    Those epochs run again on resume; without this they would be logged twice.
    """
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        key = (int(row.get("stage_index", -1)), int(row.get("epoch", -1)))
        if "stage_index" not in row or key <= (stage_index, epoch):
            kept.append(line)
    atomic_write_bytes(log_path, ("\n".join(kept) + "\n" if kept else "").encode())


def _info(logs: dict[str, float]) -> str:
    """The progress bar's text: validation figures first, then the losses."""
    keys = sorted(logs, key=lambda k: not k.startswith("val/"))[:4]
    return "  ".join(f"{k.split('/')[-1]}={logs[k]:.4f}" for k in keys)


def _train_locked(
    exp: Experiment, path: Path, resuming: bool, console: Console, t0: float
) -> tuple[Path, list[EvalResult]]:
    """The body of `train`, run while holding the run directory's lock."""
    cfg = exp.config
    resume = path if resuming else None
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
        _load_model_state(exp, state.get("model"), _checkpoint_file(path, None))
        done_stage, done_epoch = int(meta["stage_index"]), int(meta["epoch"])
        if meta.get("stage_complete"):
            done_stage, done_epoch = done_stage + 1, -1
        elif 0 <= done_stage < len(stages):
            stages[done_stage].load_state_dict(state["stage"])
        if "rng" in state:  # dropout and MC-dropout draws continue where the interrupted run was
            set_global_rng_state(state["rng"])
        console.print(f"Resuming from checkpoint {read_latest(path)!r} (stage {meta['stage']}, epoch {meta['epoch']}).")
        _truncate_log(path / "metrics" / "train_log.jsonl", int(meta["stage_index"]), int(meta["epoch"]))
    else:
        done_stage = 0
        if resume is not None:  # resumed before the first checkpoint: start again from scratch
            _truncate_log(path / "metrics" / "train_log.jsonl", -1, -1)
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
                    fh.write(json.dumps({"stage": stage.name, "stage_index": index, "epoch": epoch, **logs}) + "\n")
                complete = epoch == epochs - 1
                for message in stage.warnings:
                    progress.console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", soft_wrap=True)
                    with log_path.open("a") as fh:
                        row = {"stage": stage.name, "stage_index": index, "epoch": epoch, "warning": message}
                        fh.write(json.dumps(row) + "\n")
                stage.warnings.clear()
                if not complete and (epoch + 1) % cfg.run.checkpoint_every:
                    progress.update(task, advance=1, info=_info(logs))
                    continue
                save_checkpoint(
                    path,
                    f"{index}-{stage.name}-e{epoch:04d}",
                    {"model": _model_state(exp), "stage": stage.state_dict(), "rng": global_rng_state()},
                    {"stage": stage.name, "stage_index": index, "epoch": epoch, "stage_complete": complete},
                )
                progress.update(task, advance=1, info=_info(logs))
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


def load_run(run_dir: str | Path, checkpoint: str | None = None, trust_remote_code: bool = False) -> Experiment:
    """Rebuild a run's experiment from its saved config and load its weights.

    Args:
        run_dir: The run directory.
        checkpoint: Checkpoint name (e.g. ``"calibrated"``); default: ``final``, else the latest.
        trust_remote_code: Import the plugin code the run names (dotted paths, ``run.json`` plugin folders)
            even when the run was not created here by `routerkit train` or its files changed since.

    Raises:
        UntrustedRunError: The run names code outside routerkit and is not trusted; nothing was imported.
    """
    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise ConfigError(f"{path} is not a run directory (no config.yaml).")
    check_run_trust(path, trust_remote_code)  # before any of its code is imported or put on sys.path
    _add_saved_plugin_dirs(path)
    cfg = _read_run_config(path)
    exp = build_experiment(cfg)
    name = checkpoint or ("final" if (path / "checkpoints" / "final.json").exists() else None)
    if checkpoint is not None and not (path / "checkpoints" / f"{checkpoint}.json").exists():
        raise ConfigError(f"{path} has no checkpoint {checkpoint!r}.")
    state, _ = load_checkpoint(path, name)
    _load_model_state(exp, state.get("model"), _checkpoint_file(path, name))
    return exp
