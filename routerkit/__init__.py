"""routerkit: route every input, or every patch of an input, to the right model of a zoo.

The public API is deliberately small; see the docs for tutorials.

Example:
    >>> import torch
    >>> from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
    >>> from routerkit.models import ToySegmenter
    >>> zoo = Zoo([ToySegmenter(width=2, dropout=0.2), ToySegmenter(width=16)])
    >>> pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "param_share", (1, 16, 16))
    >>> router = create_router("paser", num_actions=2, grid_shape=(2, 2), in_channels=3)
    >>> pipe(torch.rand(4, 1, 16, 16), router).actions.shape
    torch.Size([4, 4])
"""

from __future__ import annotations

from routerkit.costs import CostModel, create_cost, list_costs
from routerkit.data import DataBundle, Split
from routerkit.data import folder_dataset as _folder_dataset  # noqa: F401  (registers the built-in 'folder' data factory)
from routerkit.deploy import Prediction, RoutedModel, load
from routerkit.executor import Executor, FlopAccountant
from routerkit.metrics import EvalResult, evaluate_router
from routerkit.models import TaskModel, Zoo, create_model, list_models
from routerkit.partitioners import Partitioner, PatchGrid, WholeInput
from routerkit.pipeline import RoutedOutput, RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward, create_reward
from routerkit.routers import Router, create_router, list_routers, register_router
from routerkit.uncertainty import UncertaintyEstimator, create_estimator, list_estimators

__version__ = "0.1.0"


__all__ = [
    "AccuracyTerm",
    "CostModel",
    "DataBundle",
    "EvalResult",
    "Executor",
    "FlopAccountant",
    "Partitioner",
    "Prediction",
    "PatchGrid",
    "Reward",
    "RoutedModel",
    "RoutedOutput",
    "RoutedPipeline",
    "Router",
    "Split",
    "TaskModel",
    "UncertaintyEstimator",
    "WholeInput",
    "Zoo",
    "__version__",
    "create_cost",
    "create_estimator",
    "create_model",
    "create_reward",
    "create_router",
    "evaluate_router",
    "list_costs",
    "list_estimators",
    "list_models",
    "list_routers",
    "load",
    "register_router",
]
