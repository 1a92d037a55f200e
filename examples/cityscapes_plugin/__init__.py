"""Cityscapes plugin: the official ``leftImg8bit`` / ``gtFine`` layout, 19 train ids, 255 = ignore.

Referenced from the YAML as ``data.factory: cityscapes_plugin:build_data``. Cityscapes needs a
registration at https://www.cityscapes-dataset.com, so routerkit never downloads it: fetch
``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` yourself, unzip both into one
folder (it then holds ``leftImg8bit/`` and ``gtFine/``) and point ``data.params.root`` (or
``$ROUTERKIT_DATA/cityscapes``) at it. Without the real data, `make_fixture` writes a small
synthetic stand-in in the same layout::

    cd examples && python -m cityscapes_plugin.fixture /tmp/cityscapes_fixture

Layout read by `build_data` (``stem`` is ``{city}_{sequence}_{frame}``, e.g. ``aachen_000000_000019``)::

    root/leftImg8bit/{train,val,test}/{city}/{stem}_leftImg8bit.png
    root/gtFine/{train,val,test}/{city}/{stem}_gtFine_labelIds.png
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cityscapes_plugin.labels import CLASS_NAMES, IGNORE_INDEX, LABEL_TO_TRAIN, LABELS, label_ids_to_train_ids
from routerkit.data import BaseSplit, DataBundle, DatasetSplit, FileFormat, Split

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LABEL_TO_TRAIN",
    "CityscapesDataset",
    "build_data",
    "find_pairs",
    "label_ids_to_train_ids",
    "load_pair",
    "load_pairs",
    "make_fixture",
    "resolve_root",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in [0, 1], subtracted when ``normalize`` is on."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in [0, 1], divided by when ``normalize`` is on."""

SPLITS = ("train", "val", "test")
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_DOWNLOAD_HELP = (
    "Cityscapes requires a registration, so routerkit never downloads it: get leftImg8bit_trainvaltest.zip and "
    "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com yourself, unzip both into one folder and set "
    "data.params.root to it (or ROUTERKIT_DATA to its parent, holding cityscapes/). For a small synthetic stand-in "
    "in the same layout run: cd examples && python -m cityscapes_plugin.fixture /tmp/cityscapes_fixture"
)


def __getattr__(name: str) -> Any:
    """``make_fixture`` is imported on first use, so ``python -m cityscapes_plugin.fixture`` runs it only once."""
    if name == "make_fixture":
        from cityscapes_plugin.fixture import make_fixture

        return make_fixture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_root(root: str | Path | None) -> Path:
    """The Cityscapes folder: ``root``, else ``$ROUTERKIT_DATA/cityscapes``.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``, or ``None``.

    Returns:
        The existing folder.

    Raises:
        FileNotFoundError: Neither is given, or the folder (or one of its two sub-folders) is missing;
            the message says how to get the data.
    """
    if root is None:
        env = os.environ.get("ROUTERKIT_DATA")
        if not env:
            raise FileNotFoundError(
                f"Expected data.params.root or the ROUTERKIT_DATA environment variable to locate Cityscapes but got neither. "
                f"{_DOWNLOAD_HELP}"
            )
        path = Path(env).expanduser() / "cityscapes"
        source = f"$ROUTERKIT_DATA/cityscapes ({path})"
    else:
        path = Path(root).expanduser()
        source = f"data.params.root ({path})"
    if not path.is_dir():
        raise FileNotFoundError(f"Expected the Cityscapes folder at {source} but it does not exist. {_DOWNLOAD_HELP}")
    missing = [name for name in ("leftImg8bit", "gtFine") if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Expected {source} to hold leftImg8bit/ and gtFine/ but these are missing: {missing}. {_DOWNLOAD_HELP}"
        )
    return path


def find_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """The ``(image, label)`` paths of one official split, sorted by city then stem.

    Args:
        root: The Cityscapes folder (see `resolve_root`).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        One ``(leftImg8bit path, gtFine labelIds path)`` pair per image.

    Raises:
        ValueError: ``split`` is not an official split name.
        FileNotFoundError: The split has no image, or an image has no label file (the message names both).
    """
    if split not in SPLITS:
        raise ValueError(f"Expected a Cityscapes split in {list(SPLITS)} but got {split!r}.")
    root = Path(root)
    images_dir = root / "leftImg8bit" / split
    images = sorted(images_dir.glob(f"*/*{_IMAGE_SUFFIX}")) if images_dir.is_dir() else []
    if not images:
        raise FileNotFoundError(
            f"Expected Cityscapes images {images_dir}/{{city}}/{{stem}}{_IMAGE_SUFFIX} for split {split!r} but found none."
        )
    pairs = []
    for image in images:
        stem = image.name[: -len(_IMAGE_SUFFIX)]
        label = root / "gtFine" / split / image.parent.name / f"{stem}{_LABEL_SUFFIX}"
        if not label.is_file():
            raise FileNotFoundError(f"Expected the label file {label} for image {image} but it does not exist.")
        pairs.append((image, label))
    return pairs


def load_pair(
    image_path: Path, label_path: Path, height: int, width: int, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read, resize and map one image / label pair, as `load_pairs` does for each of its rows.

    Args:
        image_path: The ``leftImg8bit`` image.
        label_path: Its ``gtFine`` labelIds file.
        height: Output height.
        width: Output width.
        normalize: Whether to standardise with `IMAGENET_MEAN` / `IMAGENET_STD`.

    Returns:
        ``(image float32 [3, height, width], train ids int64 [height, width])``.

    Raises:
        ValueError: A file cannot be read, the label file is not single-channel, or the image and its
            label differ in size.
    """
    mean = np.asarray(IMAGENET_MEAN if normalize else (0.0, 0.0, 0.0), dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD if normalize else (1.0, 1.0, 1.0), dtype=np.float32).reshape(3, 1, 1)
    try:
        with Image.open(image_path) as img:
            rgb = img.convert("RGB")
        with Image.open(label_path) as lab:
            lab.load()
            label: Image.Image = lab
    except (OSError, ValueError) as exc:
        raise ValueError(f"Could not read Cityscapes pair {image_path} / {label_path}: {exc}") from exc
    if label.mode not in ("L", "P", "I", "I;16"):
        raise ValueError(
            f"Expected a single-channel labelIds file but {label_path} has mode {label.mode!r}; use the "
            f"*{_LABEL_SUFFIX} files of gtFine, not the *_gtFine_color.png ones."
        )
    if rgb.size != label.size:
        raise ValueError(
            f"Expected image and label of the same size but {image_path} is {rgb.size[0]} x {rgb.size[1]} (W x H) "
            f"and {label_path} is {label.size[0]} x {label.size[1]}."
        )
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        label = label.resize((width, height), Image.Resampling.NEAREST)
    pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    image = np.ascontiguousarray((pixels - mean) / std)
    return image, label_ids_to_train_ids(np.asarray(label))


def load_pairs(pairs: Sequence[tuple[Path, Path]], height: int, width: int, normalize: bool = True) -> Split:
    """Read, resize and map image / label pairs into a `~routerkit.data.Split`.

    Images are converted to RGB, resized with bilinear filtering to ``height x width`` and scaled to
    [0, 1] (then standardised with the ImageNet mean and std when ``normalize``); labels are resized
    with nearest-neighbour sampling and mapped from label ids to train ids (255 = ignore). Each pair
    is read by `load_pair`.

    Args:
        pairs: ``(image path, label path)`` pairs, e.g. from `find_pairs`.
        height: Output height.
        width: Output width.
        normalize: Whether to standardise with `IMAGENET_MEAN` / `IMAGENET_STD`.

    Returns:
        ``images [N, 3, height, width]`` float32 and ``targets [N, height, width]`` int64.

    Raises:
        ValueError: No pair is given, a file cannot be read, a label file is not single-channel, or an
            image and its label differ in size.
    """
    if not pairs:
        raise ValueError("Expected at least one Cityscapes image to load but got none.")
    images = np.empty((len(pairs), 3, height, width), dtype=np.float32)
    targets = np.empty((len(pairs), height, width), dtype=np.int64)
    for row, (image_path, label_path) in enumerate(pairs):
        images[row], targets[row] = load_pair(image_path, label_path, height, width, normalize)  # one image at a time
    return Split(torch.from_numpy(images), torch.from_numpy(targets))


class CityscapesDataset(Dataset[tuple[Tensor, Tensor]]):
    """Image / label pairs read lazily, one per item, by `load_pair` (the tensors `load_pairs` gives, row by row).

    Args:
        pairs: ``(image path, label path)`` pairs, e.g. from `find_pairs`.
        height: Output height.
        width: Output width.
        normalize: Whether to standardise with `IMAGENET_MEAN` / `IMAGENET_STD`.

    Raises:
        ValueError: No pair is given (a bad file raises `load_pair`'s error when its item is read).
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, normalize: bool = True) -> None:
        if not pairs:
            raise ValueError("Expected at least one Cityscapes image to load but got none.")
        self.pairs, self.height, self.width, self.normalize = list(pairs), height, width, normalize

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = load_pair(*self.pairs[index], self.height, self.width, self.normalize)
        return torch.from_numpy(image), torch.from_numpy(target)


def _take(pairs: list[tuple[Path, Path]], count: int | None, field: str, generator: torch.Generator) -> list[tuple[Path, Path]]:
    """A seeded random subset of ``count`` pairs (all when ``None``), kept in sorted order."""
    if count is None:
        return pairs
    if count < 1 or count > len(pairs):
        raise ValueError(f"Expected data.params.{field} in [1, {len(pairs)}] (the images available) but got {count}.")
    keep = torch.randperm(len(pairs), generator=generator)[:count].sort().values
    return [pairs[i] for i in keep.tolist()]


def build_data(
    root: str | None = None,
    height: int = 128,
    width: int = 256,
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    test_split: str = "val",
    normalize: bool = True,
    patch_grid: Sequence[int] | None = (2, 4),
    val_fraction: float = 0.1,
    seed: int = 0,
    lazy: bool = False,
    num_workers: int = 0,
) -> DataBundle:
    """Build the Cityscapes data set (19 classes, ``ignore_index=255``) from the official layout.

    The official test split has no public labels (its label files are placeholders), so by default
    (``test_split="val"``) routerkit reports results on the official **val** split and carves its own
    validation split (threshold searches, calibration) out of the official **train** split: a seeded
    random ``num_val`` images (default ``val_fraction`` of train), disjoint from the ``num_train`` training
    images. With ``test_split="test"`` (only for a test split with real labels) train, val and test are
    the three official splits. Subsets (``num_*``) are seeded random draws, the same for the same ``seed``.

    Args:
        root: Folder holding ``leftImg8bit/`` and ``gtFine/``; ``$ROUTERKIT_DATA/cityscapes`` when ``None``.
        height: Height the images are resized to (bilinear; labels nearest).
        width: Width the images are resized to.
        num_train: Training images (D_PT + D_RL + D_FT); all the remaining ones when ``None``.
        num_val: Validation images; ``None``: ``val_fraction`` of train (``test_split="val"``) or all of val.
        num_test: Test images; all of the test split when ``None``.
        test_split: Official split reported as routerkit's test split: ``"val"`` or ``"test"``.
        normalize: Standardise RGB in [0, 1] with the ImageNet mean and std (else keep [0, 1]).
        patch_grid: ``(rows, cols)`` of the ``patch_grid`` partitioner, checked to divide ``height x width``;
            ``None`` skips the check. Keep it equal to ``partitioner.params``.
        val_fraction: Share of the official train split carved out as validation when ``num_val`` is ``None``.
        seed: Seed of the subset draws and of the train / validation carve-out.
        lazy: Read the images batch by batch (each split a `~routerkit.data.DatasetSplit` over a
            `CityscapesDataset`) instead of holding them in memory, for data that does not fit (the
            full data set at high resolution); every file is then read again in every epoch. Both give
            the same tensors.
        num_workers: ``DataLoader`` worker processes reading the files of lazy splits (0: read in the
            training process); ignored unless ``lazy``.

    Returns:
        The train / val / test bundle with the 19 Cityscapes classes in train-id order.

    Raises:
        FileNotFoundError: The data set is missing (the message says how to get it), a split has no image,
            or an image has no label file.
        ValueError: A bad parameter (named after its ``data.params`` field), an unreadable file (with
            ``lazy``: when it is read), or a test split whose labels are all ignored (with ``lazy``:
            judged by its first image).
    """
    if height < 1 or width < 1:
        raise ValueError(f"Expected data.params.height and data.params.width >= 1 but got {height} x {width}.")
    if patch_grid is not None:
        if len(patch_grid) != 2 or min(patch_grid) < 1:
            raise ValueError(f"Expected data.params.patch_grid to be [rows, cols] >= 1 or null but got {patch_grid}.")
        rows, cols = int(patch_grid[0]), int(patch_grid[1])
        if height % rows or width % cols:
            raise ValueError(
                f"Expected data.params.height divisible by {rows} and data.params.width divisible by {cols} "
                f"(data.params.patch_grid = [{rows}, {cols}], the partitioner's grid) but got {height} x {width}."
            )
    if test_split not in ("val", "test"):
        raise ValueError(f"Expected data.params.test_split to be 'val' or 'test' but got {test_split!r}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Expected data.params.val_fraction in (0, 1) but got {val_fraction}.")
    if not isinstance(lazy, bool):
        raise ValueError(f"Expected data.params.lazy to be true or false but got {lazy!r}.")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"Expected data.params.num_workers to be an int >= 0 but got {num_workers!r}.")
    path = resolve_root(root)
    generator = torch.Generator().manual_seed(seed)
    train_pairs = find_pairs(path, "train")
    if test_split == "val":
        if num_val is None:
            num_val = max(1, round(val_fraction * len(train_pairs)))
        if num_val < 1 or num_val >= len(train_pairs):
            raise ValueError(
                f"Expected data.params.num_val in [1, {len(train_pairs) - 1}] (carved out of the {len(train_pairs)} "
                f"official train images) but got {num_val}."
            )
        order = torch.randperm(len(train_pairs), generator=generator).tolist()
        val_pairs = [train_pairs[i] for i in sorted(order[:num_val])]
        train_pairs = [train_pairs[i] for i in sorted(order[num_val:])]
        test_pairs = find_pairs(path, "val")
    else:
        val_pairs = _take(find_pairs(path, "val"), num_val, "num_val", generator)
        test_pairs = find_pairs(path, "test")
    train_pairs = _take(train_pairs, num_train, "num_train", generator)
    test_pairs = _take(test_pairs, num_test, "num_test", generator)
    splits: list[BaseSplit]
    if lazy:
        splits = [
            DatasetSplit(CityscapesDataset(pairs, height, width, normalize), num_workers=num_workers, name=name)
            for name, pairs in zip(SPLITS, (train_pairs, val_pairs, test_pairs), strict=True)
        ]
        # Only the first test label is read here (the official test split's labels are all placeholders).
        test_targets = load_pair(*test_pairs[0], height, width, normalize)[1]
    else:
        splits = [load_pairs(pairs, height, width, normalize) for pairs in (train_pairs, val_pairs, test_pairs)]
        test_targets = splits[2].targets.numpy()
    if bool((test_targets == IGNORE_INDEX).all()):
        raise ValueError(
            f"Expected labelled test images but every label pixel of the official {test_split!r} split is ignored "
            "(the official test split has no public labels): use data.params.test_split='val'."
        )
    train_to_label = {label.train_id: label.id for label in LABELS if 0 <= label.train_id < IGNORE_INDEX}
    fmt = FileFormat(
        mean=IMAGENET_MEAN if normalize else None,
        std=IMAGENET_STD if normalize else None,
        mask_values=train_to_label,  # predicted masks in the official labelIds
    )
    return DataBundle(splits[0], splits[1], splits[2], list(CLASS_NAMES), ignore_index=IGNORE_INDEX, file_format=fmt)
