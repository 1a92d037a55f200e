"""Uncertainty estimators: turn the base model's output into the router's state."""

from __future__ import annotations

from routerkit.uncertainty.base import (
    ESTIMATORS,
    BaseOutput,
    UncertaintyEstimator,
    create_estimator,
    list_estimators,
)
from routerkit.uncertainty.estimators import MaxProbability, MCDropoutEntropy, SoftmaxEntropy, SoftmaxMargin

__all__ = [
    "ESTIMATORS",
    "BaseOutput",
    "MCDropoutEntropy",
    "MaxProbability",
    "SoftmaxEntropy",
    "SoftmaxMargin",
    "UncertaintyEstimator",
    "create_estimator",
    "list_estimators",
]
