"""Policy-only fine-tuning with a rising lambda, stopped at a total-variation threshold (PaSeR, noisy MNIST)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _known import K, known_setup, known_split

from routerkit import RoutedPipeline
from routerkit.replay import UnitTable
from routerkit.rewards import Correctness, PaSeRReward
from routerkit.routers import PaSeRRouter
from routerkit.training.policy import PolicyFineTuning, PolicyTraining
from routerkit.training.reinforce import policy_probs, total_variation
from routerkit.training.schedules import StageSettings

LAM = 0.2  # unique optimum at this lambda: f_0 on group 0, f_1 on group 1 (f_2 is right everywhere but dearer)


@pytest.fixture(scope="module")
def pretrained() -> tuple[RoutedPipeline, UnitTable, dict[str, Any]]:
    pipe, split, table, router = known_setup(f1_width=64)
    stage = PolicyTraining(
        pipe, router, PaSeRReward(LAM), Correctness(K), split, StageSettings(30, 3e-3, 20), 0,
        estimator="all_actions", cache=_cache(table),
    )  # fmt: skip
    for epoch in range(30):
        stage.run_epoch(epoch)
    actions = router.eval().route(table.base)[:, 0]
    assert [torch.bincount(actions[g::2], minlength=3).tolist() for g in (0, 1)] == [[30, 0, 0], [0, 30, 0]]
    return pipe, table, copy.deepcopy(router.state_dict())


def _cache(table: UnitTable) -> UnitTable:
    return table


def _finetune(
    pretrained: Any, threshold: float, epochs: int = 30, tvd_on: str = "probs"
) -> tuple[PolicyFineTuning, torch.Tensor, torch.Tensor]:
    pipe, table, state = pretrained
    router = PaSeRRouter(3, in_channels=K + 1, spatial=False, width=8)
    router.load_state_dict(state)
    before = policy_probs(router, table.base)
    stage = PolicyFineTuning(
        pipe, router, PaSeRReward(LAM), Correctness(K), known_split(60, 0), StageSettings(epochs, 3e-2, 20), 1,
        tvd_threshold=threshold, lam_end=1.0, cache=_cache(table), tvd_on=tvd_on,
    )  # fmt: skip
    for epoch in range(epochs):
        stage.run_epoch(epoch)
    return stage, before, policy_probs(router, table.base)


def test_total_variation() -> None:
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert total_variation(p, p) == 0.0
    assert total_variation(p, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        total_variation(p, p[:1])


def test_zero_threshold_keeps_the_policy(pretrained: Any) -> None:
    stage, before, after = _finetune(pretrained, 0.0, epochs=3)
    assert stage.stopped and stage.step == 0
    assert torch.equal(before, after)


@pytest.mark.parametrize("threshold", [0.01, 0.05, 1.0])
def test_the_threshold_bounds_the_drift(pretrained: Any, threshold: float) -> None:
    stage, before, after = _finetune(pretrained, threshold)
    tvd = total_variation(after, before)
    assert tvd <= threshold + 1e-6 and tvd == pytest.approx(stage.tvd, abs=1e-6)
    if threshold >= 1.0:  # never reached: the whole lambda schedule runs
        assert not stage.stopped and stage.step == 30 * 3 and stage.lam == pytest.approx(1.0)
    else:
        assert stage.stopped and stage.lam < 1.0


def test_a_stopped_stage_does_nothing_more(pretrained: Any) -> None:
    stage, _, _ = _finetune(pretrained, 0.01, epochs=4)
    assert stage.stopped
    logs = stage.run_epoch(3)  # a stopped stage does nothing more
    assert logs["charts/updates"] == 0.0 and logs["charts/stopped"] == 1.0


def test_state_round_trip_and_arguments(pretrained: Any) -> None:
    pipe, table, state = pretrained
    router = PaSeRRouter(3, in_channels=K + 1, spatial=False, width=8)
    router.load_state_dict(state)
    args = (pipe, router, PaSeRReward(LAM), Correctness(K), known_split(60, 0), StageSettings(4, 1e-2, 20), 1)
    stage = PolicyFineTuning(*args, tvd_threshold=0.2, lam_end=0.5, cache=_cache(table))
    stage.run_epoch(0)
    other = PolicyFineTuning(*args, tvd_threshold=0.2, lam_end=0.5, cache=_cache(table))
    other.load_state_dict(stage.state_dict())
    assert (other.step, other.lam, other.tvd, other.stopped) == (stage.step, stage.lam, stage.tvd, stage.stopped)
    assert other.reference is not None and stage.reference is not None and torch.equal(other.reference, stage.reference)
    with pytest.raises(ValueError, match="lam_end"):
        PolicyFineTuning(*args[:2], PaSeRReward(0.3), *args[3:], tvd_threshold=0.2, lam_end=0.1)
    with pytest.raises(ValueError, match="tvd_threshold"):
        PolicyFineTuning(*args, tvd_threshold=1.5, lam_end=0.5)
    with pytest.raises(ValueError, match="tvd_on"):
        PolicyFineTuning(*args, tvd_threshold=0.2, lam_end=0.5, tvd_on="logits")


def _greedy(probs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).float()


@pytest.mark.parametrize("tvd_on", ["decisions", "probs"])
def test_the_tvd_compares_greedy_decisions_or_probabilities(pretrained: Any, tvd_on: str) -> None:
    pipe, table, state = pretrained
    router = PaSeRRouter(3, in_channels=K + 1, spatial=False, width=8)
    router.load_state_dict(state)
    stage = PolicyFineTuning(
        pipe, router, PaSeRReward(LAM), Correctness(K), known_split(60, 0), StageSettings(1, 3e-2, 20), 1,
        tvd_threshold=0.1, lam_end=1.0, cache=_cache(table), tvd_on=tvd_on,
    )  # fmt: skip
    probs = policy_probs(router, table.base)
    measured = stage._policy(table.base)
    expected = _greedy(probs) if tvd_on == "decisions" else probs
    assert torch.equal(measured, expected)
    if tvd_on == "decisions":  # one-hot rows: the TVD between two of them is the share of units that changed model
        assert set(measured.sum(-1).flatten().tolist()) == {1.0} and set(measured.unique().tolist()) <= {0.0, 1.0}
