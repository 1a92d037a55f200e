"""Monte-Carlo-dropout entropy and single-pass softmax uncertainties."""

from __future__ import annotations

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


@ESTIMATORS.register("mc_dropout")
class MCDropoutEntropy(UncertaintyEstimator):
    """Predictive entropy of the mean of ``num_passes`` MC-dropout samples (Gal & Ghahramani 2016).

    The passes run as **one** forward of a batch of ``num_passes * B`` inputs, with dropout
    layers in training mode and every other layer (batch-norm included) in eval mode, so
    batch-norm running statistics are used and never updated. The probabilities returned
    are the MC mean; the uncertainty is the entropy of that mean (nats).

    Args:
        num_passes: Number of stochastic passes N (PaSeR: 20; 5 gives similar entropies).
        max_batch: Optional cap on the stacked batch size (memory); split into chunks beyond it.
    """

    def __init__(self, num_passes: int = 20, max_batch: int | None = None) -> None:
        if num_passes < 1:
            raise ValueError(f"Expected num_passes >= 1 but got {num_passes}.")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"Expected max_batch >= 1 or None but got {max_batch}.")
        self.num_passes = num_passes
        self.max_batch = max_batch

    def config(self) -> dict[str, Any]:
        return {"num_passes": self.num_passes, "max_batch": self.max_batch}

    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput:
        dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES) and m.p > 0]
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
            batch = x.shape[0]
            stacked = x.unsqueeze(0).expand(self.num_passes, *x.shape).reshape(self.num_passes * batch, *x.shape[1:])
            chunk = self.max_batch or stacked.shape[0]
            logits = torch.cat([model(stacked[i : i + chunk]) for i in range(0, stacked.shape[0], chunk)])
            probs = torch.softmax(logits.float(), dim=1)
            mean = probs.reshape(self.num_passes, batch, *probs.shape[1:]).mean(0)
        finally:
            _restore(modes)
        return BaseOutput(mean, entropy(mean, dim=1))


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
