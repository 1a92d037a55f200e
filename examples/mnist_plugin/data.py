"""MNIST from the IDX files, the three noise types and the routerkit `DataBundle`."""

from __future__ import annotations

import gzip
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from routerkit.data import DataBundle, FileFormat, Split

NOISE_NAMES = ("gaussian_r1", "gaussian_r2", "box")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array.

    Raises:
        ValueError: If the file is not a valid IDX file (bad magic number or size).
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"Expected an IDX file (magic 0x0000TTDD) but {path} starts with {raw[:4].hex()}.")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"Expected {expected} data bytes for shape {shape} in {path} but found {len(body)}.")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz`` (fixtures, exports)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("ROUTERKIT_CACHE", Path.home() / ".cache" / "routerkit")) / "mnist"


def download_mnist(folder: Path, timeout: float = 20.0) -> Path:
    """The standard download path: fetch the four IDX files into ``folder`` (no network: a clear error)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem in (*FILES["train"], *FILES["test"]):
        if _find(folder, stem) is not None:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + stem + ".gz", timeout=timeout) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError) as err:
                errors.append(f"{mirror}: {err}")
                continue
            tmp = folder / (stem + ".gz.part")
            tmp.write_bytes(payload)
            tmp.replace(folder / (stem + ".gz"))
            break
        else:
            raise FileNotFoundError(
                f"No local MNIST copy was found and downloading {stem}.gz failed ({'; '.join(errors)}). Point "
                "data.params.root at a folder holding the IDX files (train-images-idx3-ubyte[.gz], ...), or set "
                "ROUTERKIT_DATA to a folder with an mnist/ subfolder."
            )
    return folder


def resolve_root(root: str | None, download: bool = True) -> Path:
    """``root``, else ``$ROUTERKIT_DATA/mnist``, else the download cache (downloading if allowed)."""
    if root is not None:
        path = Path(root)
        if _find(path, FILES["train"][0]) is None:
            raise FileNotFoundError(
                f"data.params.root {str(path)!r} holds no MNIST IDX files (expected train-images-idx3-ubyte[.gz], "
                "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])."
            )
        return path
    env = os.environ.get("ROUTERKIT_DATA")
    if env and _find(Path(env) / "mnist", FILES["train"][0]) is not None:
        return Path(env) / "mnist"
    cache = _cache_dir()
    if _find(cache, FILES["test"][1]) is not None and _find(cache, FILES["train"][0]) is not None:
        return cache
    if not download:
        raise FileNotFoundError(
            "No MNIST copy found: set data.params.root, or ROUTERKIT_DATA (with an mnist/ subfolder), "
            "or allow data.params.download."
        )
    return download_mnist(cache)


def load_mnist(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``"train"`` or ``"test"`` from IDX files in ``root``."""
    paths = [_find(root, stem) for stem in FILES[split]]
    missing = [stem for stem, p in zip(FILES[split], paths, strict=True) if p is None]
    if missing:
        raise FileNotFoundError(f"MNIST folder {str(root)!r} lacks {', '.join(m + '[.gz]' for m in missing)}.")
    images, labels = read_idx(paths[0]), read_idx(paths[1])  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected MNIST images [N, H, W] and labels [N] but got {images.shape} and {labels.shape}.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = int(np.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return torch.outer(k, k)


def noise_kernels(box_size: int = 5) -> list[Tensor]:
    """The three fixed filters: Gaussian sigma 1, Gaussian sigma 2, a ``box_size`` x ``box_size`` box."""
    return [_gaussian_kernel(1.0), _gaussian_kernel(2.0), torch.full((box_size, box_size), 1.0 / box_size**2)]


def apply_noise(images: Tensor, noise: Tensor, box_size: int = 5) -> Tensor:
    """Blur each image ``[N, 1, H, W]`` (values in [0, 1]) with its noise type ``noise [N]`` (0, 1 or 2)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"Expected images [N, 1, H, W] but got {tuple(images.shape)}.")
    if noise.shape != images.shape[:1]:
        raise ValueError(f"Expected one noise type per image ({images.shape[0]}) but got noise {tuple(noise.shape)}.")
    out = torch.empty_like(images)
    for t, kernel in enumerate(noise_kernels(box_size)):
        idx = torch.nonzero(noise == t).flatten()
        if idx.numel():
            pad = kernel.shape[-1] // 2
            x = F.pad(images[idx], (pad, pad, pad, pad), mode="constant", value=0.0)
            out[idx] = F.conv2d(x, kernel[None, None])
    return out


def _split(images: Tensor, noise_seed: int, size: int, box_size: int) -> Split:
    n = images.shape[0]
    x = images.float().div(255.0).unsqueeze(1)
    pad = (size - x.shape[-1]) // 2
    if pad < 0 or size - x.shape[-1] - pad < 0:
        raise ValueError(f"Expected data.params.size >= {x.shape[-1]} but got {size}.")
    x = F.pad(x, (pad, size - x.shape[-1] - pad, pad, size - x.shape[-2] - pad))
    g = torch.Generator().manual_seed(noise_seed)
    noise = (torch.arange(n) % 3)[torch.randperm(n, generator=g)]  # equal shares, shuffled
    masks = (x[:, 0] > 0.5).long()
    return Split(apply_noise(x, noise, box_size), masks, {"noise": noise})


def build_data(
    root: str | None = None,
    num_train: int = 6000,
    num_val: int = 600,
    num_test: int = 3000,
    size: int = 32,
    box_size: int = 5,
    seed: int = 0,
    download: bool = True,
) -> DataBundle:
    """Noisy-MNIST segmentation splits.

    Train and validation images are drawn (seeded, disjoint) from the MNIST training set, test
    images are the first ``num_test`` of the official test set. Each split holds the three noise
    types in equal shares; ``meta["noise"]`` is each image's type (0: Gaussian radius 1,
    1: Gaussian radius 2, 2: box blur).

    Args:
        root: Folder with the IDX files (``.gz`` or raw); default ``$ROUTERKIT_DATA/mnist``, else the
            download cache ``~/.cache/routerkit/mnist`` (``$ROUTERKIT_CACHE``).
        num_train: Training images (cut into D_PT / D_RL / D_FT).
        num_val: Validation images.
        num_test: Test images (at most 10,000).
        size: Side of the zero-padded square input (28 -> 32 in the paper).
        box_size: Side of the box filter.
        seed: Seed of the selection and of the noise assignment.
        download: Whether the standard download may run when no local copy is found.

    Returns:
        The bundle with classes ``background, digit``.
    """
    if num_train < 3 or num_val < 3 or num_test < 3:
        raise ValueError(
            f"Expected data.params.num_train, num_val and num_test >= 3 (one image per noise type) but got "
            f"{num_train}, {num_val}, {num_test}."
        )
    if box_size < 1:
        raise ValueError(f"Expected data.params.box_size >= 1 but got {box_size}.")
    folder = resolve_root(root, download)
    train_images, _ = load_mnist(folder, "train")
    test_images, _ = load_mnist(folder, "test")
    if num_train + num_val > train_images.shape[0]:
        raise ValueError(
            f"Expected data.params.num_train + num_val <= {train_images.shape[0]} (MNIST train) but got {num_train + num_val}."
        )
    if num_test > test_images.shape[0]:
        raise ValueError(f"Expected data.params.num_test <= {test_images.shape[0]} but got {num_test}.")
    order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed))
    train = _split(train_images[order[:num_train]], seed, size, box_size)
    val = _split(train_images[order[num_train : num_train + num_val]], seed + 1, size, box_size)
    test = _split(test_images[:num_test], seed + 2, size, box_size)
    return DataBundle(train, val, test, ["background", "digit"], file_format=FileFormat(mask_values={0: 0, 1: 255}))
