"""Whatever a user hands to `RoutedModel.predict`, as model inputs ``[C, H, W]`` in the run's model space.

- A ``torch.Tensor`` or a floating-point ``numpy`` array is taken as a model input already
  (``[B, C, H, W]`` or ``[C, H, W]``; a 2-D array is one grayscale image).
- A file path (PNG, TIFF, JPEG; 8 or 16-bit; ``.npy``), a PIL image or an integer ``numpy`` array
  holds *pixels*: they are scaled and standardised as the run's data were (`FileFormat`).
- A list mixes any of these; each entry is one input (or a batch, for a 4-D tensor or array).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from routerkit.data.spec import DataSpec

__all__ = ["IMAGE_SUFFIXES", "Input", "as_inputs", "read_file"]

#: File suffixes `read_file` reads (lower case).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")


@dataclass
class Input:
    """One input: its name (file path or ``input N``) and its tensor ``[C, H, W]`` (or ``[D]``)."""

    name: str
    tensor: Tensor


def _standardise(pixels: np.ndarray, spec: DataSpec) -> Tensor:
    """Scaled pixels ``[C, H, W]`` -> model space with the spec's mean and std."""
    fmt = spec.file_format
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    if fmt.mean is not None:
        x = x - torch.tensor(fmt.mean, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if fmt.std is not None:
        x = x / torch.tensor(fmt.std, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return x


def pad_value(spec: DataSpec) -> Tensor:
    """``[C]`` model-space value of a zero pixel (``-mean / std``): what padding a file with zeros gives."""
    zero = np.zeros((spec.channels, 1, 1), dtype=np.float32)
    return _standardise(zero, spec).reshape(-1)


def _channels(x: np.ndarray, spec: DataSpec, what: str) -> np.ndarray:
    """``x [C, H, W]`` with the spec's channel count: a colour image whose channels are equal becomes grayscale."""
    want = spec.channels
    if x.shape[0] == want:
        return x
    if want == 1 and x.shape[0] in (3, 4) and np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2]):
        return x[:1]  # a grayscale scan saved as RGB
    raise ValueError(
        f"{what}: expected {want} channel(s), as the run was trained on ({list(spec.input_shape)}), but got {x.shape[0]}."
    )


def _pixels(array: np.ndarray, spec: DataSpec, what: str) -> np.ndarray:
    """Integer pixels ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` scaled like the data set's files, as ``[C, H, W]``."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[0] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
        array = array.transpose(2, 0, 1)  # HWC, as PIL and imageio give
    if array.ndim != 3:
        raise ValueError(
            f"{what}: expected an image [H, W], [H, W, C] or [C, H, W] but got an array of shape {list(array.shape)}."
        )
    out = array.astype(np.float32)
    if spec.file_format.scale == "auto":
        if array.dtype == np.uint8:
            out /= np.float32(255.0)
        elif array.dtype == np.uint16:
            out /= np.float32(65535.0)
        else:
            raise ValueError(
                f"{what}: expected 8-bit or 16-bit pixels (the run scales files into [0, 1]) but got dtype {array.dtype}."
            )
    return _channels(out, spec, what)


def read_file(path: str | Path, spec: DataSpec) -> Tensor:
    """One image file as a model input ``[C, H, W]``, read as the run's data were.

    ``.npy`` files are loaded without pickles: integer arrays are pixels (scaled), floating-point
    ones model inputs as they are.

    Raises:
        ValueError: The file is missing, cannot be decoded, is not an image, or has other
            channels than the run; the message names the file.
    """
    from routerkit.data.folder import read_image

    file = Path(path)
    what = f"Input file {file}"
    if not file.is_file():
        raise ValueError(f"{what}: no such file.")
    if file.suffix.lower() == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{what}: could not read it as a .npy array ({err}).") from None
        if np.issubdtype(array.dtype, np.floating):
            return _float_input(array, spec, what)
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{what}: expected a numeric array but got dtype {array.dtype}.")
        return _standardise(_pixels(array, spec, what), spec)
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{what}: unsupported file type {file.suffix!r}; expected one of {list(IMAGE_SUFFIXES)}.")
    pixels = read_image(file, spec.file_format.scale)
    return _standardise(_channels(pixels, spec, what), spec)


def _float_input(array: np.ndarray, spec: DataSpec, what: str) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if x.dim() == 2 and len(spec.input_shape) == 3:
        x = x.unsqueeze(0)
    return x


def as_inputs(inputs: Any, spec: DataSpec) -> list[Input]:
    """Everything `RoutedModel.predict` accepts, as a flat list of named inputs in model space.

    Raises:
        TypeError: An entry of an unsupported type.
        ValueError: A file that cannot be read, or an input of the wrong rank or channel count.
    """
    from PIL import Image

    items: Sequence[Any] = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    out: list[Input] = []
    rank = len(spec.input_shape)
    for item in items:
        index = len(out)
        if isinstance(item, (str, Path)):
            out.append(Input(str(item), read_file(item, spec)))
        elif isinstance(item, Image.Image):
            out.append(Input(f"input {index}", _standardise(_pixels(np.asarray(item), spec, f"input {index}"), spec)))
        elif isinstance(item, (Tensor, np.ndarray)):
            if isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
                if item.ndim == rank + 1:
                    out.extend(
                        Input(f"input {index + j}", _standardise(_pixels(a, spec, f"input {index + j}"), spec))
                        for j, a in enumerate(item)
                    )
                else:
                    out.append(Input(f"input {index}", _standardise(_pixels(item, spec, f"input {index}"), spec)))
                continue
            x = torch.as_tensor(item).detach().cpu()
            if not x.is_floating_point():
                raise ValueError(f"input {index}: expected a floating-point tensor (a model input) but got dtype {x.dtype}.")
            if x.dim() == rank - 1 and rank == 3:
                x = x.unsqueeze(0)  # one grayscale image [H, W]
            if x.dim() == rank + 1:
                out.extend(Input(f"input {index + j}", t) for j, t in enumerate(x.float()))
            elif x.dim() == rank:
                out.append(Input(f"input {index}", x.float()))
            else:
                raise ValueError(
                    f"input {index}: expected a tensor [B, {', '.join(map(str, spec.input_shape))}] or "
                    f"[{', '.join(map(str, spec.input_shape))}] but got shape {list(x.shape)}."
                )
        else:
            raise TypeError(
                f"input {index}: expected a tensor, a numpy array, a PIL image or a file path but got {type(item).__name__}."
            )
    if not out:
        raise ValueError("Expected at least one input but got none.")
    return out
