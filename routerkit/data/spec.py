"""What a trained run needs to know about its data to route new inputs, without the data itself.

A data plugin describes how one of its *files* becomes a model input (`FileFormat`: scaling of
8/16-bit pixels, per-channel mean and std, and the mask value written for each class id). A
run saves it, with the input shape, the classes and the task, as ``data_spec.json``
(`DataSpec`); `routerkit.load` and `routerkit predict` read that file instead of building the
training data again.

Example:
    >>> fmt = FileFormat(mean=(0.5,), std=(0.25,), mask_values={0: 0, 1: 255})
    >>> spec = DataSpec((1, 32, 32), ["background", "digit"], None, "segmentation", fmt)
    >>> DataSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "DataSpec", "FileFormat"]

#: ``"segmentation"`` (``[N, H, W]`` masks, one class per pixel) or ``"classification"`` (``[N]`` labels).
TASKS = ("segmentation", "classification")
_SCALES = ("auto", "none")


def _floats(name: str, values: Any) -> tuple[float, ...] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"Expected {name} to be a list of numbers, one per channel, but got {values!r}.") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"Expected {name} to be a non-empty list of finite numbers but got {values!r}.")
    return out


@dataclass(frozen=True)
class FileFormat:
    """How a data set's image file becomes one model input, and a class id a mask value.

    Args:
        scale: ``"auto"``: 8-bit pixels divided by 255 and 16-bit ones by 65535, into [0, 1];
            ``"none"``: raw values.
        mean: Per-channel mean subtracted after scaling (``None``: 0).
        std: Per-channel standard deviation divided by after the mean (``None``: 1).
        mask_values: Class id -> pixel value written in predicted mask files (e.g. ``{0: 0, 1:
            255, 2: 128}``, the inverse of the data set's value map); a class missing from it, or
            every class when ``None``, is written as its class id.

    Raises:
        ValueError: An unknown ``scale``, a non-finite or zero ``std``, or mask values outside 0..65535.
    """

    scale: str = "auto"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mask_values: dict[int, int] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.scale not in _SCALES:
            raise ValueError(f"Expected FileFormat.scale to be one of {list(_SCALES)} but got {self.scale!r}.")
        object.__setattr__(self, "mean", _floats("FileFormat.mean", self.mean))
        object.__setattr__(self, "std", _floats("FileFormat.std", self.std))
        if self.std is not None and any(s == 0 for s in self.std):
            raise ValueError(f"Expected a non-zero FileFormat.std per channel but got {list(self.std)}.")
        if self.mask_values is not None:
            try:
                values = {int(k): int(v) for k, v in dict(self.mask_values).items()}
            except (TypeError, ValueError):
                raise ValueError(
                    f"Expected FileFormat.mask_values to map class ids to integer pixel values but got {self.mask_values!r}."
                ) from None
            bad = {k: v for k, v in values.items() if not 0 <= v <= 65535}
            if bad:
                raise ValueError(f"Expected mask values in 0..65535 (8 or 16-bit masks) but got {bad}.")
            object.__setattr__(self, "mask_values", values)

    def mask_value(self, class_id: int) -> int:
        """The pixel value a predicted mask file holds for ``class_id``."""
        return class_id if self.mask_values is None else self.mask_values.get(class_id, class_id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (mask value keys as strings)."""
        return {
            "scale": self.scale,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "mask_values": {str(k): v for k, v in self.mask_values.items()} if self.mask_values is not None else None,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FileFormat:
        """Inverse of `to_dict`.

        Raises:
            ValueError: Unknown keys or bad values.
        """
        unknown = sorted(set(raw) - {"scale", "mean", "std", "mask_values"})
        if unknown:
            raise ValueError(f"Expected the keys scale, mean, std and mask_values of a file format but got also {unknown}.")
        return cls(raw.get("scale", "auto"), raw.get("mean"), raw.get("std"), raw.get("mask_values"))


@dataclass(frozen=True)
class DataSpec:
    """A trained run's inputs and outputs: enough to route new files without the training data.

    Args:
        input_shape: One input without the batch dimension, e.g. ``(1, 112, 128)``.
        class_names: Name of each class id.
        ignore_index: The label value losses skipped, if any (never predicted).
        task: One of `TASKS`.
        file_format: How files are read (`FileFormat`).

    Raises:
        ValueError: Fewer than 2 classes, an unknown task, a bad shape, or a mean/std whose length
            is not the number of input channels.
    """

    input_shape: tuple[int, ...]
    class_names: list[str]
    ignore_index: int | None = None
    task: str = "segmentation"
    file_format: FileFormat = field(default_factory=FileFormat)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"Expected input_shape of positive sizes, e.g. [1, 112, 128], but got {list(self.input_shape)}.")
        object.__setattr__(self, "input_shape", shape)
        if len(self.class_names) < 2:
            raise ValueError(f"Expected at least 2 class names but got {self.class_names}.")
        if self.task not in TASKS:
            raise ValueError(f"Expected task to be one of {list(TASKS)} but got {self.task!r}.")
        channels = shape[0]
        for name in ("mean", "std"):
            values = getattr(self.file_format, name)
            if values is not None and len(values) not in (1, channels):
                raise ValueError(
                    f"Expected file_format.{name} with 1 or {channels} values (the input's channels) but got {list(values)}."
                )

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """Input channels C."""
        return self.input_shape[0]

    @property
    def spatial(self) -> bool:
        """Whether inputs are images ``[C, H, W]`` with one class per pixel."""
        return len(self.input_shape) == 3 and self.task == "segmentation"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "input_shape": list(self.input_shape),
            "class_names": list(self.class_names),
            "ignore_index": self.ignore_index,
            "task": self.task,
            "file_format": self.file_format.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = "data spec") -> DataSpec:
        """Inverse of `to_dict`; ``source`` names the file in errors.

        Raises:
            ValueError: Naming ``source`` and the field that is missing or wrong.
        """
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object but got {type(raw).__name__}.")
        missing = [k for k in ("input_shape", "class_names") if k not in raw]
        if missing:
            raise ValueError(f"{source}: expected the fields input_shape and class_names but {missing} are missing.")
        try:
            return cls(
                tuple(raw["input_shape"]),
                [str(c) for c in raw["class_names"]],
                raw.get("ignore_index"),
                raw.get("task", "segmentation"),
                FileFormat.from_dict(raw.get("file_format") or {}),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
