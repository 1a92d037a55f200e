"""Run directories: choosing and preparing one, the files a run writes first, reading a run back.

A run directory holds ``config.yaml`` (the parsed config, as trained), ``run.json`` (plugin
folders, routerkit version, run id), ``checkpoints/``, ``metrics/`` and the outputs of later
commands (``figures/``, ``compare/``, ...). Everything that imports a run's code goes through
`trusted_run_config`, which checks the run is trusted first (`routerkit.training.trust`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from routerkit._io import atomic_write_bytes, atomic_write_json
from routerkit.config import ConfigError, ExperimentConfig, dump_config, parse_config
from routerkit.config.build import Experiment, build_data, build_experiment, build_routing
from routerkit.config.checks import check_device
from routerkit.data import DataSpec
from routerkit.models import Zoo
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router
from routerkit.training.checkpoint import load_checkpoint, read_latest
from routerkit.training.trust import check_run_trust, new_run_id, record_trusted_run
from routerkit.training.weights import load_model_state

__all__ = [
    "DATA_SPEC_FILE",
    "RunModels",
    "checkpoint_file",
    "load_routing",
    "load_run",
    "read_data_spec",
    "new_run_dir",
    "prepare_new_run_dir",
    "truncate_log",
    "trusted_run_config",
    "write_run_files",
]

#: The run file holding its `DataSpec` (written by `write_run_files`).
DATA_SPEC_FILE = "data_spec.json"
#: Outputs of a run that ``--overwrite`` deletes (folders, then files).
_RUN_FOLDERS = ("checkpoints", "metrics", "figures", "compare", "robustness")
_RUN_FILES = ("config.yaml", "run.json", "data_spec.json", "calibration.json")


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/name``, with a numeric suffix if that folder already holds a run."""
    base = Path(cfg.run.output_dir) / cfg.run.name
    path, i = base, 1
    while (path / "config.yaml").exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def prepare_new_run_dir(path: Path, overwrite: bool) -> None:
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
    for name in _RUN_FOLDERS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)
    for name in _RUN_FILES:
        (path / name).unlink(missing_ok=True)


def write_run_files(path: Path, cfg: ExperimentConfig, plugin_dirs: list[str] | None, spec: DataSpec | None = None) -> None:
    """A new run's ``config.yaml``, ``run.json`` and ``data_spec.json``; the run is recorded as trusted (created here).

    ``data_spec.json`` (`routerkit.data.DataSpec`: input shape, classes, task, file format) is
    what `routerkit.load` needs instead of the training data.
    """
    atomic_write_bytes(path / "config.yaml", dump_config(cfg).encode())
    if spec is not None:
        atomic_write_json(path / DATA_SPEC_FILE, spec.to_dict())
    run_info = {"plugin_dirs": list(plugin_dirs or []), "routerkit_version": _version(), "run_id": new_run_id()}
    atomic_write_json(path / "run.json", run_info)
    record_trusted_run(path)  # evaluate/compare/resume need no --trust-remote-code


def truncate_log(log_path: Path, stage_index: int, epoch: int) -> None:
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
        if not isinstance(row, dict):
            continue
        index, row_epoch = row.get("stage_index"), row.get("epoch", -1)
        older = index is None  # rows of runs from before stage indices were logged: kept
        done = isinstance(index, int) and isinstance(row_epoch, int) and (index, row_epoch) <= (stage_index, epoch)
        if older or done:
            kept.append(line)
    atomic_write_bytes(log_path, ("\n".join(kept) + "\n" if kept else "").encode())


def checkpoint_file(run_dir: Path, name: str | None) -> str:
    """The ``.safetensors`` file of checkpoint ``name`` (default: the latest), for messages."""
    return str(Path(run_dir) / "checkpoints" / f"{name or read_latest(run_dir)}.safetensors")


def trusted_run_config(path: Path, trust_remote_code: bool) -> ExperimentConfig:
    """A run directory's saved config, after checking the run may import its code.

    The trust check comes before any of the run's code is imported or put on ``sys.path``; then
    the plugin folders of ``run.json`` go on the path and ``config.yaml`` is parsed.

    Raises:
        UntrustedRunError: The run names code outside routerkit and is not trusted; nothing was imported.
        ConfigError: ``config.yaml`` is unreadable, not YAML, not a mapping or not a valid config.
    """
    check_run_trust(path, trust_remote_code)
    _add_saved_plugin_dirs(path)
    return _read_run_config(path)


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
    cfg = trusted_run_config(path, trust_remote_code)
    exp = build_experiment(cfg)
    name = checkpoint or ("final" if (path / "checkpoints" / "final.json").exists() else None)
    if checkpoint is not None and not (path / "checkpoints" / f"{checkpoint}.json").exists():
        raise ConfigError(f"{path} has no checkpoint {checkpoint!r}.")
    state, _ = load_checkpoint(path, name)
    load_model_state(exp, state.get("model"), checkpoint_file(path, name))
    return exp


@dataclass
class RunModels:
    """A trained run's routing parts, rebuilt without its training data (`load_routing`).

    Attributes:
        config: The run's config (as saved).
        spec: Its data spec (``data_spec.json``).
        pipeline: The routed pipeline with the trained zoo.
        router: The trained router.
        checkpoint: The checkpoint file the weights came from.
    """

    config: ExperimentConfig
    spec: DataSpec
    pipeline: RoutedPipeline
    router: Router
    checkpoint: str

    @property
    def zoo(self) -> Zoo:
        """The task models."""
        return self.pipeline.zoo


def read_data_spec(run_dir: str | Path) -> DataSpec | None:
    """The run's ``data_spec.json``, or ``None`` for a run saved before routerkit wrote one.

    Raises:
        ConfigError: The file is unreadable or not a valid spec; the message names it.
    """
    file = Path(run_dir) / DATA_SPEC_FILE
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"Data spec {file} is corrupted: expected the JSON that `routerkit train` saved ({err}).") from None
    try:
        return DataSpec.from_dict(raw, str(file))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_routing(
    run_dir: str | Path,
    checkpoint: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> RunModels:
    """A run's trained zoo and router, rebuilt from ``config.yaml`` and ``data_spec.json`` without its data.

    Args:
        run_dir: The run directory.
        checkpoint: Checkpoint name (e.g. ``"calibrated"``); default: ``final``, else the latest.
        trust_remote_code: Import plugin code the run names even when it was not created here.
        device: Where the models go (default: the run's ``run.device`` if this machine has it, else the CPU).

    Raises:
        UntrustedRunError: The run names code outside routerkit and is not trusted; nothing was imported.
        ConfigError: Not a run directory, no such checkpoint, a bad config or data spec, or no device.
        CheckpointError: The weights do not fit the models.
    """
    path = Path(run_dir)
    if not (path / "config.yaml").exists():
        raise ConfigError(f"{path} is not a run directory (no config.yaml).")
    cfg = trusted_run_config(path, trust_remote_code)
    spec = read_data_spec(path)
    if spec is None:  # a run from before data_spec.json: its data tells the shapes (the run is trusted by now)
        spec = build_data(cfg).spec
    if checkpoint is not None and not (path / "checkpoints" / f"{checkpoint}.json").exists():
        raise ConfigError(f"{path} has no checkpoint {checkpoint!r}.")
    name = checkpoint or ("final" if (path / "checkpoints" / "final.json").exists() else None)
    if device is not None:
        target = check_device(device)
    else:  # the run's device, or the CPU where that one is not here (a GPU run loaded on a laptop)
        try:
            target = check_device(cfg.run.device)
        except ConfigError:
            target = torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    pipeline, router = build_routing(cfg, spec, "cpu", load_weights=False)  # the checkpoint has every model's weights
    models = RunModels(cfg, spec, pipeline, router, checkpoint_file(path, name))
    state, _ = load_checkpoint(path, name)
    load_model_state(models, state.get("model"), models.checkpoint)
    pipeline.zoo.to(target)
    router.to(target)
    return models


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


def _add_saved_plugin_dirs(run_dir: Path) -> None:
    from routerkit.config.build import add_plugin_path

    info = Path(run_dir) / "run.json"
    if info.exists():
        for folder in json.loads(info.read_text()).get("plugin_dirs", []):
            add_plugin_path(folder)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routerkit")
    except PackageNotFoundError:
        return "unknown"
