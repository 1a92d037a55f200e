"""CIFAR-10 readers (JPEG archives, lossless subset, python pickles, download) and the `DataBundle`.

Every reader returns *pools*: the images of the official training set (train and validation
are drawn from it) and of the official test set, as ``uint8 [N, 3, 32, 32]`` tensors with
``int64 [N]`` labels. JPEG pools decode lazily: only the images selected are decoded.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import importlib
import io
import os
import pickle
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from routerkit.data import DataBundle, FileFormat, Split

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "CLASS_NAMES",
    "SOURCES",
    "Pool",
    "balanced_order",
    "build_data",
    "detect_source",
    "download_cifar10",
    "load_jpeg",
    "load_lossless",
    "load_pickle",
]

CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names, indexed by class id (the official ``batches.meta`` order)."""

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of the CIFAR-10 training images (RGB, values in [0, 1])."""

CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the CIFAR-10 training images (RGB, values in [0, 1])."""

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
SOURCES: tuple[str, ...] = ("auto", "jpeg", "lossless", "pickle", "download")

_PICKLE_DIR = "cifar-10-batches-py"
_JPEG_DIR = "CIFAR-10-images"
_JPEG_SUBDIRS = ("jpeg_yoongikim", ".")
_LOSSLESS_DIR = "lossless_subset"
_LOSSLESS_FILE = "cifar10_{batch}_first1017.npz"
_MEMBER = re.compile(rf"(?:^|/){re.escape(_JPEG_DIR)}/(train|test)/([^/]+)/([^/]+\.jpe?g)$", re.IGNORECASE)


@dataclass
class Pool:
    """Images of one official split, decoded on demand.

    Args:
        labels: ``int64 [N]`` class id of every image.
        read: Maps sorted positions ``int64 [n]`` to ``uint8 [n, 3, 32, 32]`` images.
        origin: Where the images come from (for messages).
    """

    labels: Tensor
    read: Callable[[Tensor], Tensor]
    origin: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _array_pool(images: Tensor, labels: Tensor, origin: str) -> Pool:
    if images.dim() != 4 or images.shape[1:] != (3, 32, 32) or images.dtype != torch.uint8:
        raise ValueError(
            f"Expected uint8 CIFAR-10 images [N, 3, 32, 32] in {origin} but got {images.dtype} {tuple(images.shape)}."
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"Expected one label per image in {origin} but got {tuple(labels.shape)} for {images.shape[0]} images.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(CLASS_NAMES)):
        raise ValueError(f"Expected labels in [0, {len(CLASS_NAMES) - 1}] in {origin} but got {labels.unique().tolist()}.")
    return Pool(labels.long(), lambda index: images[index], origin)


# ---------------------------------------------------------------- JPEG (archives or extracted folder)


def _jpeg_archive(root: Path, split: str) -> Path | None:
    for sub in _JPEG_SUBDIRS:
        path = root / sub / f"cifar10_jpeg_{split}.tar.gz"
        if path.is_file():
            return path
    return None


def _jpeg_folder(root: Path) -> Path | None:
    for sub in _JPEG_SUBDIRS:
        path = root / sub / _JPEG_DIR
        if (path / "train").is_dir() and (path / "test").is_dir():
            return path
    return None


def _decode_jpegs(blobs: Sequence[bytes]) -> Tensor:
    from PIL import Image

    out = np.empty((len(blobs), 32, 32, 3), np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as img:
            array = np.asarray(img.convert("RGB"))
        if array.shape != (32, 32, 3):
            raise ValueError(f"Expected 32 x 32 CIFAR-10 JPEG images but got one of shape {array.shape}.")
        out[i] = array
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _class_id(name: str, where: str) -> int:
    if name not in CLASS_NAMES:
        raise ValueError(f"Expected CIFAR-10 class folders {list(CLASS_NAMES)} in {where} but found {name!r}.")
    return CLASS_NAMES.index(name)


def _blob_pool(entries: list[tuple[int, str, bytes | Path]], origin: str) -> Pool:
    if not entries:
        raise FileNotFoundError(f"Expected CIFAR-10 JPEG images ({_JPEG_DIR}/<split>/<class>/*.jpg) in {origin} but found none.")
    entries.sort(key=lambda e: (e[0], e[1]))
    labels = torch.tensor([e[0] for e in entries], dtype=torch.int64)

    def read(index: Tensor) -> Tensor:
        blobs = [entries[int(i)][2] for i in index]
        return _decode_jpegs([b.read_bytes() if isinstance(b, Path) else b for b in blobs])

    return Pool(labels, read, origin)


def _read_jpeg_archive(path: Path, split: str) -> Pool:
    """One pass over the ``.tar.gz``: keep every JPEG's bytes (not decoded) with its class id."""
    entries: list[tuple[int, str, bytes | Path]] = []
    with tarfile.open(path, "r|gz") as archive:
        for member in archive:
            match = _MEMBER.search(member.name)
            if not member.isfile() or match is None or match.group(1).lower() != split:
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            entries.append((_class_id(match.group(2), str(path)), member.name, handle.read()))
    return _blob_pool(entries, str(path))


def _read_jpeg_folder(folder: Path, split: str) -> Pool:
    entries: list[tuple[int, str, bytes | Path]] = []
    for class_dir in sorted(p for p in (folder / split).iterdir() if p.is_dir()):
        label = _class_id(class_dir.name, str(folder / split))
        entries.extend((label, f.name, f) for f in class_dir.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
    return _blob_pool(entries, str(folder / split))


def load_jpeg(root: str | Path) -> tuple[Pool, Pool]:
    """The JPEG copy: ``root/jpeg_yoongikim/cifar10_jpeg_{train,test}.tar.gz`` or an extracted ``CIFAR-10-images/``.

    The archives are read in place (no extraction); images are decoded only when selected.

    Args:
        root: Folder holding ``jpeg_yoongikim/`` (or the archives, or ``CIFAR-10-images/``, directly).

    Returns:
        The train and test pools.
    """
    root = Path(root)
    folder = _jpeg_folder(root)
    if folder is not None:
        return _read_jpeg_folder(folder, "train"), _read_jpeg_folder(folder, "test")
    archives = {split: _jpeg_archive(root, split) for split in ("train", "test")}
    missing = [s for s, p in archives.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"data.params.root {str(root)!r} holds no CIFAR-10 JPEG copy: expected jpeg_yoongikim/cifar10_jpeg_"
            f"{{train,test}}.tar.gz (missing: {', '.join(missing)}) or an extracted {_JPEG_DIR}/{{train,test}}/ folder."
        )
    train, test = archives["train"], archives["test"]
    assert train is not None and test is not None
    return _read_jpeg_archive(train, "train"), _read_jpeg_archive(test, "test")


# ---------------------------------------------------------------- lossless subset (npz)


def _lossless_path(root: Path, batch: str) -> Path:
    return root / _LOSSLESS_DIR / _LOSSLESS_FILE.format(batch=batch)


def load_lossless(root: str | Path) -> tuple[Pool, Pool]:
    """The exact-pixel subset: the first 1,017 images of ``data_batch_1`` (train) and ``test_batch`` (test).

    Args:
        root: Folder holding ``lossless_subset/cifar10_{test_batch,data_batch_1}_first1017.npz``.

    Returns:
        The train and test pools.
    """
    root = Path(root)
    pools = []
    for batch in ("data_batch_1", "test_batch"):
        path = _lossless_path(root, batch)
        if not path.is_file():
            raise FileNotFoundError(f"data.params.root {str(root)!r} holds no lossless CIFAR-10 subset: {path} is missing.")
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise ValueError(f"Expected keys 'x' (uint8 NHWC) and 'y' in {path} but found {sorted(npz.keys())}.")
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise ValueError(f"Expected x of shape [N, 32, 32, 3] in {path} but got {x.shape}.")
        images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
        pools.append(_array_pool(images, torch.from_numpy(y.astype(np.int64)), str(path)))
    return pools[0], pools[1]


# ---------------------------------------------------------------- python pickles (official layout)


_SAFE_BUILTINS = frozenset(
    {"bool", "bytearray", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "set", "str", "tuple"}
)
_NUMPY_INTERNALS = frozenset({("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A batch file references something other than the data a CIFAR-10 batch holds; nothing was run."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch file, refusing every global but numpy array reconstruction and plain containers.

    A pickle can name any importable callable (``os.system``) and have the unpickler call it, so a batch file
    from anywhere but the official archive could run code. The official files (Python 2 cPickle, protocol 2)
    and numpy arrays pickled with any protocol hold only: ``numpy.core.multiarray._reconstruct`` (or
    ``numpy._core``, numpy 2), ``numpy.ndarray``, ``numpy.dtype``, ``multiarray.scalar``, ``numeric._frombuffer``
    (protocol 5), ``_codecs.encode`` (bytes under protocol 2) and builtin containers.
    """

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        super().__init__(handle, encoding="bytes")  # the official files were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        package, _, submodule = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (submodule, name) in _NUMPY_INTERNALS:
            try:  # numpy 2 keeps them in numpy._core; its numpy.core shims warn
                found = importlib.import_module(f"numpy._core.{submodule}")
            except ImportError:  # numpy 1
                found = importlib.import_module(f"numpy.core.{submodule}")
            return getattr(found, name)
        raise UnsafePickleError(
            f"Refusing to unpickle {self.path}: it references {module}.{name}, which a CIFAR-10 batch file never holds "
            "(only numpy arrays, numbers, bytes and plain containers are allowed); use the official cifar-10-batches-py files."
        )


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"Expected the CIFAR-10 batch file {path} but it is missing.")
    with path.open("rb") as handle:
        try:
            batch = _BatchUnpickler(handle, path).load()  # the official format is a pickle: restricted to data
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"Could not unpickle the CIFAR-10 batch file {path}: {err}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"Expected a pickled dict in {path} but got {type(batch).__name__}.")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"Expected keys b'data' and b'labels' in {path} but found {sorted(map(str, batch))}.")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"Expected b'data' of shape [N, 3072] in {path} but got {data.shape}.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(np.asarray(labels, dtype=np.int64))


def load_pickle(root: str | Path) -> tuple[Pool, Pool]:
    """The official python layout ``root/cifar-10-batches-py/{data_batch_1..5,test_batch}``.

    Args:
        root: Folder holding ``cifar-10-batches-py/``.

    Returns:
        The train (50,000 images in the full copy) and test pools.
    """
    folder = Path(root) / _PICKLE_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"data.params.root {str(root)!r} holds no {_PICKLE_DIR}/ folder (the official python CIFAR-10).")
    parts = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    train = _array_pool(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), str(folder))
    test = _array_pool(*_read_batch(folder / "test_batch"), str(folder / "test_batch"))
    return train, test


# ---------------------------------------------------------------- download


def cache_dir() -> Path:
    """Where the download lands: ``$ROUTERKIT_CACHE/cifar10``, default ``~/.cache/routerkit/cifar10``."""
    return Path(os.environ.get("ROUTERKIT_CACHE", Path.home() / ".cache" / "routerkit")) / "cifar10"


def download_cifar10(folder: Path | None = None, timeout: float = 15.0, looked_in: Sequence[str] = ()) -> Path:
    """The standard download path: fetch and extract the official python archive into ``folder``.

    Nothing is fetched when ``folder/cifar-10-batches-py`` already exists.

    Args:
        folder: Destination (default `cache_dir`).
        timeout: Socket timeout in seconds.
        looked_in: Local places already searched (named in the error message).

    Returns:
        ``folder``, holding ``cifar-10-batches-py/``.

    Raises:
        FileNotFoundError: When the archive cannot be fetched (no network) or is corrupt.
    """
    folder = cache_dir() if folder is None else folder
    if (folder / _PICKLE_DIR).is_dir():
        return folder
    places = [*looked_in, str(folder)]
    hint = f"No local copy of CIFAR-10 was found (looked in: {', '.join(places)}) and downloading {CIFAR10_URL} failed"
    advice = (
        "Point data.params.root at a folder holding cifar-10-batches-py/, jpeg_yoongikim/cifar10_jpeg_{train,test}.tar.gz, "
        f"{_JPEG_DIR}/ or lossless_subset/, or set ROUTERKIT_DATA to a folder with a cifar10/ subfolder."
    )
    archive = folder / "cifar-10-python.tar.gz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            part = archive.with_suffix(".part")
            with urllib.request.urlopen(CIFAR10_URL, timeout=timeout) as response, part.open("wb") as out:
                shutil.copyfileobj(response, out)
            part.replace(archive)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise FileNotFoundError(f"{hint} ({err}). {advice}") from None
    digest = hashlib.md5(archive.read_bytes()).hexdigest()  # the published checksum is an md5
    if digest != CIFAR10_MD5:
        archive.unlink()
        raise FileNotFoundError(f"{hint}: the archive's md5 is {digest}, expected {CIFAR10_MD5}. {advice}")
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(_PICKLE_DIR + "/") and ".." not in Path(m.name).parts and (m.isfile() or m.isdir())
        ]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, members=members, filter="data")
        else:  # Python without extraction filters: the members above are plain files inside the batch folder
            tar.extractall(folder, members=members)
    return folder


# ---------------------------------------------------------------- selection and the bundle


def detect_source(root: Path | None) -> str:
    """The layout found under ``root``: ``"pickle"``, ``"jpeg"``, ``"lossless"`` or ``"download"`` (none)."""
    if root is None or not root.is_dir():
        return "download"
    if (root / _PICKLE_DIR).is_dir():
        return "pickle"
    if _jpeg_folder(root) is not None or (_jpeg_archive(root, "train") and _jpeg_archive(root, "test")):
        return "jpeg"
    if all(_lossless_path(root, b).is_file() for b in ("data_batch_1", "test_batch")):
        return "lossless"
    return "download"


def balanced_order(labels: Tensor, seed: int) -> Tensor:
    """A seeded, class-balanced ordering of ``labels``' positions.

    Each class's positions are shuffled; the order then takes the first of every class (in a
    random class order), then the second of every class, and so on. Any prefix is therefore
    balanced to within one image per class (until a class runs out).
    """
    gen = torch.Generator().manual_seed(seed)
    rank = torch.empty(labels.shape[0], dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        rank[idx[torch.randperm(idx.numel(), generator=gen)]] = torch.arange(idx.numel(), dtype=torch.float64)
    key = rank + torch.rand(labels.shape[0], generator=gen, dtype=torch.float64)
    return torch.argsort(key)


def _take(pool: Pool, index: Tensor, normalize: bool) -> Split:
    order = torch.argsort(index)
    images = torch.empty((index.numel(), 3, 32, 32), dtype=torch.uint8)
    if index.numel():
        images[order] = pool.read(index[order])
    x = images.float().div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return Split(x, pool.labels[index].clone(), {"index": index.clone()})


def _root(root: str | None) -> Path | None:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("ROUTERKIT_DATA")
    return Path(env).expanduser() / "cifar10" if env else None


def build_data(
    source: str = "auto",
    root: str | None = None,
    num_train: int | None = None,
    num_val: int = 1000,
    num_test: int | None = None,
    seed: int = 0,
    normalize: bool = True,
) -> DataBundle:
    """CIFAR-10 train / validation / test splits for whole-input routing.

    Validation and training images are drawn from the official training set with one seeded,
    class-balanced ordering: validation takes its first ``num_val`` images, training the next
    ``num_train`` (so the two are disjoint). Test images are a class-balanced seeded choice of
    ``num_test`` official test images (all when ``None``). ``meta["index"]`` is each image's
    position in its pool (sorted by class and file name for JPEG copies, file order otherwise).

    Args:
        source: ``"auto"`` (default: ``pickle`` if ``root/cifar-10-batches-py`` exists, else ``jpeg``
            if the archives or an extracted ``CIFAR-10-images/`` exist, else ``lossless``, else
            ``download``), ``"jpeg"``, ``"lossless"``, ``"pickle"`` or ``"download"`` (the official
            python archive into ``$ROUTERKIT_CACHE/cifar10``, default ``~/.cache/routerkit/cifar10``).
        root: Folder of the local copy; ``$ROUTERKIT_DATA/cifar10`` when unset.
        num_train: Training images (cut into D_PT / D_RL / D_FT); ``None`` = every image not in validation.
        num_val: Validation images, held out from the official training set.
        num_test: Test images; ``None`` = the whole official test set.
        seed: Seed of the selections.
        normalize: Standardise with the CIFAR-10 channel mean / std (else values stay in [0, 1]).

    Returns:
        The bundle (``float32 [N, 3, 32, 32]`` images, ``int64 [N]`` labels) with the CIFAR-10 classes.
    """
    if source not in SOURCES:
        raise ValueError(f"Expected data.params.source in {list(SOURCES)} but got {source!r}.")
    if num_train is not None and num_train < 1:
        raise ValueError(f"Expected data.params.num_train >= 1 (or null for all) but got {num_train}.")
    if num_val < 1:
        raise ValueError(f"Expected data.params.num_val >= 1 but got {num_val}.")
    if num_test is not None and num_test < 1:
        raise ValueError(f"Expected data.params.num_test >= 1 (or null for all) but got {num_test}.")
    folder = _root(root)
    if source == "auto":
        source = detect_source(folder)
    if source == "download":
        looked = [str(folder)] if folder is not None else ["nowhere: data.params.root and ROUTERKIT_DATA are unset"]
        train_pool, test_pool = load_pickle(download_cifar10(looked_in=looked))
    else:
        if folder is None:
            raise ValueError(
                f"data.params.root is required for source {source!r} (or set ROUTERKIT_DATA to a folder with cifar10/)."
            )
        if not folder.is_dir():
            raise FileNotFoundError(f"data.params.root {str(folder)!r} is not a folder (source {source!r}).")
        loaders = {"jpeg": load_jpeg, "lossless": load_lossless, "pickle": load_pickle}
        train_pool, test_pool = loaders[source](folder)
    available = len(train_pool)
    n_train = available - num_val if num_train is None else num_train
    if n_train < 1 or num_val + n_train > available:
        raise ValueError(
            f"Expected data.params.num_val + num_train <= {available} (the training images of {train_pool.origin}) "
            f"but got {num_val} + {n_train if num_train is not None else 'all'}."
        )
    if num_test is not None and num_test > len(test_pool):
        raise ValueError(
            f"Expected data.params.num_test <= {len(test_pool)} (the test images of {test_pool.origin}) but got {num_test}."
        )
    order = balanced_order(train_pool.labels, seed)
    val = _take(train_pool, order[:num_val], normalize)
    train = _take(train_pool, order[num_val : num_val + n_train], normalize)
    test_order = balanced_order(test_pool.labels, seed + 1)
    test_index = torch.arange(len(test_pool)) if num_test is None else test_order[:num_test]
    test = _take(test_pool, test_index, normalize)
    fmt = FileFormat(mean=CIFAR10_MEAN, std=CIFAR10_STD) if normalize else FileFormat()
    return DataBundle(train, val, test, list(CLASS_NAMES), file_format=fmt)
