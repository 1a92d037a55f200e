"""The built-in ``folder`` data factory: a user's image / mask folders from YAML alone.

The layout is ``root/<split>/images/`` and ``root/<split>/masks/`` for the splits ``train``,
``val`` and ``test``; files pair up by stem and masks map to class ids through a value map, as
in `routerkit.data.folder.load_folder_split`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from routerkit.data import DATASETS, DataBundle, FileFormat, Split
from routerkit.data.folder import load_folder_split

__all__ = ["fit_size", "folder_dataset"]


def fit_size(split: Split, size: Sequence[int], ignore_index: int | None) -> Split:
    """Centre-crop or pad every image and mask of ``split`` to ``size = (H, W)``.

    A dimension larger than asked is cropped around its centre; a smaller one is padded on both
    sides, images with zeros and masks with ``ignore_index`` (so padded pixels count in no loss
    and no score). Padding without an ``ignore_index`` is refused.
    """
    if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in size):
        raise ValueError(f"Expected size to be [height, width] of two positive ints but got {list(size)}.")
    if split.images.dim() != 4 or split.targets.dim() != 3:
        raise ValueError(f"Expected a segmentation split (images [N, C, H, W]) but got images {tuple(split.images.shape)}.")
    images, targets = split.images, split.targets
    for axis, want in zip((-2, -1), size, strict=True):
        have = images.shape[axis]
        if have > want:
            start = (have - want) // 2
            images, targets = images.narrow(axis, start, want), targets.narrow(axis, start, want)
        elif have < want:
            if ignore_index is None:
                raise ValueError(
                    f"Expected images of at least {list(size)} to crop, but they are {list(split.images.shape[-2:])}: padding "
                    "them needs an ignore_index for the padded mask pixels (set data.params.ignore_index, e.g. 255)."
                )
            before, after = (want - have) // 2, want - have - (want - have) // 2
            pad = (0, 0, before, after) if axis == -2 else (before, after)
            images = torch.nn.functional.pad(images, pad)
            targets = torch.nn.functional.pad(targets, pad, value=ignore_index)
    return Split(images.contiguous(), targets.contiguous(), dict(split.meta))


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
) -> DataBundle:
    """A segmentation data set from image / mask folders, for ``data.factory: folder``.

    The layout is ``root/<split>/images/`` and ``root/<split>/masks/`` for the splits ``train``,
    ``val`` and ``test`` (folder names configurable), files paired by stem as in `load_folder_split`.

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
            deviation, for every split (scans that use a narrow band of a 16-bit range).
        size: ``[H, W]`` every image is centre-cropped or padded to (e.g. a size the patch grid and
            the models' down-sampling divide); ``None`` keeps the files' size.

    Returns:
        The `~routerkit.data.DataBundle` with ``class_names`` and ``ignore_index``.
    """
    _check_classes(value_map, default_class, class_names, ignore_index)
    base = Path(os.path.expandvars(os.path.expanduser(str(root))))
    if not base.is_dir():
        raise FileNotFoundError(f"Expected data.params.root {root!r} to be a folder ({base.resolve()}) but it is not.")
    folders = {"train": "train", "val": "val", "test": "test", **dict(splits or {})}
    unknown = sorted(set(folders) - {"train", "val", "test"})
    if unknown:
        raise ValueError(f"Expected splits to name only train, val and test but got {unknown}.")
    loaded = {
        name: load_folder_split(base / sub / images, base / sub / masks, value_map, default_class, extensions, normalize)
        for name, sub in folders.items()
    }
    fmt_mean: tuple[float, ...] | None = None
    fmt_std: tuple[float, ...] | None = None
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
    # Predicted masks are written with the data set's own values: the first mask value of each class.
    mask_values: dict[int, int] = {}
    for value, class_id in sorted(value_map.items()):
        mask_values.setdefault(int(class_id), int(value))
    fmt = FileFormat(scale=normalize, mean=fmt_mean, std=fmt_std, mask_values=mask_values)
    return DataBundle(loaded["train"], loaded["val"], loaded["test"], list(class_names), ignore_index, fmt)
