"""In-memory data containers and the PaSeR D_PT / D_RL / D_FT split.

Routing experiments hold their splits as tensors: ``images [N, C, H, W]`` float32 and
``targets`` int64 (``[N, H, W]`` masks for segmentation, ``[N]`` labels for classification).
Data plugins return a `DataBundle`; see `routerkit.data.folder` for image folders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from routerkit._registry import Registry
from routerkit.data.spec import DataSpec, FileFormat

__all__ = ["DATASETS", "DataBundle", "DataSpec", "FileFormat", "Split", "paser_split"]


#: Built-in data factories, by the name ``data.factory`` takes (``folder``: `routerkit.data.folder`,
#: registered when that module is imported, as ``import routerkit`` does); a dotted path reaches a
#: plugin's factory instead. Each returns a `DataBundle`.
DATASETS: Registry[Any] = Registry("data factory")


@dataclass
class Split:
    """One split of a data set, held in memory.

    Args:
        images: ``[N, C, H, W]`` (or ``[N, D]``) float32 inputs.
        targets: ``[N, H, W]`` int64 masks or ``[N]`` int64 labels.
        meta: Optional per-sample tensors (for example a difficulty map), indexed like ``images``.
    """

    images: Tensor
    targets: Tensor
    meta: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, Tensor) or not isinstance(self.targets, Tensor):
            raise TypeError("Expected Split.images and Split.targets to be torch tensors.")
        if self.images.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"Expected as many targets as images but got images {tuple(self.images.shape)} "
                f"and targets {tuple(self.targets.shape)}."
            )
        if self.images.dim() == 4 and self.targets.dim() == 3 and self.images.shape[-2:] != self.targets.shape[-2:]:
            raise ValueError(
                f"Expected masks with the images' spatial size {tuple(self.images.shape[-2:])} but got "
                f"{tuple(self.targets.shape[-2:])}."
            )
        self.images = self.images.float()
        self.targets = self.targets.long()
        for key, value in self.meta.items():
            if value.shape[0] != self.images.shape[0]:
                raise ValueError(f"Expected meta[{key!r}] to have {self.images.shape[0]} rows but got {value.shape[0]}.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """A copy of the split on ``device``."""
        return Split(self.images.to(device), self.targets.to(device), {k: v.to(device) for k, v in self.meta.items()})

    def subset(self, index: Tensor) -> Split:
        """The samples at ``index`` (a LongTensor of positions)."""
        index = index.to(self.images.device)
        return Split(self.images[index], self.targets[index], {k: v[index] for k, v in self.meta.items()})

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images, targets)`` mini-batches."""
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1 but got {batch_size}.")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size].to(self.images.device)
            yield self.images[idx], self.targets[idx]


@dataclass
class DataBundle:
    """Train / validation / test splits plus what the task needs to know about classes.

    Args:
        train: Training split (cut into D_PT / D_RL / D_FT by `paser_split`).
        val: Validation split (threshold searches, calibration).
        test: Test split (reported results).
        class_names: Name of each class id.
        ignore_index: Label value that losses and IoU skip, if any.
        file_format: How one of the data set's image files becomes an input and a class id a mask
            value (`routerkit.data.spec.FileFormat`), for routing new files after training.
    """

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    ignore_index: int | None = None
    file_format: FileFormat = field(default_factory=FileFormat)

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"Expected at least 2 class names but got {self.class_names}.")
        shapes = {name: tuple(s.images.shape[1:]) for name, s in self.splits().items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"Expected every split to have the same input shape but got {shapes}.")
        k = len(self.class_names)
        for name, split in self.splits().items():
            t = split.targets
            bad = (t < 0) | (t >= k)
            if self.ignore_index is not None:
                bad &= t != self.ignore_index
            if bool(bad.any()):
                values = sorted(set(t[bad].unique().tolist()))[:10]
                raise ValueError(
                    f"Expected the {name} split's targets to be class ids in [0, {k}) (one per class name "
                    f"{self.class_names}) or the ignore_index {self.ignore_index} but found {values}: check the value "
                    "map of the masks (or the labels) against class_names."
                )

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension."""
        return tuple(self.train.images.shape[1:])

    def splits(self) -> dict[str, Split]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def spec(self) -> DataSpec:
        """What a trained run keeps of this data to route new inputs (`routerkit.data.spec.DataSpec`)."""
        task = "classification" if self.train.targets.dim() == 1 else "segmentation"
        return DataSpec(self.input_shape, list(self.class_names), self.ignore_index, task, self.file_format)

    def to(self, device: torch.device | str) -> DataBundle:
        """The same bundle with every split on ``device``."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def paser_split(train: Split, fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3), seed: int = 0) -> dict[str, Split]:
    """Cut the training split into PaSeR's D_PT, D_RL and D_FT (equal thirds in the paper).

    Args:
        train: The training split.
        fractions: Shares of D_PT, D_RL and D_FT; must sum to 1.
        seed: Seed of the shuffle.

    Returns:
        ``{"pt": ..., "rl": ..., "ft": ...}``.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"Expected three positive fractions summing to 1 for D_PT/D_RL/D_FT but got {fractions}.")
    n = len(train)
    if n < 3:
        raise ValueError(f"Expected at least 3 training samples to split into D_PT/D_RL/D_FT but got {n}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_pt = max(1, round(fractions[0] * n))
    n_rl = max(1, round(fractions[1] * n))
    n_pt = min(n_pt, n - 2)
    n_rl = min(n_rl, n - n_pt - 1)
    return {
        "pt": train.subset(order[:n_pt]),
        "rl": train.subset(order[n_pt : n_pt + n_rl]),
        "ft": train.subset(order[n_pt + n_rl :]),
    }
