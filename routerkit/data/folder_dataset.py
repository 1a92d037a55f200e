"""The built-in ``folder`` data factory: a user's image / mask folders from YAML alone.

The layout is ``root/<split>/images/`` and ``root/<split>/masks/`` for the splits ``train``,
``val`` and ``test``; files pair up by stem and masks map to class ids through a value map, as
in `routerkit.data.folder.load_folder_split`. With ``lazy: true`` the splits are read from the
files batch by batch (`routerkit.data.folder.FolderDataset`) instead of held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from routerkit.data import DATASETS, BaseSplit, DataBundle, DatasetSplit, FileFormat, Split
from routerkit.data.folder import FolderDataset, load_folder_split

__all__ = ["fit_sample", "fit_size", "folder_dataset"]


def _check_size(size: Sequence[int]) -> None:
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in size):
        raise ValueError(f"Expected size to be [height, width] of two positive ints but got {list(size)}.")


def fit_sample(images: Tensor, targets: Tensor, size: Sequence[int], ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Centre-crop or pad images ``[..., H, W]`` and their masks ``[..., H, W]`` to ``size = (H, W)``.

    One sample (``[C, H, W]`` and ``[H, W]``) or a batch (``[N, C, H, W]`` and ``[N, H, W]``), with the
    semantics of `fit_size`.

    Args:
        images: Images, the last two dimensions spatial.
        targets: Masks of the same spatial size.
        size: ``(H, W)`` wanted.
        ignore_index: Mask label of padded pixels (``None``: padding is refused).

    Returns:
        ``(images, targets)`` of spatial size ``size`` (contiguous).

    Raises:
        ValueError: ``size`` is not two positive ints, or padding is needed without an ``ignore_index``.
    """
    _check_size(size)
    have_size = list(images.shape[-2:])
    for axis, want in zip((-2, -1), size, strict=True):
        have = images.shape[axis]
        if have > want:
            start = (have - want) // 2
            images, targets = images.narrow(axis, start, want), targets.narrow(axis, start, want)
        elif have < want:
            if ignore_index is None:
                raise ValueError(
                    f"Expected images of at least {list(size)} to crop, but they are {have_size}: padding "
                    "them needs an ignore_index for the padded mask pixels (set data.params.ignore_index, e.g. 255)."
                )
            before, after = (want - have) // 2, want - have - (want - have) // 2
            pad = (0, 0, before, after) if axis == -2 else (before, after)
            images = torch.nn.functional.pad(images, pad)
            targets = torch.nn.functional.pad(targets, pad, value=ignore_index)
    return images.contiguous(), targets.contiguous()


def fit_size(split: Split, size: Sequence[int], ignore_index: int | None) -> Split:
    """Centre-crop or pad every image and mask of ``split`` to ``size = (H, W)``.

    A dimension larger than asked is cropped around its centre; a smaller one is padded on both
    sides, images with zeros and masks with ``ignore_index`` (so padded pixels count in no loss
    and no score). Padding without an ``ignore_index`` is refused. `fit_sample` does the same
    for one sample.
    """
    _check_size(size)
    if split.images.dim() != 4 or split.targets.dim() != 3:
        raise ValueError(f"Expected a segmentation split (images [N, C, H, W]) but got images {tuple(split.images.shape)}.")
    images, targets = fit_sample(split.images, split.targets, size, ignore_index)
    return Split(images, targets, dict(split.meta))


class _Prepared(Dataset[tuple[Tensor, Tensor]]):
    """The items of a `FolderDataset` standardised (``(image - mean) / std``) and fitted to ``size``, as the eager path."""

    def __init__(
        self,
        data: FolderDataset,
        mean: Tensor | None,
        std: Tensor | None,
        size: Sequence[int] | None,
        ignore_index: int | None,
    ) -> None:
        self.data, self.mean, self.std, self.ignore_index = data, mean, std, ignore_index
        self.size = None if size is None else tuple(size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = self.data[index]
        if self.mean is not None and self.std is not None:
            image = (image - self.mean) / self.std
        if self.size is not None:
            image, target = fit_sample(image, target, self.size, self.ignore_index)
        return image, target


def _streamed_stats(data: FolderDataset, num_workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) standard deviation of every image of ``data``, in one pass over the files.

    Each image's mean and sum of squared deviations are taken in float64 and merged (Chan et al.), so
    the result matches the in-memory ``mean`` / ``std`` of the eager path; values are rounded to float32
    like those.
    """
    count = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    for images, _ in DatasetSplit(data, num_workers=num_workers, name="train").batches(16):
        x = images.double().transpose(0, 1).reshape(images.shape[1], -1)  # [C, B * H * W]
        n = x.shape[1]
        batch_mean = x.mean(dim=1)
        batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(dim=1)
        if mean is None or m2 is None:
            count, mean, m2 = n, batch_mean, batch_m2
            continue
        delta = batch_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + batch_m2 + delta**2 * (count * n / total)
        count = total
    assert mean is not None and m2 is not None  # a FolderDataset is never empty
    std = (m2 / max(count - 1, 1)).sqrt()
    return tuple(mean.float().tolist()), tuple(std.float().clamp_min(1e-12).tolist())


def _check_classes(
    value_map: Mapping[int, int], default_class: int | None, class_names: Sequence[str], ignore: int | None
) -> None:
    """Every class id of ``value_map`` / ``default_class`` names a class (or is the ignore index)."""
    if not isinstance(class_names, (list, tuple)) or len(class_names) < 2 or not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"Expected class_names to be a list of at least 2 names but got {class_names!r}.")
    if not isinstance(value_map, Mapping):
        raise TypeError(f"Expected value_map to map mask values to class ids (e.g. {{0: 0, 255: 1}}) but got {value_map!r}.")
    ids = [*value_map.values(), *([] if default_class is None else [default_class])]
    bad = sorted({int(c) for c in ids if isinstance(c, (int, np.integer)) and not 0 <= c < len(class_names) and c != ignore})
    if bad:
        raise ValueError(
            f"Expected class ids in [0, {len(class_names)}) (one per name of class_names {list(class_names)}) or the "
            f"ignore_index {ignore} but value_map / default_class give {bad}."
        )


@DATASETS.register("folder")
def folder_dataset(
    root: str,
    value_map: Mapping[int, int],
    class_names: Sequence[str],
    splits: Mapping[str, str] | None = None,
    images: str = "images",
    masks: str = "masks",
    default_class: int | None = None,
    ignore_index: int | None = None,
    extensions: Sequence[str] = (".png", ".tif", ".tiff"),
    normalize: str = "auto",
    standardize: bool = False,
    size: Sequence[int] | None = None,
    lazy: bool = False,
    num_workers: int = 0,
) -> DataBundle:
    """A segmentation data set from image / mask folders, for ``data.factory: folder``.

    The layout is ``root/<split>/images/`` and ``root/<split>/masks/`` for the splits ``train``,
    ``val`` and ``test`` (folder names configurable), files paired by stem as in `load_folder_split`.

    By default every split is read into memory (a `~routerkit.data.Split`), the fast path for data
    that fits. With ``lazy`` every split is a `~routerkit.data.DatasetSplit` over a
    `~routerkit.data.folder.FolderDataset`: only the file names are listed up front (and, with
    ``standardize``, the training files are read once for their statistics), and each batch is
    read from the files when it is needed, every epoch, by ``num_workers`` worker processes. Both
    give the same tensors.

    Example:
        A YAML section (paths may use ``~`` and environment variables)::

            data:
              factory: folder
              params:
                root: $ROUTERKIT_DATA/my_scans
                value_map: {0: 0, 128: 1, 255: 2}
                class_names: [pore, carbon, nickel]
                standardize: true
                size: [224, 240]
                lazy: true        # read the files batch by batch (data larger than memory)
                num_workers: 4    # DataLoader worker processes reading them

    Args:
        root: Folder holding one sub-folder per split.
        value_map: Mask value -> class id (ints), for example ``{0: 0, 128: 1, 255: 2}``.
        class_names: Name of each class id; the number of classes is its length.
        splits: Sub-folder of each split, ``{"train": ..., "val": ..., "test": ...}`` (default: the split names).
        images: Name of the images folder inside each split folder.
        masks: Name of the masks folder inside each split folder.
        default_class: Class of mask values missing from ``value_map`` (``None``: they are an error).
        ignore_index: Mask label that losses and scores skip (and that padding writes).
        extensions: File extensions read.
        normalize: ``"auto"`` (8-bit / 255, 16-bit / 65535) or ``"none"`` (raw values).
        standardize: Subtract the training split's per-channel mean and divide by its standard
            deviation, for every split (scans that use a narrow band of a 16-bit range). With
            ``lazy`` the statistics come from one streaming pass over the training files.
        size: ``[H, W]`` every image is centre-cropped or padded to (e.g. a size the patch grid and
            the models' down-sampling divide); ``None`` keeps the files' size.
        lazy: Read the files batch by batch instead of holding the splits in memory, for data that
            does not fit; every file is then read again in every epoch.
        num_workers: ``DataLoader`` worker processes reading the files of lazy splits (0: read in
            the training process); ignored unless ``lazy``.

    Returns:
        The `~routerkit.data.DataBundle` with ``class_names`` and ``ignore_index``.

    Raises:
        FileNotFoundError: ``root`` or a split folder is missing, or a folder holds no image.
        ValueError: A bad parameter, or a file that `load_folder_split` refuses (with ``lazy``: when it is read).
    """
    _check_classes(value_map, default_class, class_names, ignore_index)
    if not isinstance(lazy, bool):
        raise ValueError(f"Expected data.params.lazy to be true or false but got {lazy!r}.")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"Expected data.params.num_workers to be an int >= 0 but got {num_workers!r}.")
    if size is not None:
        _check_size(size)
    base = Path(os.path.expandvars(os.path.expanduser(str(root))))
    if not base.is_dir():
        raise FileNotFoundError(f"Expected data.params.root {root!r} to be a folder ({base.resolve()}) but it is not.")
    folders = {"train": "train", "val": "val", "test": "test", **dict(splits or {})}
    unknown = sorted(set(folders) - {"train", "val", "test"})
    if unknown:
        raise ValueError(f"Expected splits to name only train, val and test but got {unknown}.")
    fmt_mean: tuple[float, ...] | None = None
    fmt_std: tuple[float, ...] | None = None
    out: dict[str, BaseSplit]
    if lazy:
        data = {
            name: FolderDataset(base / sub / images, base / sub / masks, value_map, default_class, extensions, normalize)
            for name, sub in folders.items()
        }
        mean_t = std_t = None
        if standardize:  # statistics of the training files as read, before any padding
            fmt_mean, fmt_std = _streamed_stats(data["train"], num_workers)
            mean_t, std_t = torch.tensor(fmt_mean).reshape(-1, 1, 1), torch.tensor(fmt_std).reshape(-1, 1, 1)
        out = {
            name: DatasetSplit(_Prepared(d, mean_t, std_t, size, ignore_index), num_workers=num_workers, name=name)
            for name, d in data.items()
        }
    else:
        loaded = {
            name: load_folder_split(base / sub / images, base / sub / masks, value_map, default_class, extensions, normalize)
            for name, sub in folders.items()
        }
        if standardize:  # statistics of the training files as read, before any padding
            dims = [0, *range(2, loaded["train"].images.dim())]
            raw = loaded["train"].images
            fmt_mean = tuple(raw.mean(dim=dims).tolist())
            fmt_std = tuple(raw.std(dim=dims).clamp_min(1e-12).tolist())
            mean = torch.tensor(fmt_mean).reshape(1, -1, *([1] * (raw.dim() - 2)))
            std = torch.tensor(fmt_std).reshape(1, -1, *([1] * (raw.dim() - 2)))
            loaded = {k: Split((s.images - mean) / std, s.targets, s.meta) for k, s in loaded.items()}
        if size is not None:
            loaded = {k: fit_size(s, size, ignore_index) for k, s in loaded.items()}
        out = dict(loaded)
    # Predicted masks are written with the data set's own values: the first mask value of each class.
    mask_values: dict[int, int] = {}
    for value, class_id in sorted(value_map.items()):
        mask_values.setdefault(int(class_id), int(value))
    fmt = FileFormat(scale=normalize, mean=fmt_mean, std=fmt_std, mask_values=mask_values)
    return DataBundle(out["train"], out["val"], out["test"], list(class_names), ignore_index, fmt)
