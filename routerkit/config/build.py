"""Turn a validated `ExperimentConfig` into objects through the registries."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routerkit.config import ConfigError
from routerkit.config.checks import (
    MODEL_DATA_ARGUMENTS,
    check_config,
    check_device,
    check_meta_keys,
    check_zoo_outputs,
    resolve_data_factory,
)
from routerkit.config.schema import ExperimentConfig
from routerkit.data import DataBundle, Split, paser_split
from routerkit.models import MODELS, Zoo, create_model
from routerkit.partitioners import create_partitioner
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward, create_accuracy, create_reward
from routerkit.routers import Router, create_router


@dataclass
class Experiment:
    """Everything a run needs, built from a config."""

    config: ExperimentConfig
    data: DataBundle
    parts: dict[str, Split]
    pipeline: RoutedPipeline
    router: Router
    reward: Reward
    accuracy: AccuracyTerm

    @property
    def zoo(self) -> Zoo:
        """The task models."""
        return self.pipeline.zoo


def add_plugin_path(folder: str | Path) -> None:
    """Make plugin packages next to a config file importable (``examples/battery_plugin``)."""
    path = str(Path(folder).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)


def build_data(cfg: ExperimentConfig) -> DataBundle:
    """Call the data plugin's factory and check what it returns."""
    factory = resolve_data_factory(cfg.data.factory)
    try:
        bundle = factory(**cfg.data.params)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as err:
        raise ConfigError(f"data ({cfg.data.factory} with data.params): {err}") from None
    if not isinstance(bundle, DataBundle):
        raise ConfigError(
            f"data.factory {cfg.data.factory!r} must return a routerkit.data.DataBundle, got {type(bundle).__name__}."
        )
    return bundle


def _named_parameters(factory: Any) -> set[str]:
    """Names a factory (function or class) accepts as keywords; empty when it cannot be inspected."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


def build_zoo(cfg: ExperimentConfig, in_channels: int, num_classes: int) -> Zoo:
    """Build the task models.

    ``in_channels`` and ``num_classes`` come from the data and are passed to every model whose
    factory takes an argument of that name and whose YAML does not set it (built-in or plugin).
    `build_experiment` then runs each model once on one zero unit (`check_zoo_outputs`).
    """
    models = {}
    for i, m in enumerate(cfg.zoo.models):
        params: dict[str, Any] = dict(m.params)
        try:
            accepted = _named_parameters(MODELS.get(m.model))
            for key, value in zip(MODEL_DATA_ARGUMENTS, (in_channels, num_classes), strict=True):
                if key in accepted:
                    params.setdefault(key, value)
            models[m.name] = create_model(m.model, **params)
        except (ImportError, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
            raise ConfigError(f"zoo.models.{i} ({m.name!r}): {err}") from None
    return Zoo(models)


def build_experiment(cfg: ExperimentConfig, data: DataBundle | None = None) -> Experiment:
    """Build data, zoo, pipeline, router, reward and accuracy term from ``cfg``.

    Checks first what shows without data (`check_config`: names, dotted paths, params, device),
    then that every task model returns logits of the data's shape (`check_zoo_outputs`) and that
    the meta keys the config names exist (`check_meta_keys`). A cost model that measures on the
    machine (``latency`` without ``cost.params.seconds``) is measured once the zoo is on
    ``run.device``, and the returned experiment's config records what it measured (a copy of
    ``cfg``), so that a run saving it never measures again.

    Raises:
        ConfigError: On any configuration problem, naming the field.
    """
    check_config(cfg, data_factory=data is None, build_models=False, device=False)
    device = check_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    data = data if data is not None else build_data(cfg)
    if device.type != "cpu":
        data = DataBundle(data.train.to(device), data.val.to(device), data.test.to(device), data.class_names, data.ignore_index)
    try:
        parts = paser_split(data.train, cfg.data.split_fractions, seed=cfg.run.seed)
    except ValueError as err:
        raise ConfigError(f"data ({cfg.data.factory} with data.params, data.split_fractions): {err}") from None
    check_meta_keys(cfg, data, parts)
    input_shape = data.input_shape
    try:
        partitioner = create_partitioner(cfg.partitioner.name, **cfg.partitioner.params)
        partitioner.unit_shape(input_shape)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"partitioner: {err}") from None
    zoo = build_zoo(cfg, in_channels=input_shape[0], num_classes=data.num_classes)
    check_zoo_outputs(cfg, zoo, partitioner, input_shape, data)
    try:
        pipeline = RoutedPipeline(
            zoo,
            partitioner,
            _component("uncertainty", cfg.uncertainty.name, cfg.uncertainty.params, "estimator"),
            _component("cost", cfg.cost.name, cfg.cost.params, "cost"),
            input_shape,
        )
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"uncertainty/cost: {err}") from None
    spatial = len(input_shape) == 3 and data.train.targets.dim() == 3
    try:
        router = create_router(cfg.router.name, router_spec=pipeline.router_spec(data.num_classes, spatial), **cfg.router.params)
        reward = create_reward(cfg.reward.name, lam=cfg.reward.lam)
        accuracy = create_accuracy(cfg.reward.accuracy, num_classes=data.num_classes, ignore_index=data.ignore_index)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"router/reward: {err}") from None
    zoo.to(device)
    router.to(device)
    return Experiment(_with_measured_costs(cfg, pipeline), data, parts, pipeline, router, reward, accuracy)


def _with_measured_costs(cfg: ExperimentConfig, pipeline: RoutedPipeline) -> ExperimentConfig:
    """``cfg`` with what the cost model measured now on the zoo's device (``latency``) in ``cost.params``.

    A new run saves this config, so loading the run reuses the numbers instead of measuring again;
    ``cfg`` itself is not changed.

    Raises:
        ConfigError: Given cost params do not fit the zoo (``cost.params.seconds`` of another length).
    """
    try:
        measured = pipeline.cost_model.measure(pipeline.zoo, pipeline.model_unit_shape)
    except ValueError as err:
        raise ConfigError(f"cost: {err}") from None
    if not measured:
        return cfg
    recorded = cfg.model_copy(deep=True)
    recorded.cost.params = {**recorded.cost.params, **measured}
    return recorded


def _component(section: str, name: str, params: dict[str, Any], kind: str) -> Any:
    from routerkit.costs import create_cost
    from routerkit.uncertainty import create_estimator

    factory = create_estimator if kind == "estimator" else create_cost
    try:
        return factory(name, **params)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err}") from None
