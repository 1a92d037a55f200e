"""Monte-Carlo-dropout entropy and single-pass softmax uncertainties."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from routerkit.functional import entropy
from routerkit.uncertainty.base import ESTIMATORS, BaseOutput, UncertaintyEstimator

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule with its train/eval flag, to restore them exactly afterwards."""
    return [(m, m.training) for m in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _single_pass_probs(model: nn.Module, x: Tensor) -> Tensor:
    modes = _modes(model)
    model.eval()
    try:
        return torch.softmax(model(x).float(), dim=1)
    finally:
        _restore(modes)


class _Method(nn.Module):
    """``model.<name>`` as a module, so fvcore can count one part of a model."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = getattr(self.model, self.name)(x)
        return out


#: Per model: may its MC passes share the trunk? (see `MCDropoutEntropy._shares_trunk`)
_TRUNK_PROBES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _dropouts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES) and m.p > 0]


@ESTIMATORS.register("mc_dropout")
class MCDropoutEntropy(UncertaintyEstimator):
    """Predictive entropy of the mean of ``num_passes`` MC-dropout samples (Gal & Ghahramani 2016).

    The passes run as **one** forward of a batch of ``num_passes * B`` inputs (per block), with dropout
    layers in training mode and every other layer (batch-norm included) in eval mode, so
    batch-norm running statistics are used and never updated. The probabilities returned
    are the MC mean; the uncertainty is the entropy of that mean (nats).

    **Blocks (CPU).** On a CPU a large batch runs in blocks of images, all N passes of a block
    as one forward, each block's softmaxes averaged before the next block runs. A block holds
    about ``block_elements`` elements of what the passes run on (N x 4 inputs of 1 x 112 x 128
    at N = 8, or N x 2 of a shared trunk's 2-channel features), so the full-resolution maps of
    a small ``f_0`` and its N softmaxes stay in the cache instead of N x B of them going
    through memory. Small batches, and every batch on an accelerator, are one block. The
    samples have the same distribution whatever the blocking.

    **Shared trunk.** If ``f_0`` follows timm's split, ``model(x) == forward_head(forward_features(x))``,
    and no dropout layer runs inside ``forward_features`` (probed once per model with hooks),
    the deterministic trunk runs once and only the head runs ``num_passes`` times. The samples
    have the same distribution as full passes; the cost is one trunk plus N heads, and that is
    what `flops` charges. Otherwise every pass is a full forward of ``f_0``.

    Args:
        num_passes: Number of stochastic passes N (PaSeR: 20; 5 gives similar entropies).
        max_batch: Optional cap on a block's stacked batch size (memory); split into chunks beyond it.
        share_trunk: Use the shared trunk when ``f_0`` allows it (``False``: always N full passes).
    """

    #: Elements per block of MC passes on a CPU (``num_passes`` x images x elements of one input or
    #: of its trunk features); see **Blocks**.
    block_elements: int = 2**19

    def __init__(self, num_passes: int = 20, max_batch: int | None = None, share_trunk: bool = True) -> None:
        if num_passes < 1:
            raise ValueError(f"Expected num_passes >= 1 but got {num_passes}.")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"Expected max_batch >= 1 or None but got {max_batch}.")
        self.num_passes = num_passes
        self.max_batch = max_batch
        self.share_trunk = share_trunk

    def config(self) -> dict[str, Any]:
        return {"num_passes": self.num_passes, "max_batch": self.max_batch, "share_trunk": self.share_trunk}

    def _shares_trunk(self, model: nn.Module, x: Tensor, dropouts: list[nn.Module]) -> bool:
        """Whether MC passes may share ``model``'s trunk: a timm-style split with no dropout in the trunk.

        Probed once per model, on one input with every dropout layer in eval mode (so no random
        number is drawn) and a forward hook on each: if none fires inside ``forward_features``,
        the trunk is deterministic. The answer is cached.
        """
        if not self.share_trunk:
            return False
        if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
            return False
        if model in _TRUNK_PROBES:
            return _TRUNK_PROBES[model]
        fired: list[nn.Module] = []
        modes = _modes(model)
        hooks = [m.register_forward_hook(lambda mod, _i, _o: fired.append(mod)) for m in dropouts]
        try:
            model.eval()  # no dropout draws, no batch-norm statistics updated
            with torch.no_grad():
                model.forward_features(x[:1])  # type: ignore[operator]
        finally:
            for hook in hooks:
                hook.remove()
            _restore(modes)
        _TRUNK_PROBES[model] = not fired
        return not fired

    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
        dropouts = _dropouts(model)
        if not dropouts:
            raise ValueError(
                "MC-dropout uncertainty needs a base model with dropout (p > 0); the base model has none. "
                "Give f_0 a dropout rate (e.g. the UNet's `dropout: 0.1`) or use `softmax_entropy`."
            )
        modes = _modes(model)
        model.eval()
        for m in dropouts:
            m.train()
        try:
            features = model.forward_features(x) if self._shares_trunk(model, x, dropouts) else None  # type: ignore[operator]
            source = x if features is None else features
            run: Callable[[Tensor], Tensor] = model if features is None else model.forward_head  # type: ignore[assignment]
            group = x.shape[0]  # images per block: all of them on an accelerator, cache-sized on a CPU
            if x.device.type == "cpu":
                group = max(1, self.block_elements // (self.num_passes * max(1, source[0].numel())))
            means = [self._passes(run, source[i : i + group]) for i in range(0, x.shape[0], group)]
            mean = means[0] if len(means) == 1 else torch.cat(means)
        finally:
            _restore(modes)
        return BaseOutput(mean, entropy(mean, dim=1))

    def _passes(self, run: Callable[[Tensor], Tensor], source: Tensor) -> Tensor:
        """The MC mean of ``num_passes`` stochastic runs of ``run`` on one block of inputs (or features)."""
        stacked = torch.cat([source] * self.num_passes)  # pass-major; keeps the memory format (channels-last)
        chunk = self.max_batch or stacked.shape[0]
        outs = [run(stacked[i : i + chunk]) for i in range(0, stacked.shape[0], chunk)]
        logits = outs[0] if len(outs) == 1 else torch.cat(outs)  # one chunk: no copy
        probs = torch.softmax(logits.float(), dim=1)
        return probs.reshape(self.num_passes, source.shape[0], *probs.shape[1:]).mean(0)

    def flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        """One trunk plus ``num_passes`` heads with a shared trunk, else ``num_passes`` full forwards."""
        from routerkit.flops import count_flops

        try:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
        if not self._shares_trunk(model, x, _dropouts(model)):
            return self.num_passes * count_flops(model, input_shape)
        modes = _modes(model)
        model.eval()
        try:
            with torch.no_grad():
                features: Tensor = model.forward_features(x)  # type: ignore[operator]
        finally:
            _restore(modes)
        trunk = count_flops(_Method(model, "forward_features"), input_shape)
        head = count_flops(_Method(model, "forward_head"), tuple(features.shape[1:]))
        return trunk + self.num_passes * head


@ESTIMATORS.register("softmax_entropy")
class SoftmaxEntropy(UncertaintyEstimator):
    """Entropy of one deterministic softmax (nats)."""

    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
        probs = _single_pass_probs(model, x)
        return BaseOutput(probs, entropy(probs, dim=1))


@ESTIMATORS.register("max_prob")
class MaxProbability(UncertaintyEstimator):
    """``1 - max_k p_k`` of one deterministic softmax."""

    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
        probs = _single_pass_probs(model, x)
        return BaseOutput(probs, 1.0 - probs.max(dim=1).values)


@ESTIMATORS.register("margin")
class SoftmaxMargin(UncertaintyEstimator):
    """``1 - (p_top1 - p_top2)`` of one deterministic softmax."""

    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
        probs = _single_pass_probs(model, x)
        top2 = probs.topk(2, dim=1).values
        return BaseOutput(probs, 1.0 - (top2[:, 0] - top2[:, 1]))
