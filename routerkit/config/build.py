"""Turn a validated `ExperimentConfig` into objects through the registries."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routerkit._storage import RowStore
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
from routerkit.data import BaseSplit, DataBundle, DataSpec, paser_split
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
    parts: dict[str, BaseSplit]
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


def build_zoo(cfg: ExperimentConfig, in_channels: int, num_classes: int, *, load_weights: bool = True) -> Zoo:
    """Build the task models, loading ``zoo.models[].weights``.

    ``in_channels`` and ``num_classes`` come from the data and are passed to every model whose
    factory takes an argument of that name and whose YAML does not set it (built-in or plugin).
    A model with ``weights`` loads that state dict right after it is built
    (`routerkit.models.weights_file.load_weights_file`); ``train: false`` is read by the training
    stages (`routerkit.training.recipe`). `build_experiment` then runs each model once on one zero
    unit (`check_zoo_outputs`).

    Args:
        cfg: The experiment.
        in_channels: Channels of the data's inputs.
        num_classes: Classes of the data.
        load_weights: Load the ``weights`` files; a caller that loads a run's checkpoint right
            after (which holds every model's weights) can skip them.

    Raises:
        ConfigError: A model cannot be built, or its weights file is missing, unreadable or does
            not fit it (naming ``zoo.models.N.weights``, the file and what was expected).
    """
    from routerkit.models.weights_file import load_weights_file

    models = {}
    for i, m in enumerate(cfg.zoo.models):
        params: dict[str, Any] = dict(m.params)
        try:
            accepted = _named_parameters(MODELS.get(m.model))
            for key, value in zip(MODEL_DATA_ARGUMENTS, (in_channels, num_classes), strict=True):
                if key in accepted:
                    params.setdefault(key, value)
            model = create_model(m.model, **params)
        except (ImportError, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
            raise ConfigError(f"zoo.models.{i} ({m.name!r}): {err}") from None
        if m.weights is not None and load_weights and isinstance(model, torch.nn.Module):  # else `Zoo` names what it got
            load_weights_file(model, m.weights, f"zoo.models.{i}.weights", f"model {m.name!r} ({type(model).__name__})")
        models[m.name] = model
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
        data = data.to(device)
    try:
        parts = paser_split(data.train, cfg.data.split_fractions, seed=cfg.run.seed)
    except ValueError as err:
        raise ConfigError(f"data ({cfg.data.factory} with data.params, data.split_fractions): {err}") from None
    check_meta_keys(cfg, data, parts)
    pipeline, router = build_routing(cfg, data.spec, device)
    try:
        reward = create_reward(cfg.reward.name, lam=cfg.reward.lam)
        accuracy = create_accuracy(cfg.reward.accuracy, num_classes=data.num_classes, ignore_index=data.ignore_index)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"router/reward: {err}") from None
    return Experiment(_with_measured_costs(cfg, pipeline), data, parts, pipeline, router, reward, accuracy)


def build_routing(
    cfg: ExperimentConfig, spec: DataSpec, device: torch.device | str = "cpu", load_weights: bool = True
) -> tuple[RoutedPipeline, Router]:
    """The routed pipeline and the (untrained) router of ``cfg`` for data described by ``spec``, on ``device``.

    Needs no data: this is what `routerkit.load` rebuilds from a run's ``config.yaml`` and
    ``data_spec.json`` before loading the weights. Every task model is run once on a zero input
    (`check_zoo_outputs`). ``load_weights=False`` skips the ``zoo.models[].weights`` files (a
    run's checkpoint holds every model's weights, so a run directory does not need them).

    Raises:
        ConfigError: On a partitioner, zoo, estimator, cost or router problem, naming the section.
    """
    input_shape = spec.input_shape
    try:
        partitioner = create_partitioner(cfg.partitioner.name, **cfg.partitioner.params)
        partitioner.unit_shape(input_shape)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"partitioner: {err}") from None
    zoo = build_zoo(cfg, in_channels=spec.channels, num_classes=spec.num_classes, load_weights=load_weights)
    check_zoo_outputs(cfg, zoo, partitioner, input_shape, spec)
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
    pipeline.row_store = RowStore(cfg.run.cache_memory_gb, cfg.run.cache_dir)
    try:
        router_spec = pipeline.router_spec(spec.num_classes, spec.spatial)
        router = create_router(cfg.router.name, router_spec=router_spec, **cfg.router.params)
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"router: {err}") from None
    zoo.to(device)
    router.to(device)
    return pipeline, router


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
