"""Atomic checkpoints: tensors in safetensors, everything else in a small JSON.

A checkpoint is ``<name>.safetensors`` + ``<name>.json``. Both are written to a temporary
file in the same folder, flushed, fsynced and renamed into place, so an interrupted write
never leaves a half-written checkpoint and never destroys the previous one. ``latest.json``
is updated last and names the newest complete checkpoint.

A file that cannot be read back (truncated, garbage, not written by `save_checkpoint`) raises a
`CheckpointError` naming the file; a process killed mid-write leaves ``.<name>.<random>.tmp``
files, which the next `save_checkpoint` into the same folder removes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from routerkit._io import atomic_write_bytes as atomic_write_bytes  # re-exported: atomic IO lives in routerkit._io
from routerkit._io import atomic_write_json as atomic_write_json
from routerkit.config import ConfigError

LATEST = "latest.json"

# What `atomic_write_bytes` leaves behind when killed while writing a checkpoint file:
# ``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")`` draws 8 characters of [a-z0-9_].
_STALE_TMP = re.compile(r"\..+\.(?:safetensors|json)\.[a-z0-9_]{8}\.tmp")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded; the message names the file (or tensor) and what was expected.

    A `ConfigError`, so the command line prints it as an error rather than a traceback.
    """


def _flatten(prefix: str, obj: Any, tensors: dict[str, Tensor], meta: Any = None) -> Any:
    """Move tensors of a nested state dict into ``tensors``; return the JSON-able skeleton."""
    if isinstance(obj, Tensor):
        key = f"t{len(tensors):06d}"  # positional names: dictionary keys may contain any character
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_key(k), _flatten(f"{prefix}/{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}/{i}", v, tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}.")


def _key(k: Any) -> Any:
    if isinstance(k, (bool, int, float, str)) or k is None:
        return k
    raise TypeError(f"Cannot checkpoint a dictionary key of type {type(k).__name__}.")


def _unflatten(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_unflatten(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def save_checkpoint(
    run_dir: Path, name: str, state: Mapping[str, Any], metadata: Mapping[str, Any], update_latest: bool = True
) -> Path:
    """Save a nested ``state`` (module/optimizer state dicts, numbers) atomically.

    Args:
        run_dir: Folder of the run; the checkpoint goes to ``run_dir/checkpoints``.
        name: Checkpoint name (``"stage2-epoch0003"``).
        state: Nested mapping whose leaves are tensors, numbers, strings or None.
        metadata: JSON-able information (stage, epoch, config hash, ...).
        update_latest: Make it the run's latest checkpoint (what ``--resume`` continues from);
            False for side checkpoints such as ``calibrated``.

    Returns:
        Path of the ``.safetensors`` file.
    """
    from safetensors.torch import save as st_save

    folder = Path(run_dir) / "checkpoints"
    remove_stale_temp_files(folder)
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten("state", dict(state), tensors)
    # safetensors refuses tensors that share memory; clone the duplicates.
    seen: dict[int, str] = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[key] = value.clone()
        seen.setdefault(ptr, key)
    atomic_write_bytes(folder / f"{name}.safetensors", st_save(tensors))
    atomic_write_json(folder / f"{name}.json", {"metadata": dict(metadata), "skeleton": skeleton})
    if not update_latest:
        return folder / f"{name}.safetensors"
    try:
        previous = read_latest(run_dir)
    except CheckpointError:  # an unreadable latest.json is replaced; nothing is pruned
        previous = None
    atomic_write_json(folder / LATEST, {"name": name, "metadata": dict(metadata)})
    if previous is not None and previous != name and not previous.startswith("final"):
        for suffix in (".safetensors", ".json"):
            old = folder / f"{previous}{suffix}"
            if old.exists() and not _is_stage_end(folder, previous):
                old.unlink()
    return folder / f"{name}.safetensors"


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write_bytes` left in a checkpoints folder.

    Only regular files named exactly as `atomic_write_bytes` names its temporary copy of a
    checkpoint file (``.<name>.safetensors.<8 random>.tmp``, ``.<name>.json.<8 random>.tmp``) are
    removed, nothing else; a run has one writer at a time, so none of them is still being written.

    Args:
        folder: The run's ``checkpoints`` folder (need not exist).

    Returns:
        The removed files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    for path in folder.iterdir():
        if _STALE_TMP.fullmatch(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _read_json(path: Path, what: str) -> Any:
    """Parse the JSON file ``path``; raise `CheckpointError` naming it when it is not readable JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"Checkpoint file {path} is corrupted: expected {what} but got unreadable content ({err})."
        ) from None


def _is_stage_end(folder: Path, name: str) -> bool:
    meta_path = folder / f"{name}.json"
    if not meta_path.exists():
        return False
    try:
        payload = _read_json(meta_path, "a checkpoint's JSON metadata")
    except CheckpointError:
        return True  # unreadable: keep it rather than prune what cannot be checked
    meta = payload.get("metadata") if isinstance(payload, dict) else None
    return not isinstance(meta, dict) or bool(meta.get("stage_complete", False))


def read_latest(run_dir: Path) -> str | None:
    """Name of the newest complete checkpoint of a run, or ``None``.

    Raises:
        CheckpointError: When ``latest.json`` is not a JSON object with a string ``"name"``.
    """
    path = Path(run_dir) / "checkpoints" / LATEST
    if not path.exists():
        return None
    payload = _read_json(path, 'a JSON object {"name": <checkpoint name>, ...}')
    name = payload.get("name") if isinstance(payload, dict) else None
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f'Checkpoint file {path} is corrupted: expected a JSON object with the checkpoint "name" '
            f"but got {_describe(payload)}."
        )
    return name


def _describe(payload: Any) -> str:
    if isinstance(payload, dict):
        return f"an object with keys {sorted(map(str, payload))}"
    return f"a JSON {type(payload).__name__}"


def load_checkpoint(run_dir: Path, name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(state, metadata)`` of checkpoint ``name`` (default: the latest).

    Raises:
        FileNotFoundError: When the run has no (such) checkpoint; the message names the path.
        CheckpointError: When ``latest.json``, ``<name>.json`` or ``<name>.safetensors`` is
            truncated or corrupted, or the two files do not belong together; the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    name = name or read_latest(run_dir)
    folder = Path(run_dir) / "checkpoints"
    if name is None:
        raise FileNotFoundError(f"No checkpoint in {folder} (missing {LATEST}); nothing to resume or evaluate.")
    tensor_path, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    for path in (tensor_path, meta_path):
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint file {path} is missing.")
    payload = _read_json(meta_path, 'a JSON object {"metadata": ..., "skeleton": ...}')
    if not isinstance(payload, dict) or not isinstance(payload.get("metadata"), dict) or "skeleton" not in payload:
        raise CheckpointError(
            f'Checkpoint file {meta_path} is corrupted: expected a JSON object with "metadata" and "skeleton" '
            f"but got {_describe(payload)}."
        )
    try:
        tensors = load_file(str(tensor_path))
    except SafetensorError as err:
        raise CheckpointError(
            f"Checkpoint file {tensor_path} is corrupted (truncated or overwritten?): expected a safetensors file but got: {err}."
        ) from None
    try:
        state = _unflatten(payload["skeleton"], tensors)
    except KeyError as err:
        raise CheckpointError(
            f"Checkpoint files {meta_path} and {tensor_path} do not belong together: expected tensor {err.args[0]!r} "
            f"(named in the JSON) in the safetensors file but got only {len(tensors)} tensors."
        ) from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"Checkpoint file {meta_path} is corrupted: its skeleton does not parse ({err}).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint file {meta_path} is corrupted: expected a state mapping but got {_describe(state)}.")
    return dict(state), dict(payload["metadata"])


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor of a nested structure to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj
