"""The `UncertaintyEstimator` interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from routerkit._registry import Registry
from routerkit.functional import class_argmax


@dataclass
class BaseOutput:
    """What the base model ``f_0`` tells the router about one batch.

    Attributes:
        probs: ``[B, K, ...]`` class probabilities (the MC mean for MC dropout).
        uncertainty: ``[B, ...]`` per-pixel (or per-sample) uncertainty, higher = less sure.
        inputs: ``[B, C, ...]`` the inputs ``f_0`` ran on (set by `UncertaintyEstimator.__call__`;
            a router may read them too, e.g. PaSeR with ``input_channels``), or ``None``.
    """

    probs: Tensor
    uncertainty: Tensor
    inputs: Tensor | None = None

    def select(self, index: Tensor | slice) -> BaseOutput:
        """The rows ``index`` (inputs) of every tensor."""
        return BaseOutput(self.probs[index], self.uncertainty[index], None if self.inputs is None else self.inputs[index])

    def to(self, device: torch.device | str) -> BaseOutput:
        """Every tensor on ``device``."""
        inputs = None if self.inputs is None else self.inputs.to(device)
        return BaseOutput(self.probs.to(device), self.uncertainty.to(device), inputs)

    @property
    def pred(self) -> Tensor:
        """Arg-max prediction ``[B, ...]``."""
        return class_argmax(self.probs, 1)

    def state(self) -> Tensor:
        """Router input: probabilities and uncertainty stacked as channels ``[B, K + 1, ...]``."""
        return torch.cat([self.probs, self.uncertainty.unsqueeze(1)], dim=1)


class UncertaintyEstimator(ABC):
    """Runs ``f_0`` on a batch and returns its probabilities and an uncertainty map.

    Subclasses implement `_estimate`; `__call__` checks the output. `flops` is what the
    FLOP accountant charges per input for one call: by default ``num_passes`` full forwards
    of ``f_0``; an estimator that runs less (a shared trunk) overrides it.
    """

    #: Stochastic (or deterministic) passes of f_0 per input.
    num_passes: int = 1

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: Tensor) -> BaseOutput:
        out = self._estimate(model, x)
        if out.inputs is None:
            out.inputs = x
        if out.probs.shape[0] != x.shape[0] or out.uncertainty.shape != out.probs.shape[:1] + out.probs.shape[2:]:
            raise RuntimeError(
                f"{type(self).__name__} returned probs {tuple(out.probs.shape)} and uncertainty "
                f"{tuple(out.uncertainty.shape)} for an input of batch {x.shape[0]}."
            )
        return out

    @abstractmethod
    def _estimate(self, model: nn.Module, x: Tensor) -> BaseOutput: ...

    def flops(self, model: nn.Module, input_shape: tuple[int, ...]) -> int:
        """FLOPs per input of one call on ``model`` (fvcore convention: one multiply-add = one flop).

        Args:
            model: The base model ``f_0``.
            input_shape: Shape of one input (no batch dim).
        """
        from routerkit.flops import count_flops

        return self.num_passes * count_flops(model, input_shape)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (for run metadata)."""
        return {}


ESTIMATORS: Registry[UncertaintyEstimator] = Registry("uncertainty estimator", UncertaintyEstimator)


def create_estimator(spec: str | UncertaintyEstimator | type[UncertaintyEstimator], **kwargs: Any) -> UncertaintyEstimator:
    """Build an estimator from a name (``"mc_dropout"``, ``"softmax_entropy"``, ...), class or instance."""
    return ESTIMATORS.resolve(spec, **kwargs)


def list_estimators(pattern: str | None = None) -> list[str]:
    """Registered estimator names."""
    return ESTIMATORS.names(pattern)
