"""Inputs of another size than the trained one: windows of the trained shape, stitched back.

A run routes inputs of one shape ``[C, h, w]``. An image ``[C, H, W]`` of another size is cut into
``ceil(H / h) x ceil(W / w)`` non-overlapping windows of the trained shape (the last row and
column padded), each window is routed like a training input, and the window predictions are
stitched and cropped back to ``H x W``. An image smaller than the trained shape is one padded
window. The padding value is the model-space value of a zero pixel (``-mean / std`` of the
run's `routerkit.data.FileFormat`), i.e. what zero-padding the file would give.

Example:
    >>> import torch
    >>> tiles = Tiling.plan((1, 8, 8), (1, 20, 10))
    >>> tiles.rows, tiles.cols, tiles.num_windows
    (3, 2, 6)
    >>> windows = tiles.split(torch.rand(1, 20, 10), pad_value=torch.zeros(1))
    >>> windows.shape
    torch.Size([6, 1, 8, 8])
    >>> tiles.stitch(windows[:, :1]).shape
    torch.Size([1, 20, 10])
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Tiling"]


@dataclass(frozen=True)
class Tiling:
    """How one image of shape ``[C, H, W]`` maps onto windows of the trained shape ``[C, h, w]``.

    Attributes:
        window: The trained input shape ``(C, h, w)``.
        size: The image's ``(H, W)``.
        rows: Windows down.
        cols: Windows across.
    """

    window: tuple[int, int, int]
    size: tuple[int, int]
    rows: int
    cols: int

    @classmethod
    def plan(cls, window: tuple[int, ...], shape: tuple[int, ...]) -> Tiling:
        """The tiling of an image ``shape`` ``[C, H, W]`` by windows ``window`` ``[C, h, w]``.

        Raises:
            ValueError: Other channel counts, or shapes that are not ``[C, H, W]``.
        """
        if len(window) != 3 or len(shape) != 3:
            raise ValueError(f"Expected [C, H, W] shapes to tile but got window {list(window)} and image {list(shape)}.")
        if shape[0] != window[0]:
            raise ValueError(
                f"Expected an image with {window[0]} channel(s), as the run was trained on, but got {shape[0]} "
                f"(shape {list(shape)})."
            )
        if shape[1] <= 0 or shape[2] <= 0:
            raise ValueError(f"Expected a non-empty image but got shape {list(shape)}.")
        c, h, w = (int(v) for v in window)
        return cls((c, h, w), (int(shape[1]), int(shape[2])), -(-int(shape[1]) // h), -(-int(shape[2]) // w))

    @property
    def num_windows(self) -> int:
        """Windows the image takes."""
        return self.rows * self.cols

    @property
    def padded(self) -> tuple[int, int]:
        """``(rows * h, cols * w)``: the image's size after padding."""
        return self.rows * self.window[1], self.cols * self.window[2]

    def split(self, image: Tensor, pad_value: Tensor) -> Tensor:
        """``[num_windows, C, h, w]`` windows (row-major) of ``image [C, H, W]``, padded with ``pad_value [C]``."""
        c, h, w = self.window
        ph, pw = self.padded
        canvas = pad_value.to(image).reshape(c, 1, 1).expand(c, ph, pw).clone()
        canvas[:, : self.size[0], : self.size[1]] = image
        return canvas.reshape(c, self.rows, h, self.cols, w).permute(1, 3, 0, 2, 4).reshape(self.num_windows, c, h, w)

    def stitch(self, windows: Tensor) -> Tensor:
        """Window outputs ``[num_windows, K, h', w']`` as one ``[K, H', W']`` map, cropped to the image.

        The outputs may have another resolution than the windows (a per-unit routing map of ``h' x
        w'`` units per window); the crop scales with it.
        """
        n, k, hh, ww = windows.shape
        if n != self.num_windows:
            raise ValueError(f"Expected {self.num_windows} window outputs but got {n}.")
        full = windows.reshape(self.rows, self.cols, k, hh, ww).permute(2, 0, 3, 1, 4).reshape(k, self.rows * hh, self.cols * ww)
        crop_h = -(-self.size[0] * hh // self.window[1])
        crop_w = -(-self.size[1] * ww // self.window[2])
        return full[:, :crop_h, :crop_w]
