"""The recipe: which stages train an experiment, built from its config (``config -> stages``).

`build_stages` gives the stages of Algorithm 1 for an experiment: the two pre-training stages,
then the stages that train its router. Those come from the router's *stage builder*, found in
a registry keyed by router class (`register_stage_builder`, `stage_builder_for`): PaSeR-style
policies get REINFORCE on D_RL and a fine-tuning stage, cascades a fitting stage. A router that
is not trainable and has no builder gets no stage of its own; a trainable one without a builder
is an error that names the router.

Frozen models (``zoo.models[i].train: false``, `frozen_models`) are left out of the stages that
would train them; a pre-training stage with no model left to train is not built at all
(`skipped_stages`), and `frozen_summary` is the line the runner prints about it.

Example:
    ```python
    from routerkit.training.recipe import register_stage_builder

    @register_stage_builder(MyRouter)
    def my_router_stages(exp, router, seed):
        return [MyStage(exp.pipeline, router, exp.parts["rl"], ..., seed)]
    ```
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from routerkit.config import ConfigError, ExperimentConfig
from routerkit.config.build import Experiment
from routerkit.config.checks import check_joint_cascade
from routerkit.data import BaseSplit
from routerkit.rewards import Reward
from routerkit.routers import CascadeRouter, PaSeRRouter, Router
from routerkit.training.base import Stage
from routerkit.training.cascade_fitting import CascadeFitting, JointCascadeTraining
from routerkit.training.finetune import JointFineTuning
from routerkit.training.policy import PolicyFineTuning, PolicyTraining
from routerkit.training.pretraining import BaseModelPretraining, LargeModelPretraining, PretrainChecks
from routerkit.unit_table import UnitTable

__all__ = [
    "STAGE_BUILDERS",
    "StageBuilder",
    "build_stages",
    "frozen_models",
    "frozen_summary",
    "model_training_data",
    "policy_stage",
    "register_stage_builder",
    "skipped_stages",
    "stage_builder_for",
    "tvd_stage",
]

#: Builds the stages that train ``router`` in ``exp``; ``seed`` is the first seed they use (``run.seed + 2``).
StageBuilder = Callable[[Experiment, Any, int], list[Stage]]
#: Router class -> the function building its stages; `stage_builder_for` looks a router up along its class's MRO.
STAGE_BUILDERS: dict[type[Router], StageBuilder] = {}

B = TypeVar("B", bound=StageBuilder)


def register_stage_builder(router_cls: type[Router]) -> Callable[[B], B]:
    """Decorator registering the function that builds the training stages of ``router_cls`` (and its subclasses).

    A builder registered again for the same class replaces the earlier one, with a warning.

    Raises:
        ValueError: When ``router_cls`` is not a `Router` subclass.
    """
    if not (isinstance(router_cls, type) and issubclass(router_cls, Router)):
        raise ValueError(f"Expected a Router subclass but got {router_cls!r}.")

    def decorator(builder: B) -> B:
        if router_cls in STAGE_BUILDERS and STAGE_BUILDERS[router_cls] is not builder:
            warnings.warn(
                f"Replacing the stage builder of {router_cls.__name__} ({STAGE_BUILDERS[router_cls].__name__}) "
                f"with {getattr(builder, '__name__', builder)!r}.",
                stacklevel=2,
            )
        STAGE_BUILDERS[router_cls] = builder
        return builder

    return decorator


def stage_builder_for(router: Router) -> StageBuilder | None:
    """The stage builder of ``router``'s class or of its nearest registered base class (``None``: there is none).

    Raises:
        ConfigError: When ``router`` is trainable (``is_trainable``) but no builder covers its class.
    """
    for cls in type(router).__mro__:
        if cls in STAGE_BUILDERS:
            return STAGE_BUILDERS[cls]
    if router.is_trainable:
        known = ", ".join(sorted(c.__name__ for c in STAGE_BUILDERS))
        raise ConfigError(
            f"router {type(router).__name__} is trainable but routerkit knows no training stages for it (stage builders "
            f"exist for {known}): register one with routerkit.training.recipe.register_stage_builder."
        )
    return None


def frozen_models(cfg: ExperimentConfig) -> list[int]:
    """Zoo indices of the models with ``train: false``, which no stage trains."""
    return [i for i, m in enumerate(cfg.zoo.models) if not m.train]


def skipped_stages(cfg: ExperimentConfig) -> list[str]:
    """The pre-training stages not built because every model they would train is frozen.

    ``pretrain_large`` trains ``f_1..f_m``, ``pretrain_base`` trains ``f_0``. Joint fine-tuning
    and the joint cascade stage are always built (they train the policy too); they leave the
    frozen large models as they are.
    """
    frozen = set(frozen_models(cfg))
    skipped = [LargeModelPretraining.name] if set(range(1, len(cfg.zoo.models))) <= frozen else []
    return skipped + ([BaseModelPretraining.name] if 0 in frozen else [])


def frozen_summary(cfg: ExperimentConfig) -> str | None:
    """The line saying which models are frozen and which stages were skipped (``None`` when none is frozen)."""
    frozen = frozen_models(cfg)
    if not frozen:
        return None
    names = ", ".join(cfg.zoo.models[i].name for i in frozen)
    skipped = skipped_stages(cfg)
    return f"frozen models (zoo.models[].train: false): {names}; stages skipped: " + (
        ", ".join(skipped) + " (every model they train is frozen)" if skipped else "none"
    )


def _warn_frozen_without_weights(cfg: ExperimentConfig) -> None:
    """Warn about a frozen model with no ``weights``: it stays at its random initialisation (almost surely a mistake)."""
    for i in frozen_models(cfg):
        m = cfg.zoo.models[i]
        if m.weights is None:
            warnings.warn(
                f"zoo.models.{i}.train is false but zoo.models.{i}.weights is not set: model {m.name!r} stays frozen at "
                "its random initialisation. Expected a state dict file in weights (a zoo trained elsewhere) or train: true.",
                UserWarning,
                stacklevel=3,
            )


def _checks(exp: Experiment, section: Any) -> PretrainChecks:
    """Per-epoch validation (on the validation split), batch-norm recalibration and best epoch of a pre-training stage.

    A specialist (``zoo.models[i].train_on``) is validated on the inputs of the validation split it was trained for.
    """
    checks = PretrainChecks.from_config(section, exp.data.val, exp.data.num_classes, exp.config.evaluation.batch_size)
    for index, m in enumerate(exp.config.zoo.models):
        if m.train_on is None:
            continue
        ((key, value),) = m.train_on.items()
        column = exp.data.val.meta.get(key)
        if column is not None and column.dim() == 1 and bool((column == value).any()):
            matching = exp.data.val.subset(torch.nonzero(column == value).flatten())
            checks.model_validation["f0" if index == 0 else m.name] = matching
    return checks


def model_training_data(exp: Experiment, index: int) -> BaseSplit:
    """D_PT, or the part of it selected by ``zoo.models[index].train_on`` (``{meta key: value}``)."""
    data, spec = exp.parts["pt"], exp.config.zoo.models[index].train_on
    if spec is None:
        return data
    ((key, value),) = spec.items()
    if key not in data.meta:
        raise ConfigError(
            f"zoo.models.{index}.train_on uses meta key {key!r} but the data plugin provides {sorted(data.meta) or 'no meta'}."
        )
    column = data.meta[key]
    if column.dim() != 1:
        raise ConfigError(f"zoo.models.{index}.train_on: meta {key!r} must hold one value per input, got {tuple(column.shape)}.")
    subset = data.subset(torch.nonzero(column == value).flatten())
    if len(subset) == 0:
        raise ConfigError(f"zoo.models.{index}.train_on: no input of D_PT has {key} == {value}.")
    return subset


def policy_stage(
    exp: Experiment,
    router: PaSeRRouter,
    reward: Reward,
    seed: int,
    epochs: int | None = None,
    cache: UnitTable | None = None,
) -> PolicyTraining:
    """Stage 2 on D_RL with the config's ``training.policy`` settings.

    Args:
        exp: The experiment.
        router: The PaSeR router to train.
        reward: Its reward (e.g. another lambda for a sweep).
        seed: Random seed.
        epochs: Epochs (default: ``training.policy.epochs``).
        cache: A prebuilt replay cache of D_RL.
    """
    return PolicyTraining.from_config(
        exp.config.training.policy,
        pipeline=exp.pipeline,
        router=router,
        reward=reward,
        accuracy=exp.accuracy,
        data=exp.parts["rl"],
        seed=seed,
        epochs=epochs,
        cache=cache,
    )


def tvd_stage(
    exp: Experiment,
    router: PaSeRRouter,
    threshold: float,
    seed: int,
    cache: UnitTable | None = None,
) -> PolicyFineTuning:
    """Stage 3 as policy-only fine-tuning on D_FT stopped at a TVD ``threshold`` (``training.finetune``)."""
    t = exp.config.training
    if t.finetune.lam_end is None:
        raise ConfigError("training.finetune.lam_end is needed for TVD-threshold fine-tuning.")
    return PolicyFineTuning.from_config(
        t.finetune,
        pipeline=exp.pipeline,
        router=router,
        reward=exp.reward,
        accuracy=exp.accuracy,
        data=exp.parts["ft"],
        seed=seed,
        baseline=t.policy.baseline,
        tvd_threshold=threshold,
        cache=cache,
    )


@register_stage_builder(PaSeRRouter)
def paser_stages(exp: Experiment, router: PaSeRRouter, seed: int) -> list[Stage]:
    """REINFORCE on D_RL (seed ``seed``), then fine-tuning on D_FT (``seed + 1``): joint, or policy-only up to a TVD."""
    f = exp.config.training.finetune
    stages: list[Stage] = [policy_stage(exp, router, exp.reward, seed)]
    if f.tvd_threshold is not None:
        stages.append(tvd_stage(exp, router, f.tvd_threshold, seed + 1))
        return stages
    stages.append(
        JointFineTuning.from_config(
            f,
            pipeline=exp.pipeline,
            router=router,
            reward=exp.reward,
            accuracy=exp.accuracy,
            data=exp.parts["ft"],
            seed=seed + 1,
            ignore_index=exp.data.ignore_index,
            frozen=frozen_models(exp.config),
        )
    )
    return stages


@register_stage_builder(CascadeRouter)
def cascade_stages(exp: Experiment, router: CascadeRouter, seed: int) -> list[Stage]:
    """A `CascadeFitting` stage on the split ``training.cascade.split`` names (seed ``seed``).

    With ``training.cascade.joint`` (optimal stopping only) a `JointCascadeTraining` stage follows on
    the same split (seed ``seed + 1``): the fitted stop policies and ``f_1..f_m`` trained together,
    the frozen models (``train: false``) left out.

    Raises:
        ConfigError: ``training.cascade.joint`` is set for a cascade other than optimal stopping.
    """
    c = exp.config.training.cascade
    data = exp.data.val if c.split == "val" else exp.parts["rl"]
    stages: list[Stage] = [
        CascadeFitting.from_config(
            c,
            pipeline=exp.pipeline,
            router=router,
            accuracy=exp.accuracy,
            data=data,
            num_classes=exp.data.num_classes,
            seed=seed,
            ignore_index=exp.data.ignore_index,
        )
    ]
    if c.joint:
        check_joint_cascade(exp.config, type(router))
        stages.append(
            JointCascadeTraining.from_config(
                c,
                pipeline=exp.pipeline,
                router=router,
                accuracy=exp.accuracy,
                data=data,
                seed=seed + 1,
                ignore_index=exp.data.ignore_index,
                frozen=frozen_models(exp.config),
            )
        )
    return stages


def build_stages(exp: Experiment) -> list[Stage]:
    """The stages of Algorithm 1 for ``exp``: pre-training, then those of the router's stage builder (`stage_builder_for`).

    Frozen models (``train: false``) are left out of the stages; a pre-training stage whose models
    are all frozen is not built (`skipped_stages`). A frozen model without ``weights`` is warned about.

    Raises:
        ConfigError: When the router is trainable but has no stage builder, or ``train_on`` selects no data.
    """
    cfg, t = exp.config, exp.config.training
    seed, ignore = cfg.run.seed, exp.data.ignore_index
    _warn_frozen_without_weights(cfg)
    frozen, skipped = frozen_models(cfg), skipped_stages(cfg)
    specialists = {i: model_training_data(exp, i) for i, m in enumerate(cfg.zoo.models) if m.train_on is not None and m.train}
    stages: list[Stage] = []
    if LargeModelPretraining.name not in skipped:
        stages.append(
            LargeModelPretraining.from_config(
                t.pretrain_large,
                pipeline=exp.pipeline,
                data=exp.parts["pt"],
                seed=seed,
                ignore_index=ignore,
                model_data={i: d for i, d in specialists.items() if i > 0},
                checks=_checks(exp, t.pretrain_large),
                frozen=frozen,
            )
        )
    if BaseModelPretraining.name not in skipped:
        stages.append(
            BaseModelPretraining.from_config(
                t.pretrain_base,
                pipeline=exp.pipeline,
                data=specialists.get(0, exp.parts["pt"]),
                seed=seed + 1,
                ignore_index=ignore,
                checks=_checks(exp, t.pretrain_base),
            )
        )
    builder = stage_builder_for(exp.router)
    if builder is not None:
        stages += builder(exp, exp.router, seed + 2)
    return stages
