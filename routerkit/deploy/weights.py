"""Export a run's trained zoo as safetensors files: ``routerkit export RUN --format safetensors``.

Each model's state dict becomes ``<name>.safetensors`` (plain tensors, no code), beside a
``zoo.json`` that lists, per model, its file, ``model`` and ``params`` from the run's config, its
parameter count, its validation and test scores where the run recorded them, and the file's
SHA-256. Another config then loads the zoo with ``zoo.models[].weights`` and ``train: false``
(`routerkit.models.weights_file`), skipping the pre-training stages.

Example:
    >>> result = export_weights("runs/cifar_zoo", "examples/cifar_plugin/weights")  # doctest: +SKIP
    >>> sorted(p.name for p in result.files)  # doctest: +SKIP
    ['f0_resnet8.safetensors', 'f1_resnet20.safetensors', 'f2_resnet32.safetensors', 'zoo.json']
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routerkit._io import atomic_write_bytes, atomic_write_json

__all__ = ["WeightsExport", "export_weights"]


@dataclass
class WeightsExport:
    """What `export_weights` wrote.

    Attributes:
        out_dir: The folder.
        files: Every file written (the safetensors files, then ``zoo.json``).
        index: The content of ``zoo.json``.
    """

    out_dir: Path
    files: list[Path]
    index: dict[str, Any]


def _scores(run_dir: Path, split: str, name: str) -> dict[str, float] | None:
    """The run's recorded mean IoU and accuracy of ``name`` alone on ``split`` (``None`` when not recorded)."""
    file = run_dir / "metrics" / f"{split}.json"
    try:
        results = json.loads(file.read_text(encoding="utf-8")).get("results", [])
    except (OSError, ValueError, AttributeError):
        return None
    for row in results if isinstance(results, list) else []:
        if isinstance(row, dict) and row.get("name") == f"{name} alone":
            picked = {k: float(row[k]) for k in ("mean_iou", "accuracy") if isinstance(row.get(k), int | float)}
            return picked or None
    return None


def export_weights(
    run_dir: str | Path,
    out: str | Path | None = None,
    checkpoint: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> WeightsExport:
    """Write each zoo model of a trained run as ``<out>/<name>.safetensors``, and ``<out>/zoo.json``.

    Args:
        run_dir: The run directory.
        out: The folder (default: ``RUN_DIR/export/safetensors``).
        checkpoint: Checkpoint name (default: ``final``, else the latest).
        trust_remote_code: Import the plugin code the run names even if it comes from elsewhere.
        overwrite: Replace files already in ``out`` (otherwise existing files are an error and
            nothing is written).

    Returns:
        The `WeightsExport`.

    Raises:
        ConfigError: Not a run directory, an unknown checkpoint, an untrusted run.
        CheckpointError: The weights do not fit the models.
        FileExistsError: A file to write exists and ``overwrite`` is false.
        ImportError: ``safetensors`` is not installed.
    """
    from safetensors.torch import save

    from routerkit.config import ConfigError
    from routerkit.training.run_dir import load_routing

    path = Path(run_dir)
    parts = load_routing(path, checkpoint, trust_remote_code, "cpu")
    out_dir = Path(out) if out is not None else path / "export" / "safetensors"
    names = list(parts.zoo.names)
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ConfigError(f"Model name {name!r} of {path} cannot name a file: expected a name without '/' or '..'.")
    targets = [out_dir / f"{name}.safetensors" for name in names] + [out_dir / "zoo.json"]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        listed = ", ".join(str(t) for t in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise FileExistsError(f"Refusing to overwrite {listed}: pass overwrite=True (--overwrite) or another folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    index_file = out_dir / "zoo.json"
    if index_file.exists():  # first, so that an interrupted export leaves no index vouching for files it did not write
        index_file.unlink()
    mode = 0o666 & ~_umask()
    scored = Path(parts.checkpoint).stem == "final"  # metrics/*.json describe the final weights
    entries = []
    for i, name in enumerate(names):
        model = parts.zoo[i]
        # cloned: tensors that share storage (tied weights) are refused by safetensors
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        target = out_dir / f"{name}.safetensors"
        data = save(tensors, metadata={"routerkit_model": name})
        atomic_write_bytes(target, data)
        os.chmod(target, mode)
        spec = parts.config.zoo.models[i]
        entry: dict[str, Any] = {
            "name": name,
            "file": target.name,
            "model": spec.model,
            "params": spec.params,
            "num_parameters": int(sum(p.numel() for p in model.parameters())),
            "sha256": hashlib.sha256(data).hexdigest(),  # of the bytes written
        }
        for split in ("val", "test") if scored else ():
            scores = _scores(path, split, name)
            if scores is not None:
                entry[split] = scores
        entries.append(entry)
    index = {
        "source": {"run_dir": str(path.resolve()), "checkpoint": Path(parts.checkpoint).stem, "seed": parts.config.run.seed},
        "models": entries,
    }
    atomic_write_json(index_file, index)  # last: its presence says the set is complete
    os.chmod(index_file, mode)
    return WeightsExport(out_dir, targets, index)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
