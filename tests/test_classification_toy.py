"""routerkit is not segmentation-only: a whole-input classification toy, routed and trained."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from routerkit import RoutedPipeline, WholeInput, Zoo, evaluate_router
from routerkit.data import Split
from routerkit.functional import confusion_counts
from routerkit.models import ToyClassifier
from routerkit.rewards import Correctness, PaSeRReward
from routerkit.routers import PaSeRRouter, RandomRouter, SingleModelRouter
from routerkit.training.policy import PolicyTraining, replay_cache
from routerkit.training.schedules import StageSettings

D = 6
K = 3


def make_split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    return Split(x, torch.randint(0, K, (n,), generator=gen))


def test_routed_classification_pipeline_and_evaluation() -> None:
    torch.manual_seed(0)
    zoo = Zoo([ToyClassifier(D, K, hidden=4, dropout=0.2), ToyClassifier(D, K, hidden=16), ToyClassifier(D, K, hidden=32)]).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (D,))
    router = PaSeRRouter(3, in_channels=K + 1, spatial=False, init_bias=[0.0, 0.0, 0.0]).eval()
    split = make_split(40, 1)
    out = pipe(split.images[:10], router)
    assert out.probs.shape == (10, K) and out.actions.shape == (10, 1) and out.flops.shape == (10,)
    assert out.base.probs.shape == (10, K) and out.base.uncertainty.shape == (10,)
    # The stitched output is each input's chosen model's softmax.
    with torch.no_grad():
        for i in range(10):
            a = int(out.actions[i, 0])
            expected = torch.softmax(zoo[a](split.images[i : i + 1]), 1)[0]
            assert torch.allclose(out.probs[i], expected, atol=1e-6)
    # evaluate_router's accuracy is the share of correct arg-max predictions.
    result = evaluate_router(pipe, router, split, K, name="toy", batch_size=7)
    with torch.no_grad():
        preds = torch.cat([pipe(split.images[i : i + 7], router).pred for i in range(0, 40, 7)])
    assert result.accuracy == pytest.approx(float((preds == split.targets).float().mean()))
    conf = confusion_counts(preds[None], split.targets[None], K)[0]
    per_class = conf.diagonal() / (conf.sum(0) + conf.sum(1) - conf.diagonal())
    assert result.per_class_iou == pytest.approx(per_class.tolist(), nan_ok=True)
    assert result.num_inputs == 40 and result.name == "toy"
    assert sum(result.usage) == pytest.approx(1.0) and len(result.usage) == 3
    assert result.gflops > 0 and result.iou_per_gflop == pytest.approx(result.mean_iou / result.gflops)
    # Baselines work on vectors too.
    single = evaluate_router(pipe, SingleModelRouter(3, index=2, spatial=False), split, K)
    assert single.usage == [0.0, 0.0, 1.0]
    rand = evaluate_router(pipe, RandomRouter(3, spatial=False, seed=0), split, K)
    assert all(u > 0 for u in rand.usage)
    # The accuracy term used by the reward on whole inputs: 1 for a correct classification.
    correct = Correctness(K)(out.probs, split.targets[:10])
    assert correct.tolist() == (out.pred == split.targets[:10]).float().tolist()


class RuleModel(nn.Module):
    """Binary classifier right on one half of the feature[0] sign and wrong on the other.

    The true label is ``feature[1] > 0``. ``right_when_positive`` says on which side of
    ``feature[0] = 0`` the model answers correctly; ``confidence`` is its logit margin on the
    side where it is right (on the other side it is wrong with margin ``wrong_margin``).
    The linear layer only carries the parameters that the cost model counts.
    """

    def __init__(self, right_when_positive: bool, confidence: float, wrong_margin: float, hidden: int) -> None:
        super().__init__()
        self.right_when_positive = right_when_positive
        self.confidence, self.wrong_margin = confidence, wrong_margin
        self.body = nn.Linear(D, hidden)
        with torch.no_grad():
            self.body.weight.zero_()
            self.body.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        label_sign = torch.where(x[:, 1] > 0, 1.0, -1.0)
        positive = x[:, 0] > 0
        right = positive if self.right_when_positive else ~positive
        margin = torch.where(right, self.confidence, -self.wrong_margin) * label_sign
        margin = margin + self.body(x).sum(1)  # zero, keeps the parameters in the graph
        return torch.stack([-margin / 2, margin / 2], dim=1)


def test_reinforce_learns_to_route_by_feature() -> None:
    torch.manual_seed(0)
    # f_0: confident and right when feature[0] <= 0, unsure and wrong when feature[0] > 0.
    f0 = RuleModel(right_when_positive=False, confidence=6.0, wrong_margin=0.3, hidden=2)
    # f_1: right exactly when feature[0] > 0, and much more expensive.
    f1 = RuleModel(right_when_positive=True, confidence=6.0, wrong_margin=6.0, hidden=64)
    zoo = Zoo([f0, f1])
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (D,))
    train = make_split(512, 2)
    train.targets = (train.images[:, 1] > 0).long()
    test = make_split(400, 3)
    test.targets = (test.images[:, 1] > 0).long()

    router = PaSeRRouter(2, in_channels=3, spatial=False, width=8)
    stage = PolicyTraining(
        pipe,
        router,
        PaSeRReward(lam=0.05),
        Correctness(2),
        train,
        StageSettings(epochs=12, lr=1e-2, batch_size=64),
        seed=0,
    )
    # The replayed accuracies encode the toy's rule.
    cache = replay_cache(pipe, Correctness(2), train)
    probs, unc, acc = cache.base.probs, cache.base.uncertainty, cache.accuracy
    assert probs.shape == (512, 2) and unc.shape == (512,)
    positive = train.images[:, 0] > 0
    assert acc.shape == (512, 1, 2)
    assert torch.equal(acc[:, 0, 1], positive.float()) and torch.equal(acc[:, 0, 0], (~positive).float())
    first = stage.run_epoch(0)
    for epoch in range(1, 12):
        logs = stage.run_epoch(epoch)
    assert logs["charts/alpha"] == pytest.approx(0.95)
    assert logs["charts/mean_reward"] > first["charts/mean_reward"]

    router.eval()
    with torch.no_grad():
        actions = pipe(test.images, router).actions[:, 0]
    pos = test.images[:, 0] > 0
    assert (actions[pos] == 1).float().mean() > 0.8
    assert (actions[~pos] == 0).float().mean() > 0.8
    result = evaluate_router(pipe, router, test, 2)
    assert result.accuracy > 0.8
