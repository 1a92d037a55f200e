"""Cascades, the oracle and the replayed unit table on toy zoos where the right answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from _known import K, KnownModel, known_split
from fvcore.nn import FlopCountAnalysis
from torch import Tensor

from routerkit import PatchGrid, RoutedPipeline, WholeInput, Zoo
from routerkit.data import Split
from routerkit.models import ToySegmenter
from routerkit.replay import build_unit_table, routed_flops
from routerkit.rewards import Correctness, PaSeRReward, UnitIoU
from routerkit.routers import (
    IDKCascade,
    OptimalStoppingCascade,
    OracleRouter,
    PaSeRRouter,
    RandomRouter,
    SingleModelRouter,
)
from routerkit.training.fitters import fit_idk_grid, fit_idk_iou, fit_optimal_stopping


@pytest.fixture
def known() -> tuple[RoutedPipeline, Split]:
    """f_0 right on group 0, f_1 right on group 1, f_2 right everywhere (and the costliest)."""
    zoo = Zoo([KnownModel((0,), 2), KnownModel((1,), 16), KnownModel((0, 1), 256)]).eval()
    pipe = RoutedPipeline(zoo, WholeInput(), "softmax_entropy", "param_share", (4,))
    return pipe, known_split(60, 0)


def _accuracy(pipe: RoutedPipeline, router: object, split: Split) -> tuple[float, Tensor, Tensor]:
    out = pipe.route(split.images, router, targets=split.targets)  # type: ignore[arg-type]
    return float((out.pred == split.targets).double().mean()), out.actions[:, 0], out.flops


def test_oracle_picks_the_right_model_per_half(known: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = known
    oracle = OracleRouter(3, num_classes=K, lam=0.1, accuracy="correct", in_channels=K + 1)
    acc, actions, _ = _accuracy(pipe, oracle, split)
    group = split.images[:, 1].long()
    assert acc == 1.0
    assert bool((actions[group == 0] == 0).all()) and bool((actions[group == 1] == 1).all())  # cheapest correct model
    with pytest.raises(ValueError, match="needs the targets"):
        pipe.route(split.images, oracle)


def test_idk_grid_search_finds_the_cheap_perfect_cascade(known: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = known
    table = build_unit_table(pipe, Correctness(K), split, K)
    idk = IDKCascade(3, in_channels=K + 1)
    fit = fit_idk_grid(idk, table, lam=0.1, steps=11)
    acc, actions, flops = _accuracy(pipe, idk, split)
    group = split.images[:, 1].long()
    assert acc == 1.0
    assert bool((actions[group == 0] == 0).all()) and bool((actions[group == 1] == 1).all())
    assert fit["ce"] < 0.01
    # a unit answered by f_1 paid f_0 (whole input) and f_1; nobody paid f_2
    f0, f1 = pipe.accountant.base_flops, pipe.accountant.unit_flops[1]
    assert torch.allclose(flops[group == 1], torch.full_like(flops[group == 1], float(f0 + f1)))
    assert torch.allclose(flops[group == 0], torch.full_like(flops[group == 0], float(f0)))


def test_cascade_pays_every_stage_it_ran(known: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = known
    always_forward = IDKCascade(3, thresholds=[-1.0, -1.0], in_channels=K + 1)
    acc, actions, flops = _accuracy(pipe, always_forward, split)
    assert acc == 1.0 and bool((actions == 2).all())
    expected = pipe.accountant.base_flops + pipe.accountant.unit_flops[1] + pipe.accountant.unit_flops[2]
    assert torch.allclose(flops, torch.full_like(flops, float(expected)))
    never = IDKCascade(3, in_channels=K + 1)  # unfitted: +inf thresholds, every unit stops at f_0
    _, actions, _ = _accuracy(pipe, never, split)
    assert bool((actions == 0).all())


def test_optimal_stopping_learns_to_stop_where_the_stage_is_right(known: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = known
    table = build_unit_table(pipe, Correctness(K), split, K)
    torch.manual_seed(0)
    cascade = OptimalStoppingCascade(3, in_channels=K + 1)
    out = fit_optimal_stopping(cascade, table, alpha=0.2, epochs=150, lr=3e-2, batch_size=32)
    acc, actions, _ = _accuracy(pipe, cascade, split)
    group = split.images[:, 1].long()
    assert acc == 1.0, actions
    assert bool((actions[group == 0] == 0).all()) and bool((actions[group == 1] == 1).all())
    assert out["mean_reward"] > -0.2
    # with a huge cost weight it stops at f_0 everywhere
    stingy = OptimalStoppingCascade(3, in_channels=K + 1)
    fit_optimal_stopping(stingy, table, alpha=50.0, epochs=60, lr=3e-2, batch_size=32)
    assert bool((stingy.decide_table(table) == 0).all())


# --- segmentation: replay equals live routing; the oracle bounds every router -------------------


@pytest.fixture
def seg() -> tuple[RoutedPipeline, Split]:
    torch.manual_seed(3)
    zoo = Zoo([ToySegmenter(1, 3, width=2), ToySegmenter(1, 3, width=4), ToySegmenter(1, 3, width=8)]).eval()
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "softmax_entropy", "flops", (1, 8, 8))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(10, 1, 8, 8, generator=gen)
    targets = (images[:, 0] * 3).long().clamp(0, 2)
    return pipe, Split(images, targets)


def test_table_decisions_equal_live_cascade_decisions(seg: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = seg
    table = build_unit_table(pipe, UnitIoU(3), split, 3)
    idk = IDKCascade(3, grid_shape=(2, 2), in_channels=4)
    idk.set_thresholds(idk.thresholds_at(table, 0.0))
    torch.manual_seed(5)
    stopping = OptimalStoppingCascade(3, grid_shape=(2, 2), in_channels=4)
    for router in (idk, stopping):
        out = pipe.route(split.images, router)
        replayed = router.decide_table(table)
        assert torch.equal(out.actions, replayed)
        assert routed_flops(pipe, router, table, replayed) == pytest.approx(float(out.flops.mean()))
        confusion_iou = table.mean_iou(replayed)
        from routerkit.functional import confusion_counts, iou_from_confusion

        live = iou_from_confusion(confusion_counts(out.pred.unsqueeze(0), split.targets.unsqueeze(0), 3)[0])
        assert confusion_iou == pytest.approx(float(torch.nanmean(live)), abs=1e-6)


def test_oracle_bounds_every_router_reward(seg: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = seg
    table = build_unit_table(pipe, UnitIoU(3), split, 3)
    for lam in (0.0, 0.1, 0.5):
        rewards = table.rewards(PaSeRReward(lam))
        oracle = OracleRouter(3, num_classes=3, lam=lam, grid_shape=(2, 2)).decide_table(table)
        best = float(table.gather(rewards, oracle).nanmean())
        torch.manual_seed(0)
        idk = IDKCascade(3, grid_shape=(2, 2), in_channels=4)
        fit_idk_grid(idk, table, lam, steps=5)
        candidates = [
            PaSeRRouter(3, grid_shape=(2, 2), in_channels=4, width=4).eval().route(table.base),
            RandomRouter(3, grid_shape=(2, 2)).route(table.base),
            idk.decide_table(table),
            OptimalStoppingCascade(3, grid_shape=(2, 2), in_channels=4).decide_table(table),
            *[SingleModelRouter(3, index=i, grid_shape=(2, 2)).route(table.base) for i in range(3)],
        ]
        for actions in candidates:
            assert float(table.gather(rewards, actions).nanmean()) <= best + 1e-6
        # and the oracle is exactly the per-unit max
        assert torch.equal(
            table.gather(torch.nan_to_num(rewards, nan=-math.inf), oracle),
            torch.nan_to_num(rewards, nan=-math.inf).max(-1).values,
        )


def test_idk_iou_match_mode(seg: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = seg
    table = build_unit_table(pipe, UnitIoU(3), split, 3)
    low = table.mean_iou(torch.zeros(10, 4, dtype=torch.long))
    high = table.mean_iou(torch.full((10, 4), 2, dtype=torch.long))
    idk = IDKCascade(3, grid_shape=(2, 2), in_channels=4)
    reachable = [table.mean_iou(idk.decide_table(table))]
    for offset in torch.linspace(-4, 4, 161).tolist():
        idk.set_thresholds(idk.thresholds_at(table, offset))
        reachable.append(table.mean_iou(idk.decide_table(table)))
    target = sorted(reachable)[len(reachable) // 2]
    fit = fit_idk_iou(idk, table, target)
    assert fit["matched"] == 1.0 and abs(fit["iou"] - target) <= 1e-3
    assert table.mean_iou(idk.decide_table(table)) == pytest.approx(fit["iou"])
    unreachable = fit_idk_iou(idk, table, 1.5)
    assert unreachable["matched"] == 0.0 and unreachable["iou"] == pytest.approx(max(reachable))
    assert min(low, high) >= 0


def test_cascade_argument_errors() -> None:
    with pytest.raises(ValueError, match="2 thresholds"):
        IDKCascade(3, thresholds=[0.1])
    with pytest.raises(ValueError, match="num_classes"):
        OptimalStoppingCascade(3, in_channels=1)
    with pytest.raises(ValueError, match="loss 'ce' or 'acc'"):
        fit_optimal_stopping(OptimalStoppingCascade(3, in_channels=4), None, 0.1, loss="mse")  # type: ignore[arg-type]


def test_stop_policies_are_charged_at_every_stage_a_unit_reached(seg: tuple[RoutedPipeline, Split]) -> None:
    pipe, split = seg
    torch.manual_seed(5)
    stopping = OptimalStoppingCascade(3, grid_shape=(2, 2), in_channels=4, hidden=6).eval()
    direct = [FlopCountAnalysis(p.net, (torch.zeros(1, 3 + 2),)).total() for p in stopping.policies]
    assert stopping.decision_flops() == direct == [(3 + 2) * 6 + 6] * 2
    assert IDKCascade(3, in_channels=4).decision_flops() == [0, 0]
    out = pipe.route(split.images, stopping)
    acct = pipe.accountant
    for b in range(len(split)):
        expected = float(acct.base_flops)  # softmax_entropy: one pass of f_0
        for a in out.actions[b].tolist():
            expected += sum(acct.unit_flops[1 : a + 1]) + sum(direct[: min(a, 1) + 1])
        assert out.flops[b].item() == pytest.approx(expected)
