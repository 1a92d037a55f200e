"""Task models: the `TaskModel` protocol, the `Zoo`, presets and a registry.

A task model is any ``torch.nn.Module`` mapping ``[N, C, ...]`` inputs (a unit or a whole
input) to logits ``[N, K, ...]``. Existing models are wrapped, never subclassed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from routerkit._registry import Registry
from routerkit.models.cifar_resnet import CIFAR_RESNET_DEPTHS, CifarResNet
from routerkit.models.unet import PAPER_PRESETS, UNet

__all__ = [
    "CIFAR_RESNET_DEPTHS",
    "MODELS",
    "PAPER_PRESETS",
    "CifarResNet",
    "SMPModel",
    "TaskModel",
    "ToyClassifier",
    "ToySegmenter",
    "UNet",
    "Zoo",
    "create_model",
    "list_models",
]


@runtime_checkable
class TaskModel(Protocol):
    """What routerkit needs of a user's model: a module mapping inputs to logits."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


MODELS: Registry[nn.Module] = Registry("task model", nn.Module)


def create_model(name: str | nn.Module | type[nn.Module], **kwargs: Any) -> nn.Module:
    """Build a task model from a registered name, a dotted path, a class or an instance."""
    return MODELS.resolve(name, **kwargs)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered task-model names, optionally filtered by a shell pattern (``"unet*"``)."""
    return MODELS.names(pattern)


MODELS.register("unet")(UNet)


def _paper_unet(size: str) -> Any:
    def build(in_channels: int = 1, num_classes: int = 3, dropout: float = 0.0, dropout_at: str = "both") -> nn.Module:
        base, depth = PAPER_PRESETS[size]
        return UNet(in_channels, num_classes, base, depth, dropout, dropout_at)

    build.__doc__ = f"The PaSeR paper's {size} UNet (see ``PAPER_PRESETS``)."
    return build


for _size in PAPER_PRESETS:
    MODELS.register(f"unet_paper_{_size}")(_paper_unet(_size))


@MODELS.register("cifar_resnet")
def _cifar_resnet(
    depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16, dropout: float = 0.0
) -> nn.Module:
    return CifarResNet(depth, num_classes, in_channels, width, dropout)


def _cifar_resnet_preset(depth: int) -> Any:
    def build(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
        return CifarResNet(depth, num_classes, in_channels, 16, dropout)

    build.__doc__ = f"The CIFAR ResNet-{depth} of He et al. 2016 (widths 16 / 32 / 64)."
    return build


for _depth in CIFAR_RESNET_DEPTHS:
    MODELS.register(f"cifar_resnet{_depth}")(_cifar_resnet_preset(_depth))


class SMPModel(nn.Module):
    """Any segmentation-models-pytorch architecture by name, randomly initialised by default.

    The input is zero-padded to a multiple of ``pad_multiple`` (smp encoders need sizes
    divisible by their output stride) and the logits cropped back.

    Args:
        arch: smp architecture name (``"Unet"``, ``"FPN"``, ``"Segformer"``, ...).
        encoder_name: smp/timm encoder name.
        in_channels: Input channels.
        num_classes: Output classes.
        encoder_weights: ``None`` (default, no download) or a *local* file path with an encoder
            state dict. Hub names such as ``"imagenet"`` are refused: routerkit never downloads.
        pad_multiple: Pad inputs to this multiple.
        **kwargs: Passed to ``smp.create_model``.
    """

    def __init__(
        self,
        arch: str = "Unet",
        encoder_name: str = "resnet18",
        in_channels: int = 1,
        num_classes: int = 3,
        encoder_weights: str | None = None,
        pad_multiple: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp  # lazy: heavy import

        self.model = smp.create_model(
            arch, encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels, classes=num_classes, **kwargs
        )
        if encoder_weights is not None:
            from pathlib import Path

            import torch

            path = Path(encoder_weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"encoder_weights must be None or a local weights file; {encoder_weights!r} is not a file "
                    "(routerkit never downloads weights)."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.encoder.load_state_dict(state)
        self.pad_multiple = pad_multiple

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % self.pad_multiple, (-width) % self.pad_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits: Tensor = self.model(x)
        return logits[..., :height, :width]


MODELS.register("smp")(SMPModel)


@MODELS.register("toy_segmenter")
class ToySegmenter(nn.Module):
    """A tiny fully-convolutional segmenter for tests and docs (``width`` sets its cost)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


@MODELS.register("toy_classifier")
class ToyClassifier(nn.Module):
    """A tiny MLP classifier for tests and docs: ``[N, D]`` features -> ``[N, K]`` logits."""

    def __init__(self, in_features: int = 8, num_classes: int = 2, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x.flatten(1))
        return out


class Zoo(nn.Module):
    """An ordered set of task models: index 0 is the cheap base model ``f_0`` that always runs.

    Args:
        models: A sequence of modules (named ``f0``, ``f1``, ...) or a mapping name -> module.

    Example:
        >>> zoo = Zoo({"small": ToySegmenter(width=2), "big": ToySegmenter(width=32)})
        >>> zoo.names, len(zoo)
        (['small', 'big'], 2)
    """

    def __init__(self, models: Sequence[nn.Module] | Mapping[str, nn.Module]) -> None:
        super().__init__()
        if isinstance(models, Mapping):
            names, mods = list(models.keys()), list(models.values())
        else:
            mods = list(models)
            names = [f"f{i}" for i in range(len(mods))]
        if len(mods) < 2:
            raise ValueError(f"Expected a zoo of at least 2 models (f_0 and one costlier model) but got {len(mods)}.")
        for name, mod in zip(names, mods, strict=True):
            if not isinstance(mod, nn.Module):
                raise TypeError(f"Expected zoo member {name!r} to be a torch.nn.Module but got {type(mod).__name__}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Expected unique model names but got {names}.")
        self.names = names
        self.members = nn.ModuleList(mods)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> nn.Module:
        return self.members[index]

    def __iter__(self) -> Iterator[nn.Module]:  # type: ignore[override]
        return iter(self.members)

    @property
    def base(self) -> nn.Module:
        """The base model ``f_0``."""
        return self.members[0]

    @property
    def num_models(self) -> int:
        """Number of models m + 1 (the router's action count)."""
        return len(self.members)

    def num_parameters(self) -> list[int]:
        """Learnable parameter count of each model."""
        return [sum(p.numel() for p in m.parameters()) for m in self.members]
