"""Whether a run directory may import code: a run from someone else runs none of it unless the user opts in.

A run directory's ``config.yaml`` may name code by dotted path (``data.factory: mypkg.data:build``,
``zoo.models[].model: mypkg.zoo:Net``, a router, estimator, cost, partitioner, reward or accuracy
term) and its ``run.json`` lists ``plugin_dirs``, folders put on ``sys.path`` so that code imports.
Importing it runs it, with the rights of whoever loads the run. So, as transformers does with
``trust_remote_code``, loading a run imports only:

- components of routerkit itself: registered names (``paser``, ``unet``) and dotted paths to
  classes defined in the ``routerkit`` package;
- anything else when the user says so (``trust_remote_code=True``, ``--trust-remote-code``), or
  when the run was created by `routerkit train` as this user on this machine and neither its
  ``config.yaml`` nor its ``run.json`` changed since.

`routerkit train` records each new run in a per-user trust store, ``$ROUTERKIT_HOME/trusted_runs.json``
(default ``~/.cache/routerkit/trusted_runs.json``): the run's resolved path, the random ``run_id``
written into its ``run.json`` and the sha256 of both files. A run copied or downloaded from elsewhere,
moved, or whose files were edited afterwards is therefore not trusted until the flag is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from routerkit._io import atomic_write_json
from routerkit.config import ConfigError

__all__ = [
    "TRUST_FLAG",
    "UntrustedRunError",
    "check_run_trust",
    "code_to_import",
    "new_run_id",
    "record_trusted_run",
    "trust_problem",
    "trust_store_path",
]

TRUST_FLAG = "--trust-remote-code"
STORE_NAME = "trusted_runs.json"
_STORE_VERSION = 1


class UntrustedRunError(ConfigError):
    """Raised before anything is imported when a run directory names code it may not run.

    Attributes:
        run_dir: The run directory.
        imports: What loading it would import: ``"field: dotted.path"`` and ``"run.json plugin_dirs: folder"``.
        reason: Why the run is not trusted.
    """

    def __init__(self, run_dir: Path, imports: list[str], reason: str) -> None:
        self.run_dir, self.imports, self.reason = run_dir, imports, reason
        listed = "\n".join(f"  - {item}" for item in imports)
        super().__init__(
            f"Refusing to load run directory {run_dir}: it would import code that is not part of routerkit, "
            f"and {reason}.\nLoading it would import and run, with your permissions:\n{listed}\n"
            f"Only if you trust where this run came from, pass {TRUST_FLAG} (Python: trust_remote_code=True)."
        )


def trust_store_path() -> Path:
    """``$ROUTERKIT_HOME/trusted_runs.json`` (default ``~/.cache/routerkit/trusted_runs.json``)."""
    home = os.environ.get("ROUTERKIT_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "routerkit") / STORE_NAME


def new_run_id() -> str:
    """A random id for a new run's ``run.json`` (the trust store checks it)."""
    return secrets.token_hex(16)


# ---------------------------------------------------------------- what a run would import


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    info = run_dir / "run.json"
    if not info.exists():
        return {}
    try:
        data = json.loads(info.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{info} is not a readable JSON file ({err}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Expected a JSON object in {info} but got {type(data).__name__}.")
    return data


def _read_raw_config(run_dir: Path) -> dict[str, Any]:
    """The run's config as plain YAML data; empty when it does not parse (loading then fails before building)."""
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _registries() -> dict[str, Any]:
    from routerkit.costs import COSTS
    from routerkit.data import DATASETS
    from routerkit.models import MODELS
    from routerkit.partitioners import PARTITIONERS
    from routerkit.rewards import ACCURACY_TERMS, REWARDS
    from routerkit.routers import ROUTERS
    from routerkit.uncertainty import ESTIMATORS

    return {
        "models": MODELS,
        "partitioners": PARTITIONERS,
        "estimators": ESTIMATORS,
        "costs": COSTS,
        "routers": ROUTERS,
        "rewards": REWARDS,
        "accuracy": ACCURACY_TERMS,
        "data": DATASETS,
    }


def _routerkit_component(path: str, registries: dict[str, Any]) -> bool:
    """Whether a dotted path names a component of routerkit itself (importing it imports only routerkit).

    Only public modules and attributes of the ``routerkit`` package count, and the object must be a
    registered component (a model, router, estimator, cost, partitioner, reward, accuracy term or data
    factory): a helper such as ``add_plugin_path`` or any other class of routerkit is not a component.
    """
    module_name, attr = path.partition(":")[::2] if ":" in path else path.rpartition(".")[::2]
    parts = [*module_name.split("."), *attr.split(".")]
    if parts[0] != "routerkit" or any(not p or p.startswith("_") for p in parts):
        return False
    from routerkit._registry import import_object

    try:
        obj = import_object(path)  # only routerkit's own modules are imported here
    except ImportError:
        return True  # nothing outside routerkit can be reached; the build reports the missing name
    return any(reg.get(name) is obj for reg in registries.values() for name in reg.names())


def code_to_import(run_dir: str | Path) -> list[str]:
    """What loading ``run_dir`` would import beyond routerkit: dotted paths of its config and its plugin folders.

    Reads ``config.yaml`` (``yaml.safe_load``) and ``run.json`` only; imports nothing outside routerkit.

    Args:
        run_dir: The run directory.

    Returns:
        One line per item, ``"data.factory: mypkg.data:build"`` or ``"run.json plugin_dirs: /path (put on sys.path)"``;
        empty when the run uses routerkit's own components only.
    """
    path = Path(run_dir)
    info = _read_run_info(path)
    raw = _read_raw_config(path)
    registries = _registries()
    found: list[str] = []

    def named(field: str, value: Any, registry: str) -> None:
        # A registry imports a name that is not registered and holds a ':' (`Registry.get`); '.' is flagged too.
        dotted = isinstance(value, str) and (":" in value or "." in value) and value not in registries[registry]
        if dotted and not _routerkit_component(value, registries):
            found.append(f"{field}: {value}")

    factory = _section(raw, "data").get("factory")  # `import_object` takes 'pkg.mod:attr' and 'pkg.mod.attr'
    if isinstance(factory, str) and (":" in factory or "." in factory) and not _routerkit_component(factory, registries):
        found.append(f"data.factory: {factory}")
    models = _section(raw, "zoo").get("models")
    for i, model in enumerate(models if isinstance(models, list) else []):
        if isinstance(model, dict):
            named(f"zoo.models.{i}.model", model.get("model"), "models")
    for section, registry in (
        ("partitioner", "partitioners"),
        ("uncertainty", "estimators"),
        ("cost", "costs"),
        ("router", "routers"),
        ("reward", "rewards"),
    ):
        named(f"{section}.name", _section(raw, section).get("name"), registry)
    named("reward.accuracy", _section(raw, "reward").get("accuracy"), "accuracy")
    folders = info.get("plugin_dirs") or []
    for folder in folders if isinstance(folders, list) else [folders]:
        found.append(f"run.json plugin_dirs: {folder} (put on sys.path)")
    return found


# ---------------------------------------------------------------- the trust store


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _read_store(store: Path) -> dict[str, Any]:
    try:
        data = json.loads(store.read_text())
    except FileNotFoundError:
        return {"version": _STORE_VERSION, "runs": {}}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.warn(f"Ignoring the unreadable routerkit trust store {store} ({err}).", stacklevel=3)
        return {"version": _STORE_VERSION, "runs": {}}
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        return {"version": _STORE_VERSION, "runs": {}}
    return data


@contextmanager
def _locked(store: Path) -> Iterator[None]:
    """Serialise read-modify-write of the store between processes (POSIX ``flock``; none elsewhere)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(store.with_name(store.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_trusted_run(run_dir: str | Path) -> bool:
    """Record a run that `routerkit train` just created here, so that loading it needs no flag.

    Called after ``config.yaml`` and ``run.json`` (with its ``run_id``) are written. Entries of run
    directories that no longer exist are dropped. The store is written atomically.

    Args:
        run_dir: The run directory.

    Returns:
        Whether the run was recorded; ``False`` (with a warning) when the store cannot be written, in
        which case loading the run later needs ``--trust-remote-code``.
    """
    path = Path(run_dir).resolve()
    run_id = _read_run_info(path).get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"Expected a run_id in {path / 'run.json'} but found none.")
    entry = {
        "run_id": run_id,
        "config_sha256": _sha256(path / "config.yaml"),
        "run_json_sha256": _sha256(path / "run.json"),
    }
    store = trust_store_path()
    try:
        with _locked(store):
            data = _read_store(store)
            runs = {k: v for k, v in data["runs"].items() if (Path(k) / "config.yaml").exists()}
            runs[str(path)] = entry
            atomic_write_json(store, {"version": _STORE_VERSION, "runs": runs})
    except OSError as err:
        warnings.warn(
            f"Could not record run {path} in the trust store {store} ({err}); loading it will need {TRUST_FLAG}.",
            stacklevel=2,
        )
        return False
    return True


def trust_problem(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` is not a run created here by this user, unchanged since; ``None`` when it is."""
    path = Path(run_dir).resolve()
    run_id = _read_run_info(path).get("run_id")
    store = trust_store_path()
    entry = _read_store(store)["runs"].get(str(path))
    if not isinstance(entry, dict):
        if not isinstance(run_id, str):
            return (
                "its run.json has no run id: it was not created by `routerkit train` as this user on this machine, "
                "or by a routerkit that did not yet record the runs it creates"
            )
        return f"it was not created by `routerkit train` as this user on this machine (no entry for {path} in {store})"
    if not isinstance(run_id, str) or entry.get("run_id") != run_id:
        return "its run.json does not carry the run id recorded when it was trained here (the folder was replaced)"
    if entry.get("config_sha256") != _sha256(path / "config.yaml"):
        return "its config.yaml changed after `routerkit train` wrote it"
    if entry.get("run_json_sha256") != _sha256(path / "run.json"):
        return "its run.json changed after `routerkit train` wrote it"
    return None


def check_run_trust(run_dir: str | Path, trust_remote_code: bool = False) -> None:
    """Refuse, before anything is imported or put on ``sys.path``, a run that names code it may not run.

    Args:
        run_dir: The run directory.
        trust_remote_code: Import the run's plugin code whatever its origin.

    Raises:
        UntrustedRunError: The run names code beyond routerkit and is neither trusted by the flag nor
            recorded, unchanged, in this user's trust store. The message lists that code.
    """
    if trust_remote_code:
        return
    imports = code_to_import(run_dir)
    if not imports:
        return
    reason = trust_problem(run_dir)
    if reason is not None:
        raise UntrustedRunError(Path(run_dir), imports, reason)
