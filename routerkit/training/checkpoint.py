"""Atomic checkpoints: tensors in safetensors, everything else in a small JSON.

A checkpoint is ``<name>.safetensors`` + ``<name>.json``. Both are written to a temporary
file in the same folder, flushed, fsynced and renamed into place, so an interrupted write
never leaves a half-written checkpoint and never destroys the previous one. ``latest.json``
is updated last and names the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LATEST = "latest.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


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
    previous = read_latest(run_dir)
    atomic_write_json(folder / LATEST, {"name": name, "metadata": dict(metadata)})
    if previous is not None and previous != name and not previous.startswith("final"):
        for suffix in (".safetensors", ".json"):
            old = folder / f"{previous}{suffix}"
            if old.exists() and not _is_stage_end(folder, previous):
                old.unlink()
    return folder / f"{name}.safetensors"


def _is_stage_end(folder: Path, name: str) -> bool:
    meta_path = folder / f"{name}.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text()).get("metadata", {})
    return bool(meta.get("stage_complete", False))


def read_latest(run_dir: Path) -> str | None:
    """Name of the newest complete checkpoint of a run, or ``None``."""
    path = Path(run_dir) / "checkpoints" / LATEST
    if not path.exists():
        return None
    return str(json.loads(path.read_text())["name"])


def load_checkpoint(run_dir: Path, name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(state, metadata)`` of checkpoint ``name`` (default: the latest).

    Raises:
        FileNotFoundError: When the run has no (such) checkpoint; the message names the path.
    """
    from safetensors.torch import load_file

    name = name or read_latest(run_dir)
    folder = Path(run_dir) / "checkpoints"
    if name is None:
        raise FileNotFoundError(f"No checkpoint in {folder} (missing {LATEST}); nothing to resume or evaluate.")
    tensor_path, meta_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    for path in (tensor_path, meta_path):
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint file {path} is missing.")
    payload = json.loads(meta_path.read_text())
    tensors = load_file(str(tensor_path))
    state = _unflatten(payload["skeleton"], tensors)
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
