"""Data containers and the PaSeR D_PT / D_RL / D_FT split.

A split yields ``images [B, C, H, W]`` float32 and ``targets`` int64 (``[B, H, W]`` masks for
segmentation, ``[B]`` labels for classification) in mini-batches. Two kinds share one interface
(`BaseSplit`):

- `Split`: every sample held as one tensor in memory, the fast path for small data;
- `DatasetSplit`: a ``torch.utils.data.Dataset`` read lazily, batch by batch, through a
  ``DataLoader`` (worker processes, ``pin_memory`` on accelerators), for data that does not fit
  in memory. Both give the same batches in the same order for the same generator.

Data plugins return a `DataBundle`; see `routerkit.data.folder` for image folders.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from routerkit._registry import Registry
from routerkit.data.spec import DataSpec, FileFormat

__all__ = ["DATASETS", "BaseSplit", "DataBundle", "DataSpec", "DatasetSplit", "FileFormat", "Split", "paser_split", "shard_of"]


#: Built-in data factories, by the name ``data.factory`` takes (``folder``: `routerkit.data.folder`,
#: registered when that module is imported, as ``import routerkit`` does); a dotted path reaches a
#: plugin's factory instead. Each returns a `DataBundle`.
DATASETS: Registry[Any] = Registry("data factory")


def _order(n: int, shuffle: bool, generator: torch.Generator | None) -> Tensor:
    """The sample order of one pass: ``randperm`` from ``generator`` when shuffling, else ``0..n-1``."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def shard_of(index: Tensor, shard: tuple[int, int] | None) -> Tensor:
    """Rank ``r``'s contiguous share of a global batch ``index`` for ``shard = (r, world)``.

    Shares differ in size by at most one. A rank whose share would be empty (a batch smaller than
    the world) gets the batch's first sample, so that it can still run its step (its loss then
    weighs nothing: see `routerkit.training.distributed.Distributed.loss_scale`).
    """
    if shard is None:
        return index
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"Expected a shard (rank, world) with 0 <= rank < world but got {shard}.")
    mine = torch.tensor_split(index, world)[rank]
    return mine if mine.numel() else index[:1]


class BaseSplit(ABC):
    """What every split offers the stages, evaluation and plots: its size, shapes and mini-batches.

    Subclasses: `Split` (tensors in memory) and `DatasetSplit` (a ``Dataset`` read lazily).
    """

    meta: dict[str, Tensor]

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples N."""

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension."""

    @property
    @abstractmethod
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one target without the batch dimension (``()`` for a class label)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the batches are delivered."""

    @abstractmethod
    def to(self, device: torch.device | str) -> BaseSplit:
        """The same split delivering its batches on ``device``."""

    @abstractmethod
    def subset(self, index: Tensor) -> BaseSplit:
        """The samples at ``index`` (a LongTensor of positions), of the same kind."""

    def index_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(index, images, targets)`` mini-batches; ``index`` are the samples' positions.

        With ``shuffle``, the order is ``torch.randperm(len(self), generator=generator)``, the same
        for every kind of split, drawn when the first batch is asked for. With ``shard = (rank,
        world)`` each global batch of ``batch_size`` is cut as `shard_of` cuts it and only this
        rank's share is read and yielded.
        """
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1 but got {batch_size}.")
        order = _order(len(self), shuffle, generator)
        plan = [shard_of(order[s : s + batch_size], shard) for s in range(0, len(self), batch_size)]
        yield from self._read(plan, shard)

    def _read(self, plan: list[Tensor], shard: tuple[int, int] | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Read the batches of ``plan`` (one tensor of positions per batch), in order, as ``(index, images, targets)``.

        A kind of split implements this, or `index_batches` itself.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither _read nor index_batches.")

    @abstractmethod
    def materialize(self, index: Tensor | None = None) -> Split:
        """The samples at ``index`` (default: all) as an in-memory `Split`."""

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(images, targets)`` mini-batches (see `index_batches`)."""
        for _, images, targets in self.index_batches(batch_size, shuffle, generator, shard):
            yield images, targets

    @property
    def is_classification(self) -> bool:
        """Whether a target is one class label per input (else a mask per input)."""
        return len(self.target_shape) == 0

    def take(self, n: int) -> Split:
        """The first ``n`` samples (fewer if the split is smaller) in memory, e.g. for a figure."""
        return self.materialize(torch.arange(min(int(n), len(self))))

    @abstractmethod
    def check_targets(self, name: str, num_classes: int, ignore_index: int | None) -> None:
        """Raise a clear error if a target is not a class id in ``[0, num_classes)`` or ``ignore_index``."""


def _bad_targets(t: Tensor, num_classes: int, ignore_index: int | None) -> Tensor:
    """Mask of the target values that are neither a class id nor the ignore index."""
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    return bad


def _target_error(name: str, t: Tensor, bad: Tensor, num_classes: int, ignore_index: int | None, where: str = "") -> ValueError:
    values = sorted(set(t[bad].unique().tolist()))[:10]
    return ValueError(
        f"Expected the {name} split's targets{where} to be class ids in [0, {num_classes}) or the ignore_index "
        f"{ignore_index} but found {values}: check the value map of the masks (or the labels) against class_names."
    )


@dataclass
class Split(BaseSplit):
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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def target_shape(self) -> tuple[int, ...]:
        return tuple(self.targets.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> Split:
        """A copy of the split on ``device``."""
        return Split(self.images.to(device), self.targets.to(device), {k: v.to(device) for k, v in self.meta.items()})

    def subset(self, index: Tensor) -> Split:
        """The samples at ``index`` (a LongTensor of positions)."""
        index = index.to(self.images.device)
        return Split(self.images[index], self.targets[index], {k: v[index] for k, v in self.meta.items()})

    def materialize(self, index: Tensor | None = None) -> Split:
        return self if index is None else self.subset(index)

    def _read(self, plan: list[Tensor], shard: tuple[int, int] | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for idx in plan:
            on = idx.to(self.images.device)
            yield idx, self.images[on], self.targets[on]

    def check_targets(self, name: str, num_classes: int, ignore_index: int | None) -> None:
        bad = _bad_targets(self.targets, num_classes, ignore_index)
        if bool(bad.any()):
            raise _target_error(name, self.targets, bad, num_classes, ignore_index)


class DatasetSplit(BaseSplit):
    """A split read lazily from a ``torch.utils.data.Dataset``, batch by batch.

    Each item of ``dataset`` is ``(image, target)``: an image ``[C, H, W]`` (or ``[D]``) float
    tensor and a target ``[H, W]`` (mask) or ``[]`` (label) integer tensor (numpy arrays and
    Python ints are converted). Batches go through a ``DataLoader`` with ``num_workers`` worker
    processes and ``pin_memory`` (default: when the batches go to an accelerator), in the order
    `BaseSplit.index_batches` defines, so a `DatasetSplit` and a `Split` of the same samples give
    the same batches. Only one batch is held at a time: memory does not grow with the data set.

    Every item is checked against the first item's shapes and, once the split belongs to a
    `DataBundle`, every batch's targets against the class ids, with an error naming the split and samples.

    Args:
        dataset: The samples (any map-style ``Dataset`` with ``__len__``).
        num_workers: ``DataLoader`` worker processes (0: read in the calling process).
        pin_memory: Page-locked batches for fast copies to an accelerator (``None``: when ``device`` is one).
        device: Where the batches are delivered.
        meta: Optional small per-sample tensors held in memory (e.g. a group label for ``train_on``).
        name: What the split is called in error messages (e.g. ``"train"``).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        num_workers: int = 0,
        pin_memory: bool | None = None,
        device: torch.device | str = "cpu",
        meta: dict[str, Tensor] | None = None,
        name: str = "dataset",
    ) -> None:
        if not hasattr(dataset, "__len__"):
            raise TypeError(f"Expected a map-style Dataset with __len__ for DatasetSplit but got {type(dataset).__name__}.")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"Expected num_workers to be an int >= 0 but got {num_workers!r}.")
        self.dataset, self.num_workers, self.name = dataset, num_workers, name
        self._device = torch.device(device)
        self._pin_default = pin_memory is None
        self.pin_memory = self._device.type != "cpu" if pin_memory is None else bool(pin_memory)
        n = len(dataset)  # type: ignore[arg-type]
        self.meta = dict(meta or {})
        for key, value in self.meta.items():
            if value.shape[0] != n:
                raise ValueError(f"Expected meta[{key!r}] of the {name} split to have {n} rows but got {value.shape[0]}.")
        self._classes: tuple[int, int | None] | None = None
        self._passes = 0
        if n == 0:
            raise ValueError(f"Expected a non-empty Dataset for the {name} split but it has no item.")
        image, target = _as_sample(dataset[0], name, 0)
        self._shapes = (tuple(image.shape), tuple(target.shape))
        if image.dim() == 3 and target.dim() == 2 and image.shape[-2:] != target.shape:
            raise ValueError(
                f"Expected the {name} split's masks to have the images' spatial size {tuple(image.shape[-2:])} but sample 0 "
                f"has a mask of {tuple(target.shape)}."
            )

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._shapes[0]

    @property
    def target_shape(self) -> tuple[int, ...]:
        return self._shapes[1]

    @property
    def device(self) -> torch.device:
        return self._device

    def _like(self, dataset: Dataset[Any], meta: dict[str, Tensor], device: torch.device | None = None) -> DatasetSplit:
        """A copy of this split's settings (workers, pinning, shapes, class check) over ``dataset``, not read again."""
        out = copy.copy(self)
        out.dataset, out.meta, out._passes = dataset, meta, 0
        out._device = self._device if device is None else device
        return out

    def to(self, device: torch.device | str) -> DatasetSplit:
        device = torch.device(device)
        out = self._like(self.dataset, {k: v.to(device) for k, v in self.meta.items()}, device)
        if self._pin_default:  # pin_memory not given: page-locked batches exactly when they go to an accelerator
            out.pin_memory = device.type != "cpu"
        return out

    def subset(self, index: Tensor) -> DatasetSplit:
        rows = index.reshape(-1).tolist()
        meta = {k: v[index.to(v.device)] for k, v in self.meta.items()}
        return self._like(Subset(self.dataset, rows), meta)

    def check_targets(self, name: str, num_classes: int, ignore_index: int | None) -> None:
        """Targets are checked batch by batch as they are read (reading them all here would read the whole data set)."""
        self.name, self._classes = name, (num_classes, ignore_index)

    def _loader(self, batches: list[list[int]], shard: tuple[int, int] | None) -> DataLoader[Any]:
        # The loader's own generator seeds its workers (random transforms of a Dataset): a new seed per pass and
        # rank, and never a draw from the global generators (dropout, MC passes), which would change the run.
        self._passes += 1
        seed = self._passes * 1_000_003 + (shard[0] if shard else 0)
        return DataLoader(
            _Indexed(self.dataset, self.name, self._shapes),
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=_collate,
            generator=torch.Generator().manual_seed(seed),
        )

    def _read(self, plan: list[Tensor], shard: tuple[int, int] | None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        batches = iter(self._loader([idx.tolist() for idx in plan], shard))
        try:
            for idx, images, targets in batches:
                if self._classes is not None:
                    bad = _bad_targets(targets, *self._classes)
                    if bool(bad.any()):
                        hit = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten().tolist()
                        rows = sorted({_root_index(self.dataset, int(idx[i])) for i in hit})
                        raise _target_error(self.name, targets, bad, *self._classes, where=f" (samples {rows[:8]})")
                fast = self.pin_memory
                yield idx, images.to(self._device, non_blocking=fast), targets.to(self._device, non_blocking=fast)
        finally:  # stop the worker processes now (an error or an early break leaves them to a slow garbage collection)
            shutdown = getattr(batches, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            del batches

    def materialize(self, index: Tensor | None = None) -> Split:
        part = self if index is None else self.subset(index)
        chunks = list(part.index_batches(64))
        if not chunks:  # an empty selection: empty tensors of the split's shapes
            empty = torch.empty((0, *self._shapes[0])), torch.empty((0, *self._shapes[1]), dtype=torch.long)
            return Split(*empty, {k: v[:0] for k, v in part.meta.items()})
        images = torch.cat([c[1] for c in chunks])
        targets = torch.cat([c[2] for c in chunks])
        return Split(images, targets, dict(part.meta))


def _as_sample(item: Any, name: str, index: int) -> tuple[Tensor, Tensor]:
    """One ``(image, target)`` item as a float32 image tensor and an int64 target tensor."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(
            f"Expected item {index} of the {name} split's Dataset to be (image, target) but got "
            + (f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__)
            + "."
        )
    image, target = torch.as_tensor(item[0]), torch.as_tensor(item[1])
    if not image.is_floating_point():
        raise TypeError(f"Expected item {index} of the {name} split to have a float image but got {image.dtype}.")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"Expected item {index} of the {name} split to have an integer target but got {target.dtype}.")
    return image.float(), target.long()


class _Indexed(Dataset[tuple[int, Tensor, Tensor]]):
    """Items of a dataset with their position, converted to ``(index, float image, int64 target)`` and checked."""

    def __init__(self, dataset: Dataset[Any], name: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        self.dataset, self.name, self.shapes = dataset, name, shapes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor, Tensor]:
        image, target = _as_sample(self.dataset[index], self.name, _root_index(self.dataset, index))
        if (tuple(image.shape), tuple(target.shape)) != self.shapes:
            raise ValueError(
                f"Expected every sample of the {self.name} split to have an input of {self.shapes[0]} and a target of "
                f"{self.shapes[1]} (as its first sample) but sample {_root_index(self.dataset, index)} has "
                f"{tuple(image.shape)} and {tuple(target.shape)}."
            )
        return index, image, target


def _root_index(dataset: Dataset[Any], index: int) -> int:
    """The position in the user's Dataset of item ``index`` of ``dataset`` (through the `Subset` of D_PT / D_RL / D_FT)."""
    while isinstance(dataset, Subset):
        index, dataset = int(dataset.indices[index]), dataset.dataset
    return index


def _collate(items: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)
    return index, torch.stack([x for _, x, _ in items]), torch.stack([t for _, _, t in items])


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

    train: BaseSplit
    val: BaseSplit
    test: BaseSplit
    class_names: list[str]
    ignore_index: int | None = None
    file_format: FileFormat = field(default_factory=FileFormat)

    def __post_init__(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError(f"Expected at least 2 class names but got {self.class_names}.")
        for name, split in self.splits().items():
            if not isinstance(split, BaseSplit):
                raise TypeError(
                    f"Expected DataBundle.{name} to be a routerkit.data.Split or DatasetSplit but got {type(split).__name__}."
                )
        shapes = {name: s.input_shape for name, s in self.splits().items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"Expected every split to have the same input shape but got {shapes}.")
        for name, split in self.splits().items():
            split.check_targets(name, len(self.class_names), self.ignore_index)

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension."""
        return self.train.input_shape

    def splits(self) -> dict[str, BaseSplit]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    @property
    def spec(self) -> DataSpec:
        """What a trained run keeps of this data to route new inputs (`routerkit.data.spec.DataSpec`)."""
        task = "classification" if self.train.is_classification else "segmentation"
        return DataSpec(self.input_shape, list(self.class_names), self.ignore_index, task, self.file_format)

    def to(self, device: torch.device | str) -> DataBundle:
        """The same bundle with every split on ``device``."""
        return dataclasses.replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))


def paser_split(
    train: BaseSplit, fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3), seed: int = 0
) -> dict[str, BaseSplit]:
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
