"""How each cascade is fitted on a replayed `~routerkit.unit_table.UnitTable` of the frozen zoo.

Routers only decide; the procedures that choose their parameters live here, one per router,
found through `CASCADE_FITTERS` (keyed by router class):

- `IDKCascade`: `fit_idk_grid` (grid search of the thresholds for ``CE + lambda_IDK * C``, the
  PaSeR paper's Eq. 5) or `fit_idk_iou` (one offset in std units shared by every stage, tuned
  until the cascade's IoU matches a target).
- `OptimalStoppingCascade`: `fit_optimal_stopping` (Guan et al.'s stop policies by REINFORCE
  with a baseline on the reward ``-loss - alpha * cost paid``, the cost by the one charging rule).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from routerkit.functional import paid_cost, reinforce_loss
from routerkit.routers import CascadeRouter, IDKCascade, OptimalStoppingCascade
from routerkit.training.reinforce import reward_baseline
from routerkit.unit_table import UnitTable

__all__ = ["CASCADE_FITTERS", "cascade_fitter", "fit_idk_grid", "fit_idk_iou", "fit_optimal_stopping"]


@torch.no_grad()
def fit_idk_grid(
    router: IDKCascade, table: UnitTable, lam: float, steps: int = 21, max_combinations: int = 20000
) -> dict[str, float]:
    """Grid-search the thresholds on ``table`` for the loss ``CE + lam * C`` (Eq. 5).

    Each stage's grid spans mean - 1 std .. mean + 1 std of its uncertainty. When
    ``steps ** m`` exceeds ``max_combinations`` the grid is searched by coordinate descent.

    Returns:
        The selected thresholds' loss, mean CE and mean cost.
    """
    mean, std = router.stage_statistics(table)
    grids = [torch.linspace(float(mu - sd), float(mu + sd), steps) for mu, sd in zip(mean, std, strict=True)]

    def objective(values: Tensor) -> tuple[float, float, float]:
        router.set_thresholds(values)
        actions = router.decide_table(table)
        ce = float(table.gather(table.loss, actions).mean())
        cost = float(router.paid_costs(table, actions).mean())
        return ce + lam * cost, ce, cost

    best: tuple[float, float, float] | None = None
    best_values = torch.stack([g[-1] for g in grids])
    if steps ** len(grids) <= max_combinations:
        for combo in itertools.product(*[range(steps)] * len(grids)):
            values = torch.stack([g[j] for g, j in zip(grids, combo, strict=True)])
            score = objective(values)
            if best is None or score[0] < best[0]:
                best, best_values = score, values
    else:
        values = best_values.clone()
        for _ in range(3):
            for s, grid in enumerate(grids):
                for v in grid:
                    trial = values.clone()
                    trial[s] = v
                    score = objective(trial)
                    if best is None or score[0] < best[0]:
                        best, best_values = score, trial
                values = best_values.clone()
    router.set_thresholds(best_values)
    assert best is not None
    return {"loss": best[0], "ce": best[1], "cost": best[2]}


@torch.no_grad()
def fit_idk_iou(router: IDKCascade, table: UnitTable, target: float, tol: float = 1e-3, span: float = 4.0) -> dict[str, float]:
    """Tune one offset (in std units, shared by every stage) until the table's IoU matches ``target``.

    Scans offsets in ``[-span, span]`` then bisects the bracket around the target. If the
    target is out of reach, keeps the closest setting and reports ``matched = 0``.

    Returns:
        ``offset``, realised ``iou``, ``matched`` (1.0 / 0.0).
    """

    def iou_at(offset: float) -> float:
        router.set_thresholds(router.thresholds_at(table, offset))
        return table.mean_iou(router.decide_table(table))

    offsets = torch.linspace(span, -span, 161).tolist()  # high offset = few forwards = low IoU
    ious = [iou_at(o) for o in offsets]
    best = min(range(len(offsets)), key=lambda j: abs(ious[j] - target))
    best_offset, best_iou = offsets[best], ious[best]
    for j in range(len(offsets) - 1):
        lo, hi = ious[j], ious[j + 1]
        if abs(best_iou - target) <= tol:
            break
        if (lo - target) * (hi - target) <= 0:
            a, b = offsets[j], offsets[j + 1]
            for _ in range(40):
                mid = 0.5 * (a + b)
                v = iou_at(mid)
                if abs(v - target) < abs(best_iou - target):
                    best_offset, best_iou = mid, v
                if abs(v - target) <= tol:
                    break
                if (v - target) * (lo - target) > 0:
                    a, lo = mid, v
                else:
                    b = mid
    router.set_thresholds(router.thresholds_at(table, best_offset))
    return {"offset": best_offset, "iou": best_iou, "matched": float(abs(best_iou - target) <= tol)}


def fit_optimal_stopping(
    router: OptimalStoppingCascade,
    table: UnitTable,
    alpha: float,
    epochs: int = 60,
    lr: float = 1e-2,
    batch_size: int = 512,
    loss: str = "ce",
    seed: int = 0,
) -> dict[str, float]:
    """Train the stop policies by REINFORCE on ``table``.

    The reward of a unit that stops at stage ``a`` is ``-loss_a - alpha * sum_{i <= a} C(f_i)``,
    with ``loss_a`` the unit's cross-entropy (``loss="ce"``) or ``1 - accuracy term``
    (``loss="acc"``) and ``C`` the normalised costs. The baseline is the batch mean reward.

    Returns:
        Mean reward of the greedy policy on ``table`` after training.
    """
    if loss not in ("ce", "acc"):
        raise ValueError(f"Expected loss 'ce' or 'acc' but got {loss!r}.")
    n, p, a = table.accuracy.shape
    feats_p = table.unit_probs[:, :, : a - 1].reshape(n * p, a - 1, -1).float()
    feats_u = table.uncertainty[..., : a - 1].reshape(n * p, a - 1).float()
    per_unit_loss = (table.loss if loss == "ce" else 1.0 - table.accuracy).reshape(n * p, a).float()
    per_unit_loss = torch.nan_to_num(per_unit_loss, nan=0.0)
    every_stop = torch.arange(a)
    rewards_all = -per_unit_loss - alpha * paid_cost(every_stop, table.costs, cascade=True).float()  # [U, A]
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    total = n * p
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, total, batch_size):
            idx = order[start : start + batch_size]
            logits = torch.stack([router.stop_logits(i, feats_p[idx, i], feats_u[idx, i]) for i in range(a - 1)], -1)
            stop_prob = torch.sigmoid(logits)
            draws = torch.rand(stop_prob.shape, generator=generator) < stop_prob.detach()
            draws = torch.cat([draws, torch.ones(len(idx), 1, dtype=torch.bool)], -1)
            final = draws.long().argmax(-1)  # first stop
            logp_stop = nn.functional.logsigmoid(logits)
            logp_go = nn.functional.logsigmoid(-logits)
            steps = torch.arange(a - 1).unsqueeze(0)
            went_on = (steps < final.unsqueeze(1)).float()
            stopped_here = (steps == final.unsqueeze(1)).float()
            logp = (went_on * logp_go + stopped_here * logp_stop).sum(-1)
            reward = rewards_all[idx].gather(1, final.unsqueeze(1)).squeeze(1)
            advantage = reward - reward_baseline("mean", reward)
            objective = reinforce_loss(logp, advantage)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
    router.eval()
    with torch.no_grad():
        actions = router.decide_table(table).reshape(-1)
        realised = rewards_all.gather(1, actions.unsqueeze(1)).mean()
    return {"mean_reward": float(realised)}


def _fit_idk(router: CascadeRouter, table: UnitTable, settings: Any, seed: int) -> dict[str, float]:
    assert isinstance(router, IDKCascade)
    if settings.method == "grid":
        return fit_idk_grid(router, table, settings.lam, settings.grid_steps)
    if settings.iou_target is None:
        raise ValueError("training.cascade.method 'iou_match' needs training.cascade.iou_target.")
    return fit_idk_iou(router, table, settings.iou_target)


def _fit_stopping(router: CascadeRouter, table: UnitTable, settings: Any, seed: int) -> dict[str, float]:
    assert isinstance(router, OptimalStoppingCascade)
    return fit_optimal_stopping(router, table, settings.alpha, settings.policy_epochs, settings.lr, 512, settings.loss, seed)


#: Router class -> ``fit(router, table, settings, seed) -> logged scalars``; ``settings`` has the
#: fields of `routerkit.config.schema.CascadeFitConfig`. Register a custom cascade's fitter here.
CASCADE_FITTERS: dict[type[CascadeRouter], Callable[[CascadeRouter, UnitTable, Any, int], dict[str, float]]] = {
    IDKCascade: _fit_idk,
    OptimalStoppingCascade: _fit_stopping,
}


def cascade_fitter(router: CascadeRouter) -> Callable[[CascadeRouter, UnitTable, Any, int], dict[str, float]]:
    """The fitting procedure of ``router``'s class (the nearest registered base class)."""
    for cls in type(router).__mro__:
        if cls in CASCADE_FITTERS:
            return CASCADE_FITTERS[cls]
    raise ValueError(
        f"No fitting procedure for {type(router).__name__}: register one in routerkit.training.fitters.CASCADE_FITTERS."
    )
