"""Partitioners cut an input into routing units and stitch per-unit outputs back.

Units are laid out ``[B * P, ...]`` with the P units of sample ``b`` at rows
``b * P .. b * P + P - 1`` (row-major over the grid), so ``actions[B, P].flatten()``
indexes them directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.nn.functional as F
from torch import Tensor

from routerkit._registry import Registry


class Partitioner(ABC):
    """Split inputs into routing units and stitch unit outputs back.

    Subclasses implement `_split` and `_stitch`; the public methods check shapes.
    """

    @property
    @abstractmethod
    def num_units(self) -> int:
        """Number of units P per input."""

    @property
    @abstractmethod
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the unit grid (``(1, 1)`` for whole inputs)."""

    def split(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` (or ``[B, H, W]``) -> ``[B * P, C, h, w]`` (or ``[B * P, h, w]``)."""
        return self._split(x)

    def stitch(self, units: Tensor, batch_size: int) -> Tensor:
        """Inverse of `split` for ``batch_size`` inputs."""
        if units.shape[0] != batch_size * self.num_units:
            raise ValueError(
                f"Expected {batch_size * self.num_units} units ({batch_size} inputs x {self.num_units}) but got {units.shape[0]}."
            )
        return self._stitch(units, batch_size)

    def unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one unit (without batch) for an input of shape ``input_shape`` (without batch)."""
        return self._unit_shape(tuple(input_shape))

    @property
    def halo(self) -> int:
        """Pixels of context each unit's model sees beyond the unit's border on every side (0: none)."""
        return 0

    def split_inputs(self, x: Tensor) -> Tensor:
        """The units a model runs on: `split`, each unit widened by `halo` pixels of its neighbours.

        The model's output on these is cut back to the unit with `crop`; targets, ``f_0``'s
        probabilities and uncertainties are split with `split` (no halo).
        """
        return self.split(x)

    def crop(self, unit_outputs: Tensor) -> Tensor:
        """A model's output on `split_inputs` units cut back to the units (``[U, K, h, w]``)."""
        return unit_outputs

    def model_unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of what a unit's model runs on (the unit with its halo), without batch: FLOPs are counted on it."""
        return self.unit_shape(input_shape)

    @abstractmethod
    def _split(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def _stitch(self, units: Tensor, batch_size: int) -> Tensor: ...

    @abstractmethod
    def _unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]: ...


PARTITIONERS: Registry[Partitioner] = Registry("partitioner", Partitioner)


@PARTITIONERS.register("patch_grid")
class PatchGrid(Partitioner):
    """Non-overlapping ``rows x cols`` grid of equal patches (PaSeR: 4 x 4 on 224 x 256 images).

    **Context margin.** A patch model sees nothing across its patch's border, so routed masks
    can show straight seams along the grid. With ``halo > 0`` each patch's model runs on the
    patch widened by ``halo`` pixels of its neighbours (reflected at the image border), and its
    output is cropped back to the patch: decisions, targets and stitching stay per patch, and
    the FLOPs charged are those of the widened patch.

    Args:
        rows: Patches along the height.
        cols: Patches along the width.
        halo: Context margin in pixels on every side (0: none).

    Example:
        >>> import torch
        >>> grid = PatchGrid(2, 2)
        >>> x = torch.randn(3, 1, 8, 8)
        >>> grid.split(x).shape
        torch.Size([12, 1, 4, 4])
        >>> bool((grid.stitch(grid.split(x), 3) == x).all())
        True
    """

    def __init__(self, rows: int = 4, cols: int = 4, halo: int = 0) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"Expected rows >= 1 and cols >= 1 but got rows={rows}, cols={cols}.")
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"Expected halo to be an integer >= 0 (pixels) but got {halo!r}.")
        self.rows = rows
        self.cols = cols
        self._halo = halo

    def __repr__(self) -> str:
        extra = f", halo={self._halo}" if self._halo else ""
        return f"PatchGrid(rows={self.rows}, cols={self.cols}{extra})"

    @property
    def halo(self) -> int:
        return self._halo

    def split_inputs(self, x: Tensor) -> Tensor:
        a = self._halo
        if a == 0:
            return self.split(x)
        if x.dim() != 4:
            raise ValueError(f"Expected a [B, C, H, W] input to widen by a halo but got shape {tuple(x.shape)}.")
        b, c, height, width = x.shape
        h, w = self._check(height, width)
        if a >= min(height, width):
            raise ValueError(f"Expected halo ({a}) smaller than the input ({height} x {width}).")
        padded = F.pad(x, (a, a, a, a), mode="reflect")  # [B, C, H + 2a, W + 2a]
        windows = padded.unfold(2, h + 2 * a, h).unfold(3, w + 2 * a, w)  # [B, C, rows, cols, h + 2a, w + 2a]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(b * self.num_units, c, h + 2 * a, w + 2 * a)

    def crop(self, unit_outputs: Tensor) -> Tensor:
        a = self._halo
        return unit_outputs if a == 0 else unit_outputs[..., a:-a, a:-a]

    def model_unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = self.unit_shape(input_shape)
        a = self._halo
        return shape if a == 0 else (*shape[:-2], shape[-2] + 2 * a, shape[-1] + 2 * a)

    @property
    def num_units(self) -> int:
        return self.rows * self.cols

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def _check(self, height: int, width: int) -> tuple[int, int]:
        if height % self.rows or width % self.cols:
            raise ValueError(
                f"PatchGrid({self.rows}, {self.cols}) needs an input height divisible by {self.rows} and width "
                f"divisible by {self.cols}, but got {height} x {width}. Crop or pad the inputs (e.g. to "
                f"{height - height % self.rows} x {width - width % self.cols}) or choose another grid."
            )
        return height // self.rows, width // self.cols

    def _unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        h, w = self._check(input_shape[-2], input_shape[-1])
        return (*input_shape[:-2], h, w)

    def _split(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"Expected a [B, C, H, W] or [B, H, W] tensor but got shape {tuple(x.shape)}.")
        squeeze = x.dim() == 3
        if squeeze:
            x = x.unsqueeze(1)
        b, c, height, width = x.shape
        h, w = self._check(height, width)
        units = x.reshape(b, c, self.rows, h, self.cols, w).permute(0, 2, 4, 1, 3, 5).reshape(b * self.num_units, c, h, w)
        return units.squeeze(1) if squeeze else units

    def _stitch(self, units: Tensor, batch_size: int) -> Tensor:
        squeeze = units.dim() == 3
        if squeeze:
            units = units.unsqueeze(1)
        _, c, h, w = units.shape
        x = (
            units.reshape(batch_size, self.rows, self.cols, c, h, w)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(batch_size, c, self.rows * h, self.cols * w)
        )
        return x.squeeze(1) if squeeze else x


@PARTITIONERS.register("whole_input")
class WholeInput(Partitioner):
    """One unit per input: the router decides per sample (classification, detection, ...)."""

    def __repr__(self) -> str:
        return "WholeInput()"

    @property
    def num_units(self) -> int:
        return 1

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (1, 1)

    def _unit_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return input_shape

    def _split(self, x: Tensor) -> Tensor:
        return x

    def _stitch(self, units: Tensor, batch_size: int) -> Tensor:
        return units


def create_partitioner(spec: str | Partitioner | type[Partitioner], **kwargs: int) -> Partitioner:
    """Build a partitioner from a name (``"patch_grid"``, ``"whole_input"``), class or instance."""
    return PARTITIONERS.resolve(spec, **kwargs)
