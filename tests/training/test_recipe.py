"""The recipe: stages from config sections, the registry of stage builders keyed by router class, unique stage names."""

from __future__ import annotations

import pytest
import torch
from _known import K, known_setup, known_split

from routerkit.config import ConfigError
from routerkit.config.schema import FinetuneConfig, PolicyConfig
from routerkit.rewards import Correctness, PaSeRReward
from routerkit.routers import PaSeRRouter, RandomRouter, create_router
from routerkit.training import (
    BaseModelPretraining,
    CascadeFitting,
    JointFineTuning,
    LargeModelPretraining,
    PolicyFineTuning,
    PolicyTraining,
    Stage,
)
from routerkit.training.recipe import STAGE_BUILDERS, cascade_stages, paser_stages, register_stage_builder, stage_builder_for
from routerkit.training.schedules import StageSettings


class _WiderPaSeR(PaSeRRouter):
    """A PaSeR variant: trained by PaSeR's stages through its base class."""


class _TrainableRandom(RandomRouter):
    """Trainable, but no stage builder covers it."""

    is_trainable = True


def test_stage_builders_follow_the_router_class() -> None:
    assert stage_builder_for(PaSeRRouter(3, in_channels=K + 1, spatial=False, width=8)) is paser_stages
    assert stage_builder_for(_WiderPaSeR(3, in_channels=K + 1, spatial=False, width=8)) is paser_stages
    assert stage_builder_for(create_router("idk", num_actions=3)) is cascade_stages
    assert stage_builder_for(create_router("random", num_actions=3)) is None  # nothing to train


def test_a_trainable_router_without_stage_builder_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"_TrainableRandom is trainable.*register_stage_builder"):
        stage_builder_for(_TrainableRandom(3))


def test_registering_again_warns_and_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STAGE_BUILDERS, _TrainableRandom, lambda exp, router, seed: [])
    with pytest.warns(UserWarning, match="Replacing the stage builder of _TrainableRandom"):
        register_stage_builder(_TrainableRandom)(paser_stages)
    assert stage_builder_for(_TrainableRandom(3)) is paser_stages
    with pytest.raises(ValueError, match="Expected a Router subclass"):
        register_stage_builder(int)  # type: ignore[arg-type]


def test_stage_names_are_unique() -> None:
    stages = (LargeModelPretraining, BaseModelPretraining, PolicyTraining, PolicyFineTuning, JointFineTuning, CascadeFitting)
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match=r"unique stage name.*'policy'"):

        class _AnotherPolicy(Stage):
            name = "policy"


def test_from_config_matches_the_stage_built_by_hand() -> None:
    section = PolicyConfig(epochs=2, lr=1e-2, batch_size=20, baseline="mean", credit="input", entropy_coef=0.01)
    logs = []
    for from_config in (True, False):
        pipe, split, table, router = known_setup()
        cache = table
        common = {"pipeline": pipe, "router": router, "reward": PaSeRReward(0.1), "accuracy": Correctness(K), "data": split}
        if from_config:
            stage = PolicyTraining.from_config(section, **common, seed=3, cache=cache)
        else:
            stage = PolicyTraining(
                *common.values(), StageSettings(2, 1e-2, 20), 3, baseline="mean", credit="input", entropy_coef=0.01, cache=cache
            )
        logs.append([stage.train_epoch(e) for e in range(2)])
        logs.append(torch.cat([p.detach().flatten() for p in router.parameters()]).tolist())
    assert logs[0] == logs[2] and logs[1] == logs[3]


def test_tvd_fine_tuning_needs_a_threshold_and_lam_end() -> None:
    pipe, _, _, router = known_setup()
    objects = {"pipeline": pipe, "router": router, "reward": PaSeRReward(0.1), "accuracy": Correctness(K)}
    with pytest.raises(ValueError, match="tvd_threshold and lam_end"):
        PolicyFineTuning.from_config(FinetuneConfig(), **objects, data=known_split(20, 1), seed=0, baseline="expected")
    stage = PolicyFineTuning.from_config(
        FinetuneConfig(tvd_threshold=0.2, lam_end=0.5), **objects, data=known_split(20, 1), seed=0, baseline="expected"
    )
    assert (stage.name, stage.tvd_threshold, stage.lam_end, stage.baseline) == ("finetune_tvd", 0.2, 0.5, "expected")
