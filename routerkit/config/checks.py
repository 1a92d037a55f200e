"""Checks of an experiment config beyond its schema, shared by ``routerkit validate`` and `build_experiment`.

Two kinds, by what they need:

- Without data (`config_problems`, what ``routerkit validate`` runs): every registered name and
  dotted path resolves (dotted paths are imported, never called), component ``params`` match
  the signature of their class or factory, every task model builds on the meta device (no
  memory, no weights) and ``run.device`` exists on this machine.
- With data (`check_zoo_outputs`, `check_meta_keys`, run by `build_experiment`): every task
  model runs once on one zero unit and returns logits of the shape the data need, and the meta
  keys the config names exist in the data.

Every failure is a `ConfigError` whose message starts with the field at fault.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from routerkit._registry import Registry, import_object
from routerkit.config import ConfigError
from routerkit.config.schema import ExperimentConfig

if TYPE_CHECKING:
    from routerkit.data import BaseSplit, DataBundle, DataSpec
    from routerkit.models import Zoo
    from routerkit.partitioners import Partitioner

__all__ = [
    "check_config",
    "check_device",
    "check_meta_keys",
    "check_params",
    "check_zoo_outputs",
    "config_problems",
    "resolve_component",
]

#: Keyword arguments routerkit passes to a router itself (``router.params`` must not set them).
ROUTER_ARGUMENTS = ("num_actions", "grid_shape", "in_channels", "num_classes", "spatial")
#: Keyword arguments a task model gets from the data when it takes them and its params do not set them.
MODEL_DATA_ARGUMENTS = ("in_channels", "num_classes")
_META_UNSUPPORTED = re.compile(r"\bmeta\b", re.IGNORECASE)
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def resolve_component(field: str, name: str, registry: Registry[Any] | None = None) -> Callable[..., Any]:
    """The class or factory behind ``name``, imported but not called.

    Args:
        field: The config field holding ``name`` (``"router.name"``), named in the error.
        name: A registered name or a dotted path ``"package.module:attribute"``.
        registry: Where registered names live; ``None``: ``name`` must be a dotted path.

    Returns:
        The class or factory.

    Raises:
        ConfigError: When the name is not registered or the dotted path does not import.
    """
    try:
        factory = registry.get(name) if registry is not None else import_object(name)
    except (ImportError, AttributeError, SyntaxError, KeyError) as err:
        raise ConfigError(f"{field}: {_one_line(err)}") from None
    if not callable(factory):
        raise ConfigError(f"{field}: Expected {name!r} to be a class or a factory function but got {type(factory).__name__}.")
    return factory  # type: ignore[no-any-return]


def resolve_data_factory(name: str) -> Callable[..., Any]:
    """``data.factory``: a built-in name (``folder``, `routerkit.data.DATASETS`) or a dotted path to a plugin."""
    from routerkit.data import DATASETS

    dotted = ":" in name or "." in name
    return resolve_component("data.factory", name, None if dotted else DATASETS)


def check_params(
    field: str,
    factory: Callable[..., Any],
    params: Mapping[str, Any],
    supplied: Iterable[str] = (),
    filled: Iterable[str] = (),
) -> None:
    """Check ``params`` against the keyword arguments ``factory`` accepts.

    Nothing is checked when the signature cannot be read; unknown names are not checked when the
    factory takes ``**kwargs``.

    Args:
        field: The config field holding ``params`` (``"router.params"``), named in the error.
        factory: The class or factory the params go to.
        params: The keyword arguments from the config.
        supplied: Arguments routerkit passes itself: the config must not set them.
        filled: Arguments routerkit fills from the data when the config does not set them.

    Raises:
        ConfigError: On an unknown, clashing or missing required argument.
    """
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return
    label = getattr(factory, "__qualname__", None) or repr(factory)
    supplied, filled = set(supplied), set(filled)
    clash = sorted(supplied & set(params))
    if clash:
        raise ConfigError(
            f"{field}: Expected no {', '.join(clash)} (routerkit passes {'it' if len(clash) == 1 else 'them'} to {label} "
            f"itself) but got {', '.join(f'{k}={params[k]!r}' for k in clash)}; remove {'it' if len(clash) == 1 else 'them'}."
        )
    names = [p.name for p in parameters if p.kind in _KEYWORD_KINDS]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        unknown = sorted(set(params) - set(names))
        if unknown:
            accepted = [n for n in names if n not in supplied]
            raise ConfigError(
                f"{field}: Expected keyword arguments of {label} among {', '.join(accepted) or '(none)'} but got unknown "
                f"{', '.join(repr(k) for k in unknown)}."
            )
    missing = [
        p.name
        for p in parameters
        if p.kind in _KEYWORD_KINDS and p.default is inspect.Parameter.empty and p.name not in {*params, *supplied, *filled}
    ]
    if missing:
        raise ConfigError(f"{field}: Expected a value for {', '.join(missing)} (required by {label}) but got none.")


def check_device(name: str) -> torch.device:
    """``run.device`` as a torch device that exists on this machine.

    Raises:
        ConfigError: When the device cannot train (``meta``, ...) or is not available here.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ConfigError(f"run.device: Expected a torch device but got {name!r} ({_one_line(err)}).") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device: Expected a device that can train ('cpu', 'cuda', 'cuda:N' or 'mps') but got {name!r}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device is {name!r} but no CUDA device is available here; use run.device=cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"run.device: Expected a CUDA device index below {count} (the CUDA devices here) but got {name!r}.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device is {name!r} but no MPS device is available here; use run.device=cpu.")
    return device


def _build(field: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> Any:
    """``factory(**kwargs)`` with the constructor's own argument checks reported under ``field``."""
    try:
        return factory(**kwargs)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{field}: {_one_line(err)}") from None


def _build_router(cfg: ExperimentConfig, factory: Callable[..., Any]) -> None:
    """Build the router on the meta device with what the data will fix guessed (both kinds of state).

    Reported only when it fails for a spatial and for a vector state alike: the data decide which it gets.
    """
    from routerkit.partitioners import create_partitioner

    try:
        grid_shape = create_partitioner(cfg.partitioner.name, **cfg.partitioner.params).grid_shape
    except Exception:  # reported by the partitioner check
        return
    kwargs = {"num_actions": len(cfg.zoo.models), "grid_shape": grid_shape, "num_classes": 2, **cfg.router.params}
    errors = []
    for spatial in (True, False):
        try:
            with torch.device("meta"):
                factory(spatial=spatial, **kwargs)
            return
        except (TypeError, ValueError, KeyError) as err:
            errors.append(err)
        except Exception:  # needs real tensors or data: the real build checks it
            return
    raise ConfigError(f"router.params: {_one_line(errors[0])}")


def _component_checks(cfg: ExperimentConfig, data_factory: bool) -> Iterable[Callable[[], None]]:
    """One callable per component: resolve its name or dotted path, check its params, build it (no data needed)."""
    from routerkit.costs import COSTS
    from routerkit.partitioners import PARTITIONERS
    from routerkit.rewards import ACCURACY_TERMS, REWARDS
    from routerkit.routers import ROUTERS
    from routerkit.uncertainty import ESTIMATORS

    def component(
        section: str,
        registry: Registry[Any],
        name: str,
        params: Mapping[str, Any],
        supplied: Iterable[str] = (),
        build: Callable[[Callable[..., Any]], Any] | None = None,
    ) -> Callable[[], None]:
        def check() -> None:
            factory = resolve_component(f"{section}.name", name, registry)
            check_params(f"{section}.params", factory, params, supplied)
            if build is not None:
                build(factory)

        return check

    def named(field: str, registry: Registry[Any], name: str, supplied: Iterable[str]) -> Callable[[], None]:
        def check() -> None:
            check_params(field, resolve_component(field, name, registry), {}, supplied)

        return check

    def build_with(section: str, params: Mapping[str, Any]) -> Callable[[Callable[..., Any]], Any]:
        return lambda factory: _build(f"{section}.params", factory, params)

    def data() -> None:
        factory = resolve_data_factory(cfg.data.factory)
        check_params("data.params", factory, cfg.data.params)

    if data_factory:
        yield data
    p, u, c = cfg.partitioner, cfg.uncertainty, cfg.cost
    yield component("partitioner", PARTITIONERS, p.name, p.params, build=build_with("partitioner", p.params))
    yield component("uncertainty", ESTIMATORS, u.name, u.params, build=build_with("uncertainty", u.params))
    yield component("cost", COSTS, c.name, c.params, build=build_with("cost", c.params))
    yield component(
        "router", ROUTERS, cfg.router.name, cfg.router.params, ROUTER_ARGUMENTS, build=functools.partial(_build_router, cfg)
    )
    yield named("reward.name", REWARDS, cfg.reward.name, ("lam",))
    yield named("reward.accuracy", ACCURACY_TERMS, cfg.reward.accuracy, ("num_classes", "ignore_index"))
    if cfg.training.cascade.joint:
        yield lambda: check_joint_cascade(cfg, resolve_component("router.name", cfg.router.name, ROUTERS))


def check_joint_cascade(cfg: ExperimentConfig, router_cls: Any) -> None:
    """Refuse ``training.cascade.joint`` for a cascade other than optimal stopping (a PaSeR-style router ignores it).

    Raises:
        ConfigError: Naming ``training.cascade.joint``.
    """
    from routerkit.routers import CascadeRouter, OptimalStoppingCascade

    if not (cfg.training.cascade.joint and isinstance(router_cls, type) and issubclass(router_cls, CascadeRouter)):
        return
    if not issubclass(router_cls, OptimalStoppingCascade):
        raise ConfigError(
            f"training.cascade.joint: joint training is for the optimal-stopping cascade (router.name: "
            f"optimal_stopping) but router.name is {cfg.router.name!r} ({router_cls.__name__}); "
            "set training.cascade.joint: false."
        )


def _model_checks(cfg: ExperimentConfig, build: bool) -> Iterable[Callable[[], None]]:
    """One callable per task model: resolve it, check its params and (``build``) build it on the meta device."""
    from routerkit.models import MODELS

    def check(index: int) -> None:
        m = cfg.zoo.models[index]
        factory = resolve_component(f"zoo.models.{index}.model", m.model, MODELS)
        check_params(f"zoo.models.{index}.params", factory, m.params, filled=MODEL_DATA_ARGUMENTS)
        if not build:
            return
        try:
            with torch.device("meta"):
                model = factory(**m.params)
        except Exception as err:  # any constructor failure is a config problem to report
            if isinstance(err, NotImplementedError) or _META_UNSUPPORTED.search(str(err)):
                return  # the constructor needs real tensors (e.g. `.item()`); the real build checks it
            raise ConfigError(
                f"zoo.models.{index} ({m.name!r}): Expected {m.model!r} to build with zoo.models.{index}.params "
                f"{dict(m.params)} but it raised {type(err).__name__}: {_one_line(err)}"
            ) from None
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"zoo.models.{index}.model: Expected {m.model!r} to build a torch.nn.Module but got {type(model).__name__}."
            )

    for i in range(len(cfg.zoo.models)):
        yield functools.partial(check, i)


def config_problems(
    cfg: ExperimentConfig, *, data_factory: bool = True, build_models: bool = True, device: bool = True
) -> list[str]:
    """Every problem of ``cfg`` that shows without data, one message per component (empty: all good).

    Nothing is trained and no data are loaded; dotted paths are imported but not called.

    Args:
        cfg: A config that passed the schema.
        data_factory: Import ``data.factory`` and check ``data.params`` against its signature.
        build_models: Build every task model on the meta device (catches constructor errors).
        device: Check that ``run.device`` is available here.

    Returns:
        Messages, each starting with the field at fault.
    """
    checks: list[Callable[[], Any]] = [*_component_checks(cfg, data_factory), *_model_checks(cfg, build_models)]
    if device:
        checks.append(functools.partial(check_device, cfg.run.device))
    problems = []
    for check in checks:
        try:
            check()
        except ConfigError as err:
            problems.append(str(err))
    return problems


def check_config(cfg: ExperimentConfig, **kwargs: bool) -> None:
    """Raise a `ConfigError` listing every problem `config_problems` finds (same keyword arguments)."""
    problems = config_problems(cfg, **kwargs)
    if problems:
        raise ConfigError("\n".join(problems))


def _expected_logits(num_classes: int, shape: tuple[int, ...], classification: bool) -> tuple[int, ...]:
    return (1, num_classes) if classification else (1, num_classes, *shape[1:])


def check_zoo_outputs(
    cfg: ExperimentConfig, zoo: Zoo, partitioner: Partitioner, input_shape: tuple[int, ...], data: DataBundle | DataSpec
) -> None:
    """Run every task model once on one zero input and check the shape of its logits.

    ``f_0`` runs on the whole input, the other models on one unit (``partitioner.unit_shape``),
    in eval mode under ``torch.no_grad`` (no random numbers drawn, batch-norm statistics kept);
    each model's mode is restored. Classification (``[N]`` targets) expects ``[1, K]`` logits,
    dense tasks ``[1, K, *spatial size of the input]``.

    Raises:
        ConfigError: Naming ``zoo.models.N (name)`` and the expected vs actual shape.
    """
    unit_shape = tuple(partitioner.model_unit_shape(input_shape))  # a unit with its context margin
    from routerkit.data import DataSpec

    spec = data if isinstance(data, DataSpec) else data.spec
    classification = spec.task == "classification"
    num_classes = spec.num_classes
    for i, name in enumerate(zoo.names):
        model = zoo[i]
        shape, what = (tuple(input_shape), "input") if i == 0 else (unit_shape, "unit")
        expected = _expected_logits(num_classes, shape, classification)
        first = next(model.parameters(), None)
        x = torch.zeros(1, *shape, device=first.device if first is not None else "cpu")
        field = f"zoo.models.{i} ({name!r})"
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as err:  # a model that cannot run on the data's shape is a config problem
            raise ConfigError(
                f"{field}: Expected the model to map one {what} of shape {list(x.shape)} to logits {list(expected)} "
                f"but it raised {type(err).__name__}: {_one_line(err)} (check in_channels and the model's params)"
            ) from err
        finally:
            model.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{field}: Expected logits as a tensor of shape {list(expected)} but got {type(out).__name__}.")
        if tuple(out.shape) != expected:
            hint = f"num_classes {num_classes} (the data's classes)"
            if out.dim() >= 2 and out.shape[1] == num_classes:
                hint = "the output's spatial size equal to the input's"
            raise ConfigError(
                f"{field}: Expected logits of shape {list(expected)} for one {what} of shape {list(x.shape)} but got "
                f"{list(out.shape)}; the model needs {hint}."
            )


def check_meta_keys(cfg: ExperimentConfig, data: DataBundle, parts: Mapping[str, BaseSplit]) -> None:
    """The per-input meta keys the config names (``evaluation.expert_key``, ``zoo.models.N.train_on``) exist in the data.

    Raises:
        ConfigError: Naming the field and the keys the data have.
    """

    def keys(split: BaseSplit) -> str:
        return ", ".join(sorted(split.meta)) or "none"

    key = cfg.evaluation.expert_key
    if key is not None:
        splits = {"val": data.val, "test": data.test}
        for split_name in sorted({cfg.evaluation.split, cfg.compare.split}):
            if key not in splits[split_name].meta:
                raise ConfigError(
                    f"evaluation.expert_key: Expected a meta key of the data's {split_name} split (it has: "
                    f"{keys(splits[split_name])}) but got {key!r}."
                )
    for i, m in enumerate(cfg.zoo.models):
        if m.train_on is not None:
            for meta_key in m.train_on:
                if meta_key not in parts["pt"].meta:
                    raise ConfigError(
                        f"zoo.models.{i}.train_on: Expected a meta key of the data (D_PT has: {keys(parts['pt'])}) "
                        f"but got {meta_key!r}."
                    )
