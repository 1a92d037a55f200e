"""The policy-gradient estimators on a zoo where the optimal routing is known.

f_0 is right on half the inputs, f_1 on the other half, f_2 everywhere but at a high cost: the
best policy keeps f_0 on the first half and sends the second half to f_1. Plain REINFORCE with
uniform exploration (the paper's Eq. 4 without correction) locks into the "safe" costly model;
importance weighting with the expected-reward baseline, and the all-actions estimator, find the
optimum.
"""

from __future__ import annotations

import pytest
import torch
from _known import K, KnownModel, known_setup, known_split

from routerkit import RoutedPipeline, WholeInput, Zoo
from routerkit.rewards import Correctness, PaSeRReward
from routerkit.routers import PaSeRRouter
from routerkit.training.policy import PolicyTraining
from routerkit.training.reinforce import importance_weights
from routerkit.training.schedules import StageSettings


def _train(baseline: str, importance_weighting: bool, estimator: str = "reinforce") -> list[list[int]]:
    pipe, split, table, router = known_setup()
    stage = PolicyTraining(
        pipe,
        router,
        PaSeRReward(0.1),
        Correctness(K),
        split,
        StageSettings(120, 1e-3, 20),
        0,
        baseline=baseline,
        importance_weighting=importance_weighting,
        estimator=estimator,
        cache=table,
    )
    for epoch in range(120):
        stage.run_epoch(epoch)
    actions = router.eval().route(table.base)[:, 0]
    return [torch.bincount(actions[g::2], minlength=3).tolist() for g in (0, 1)]


OPTIMUM = [[30, 0, 0], [0, 30, 0]]  # group 0 -> f_0, group 1 -> f_1


@pytest.mark.parametrize("estimator", ["reinforce", "all_actions"])
def test_corrected_estimators_find_the_optimum(estimator: str) -> None:
    assert _train("expected", True, estimator) == OPTIMUM


def test_uncorrected_exploration_locks_into_the_costly_model() -> None:
    assert _train("expected", False) != OPTIMUM
    assert _train("mean", False) != OPTIMUM


def test_importance_weights() -> None:
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    actions = torch.tensor([[0]])
    w = importance_weights(logits, actions, alpha=0.7)
    assert float(w) == pytest.approx(0.7 / (0.7 * 0.7 + 0.3 / 3))
    assert float(importance_weights(logits, actions, alpha=1.0)) == pytest.approx(1.0)  # on-policy: no correction
    # E_mu[w * g(a)] = E_pi[g(a)] for any g
    probs = torch.tensor([0.7, 0.2, 0.1])
    mu = 0.7 * probs + 0.3 / 3
    all_w = importance_weights(logits.expand(1, 3, 3), torch.arange(3).reshape(1, 3), alpha=0.7)[0]
    g = torch.tensor([1.0, -2.0, 5.0])
    assert float((mu * all_w * g).sum()) == pytest.approx(float((probs * g).sum()), rel=1e-5)


def test_estimator_argument_is_checked() -> None:
    zoo = Zoo([KnownModel((0,), 2), KnownModel((1,), 16)]).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (4,))
    with pytest.raises(ValueError, match="estimator"):
        PolicyTraining(
            pipe,
            PaSeRRouter(2, in_channels=K + 1, spatial=False),
            PaSeRReward(0.1),
            Correctness(K),
            known_split(4, 0),
            StageSettings(1, 1e-3, 2),
            0,
            estimator="vanilla",
        )
