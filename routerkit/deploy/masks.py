"""A deterministic MC-dropout state: the dropout masks of the N passes drawn once and kept.

MC dropout normally draws fresh masks from the global generator on every call, so an exported
graph (ONNX runtimes have their own random generators) cannot repeat PyTorch's state. With
`fix_mc_masks`, ``f_0``'s dropout layers are swapped for `FixedMaskDropout` layers holding one
mask per pass, drawn once from ``seed``; pass ``n`` of every input uses mask ``n``. The state is
then a deterministic function of the input, the same in PyTorch (`routerkit.load(...,
mask_seed=...)`) and in the exported edge graph (`routerkit.deploy.export_onnx` bakes the masks in
as constants), whatever the batch size.

The masks of one pass are shared by the inputs of a batch (a fresh draw per input would make the
state depend on where an input sits in its batch). Each pass is still an ordinary dropout
sample, so the MC mean and its entropy keep their meaning; they are one fixed draw of it.

Example:
    >>> import torch
    >>> from routerkit.models import UNet
    >>> net = UNet(1, 2, base_channels=2, depth=1, dropout=0.2, dropout_at="head").eval()
    >>> masks = fix_dropout_masks(net, num_passes=3, input_shape=(1, 8, 8), seed=0)
    >>> [tuple(m.shape) for m in masks.values()]
    [(3, 2, 1, 1)]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router
from routerkit.uncertainty.estimators import MCDropoutEntropy

__all__ = ["FixedMaskDropout", "fix_dropout_masks", "fix_mc_masks"]

#: Dropout types whose masks can be fixed (a mask multiplies the input); alpha dropouts are affine, not supported.
_MASKABLE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ALPHA = (nn.AlphaDropout, nn.FeatureAlphaDropout)


class FixedMaskDropout(nn.Dropout):
    """Dropout with one fixed, pre-scaled mask per MC pass.

    A subclass of ``nn.Dropout`` so that MC-dropout estimators find it and switch it to training
    mode as they do any dropout layer. In training mode (or with ``forced``) it multiplies pass
    ``n`` of a pass-major batch ``[N * B, ...]`` (what `MCDropoutEntropy` runs) by ``masks[n]``; in
    eval mode it is the identity, as dropout is.

    Args:
        p: The original layer's drop probability (kept for the estimators, which skip ``p = 0``).
        masks: ``[N, *shape]`` masks, zeros and ``1 / (1 - p)``; ``shape`` broadcasts against one
            input of the layer (``[C, 1, 1]`` for ``Dropout2d``, the whole feature shape for ``Dropout``).
        kind: The original layer's class name (for ``repr`` and messages).
    """

    masks: Tensor

    def __init__(self, p: float, masks: Tensor, kind: str = "Dropout") -> None:
        super().__init__(p)
        self.register_buffer("masks", masks)
        self.kind = kind
        #: Apply the masks in eval mode too (set on the copy of ``f_0`` that is exported).
        self.forced = False

    @property
    def num_passes(self) -> int:
        """Passes N the masks were drawn for."""
        return int(self.masks.shape[0])

    def extra_repr(self) -> str:
        return f"p={self.p}, passes={self.num_passes}, mask={list(self.masks.shape[1:])}, was={self.kind}"

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.forced):
            return x
        n = self.num_passes
        if not torch.onnx.is_in_onnx_export() and (x.shape[0] % n or tuple(x.shape[1:]) != self._feature_shape(x)):
            raise ValueError(
                f"FixedMaskDropout ({self.kind}, {n} fixed MC passes): expected a pass-major batch [{n} x B, "
                f"{', '.join(map(str, self._feature_shape(x)))}] but got {list(x.shape)}; fixed masks need every forward "
                "to hold whole passes of inputs of the trained shape (no uncertainty.params.max_batch)."
            )
        y = x.reshape(n, -1, *x.shape[1:]) * self.masks.to(x.dtype).unsqueeze(1)
        return y.reshape(-1, *x.shape[1:])

    def _feature_shape(self, x: Tensor) -> tuple[int, ...]:
        """The input shape (no batch) the masks were drawn for, where they are not broadcast."""
        return tuple(m if m != 1 else s for m, s in zip(self.masks.shape[1:], x.shape[1:], strict=False))


def _mask_shape(layer: nn.Module, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one pass's mask for ``layer`` on inputs ``[B, *feature_shape]``."""
    if isinstance(layer, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return (feature_shape[0], *([1] * (len(feature_shape) - 1)))  # one draw per channel
    return feature_shape  # nn.Dropout: one draw per element


def fix_dropout_masks(model: nn.Module, num_passes: int, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Tensor]:
    """Swap ``model``'s dropout layers (``p > 0``) for `FixedMaskDropout` layers, in place.

    The input shape each layer sees is probed with one forward of a zero input of
    ``input_shape`` (eval mode, no gradient); the masks of all layers are drawn, in module order,
    from one ``torch.Generator`` seeded with ``seed``.

    Args:
        model: The base model ``f_0`` (changed in place).
        num_passes: MC passes N (one mask per pass and layer).
        input_shape: One input of the trained shape, without batch.
        seed: Seed of the draw.

    Returns:
        The masks by layer name (``[N, *mask shape]`` each).

    Raises:
        ValueError: ``model`` has no dropout layer with ``p > 0``, uses alpha dropout (not a mask),
            or a layer is not called on that input.
    """
    if num_passes < 1:
        raise ValueError(f"Expected num_passes >= 1 but got {num_passes}.")
    alpha = [name for name, m in model.named_modules() if isinstance(m, _ALPHA) and m.p > 0]
    if alpha:
        raise ValueError(
            f"Cannot fix the MC-dropout masks of {', '.join(alpha)}: alpha dropout is an affine map, not a mask; "
            "use nn.Dropout / Dropout1d / Dropout2d / Dropout3d in f_0."
        )
    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _MASKABLE) and not isinstance(m, FixedMaskDropout) and m.p > 0
    }
    if not layers:
        raise ValueError("f_0 has no dropout layer with p > 0 whose MC-dropout masks could be fixed.")
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str) -> object:
        def record(_module: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
            shapes.setdefault(name, tuple(args[0].shape[1:]))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]  # type: ignore[arg-type]
    modes = [(m, m.training) for m in model.modules()]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    missing = sorted(set(layers) - set(shapes))
    if missing:
        raise ValueError(f"Dropout layer(s) {', '.join(missing)} of f_0 did not run on an input of shape {list(input_shape)}.")
    gen = torch.Generator().manual_seed(seed)
    masks: dict[str, Tensor] = {}
    for name, layer in layers.items():
        p = float(layer.p)
        shape = _mask_shape(layer, shapes[name])
        keep = torch.bernoulli(torch.full((num_passes, *shape), 1.0 - p), generator=gen)
        masks[name] = (keep / (1.0 - p)).to(device)
        fixed = FixedMaskDropout(p, masks[name], type(layer).__name__)
        fixed.train(layer.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fixed)
    return masks


def fix_mc_masks(pipeline: RoutedPipeline, router: Router, seed: int) -> dict[str, Tensor]:
    """Fix the MC-dropout masks of ``pipeline``'s ``f_0`` when ``router``'s state is MC dropout.

    Changes ``pipeline`` in place (its ``f_0`` and estimator): meant for the inference copy a
    `RoutedModel` holds. The estimator's ``max_batch`` is cleared, since each forward must hold
    whole passes (`FixedMaskDropout`).

    Args:
        pipeline: The routed pipeline (an inference copy).
        router: The router (its state is MC dropout only if it uses the uncertainty).
        seed: Seed of the masks.

    Returns:
        The masks by layer name; empty when the state draws no dropout mask (another estimator,
        or a router that does not use the uncertainty).
    """
    estimator = pipeline.estimator
    if not isinstance(estimator, MCDropoutEntropy) or not router.uses_uncertainty or pipeline.base_passes(router) == 0:
        return {}
    estimator.max_batch = None
    return fix_dropout_masks(pipeline.zoo.base, estimator.num_passes, pipeline.input_shape, seed)
