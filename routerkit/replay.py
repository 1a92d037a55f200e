"""Per-unit outputs of every frozen model on a split, cached once and replayed by every strategy.

A `UnitTable` holds, for each input and unit, what every model of the zoo would give: its
accuracy term, its mean cross-entropy, its mean entropy, its mean class probabilities (the
features of a stop policy) and its confusion counts. Any routing decision ``actions [N, P]`` is
then scored exactly (split-level macro IoU from the summed confusion counts, FLOPs from the
accountant) without running a model again. Sweeping PaSeR's lambda, an IDK cascade's
thresholds or an optimal-stopping cascade's alpha takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from routerkit.data import Split
from routerkit.functional import confusion_counts, entropy, iou_from_confusion
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward
from routerkit.routers import CascadeRouter, OracleRouter, Router
from routerkit.uncertainty import BaseOutput


@dataclass
class UnitTable:
    """Replayed per-unit outputs of every model on one split.

    Attributes:
        base: ``f_0``'s state on the whole inputs (probabilities ``[N, K, ...]`` and uncertainty).
        accuracy: ``[N, P, A]`` accuracy term of each model on each unit.
        loss: ``[N, P, A]`` mean cross-entropy of each model on each unit.
        uncertainty: ``[N, P, A]`` mean uncertainty of each model on each unit: the estimator's
            (e.g. MC-dropout entropy) for ``f_0``, the softmax entropy for the others.
        unit_probs: ``[N, P, A, K]`` class probabilities of each model averaged over the unit.
        confusion: ``[N, P, A, K, K]`` confusion counts (rows = label) of each model on each unit.
        unit_flops: ``[A]`` FLOPs of each model on one unit (``f_0``: 0, it runs on the whole input).
        base_flops: FLOPs of one deterministic pass of ``f_0`` on one whole input.
        state_flops: FLOPs of ``f_0`` for the estimator's state on one input (all MC passes).
        costs: ``[A]`` normalised costs of the cost model.
    """

    base: BaseOutput
    accuracy: Tensor
    loss: Tensor
    uncertainty: Tensor
    unit_probs: Tensor
    confusion: Tensor
    unit_flops: Tensor
    base_flops: float
    state_flops: float
    costs: Tensor

    @property
    def num_inputs(self) -> int:
        """Inputs N."""
        return int(self.accuracy.shape[0])

    @property
    def num_units(self) -> int:
        """Units P per input."""
        return int(self.accuracy.shape[1])

    @property
    def num_actions(self) -> int:
        """Models A = m + 1."""
        return int(self.accuracy.shape[2])

    def subset(self, index: Tensor) -> UnitTable:
        """The rows ``index`` of the table (inputs)."""
        return UnitTable(
            BaseOutput(self.base.probs[index], self.base.uncertainty[index]),
            self.accuracy[index],
            self.loss[index],
            self.uncertainty[index],
            self.unit_probs[index],
            self.confusion[index],
            self.unit_flops,
            self.base_flops,
            self.state_flops,
            self.costs,
        )

    def gather(self, values: Tensor, actions: Tensor) -> Tensor:
        """Pick ``values[..., a]`` per unit for ``actions [N, P]``."""
        self._check_actions(actions)
        return values.gather(2, actions.unsqueeze(-1)).squeeze(-1)

    def rewards(self, reward: Reward, lam: float | None = None) -> Tensor:
        """``[N, P, A]`` reward of every action on every unit."""
        acc = self.accuracy
        return reward(acc, acc[..., :1].expand_as(acc), self.costs.to(acc).expand_as(acc), lam=lam)

    def mean_iou(self, actions: Tensor) -> float:
        """Split-level macro mean IoU (classes present in label or prediction) of ``actions``."""
        self._check_actions(actions)
        idx = actions.reshape(*actions.shape, 1, 1, 1).expand(*actions.shape, 1, *self.confusion.shape[-2:])
        confusion = self.confusion.gather(2, idx).sum((0, 1, 2))
        return float(torch.nanmean(iou_from_confusion(confusion)))

    def flops(
        self,
        actions: Tensor,
        cascade: bool = False,
        base_flops: float | None = None,
        policy_flops: float = 0.0,
        decision_flops: Sequence[float] | None = None,
    ) -> float:
        """Mean FLOPs per input of ``actions`` (fvcore convention: one multiply-add = one flop).

        Args:
            actions: ``[N, P]`` final model per unit.
            cascade: Whether a unit that ended at model ``a`` also paid for models ``1..a-1``.
            base_flops: FLOPs of ``f_0`` charged per input (default: the estimator's, ``state_flops``).
            policy_flops: FLOPs of the router's own networks per input.
            decision_flops: For a cascade, FLOPs per unit of the stop decision after each stage
                ``0..m-1``, charged for every unit that reached the stage.
        """
        self._check_actions(actions)
        onehot = F.one_hot(actions, self.num_actions).double()
        paid = onehot.flip(-1).cumsum(-1).flip(-1) if cascade else onehot
        routed = (paid * self.unit_flops.double()).sum((1, 2))
        if cascade and decision_flops is not None:
            per_stage = torch.tensor([*decision_flops, 0.0], dtype=torch.float64)
            routed = routed + (paid * per_stage).sum((1, 2))
        base = self.state_flops if base_flops is None else base_flops
        return float(routed.mean()) + base + policy_flops

    def usage(self, actions: Tensor) -> list[float]:
        """Share of units sent to each model."""
        counts = torch.bincount(actions.reshape(-1), minlength=self.num_actions).double()
        return (counts / counts.sum()).tolist()

    def _check_actions(self, actions: Tensor) -> None:
        if actions.shape != self.accuracy.shape[:2]:
            raise ValueError(f"Expected actions of shape {tuple(self.accuracy.shape[:2])} but got {tuple(actions.shape)}.")


def _unit_mean(x: Tensor, unit_targets: Tensor | None, ignore_index: int | None) -> Tensor:
    """Mean over the spatial dims of ``x [U, ...]`` (over valid pixels when ``ignore_index`` is set)."""
    dims = tuple(range(1, x.dim()))
    if not dims:
        return x
    if unit_targets is None or ignore_index is None:
        return x.mean(dims)
    valid = (unit_targets != ignore_index).to(x.dtype)
    return (x * valid).sum(dims) / valid.sum(dims).clamp_min(1.0)


@torch.no_grad()
def build_unit_table(
    pipeline: RoutedPipeline,
    accuracy: AccuracyTerm,
    data: Split,
    num_classes: int,
    batch_size: int = 16,
    ignore_index: int | None = None,
    device: torch.device | str = "cpu",
) -> UnitTable:
    """Run ``f_0`` (with the estimator) and every model on every unit of ``data`` once.

    Args:
        pipeline: The routed pipeline (frozen zoo, partitioner, estimator, costs).
        accuracy: The per-unit accuracy term of the reward.
        data: The split.
        num_classes: Classes K.
        batch_size: Inputs per batch.
        ignore_index: Label ignored by losses, IoU and confusion counts.
        device: Where the models run.

    Returns:
        The split's `UnitTable` (kept on the CPU).
    """
    if len(data) == 0:
        raise ValueError("Cannot build a unit table of an empty split.")
    pipeline.zoo.eval()
    part, num_models = pipeline.partitioner, len(pipeline.zoo)
    rows: dict[str, list[Tensor]] = {k: [] for k in ("probs", "unc", "acc", "loss", "uncm", "up", "conf")}
    for images, targets in data.batches(batch_size):
        images, targets = images.to(device), targets.to(device)
        batch = images.shape[0]
        base = pipeline.estimator(pipeline.zoo.base, images)
        units, unit_targets = part.split(images), part.split(targets)
        acc, loss, unc, up, conf = [], [], [], [], []
        for i in range(num_models):
            if i == 0:
                probs = part.split(base.probs)
                u = part.split(base.uncertainty.unsqueeze(1)).squeeze(1)
            else:
                probs = torch.softmax(pipeline.zoo[i](units).float(), 1)
                u = entropy(probs)
            safe_targets = unit_targets if ignore_index is None else unit_targets.masked_fill(unit_targets == ignore_index, 0)
            nll = -torch.log(probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1).clamp_min(1e-12))
            acc.append(accuracy(probs, unit_targets))
            loss.append(_unit_mean(nll, unit_targets, ignore_index))
            unc.append(_unit_mean(u, unit_targets, None))
            up.append(probs.flatten(2).mean(-1) if probs.dim() > 2 else probs)
            conf.append(confusion_counts(probs.argmax(1), unit_targets, num_classes, ignore_index))
        shape = (batch, part.num_units, num_models)
        rows["acc"].append(torch.stack(acc, -1).reshape(shape).cpu())
        rows["loss"].append(torch.stack(loss, -1).reshape(shape).cpu())
        rows["uncm"].append(torch.stack(unc, -1).reshape(shape).cpu())
        rows["up"].append(torch.stack(up, 1).reshape(*shape, num_classes).cpu())
        rows["conf"].append(torch.stack(conf, 1).reshape(*shape, num_classes, num_classes).cpu())
        rows["probs"].append(base.probs.cpu())
        rows["unc"].append(base.uncertainty.cpu())
    acct = pipeline.accountant
    unit_flops = torch.tensor([0, *acct.unit_flops[1:]], dtype=torch.float64)
    return UnitTable(
        base=BaseOutput(torch.cat(rows["probs"]), torch.cat(rows["unc"])),
        accuracy=torch.cat(rows["acc"]),
        loss=torch.cat(rows["loss"]),
        uncertainty=torch.cat(rows["uncm"]),
        unit_probs=torch.cat(rows["up"]),
        confusion=torch.cat(rows["conf"]),
        unit_flops=unit_flops,
        base_flops=float(acct.base_flops),
        state_flops=float(acct.estimator_flops(pipeline.estimator)),
        costs=pipeline.costs.detach().cpu().float(),
    )


@torch.no_grad()
def decide(router: Router, table: UnitTable) -> Tensor:
    """Greedy decisions ``[N, P]`` of any router on a replayed table (cascades and the oracle included)."""
    router.reset()
    if isinstance(router, (CascadeRouter, OracleRouter)):
        return router.decide_table(table)
    return router.route(table.base, greedy=True)


def routed_flops(pipeline: RoutedPipeline, router: Router, table: UnitTable, actions: Tensor) -> float:
    """Mean FLOPs per input of ``router``'s ``actions`` on ``table``, counted as `RoutedPipeline` counts them.

    ``f_0``'s passes as the router needs them, its policy network, and the models run on the units
    (every stage up to the chosen one for a cascade). fvcore convention: one multiply-add = one flop.
    """
    policy = 0.0
    if router.flops_module() is not None:
        policy = float(pipeline.policy_flops(router, BaseOutput(table.base.probs[:1], table.base.uncertainty[:1])))
    decisions = router.decision_flops() if isinstance(router, CascadeRouter) else None
    return table.flops(
        actions, cascade=router.is_cascade, base_flops=pipeline.base_flops(router), policy_flops=policy, decision_flops=decisions
    )
