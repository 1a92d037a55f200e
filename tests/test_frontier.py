"""The single-model frontier: hull maths, APGR / AIQ, and routers placed against it on a zoo with a known answer."""

from __future__ import annotations

import math

import pytest
from _known import K, known_setup

from routerkit.frontier import Frontier, aiq, apgr, sweep_summary, upper_hull
from routerkit.metrics import evaluate_router
from routerkit.routers import OracleRouter, RandomRouter, SingleModelRouter

SHIPPED = [(0.0086, 0.7101), (0.1466, 0.7724), (1.2986, 0.7714)]  # the battery table


def test_upper_hull_drops_dominated_and_concave_violating_points() -> None:
    assert upper_hull(SHIPPED) == [(0.0086, 0.7101), (0.1466, 0.7724)]  # f2 costs more for less
    # (0.5, 0.6) lies below the segment (0, 0.5)-(1, 1): a mix of the two beats it
    assert upper_hull([(0.0, 0.5), (0.5, 0.6), (1.0, 1.0)]) == [(0.0, 0.5), (1.0, 1.0)]
    assert upper_hull([(0.0, 0.5), (0.5, 0.9), (1.0, 1.0)]) == [(0.0, 0.5), (0.5, 0.9), (1.0, 1.0)]
    assert upper_hull([(1.0, math.nan), (0.0, 0.5)]) == [(0.0, 0.5)]


def test_frontier_quality_cost_gain_and_saving() -> None:
    f = Frontier.of(SHIPPED)
    assert f.weak == (0.0086, 0.7101) and f.best == (0.1466, 0.7724)
    # The worked example: the f0/f1 mix reaches 0.759 at 0.117 GFLOPs.
    assert f.quality_at(0.117) == pytest.approx(0.759, abs=5e-4)
    assert f.quality_at(5.0) == pytest.approx(0.7724)  # flat beyond the best model
    assert math.isnan(f.quality_at(0.001))  # nothing is cheaper than f0 alone
    assert f.cost_for(0.7101) == pytest.approx(0.0086)
    assert f.cost_for(0.78) == math.inf
    # The PaSeR row: 0.7589 IoU at 0.1785 GFLOPs is below the frontier.
    s = f.summary(0.1785, 0.7589)
    assert s["hull_gain"] == pytest.approx(0.7589 - 0.7724)
    assert s["hull_cost"] == pytest.approx(0.0086 + (0.1466 - 0.0086) * (0.7589 - 0.7101) / (0.7724 - 0.7101))
    assert s["hull_saving"] < 0  # it pays more than the mix that reaches its quality
    # The oracle's row at lambda 0.2: 0.7636 at 0.0837 GFLOPs, about 2 points above.
    assert f.gain(0.0837, 0.7636) == pytest.approx(0.7636 - f.quality_at(0.0837))
    assert 0.015 < f.gain(0.0837, 0.7636) < 0.025
    assert f.saving(0.0837, 0.7636) > 0.3
    assert math.isnan(f.saving(0.2, 0.8))  # beyond the best model


def test_apgr_and_aiq() -> None:
    f = Frontier.of(SHIPPED)
    assert apgr(f.points, f) == pytest.approx(0.5)  # one straight segment: half the gap on average
    assert aiq(f.points, f) == pytest.approx((0.7101 + 0.7724) / 2)
    better = [(0.02, 0.77), (0.1, 0.7724)]
    assert apgr(better, f) > 0.9
    worse = [(0.14, 0.72)]
    assert apgr(worse, f) < 0.5
    summary = sweep_summary({"paser": ("PaSeR", better), "bad": ("bad", worse)}, SHIPPED)
    assert summary["families"]["paser"]["apgr"] > summary["frontier"]["apgr"] > summary["families"]["bad"]["apgr"]
    assert summary["families"]["paser"]["max_hull_gain"] > 0


def test_routers_against_the_frontier_on_a_known_zoo() -> None:
    """f_0 right on group 0, f_1 on group 1 (f_1 cheaper than f_2, which is right everywhere)."""
    pipe, split, _, _ = known_setup(n=200)

    def run(router, name):  # type: ignore[no-untyped-def]
        return evaluate_router(pipe, router, split, K, name, batch_size=50)

    singles = [run(SingleModelRouter(3, index=i), f"f{i}") for i in range(3)]
    frontier = Frontier.of([(r.gflops, r.mean_iou) for r in singles])
    for r in singles:
        r.against(frontier)
        assert r.hull_gain is not None and r.hull_gain <= 1e-9  # a single model is on or below the frontier
    on_hull = [r for r in singles if (r.gflops, r.mean_iou) in frontier.points]
    assert all(r.hull_gain == pytest.approx(0.0, abs=1e-12) for r in on_hull) and on_hull
    oracle = run(OracleRouter(3, num_classes=K, lam=0.05, accuracy="correct"), "oracle").against(frontier)
    assert oracle.hull_gain is not None and oracle.hull_gain > 0.1  # per-input choice beats every mix clearly
    gains = [run(RandomRouter(3, seed=s), "random").against(frontier).hull_gain for s in range(5)]
    assert all(g is not None for g in gains)
    assert sum(gains) / len(gains) < 0.02  # a random policy is not above the frontier beyond noise
