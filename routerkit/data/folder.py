"""Image / mask folder data sets for users' own segmentation data.

A folder data set is an images folder and a masks folder whose files pair up by *stem*
(``a.png`` pairs with ``a.tif``). Images may be PNG or TIFF, 8-bit or 16-bit, grayscale or RGB;
masks are single-channel and their pixel values are mapped to class ids through a ``value_map``.

Example:
    >>> split = load_folder_split("data/images", "data/masks", {0: 0, 255: 1})  # doctest: +SKIP
    >>> split.images.shape, split.targets.shape  # doctest: +SKIP
    (torch.Size([12, 1, 256, 256]), torch.Size([12, 256, 256]))

`FolderDataset` reads the same files lazily, one image / mask pair per item, for data that does not
fit in memory (wrap it in a `~routerkit.data.DatasetSplit`).

`routerkit.data.folder_dataset.folder_dataset` (``data.factory: folder`` in a YAML) reads a whole
data set laid out as ``root/{train,val,test}/{images,masks}/`` with no Python at all.

`load_paser_battery` reads the battery electrode data set of the PaSeR paper
(``root/{train,validation,test}_{images,label}/``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from routerkit.data import Split

__all__ = [
    "PASER_BATTERY_CLASSES",
    "PASER_BATTERY_VALUE_MAP",
    "FolderDataset",
    "folder_pairs",
    "load_folder_split",
    "load_paser_battery",
    "read_image",
    "read_image_bytes",
]

PASER_BATTERY_CLASSES: list[str] = ["pore", "carbon", "nickel"]
"""Class names of the PaSeR battery data set, indexed by class id."""

PASER_BATTERY_VALUE_MAP: dict[int, int] = {0: 0, 255: 1}
"""Mask value -> class id of the PaSeR battery masks; every other value is nickel (class 2)."""

_PASER_BATTERY_DEFAULT_CLASS = 2
_MAX_LISTED = 10
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Image modes converted before reading (alpha is dropped, palettes and colour spaces go to RGB).
_IMAGE_CONVERSIONS = {
    "1": "L",
    "LA": "L",
    "La": "L",
    "P": "RGB",
    "PA": "RGB",
    "RGBA": "RGB",
    "RGBa": "RGB",
    "RGBX": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "LAB": "RGB",
    "HSV": "RGB",
}
_SINGLE_CHANNEL_MASK_MODES = ("1", "L", "P", "I", *_SIXTEEN_BIT_MODES)


def _short_list(values: Sequence[object], limit: int = _MAX_LISTED) -> str:
    """``[a, b, c]`` with at most ``limit`` entries, followed by how many were left off."""
    shown = ", ".join(str(v) for v in values[:limit])
    more = f", ... ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case extensions with a leading dot."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    out = tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)
    if not out:
        raise ValueError("Expected at least one file extension but got none.")
    return out


def _files_by_stem(folder: Path, extensions: tuple[str, ...], kind: str) -> dict[str, Path]:
    """The image files of ``folder`` keyed by stem; hidden files and other extensions are skipped."""
    if not folder.exists():
        raise FileNotFoundError(f"Expected a {kind} folder at {folder} but it does not exist.")
    if not folder.is_dir():
        raise NotADirectoryError(f"Expected {folder} to be a {kind} folder but it is a file.")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in extensions or not path.is_file():
            continue
        if path.stem in files:
            raise ValueError(
                f"Expected one {kind} file per stem in {folder} but {files[path.stem].name!r} and "
                f"{path.name!r} share the stem {path.stem!r}."
            )
        files[path.stem] = path
    if not files:
        raise FileNotFoundError(f"Expected {kind} files with extensions {list(extensions)} in {folder} but found none.")
    return files


def folder_pairs(
    images_dir: str | Path,
    masks_dir: str | Path,
    extensions: Iterable[str] = (".png", ".tif", ".tiff"),
) -> list[tuple[str, Path, Path]]:
    """Pair the files of an images folder with those of a masks folder by stem.

    Extensions are matched case-insensitively; hidden files and files with other extensions are
    ignored. The pairs come sorted by stem, which is the row order of `load_folder_split`.

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks.
        extensions: File extensions to read.

    Returns:
        ``(stem, image_path, mask_path)`` for every stem, sorted by stem.

    Raises:
        FileNotFoundError: A folder is missing or holds no file with one of ``extensions``.
        NotADirectoryError: A folder path is a file.
        ValueError: Two files of one folder share a stem, or a stem has an image but no mask
            (or a mask but no image).
    """
    exts = _normalize_extensions(extensions)
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    images = _files_by_stem(images_dir, exts, "image")
    masks = _files_by_stem(masks_dir, exts, "mask")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"images in {images_dir} without a mask in {masks_dir}: {_short_list(no_mask)}")
    if no_image:
        problems.append(f"masks in {masks_dir} without an image in {images_dir}: {_short_list(no_image)}")
    if problems:
        raise ValueError("Expected every image to have a mask with the same stem but found " + "; ".join(problems) + ".")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


class _Blob:
    """An image file's bytes under a name (an upload): read like a file, named like one in messages."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name = data, name

    def open(self, mode: str = "rb") -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return self.name


def _png_bit_depth(path: Path | _Blob) -> int | None:
    """Bit depth per sample from a PNG's IHDR chunk, or ``None`` for other files."""
    with path.open("rb") as handle:
        header = handle.read(26)
    if len(header) < 26 or not header.startswith(_PNG_SIGNATURE) or header[12:16] != b"IHDR":
        return None
    return header[24]


def _source_bit_depth(path: Path | _Blob, image: Image.Image) -> int | None:
    """Largest bits per sample stored in the file (PNG header or TIFF tag 258), if known."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, tuple) and bits:
            return int(max(bits))
        if isinstance(bits, int):
            return bits
    return _png_bit_depth(path)


def _open(path: Path | _Blob, kind: str) -> Image.Image:
    """Open and fully decode an image file, turning Pillow's errors into one that names the file."""
    try:
        with Image.open(path.open("rb") if isinstance(path, _Blob) else path) as image:
            frames = int(getattr(image, "n_frames", 1))
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        text = str(exc)
        if isinstance(path, _Blob):  # Pillow names the in-memory stream; the blob's name is already in the message
            text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)
        raise ValueError(f"Could not read {kind} file {path}: {text}") from exc
    if frames > 1:
        raise ValueError(
            f"Expected a single-page {kind} file but {path} has {frames} pages (frames); save each page as its own file."
        )
    return image


def _check_not_reduced(path: Path | _Blob, image: Image.Image, kind: str) -> None:
    """Refuse files with more than 8 bits per sample that Pillow would decode as 8-bit (16-bit RGB)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        return
    bits = _source_bit_depth(path, image)
    if bits is not None and bits > 8:
        raise ValueError(
            f"Cannot read {kind} file {path}: it stores {bits}-bit samples in mode {image.mode!r}, which Pillow "
            "reduces to 8 bits. Only grayscale images may be 16-bit; save 16-bit colour data as 8-bit RGB "
            "or as one 16-bit grayscale file per channel."
        )


def _looks_16bit(path: Path | _Blob, image: Image.Image, array: np.ndarray) -> bool:
    """Whether a mode-"I" image came from a 16-bit file (by its header, else by its value range)."""
    bits = _source_bit_depth(path, image)
    if bits is not None:
        return bits <= 16
    return bool(array.size) and int(array.min()) >= 0 and int(array.max()) <= 65535


def _read_image(path: Path | _Blob, normalize: str) -> np.ndarray:
    """One image as float32 ``[C, H, W]``, scaled to [0, 1] unless ``normalize == "none"``."""
    image = _open(path, "image")
    _check_not_reduced(path, image, "image")
    mode = image.mode
    if mode in _IMAGE_CONVERSIONS:
        image = image.convert(_IMAGE_CONVERSIONS[mode])
        mode = image.mode
    array = np.asarray(image)
    if mode in ("L", "RGB"):
        scale = 255.0
    elif mode in _SIXTEEN_BIT_MODES:
        scale = 65535.0
    elif mode == "I" and _looks_16bit(path, image, array):
        scale = 65535.0  # 16-bit grayscale decoded as 32-bit integers (older Pillow versions)
    elif mode in ("I", "F"):
        scale = 0.0  # 32-bit samples: only readable raw
        if normalize == "auto":
            kind = "float" if mode == "F" else "integer"
            raise ValueError(
                f"Cannot scale image file {path} to [0, 1]: it holds 32-bit {kind} samples and only 8-bit and "
                "16-bit images are scaled; pass normalize='none' to keep raw values."
            )
    else:
        raise ValueError(f"Cannot read image file {path}: unsupported image mode {mode!r}.")
    out = array.astype(np.float32)
    if normalize == "auto":
        out /= np.float32(scale)
    return out[None] if out.ndim == 2 else np.ascontiguousarray(out.transpose(2, 0, 1))


def read_image(path: str | Path, normalize: str = "auto") -> np.ndarray:
    """One PNG / TIFF / JPEG image file as float32 ``[C, H, W]`` (C = 1 or 3), as `load_folder_split` reads it.

    Args:
        path: The file.
        normalize: ``"auto"`` scales 8-bit pixels by 1/255 and 16-bit ones by 1/65535 into [0, 1];
            ``"none"`` keeps raw values.

    Raises:
        ValueError: The file cannot be decoded, has several pages, or holds samples that cannot be
            scaled (32-bit, 16-bit colour); the message names the file.
    """
    if normalize not in ("auto", "none"):
        raise ValueError(f"Expected normalize to be 'auto' or 'none' but got {normalize!r}.")
    return _read_image(Path(path), normalize)


def read_image_bytes(data: bytes, name: str, normalize: str = "auto") -> np.ndarray:
    """`read_image` of a file's bytes held in memory (an upload), with ``name`` standing for the file in messages.

    Args:
        data: The encoded image (PNG, TIFF, JPEG).
        name: What messages call it.
        normalize: As `read_image`.

    Raises:
        ValueError: As `read_image`; the message names ``name``.
    """
    if normalize not in ("auto", "none"):
        raise ValueError(f"Expected normalize to be 'auto' or 'none' but got {normalize!r}.")
    return _read_image(_Blob(data, name), normalize)


def _read_mask(path: Path) -> np.ndarray:
    """One mask's raw values as int64 ``[H, W]``."""
    image = _open(path, "mask")
    if image.mode == "F":
        raise ValueError(f"Expected an integer mask but {path} holds floating-point values (mode 'F').")
    if image.mode not in _SINGLE_CHANNEL_MASK_MODES:
        channels = len(image.getbands())
        raise ValueError(
            f"Expected a single-channel (grayscale or palette) mask but {path} has mode {image.mode!r} "
            f"with {channels} channel(s); save masks as 8-bit or 16-bit grayscale."
        )
    _check_not_reduced(path, image, "mask")
    return np.asarray(image).astype(np.int64)


def _check_value_map(value_map: Mapping[int, int], default_class: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys and their class ids as int64 arrays."""
    items = sorted(value_map.items())
    for key, value in items:
        if not isinstance(key, (int, np.integer)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"Expected value_map to map int mask values to int class ids but got {key!r}: {value!r}.")
    if default_class is not None and not isinstance(default_class, (int, np.integer)):
        raise TypeError(f"Expected default_class to be an int or None but got {default_class!r}.")
    if not items and default_class is None:
        raise ValueError("Expected a non-empty value_map or a default_class but got neither.")
    keys = np.array([k for k, _ in items], dtype=np.int64)
    classes = np.array([v for _, v in items], dtype=np.int64)
    return keys, classes


def _map_values(
    mask: np.ndarray,
    keys: np.ndarray,
    classes: np.ndarray,
    default_class: int | None,
    path: Path,
    value_map: Mapping[int, int],
) -> np.ndarray:
    """Map raw mask values to class ids with a vectorised sorted-key lookup."""
    if keys.size:
        pos = np.minimum(np.searchsorted(keys, mask), keys.size - 1)
        found = keys[pos] == mask
        mapped = classes[pos]
    else:
        found = np.zeros(mask.shape, dtype=bool)
        mapped = np.zeros(mask.shape, dtype=np.int64)
    if found.all():
        return mapped
    if default_class is None:
        unmapped = np.unique(mask[~found]).tolist()
        raise ValueError(
            f"Mask file {path} holds values that value_map does not map: {_short_list(unmapped)}; "
            f"value_map is {dict(value_map)}. Add them to value_map or pass default_class."
        )
    return np.where(found, mapped, np.int64(default_class))


def load_folder_split(
    images_dir: str | Path,
    masks_dir: str | Path,
    value_map: Mapping[int, int],
    default_class: int | None = None,
    extensions: Iterable[str] = (".png", ".tif", ".tiff"),
    normalize: str = "auto",
) -> Split:
    """Load a segmentation split from an images folder and a masks folder.

    Images and masks pair up by file stem (``a.png`` pairs with ``a.tif``) and rows are sorted by stem
    (see `folder_pairs`). Images may be 8-bit or 16-bit, grayscale or RGB, but every image of the
    split must have the same shape. Alpha channels are dropped and palette images become RGB. Only
    grayscale images may be 16-bit: Pillow reduces 16-bit colour files to 8 bits, so they are refused.

    Masks must be single-channel (8/16-bit grayscale, 1-bit or palette; a 1-bit mask holds 0 and 1, a
    palette mask its palette indices). Each raw value is mapped to a class id through ``value_map``.

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks, one per image with the same stem.
        value_map: Mask value -> class id, for example ``{0: 0, 255: 1}``.
        default_class: Class id of mask values missing from ``value_map``; ``None`` makes them an error.
        extensions: File extensions to read (case-insensitive); other files are ignored.
        normalize: ``"auto"`` scales 8-bit images by 1/255 and 16-bit images by 1/65535 into [0, 1];
            ``"none"`` keeps the raw values (as float32).

    Returns:
        A `~routerkit.data.Split` with ``images [N, C, H, W]`` float32 and ``targets [N, H, W]`` int64.

    Raises:
        FileNotFoundError: A folder is missing or has no file with one of ``extensions``.
        NotADirectoryError: A folder path is a file.
        ValueError: Unpaired stems, unreadable files, images of differing shapes, an image and mask of
            different size, a mask that is not single-channel, unmapped mask values (without
            ``default_class``) or a bad ``normalize``.
        TypeError: ``value_map`` or ``default_class`` does not hold ints.
    """
    if normalize not in ("auto", "none"):
        raise ValueError(f"Expected normalize to be 'auto' or 'none' but got {normalize!r}.")
    keys, classes = _check_value_map(value_map, default_class)
    pairs = folder_pairs(images_dir, masks_dir, extensions)

    images: np.ndarray | None = None
    targets: np.ndarray | None = None
    first_name = ""
    for row, (_, image_path, mask_path) in enumerate(pairs):
        image = _read_image(image_path, normalize)
        if images is None or targets is None:
            images = np.empty((len(pairs), *image.shape), dtype=np.float32)
            targets = np.empty((len(pairs), *image.shape[1:]), dtype=np.int64)
            first_name = image_path.name
        elif image.shape != images.shape[1:]:
            raise ValueError(
                f"Expected every image in {Path(images_dir)} to have the shape (C, H, W) = {images.shape[1:]} "
                f"of {first_name!r} but {image_path} has {image.shape}."
            )
        mask = _read_mask(mask_path)
        if mask.shape != image.shape[1:]:
            raise ValueError(
                f"Expected image and mask of the same size but image {image_path} is (H, W) = {image.shape[1:]} "
                f"and mask {mask_path} is {mask.shape}."
            )
        images[row] = image
        targets[row] = _map_values(mask, keys, classes, default_class, mask_path, value_map)
    assert images is not None and targets is not None  # folder_pairs never returns an empty list
    return Split(torch.from_numpy(images), torch.from_numpy(targets))


class FolderDataset(Dataset[tuple[Tensor, Tensor]]):
    """An images folder and a masks folder read lazily: one image / mask pair per item.

    Each item is read as `load_folder_split` reads one row (same pairing by stem and order, same
    scaling, value map and error messages), so ``DatasetSplit(FolderDataset(...)).materialize()``
    equals `load_folder_split` with the same arguments. Only the file names are listed when it is
    built; a bad file raises its error when its item is read. Every image must have the shape of
    the first one (sorted by stem).

    Example:
        >>> from routerkit.data import DatasetSplit
        >>> data = FolderDataset("data/images", "data/masks", {0: 0, 255: 1})  # doctest: +SKIP
        >>> split = DatasetSplit(data, num_workers=4)  # doctest: +SKIP
        >>> image, mask = data[0]  # doctest: +SKIP
        >>> image.shape, mask.shape  # doctest: +SKIP
        (torch.Size([1, 256, 256]), torch.Size([256, 256]))

    Args:
        images_dir: Folder of images.
        masks_dir: Folder of masks, one per image with the same stem.
        value_map: Mask value -> class id, for example ``{0: 0, 255: 1}``.
        default_class: Class id of mask values missing from ``value_map``; ``None`` makes them an error.
        extensions: File extensions to read (case-insensitive); other files are ignored.
        normalize: ``"auto"`` scales 8-bit images by 1/255 and 16-bit images by 1/65535 into [0, 1];
            ``"none"`` keeps the raw values (as float32).

    Raises:
        FileNotFoundError: A folder is missing or has no file with one of ``extensions``.
        NotADirectoryError: A folder path is a file.
        ValueError: Unpaired stems or a bad ``normalize`` (when built); an unreadable file, an image
            of another shape than the first, an image and mask of different size, a mask that is
            not single-channel or unmapped mask values (when that item is read).
        TypeError: ``value_map`` or ``default_class`` does not hold ints.
    """

    def __init__(
        self,
        images_dir: str | Path,
        masks_dir: str | Path,
        value_map: Mapping[int, int],
        default_class: int | None = None,
        extensions: Iterable[str] = (".png", ".tif", ".tiff"),
        normalize: str = "auto",
    ) -> None:
        if normalize not in ("auto", "none"):
            raise ValueError(f"Expected normalize to be 'auto' or 'none' but got {normalize!r}.")
        self._keys, self._classes = _check_value_map(value_map, default_class)
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.value_map, self.default_class, self.normalize = dict(value_map), default_class, normalize
        self.pairs = folder_pairs(images_dir, masks_dir, extensions)
        self._first_shape: tuple[int, ...] | None = None  # the first image's (C, H, W), known once it is read

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        _, image_path, mask_path = self.pairs[index]
        image = _read_image(image_path, self.normalize)
        if index == 0:
            self._first_shape = image.shape
        else:
            if self._first_shape is None:
                self._first_shape = _read_image(self.pairs[0][1], self.normalize).shape
            if image.shape != self._first_shape:
                raise ValueError(
                    f"Expected every image in {self.images_dir} to have the shape (C, H, W) = {self._first_shape} "
                    f"of {self.pairs[0][1].name!r} but {image_path} has {image.shape}."
                )
        mask = _read_mask(mask_path)
        if mask.shape != image.shape[1:]:
            raise ValueError(
                f"Expected image and mask of the same size but image {image_path} is (H, W) = {image.shape[1:]} "
                f"and mask {mask_path} is {mask.shape}."
            )
        return image, _map_values(mask, self._keys, self._classes, self.default_class, mask_path, self.value_map)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """Pair ``index`` (in stem order) as ``(image float32 [C, H, W], mask int64 [H, W])``."""
        if not -len(self.pairs) <= index < len(self.pairs):
            raise IndexError(f"Expected an index in [0, {len(self.pairs)}) but got {index}.")
        image, target = self._read(index % len(self.pairs))
        return torch.from_numpy(image), torch.from_numpy(target)


def load_paser_battery(root: str | Path, splits: Sequence[str] = ("train", "validation", "test")) -> dict[str, Split]:
    """Load the PaSeR battery electrode data set.

    The expected layout is ``root/<split>_images/`` and ``root/<split>_label/`` for each split, holding
    grayscale PNGs paired by stem. Mask value 0 is pore (class 0), 255 is carbon (class 1) and every other
    value is nickel (class 2); see :data:`PASER_BATTERY_CLASSES`.

    Args:
        root: Folder holding the split folders.
        splits: Splits to load.

    Returns:
        ``{split: Split}`` for each name in ``splits``.

    Raises:
        FileNotFoundError: ``root`` or a split folder is missing (all missing folders are listed).
        ValueError: ``splits`` is empty, or a split fails `load_folder_split`'s checks.
    """
    root = Path(root)
    if isinstance(splits, str):
        splits = (splits,)
    if not splits:
        raise ValueError("Expected at least one split name but got none.")
    layout = ", ".join(f"{name}_images/ + {name}_label/" for name in splits)
    if not root.is_dir():
        raise FileNotFoundError(f"Expected the PaSeR battery folder at {root} (holding {layout}) but it is not a folder.")
    missing = [
        str(root / f"{name}_{part}") for name in splits for part in ("images", "label") if not (root / f"{name}_{part}").is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"Expected the PaSeR battery layout root/<split>_images/ and root/<split>_label/ ({layout}) in {root} "
            f"but these folders are missing: {missing}."
        )
    return {
        name: load_folder_split(
            root / f"{name}_images",
            root / f"{name}_label",
            PASER_BATTERY_VALUE_MAP,
            default_class=_PASER_BATTERY_DEFAULT_CLASS,
        )
        for name in splits
    }
