"""Budget calibration: move one knob of a trained router until its realised cost hits a target.

The router names its knob (`Router.budget_knob`), which moves cost monotonically:

- `PaSeRRouter`: a bias ``-b * (C_i - C_0)`` added to the logits (costlier models lose more).
- `IDKCascade`: an offset ``o``, thresholds ``mean + o * std`` of each stage's uncertainty.
- `OptimalStoppingCascade`: a bias ``b`` added to every stop logit.

The knob is found by bisection on the replayed validation split so that the realised GFLOPs
per input (or the share of units sent to models other than ``f_0``) is within ``tolerance``
(relative) of the target; the test split's figures are reported beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routerkit.config.build import Experiment
from routerkit.flops import FLOP_CONVENTION
from routerkit.metrics import seeded_rng
from routerkit.replay import UnitTable, build_unit_table, decide, routed_flops
from routerkit.routers import Router


@dataclass
class CalibrationResult:
    """Outcome of `calibrate`.

    Attributes:
        router: Router class name.
        knob: What was moved (``logit_bias``, ``threshold_offset``, ``stop_bias``).
        value: The knob's calibrated value.
        target: The target value.
        metric: ``gflops`` (per input) or ``share`` (of units sent past ``f_0``).
        val: Realised metric on the validation split.
        within_tolerance: Whether ``|val - target| <= tolerance * target``.
        test: Realised metric on the test split.
        test_mean_iou: Mean IoU on the test split (replayed outputs).
        val_mean_iou: Mean IoU on the validation split.
        flop_convention: How FLOPs are counted.
    """

    router: str
    knob: str
    value: float
    target: float
    metric: str
    val: float
    within_tolerance: bool
    test: float
    test_mean_iou: float
    val_mean_iou: float
    flop_convention: str = FLOP_CONVENTION

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary."""
        return asdict(self)


def _measure(exp: Experiment, router: Router, table: UnitTable, metric: str) -> tuple[float, float]:
    actions = decide(router, table)
    if metric == "share":
        value = float((actions > 0).double().mean())
    else:
        value = routed_flops(exp.pipeline, router, table, actions) / 1e9
    return value, table.mean_iou(actions)


def calibrate(
    exp: Experiment,
    target: float,
    metric: str = "gflops",
    tolerance: float = 0.02,
    iterations: int = 60,
) -> CalibrationResult:
    """Calibrate ``exp.router`` so that its validation cost lands on ``target``.

    Args:
        exp: A trained experiment.
        target: GFLOPs per input (``metric="gflops"``) or share in [0, 1] of units sent past
            ``f_0`` (``metric="share"``).
        metric: ``"gflops"`` or ``"share"``.
        tolerance: Relative tolerance on the validation split.
        iterations: Bisection steps.

    Returns:
        The calibration; ``exp.router`` keeps the calibrated knob.
    """
    if metric not in ("gflops", "share"):
        raise ValueError(f"Expected metric 'gflops' or 'share' but got {metric!r}.")
    if target <= 0 or (metric == "share" and target > 1):
        raise ValueError(f"Expected a target > 0 (and <= 1 for a share) but got {target}.")
    cfg, data = exp.config, exp.data
    device = cfg.run.device
    with seeded_rng(cfg.run.seed, device):  # the same MC-dropout states as compare's tables
        val_t = build_unit_table(
            exp.pipeline, exp.accuracy, data.val, data.num_classes, cfg.compare.batch_size, data.ignore_index, device
        )
    with seeded_rng(cfg.run.seed, device):
        test_t = build_unit_table(
            exp.pipeline, exp.accuracy, data.test, data.num_classes, cfg.compare.batch_size, data.ignore_index, device
        )
    router = exp.router.cpu().eval()
    knob = router.budget_knob(val_t)
    if knob is None:
        raise ValueError(f"calibrate supports PaSeR, IDK and optimal-stopping routers, not {type(router).__name__}.")
    name, setter, low, high = knob.name, knob.set, knob.low, knob.high

    def cost_at(value: float) -> float:
        setter(value)
        return _measure(exp, router, val_t, metric)[0]

    # bisection on [low, high]; cost falls as the knob grows unless the knob says otherwise
    c_low, c_high = cost_at(low), cost_at(high)
    best, best_err = low, abs(c_low - target)
    if abs(c_high - target) < best_err:
        best, best_err = high, abs(c_high - target)
    lo, hi = low, high
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        c = cost_at(mid)
        if abs(c - target) < best_err:
            best, best_err = mid, abs(c - target)
        if best_err <= tolerance * target:
            break
        if (c > target) != knob.increasing:
            lo = mid
        else:
            hi = mid
    setter(best)
    val_value, val_iou = _measure(exp, router, val_t, metric)
    test_value, test_iou = _measure(exp, router, test_t, metric)
    router.to(device)
    return CalibrationResult(
        router=type(router).__name__,
        knob=name,
        value=best,
        target=target,
        metric=metric,
        val=val_value,
        within_tolerance=abs(val_value - target) <= tolerance * target,
        test=test_value,
        test_mean_iou=test_iou,
        val_mean_iou=val_iou,
    )
