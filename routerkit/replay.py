"""Fill the replay table once per split and replay any router on it.

`build_unit_table` runs ``f_0`` (with the estimator) and, through the executor, every model on
every unit of a split once, into a `~routerkit.unit_table.UnitTable`. Any router then decides on
the table (`decide`: ``Router.decide_table``) and is charged as live routing charges it
(`routed_flops`), so sweeping PaSeR's lambda, an IDK cascade's thresholds or an
optimal-stopping cascade's alpha takes seconds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from routerkit._storage import RowStore
from routerkit.data import BaseSplit
from routerkit.functional import class_argmax, confusion_counts, entropy
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm
from routerkit.routers import Router
from routerkit.uncertainty import BaseOutput
from routerkit.unit_table import UnitTable

__all__ = ["UnitTable", "build_unit_table", "decide", "routed_flops"]


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
    data: BaseSplit,
    num_classes: int,
    batch_size: int = 16,
    ignore_index: int | None = None,
    device: torch.device | str = "cpu",
    store: RowStore | None = None,
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
        store: Where the table's rows are kept: in memory, or memory-mapped on disk when the whole
            table exceeds its budget (default: the pipeline's ``row_store``). The values
            are the same either way.

    Returns:
        The split's `UnitTable` (kept on the CPU).
    """
    if len(data) == 0:
        raise ValueError("Cannot build a unit table of an empty split.")
    store = pipeline.row_store if store is None else store
    pipeline.zoo.eval()
    part, num_models = pipeline.partitioner, len(pipeline.zoo)
    out: dict[str, Tensor] | None = None
    for idx, images, targets in data.index_batches(batch_size):
        images, targets = images.to(device), targets.to(device)
        batch = images.shape[0]
        base = pipeline.estimator(pipeline.zoo.base, images)
        units, unit_targets = part.split_inputs(images), part.split(targets)
        every = pipeline.executor.all_unit_probs(units, part.split(base.probs))
        acc, loss, unc, up, conf = [], [], [], [], []
        for i, probs in enumerate(every):
            u = part.split(base.uncertainty.unsqueeze(1)).squeeze(1) if i == 0 else entropy(probs)
            safe_targets = unit_targets if ignore_index is None else unit_targets.masked_fill(unit_targets == ignore_index, 0)
            nll = -torch.log(probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1).clamp_min(1e-12))
            acc.append(accuracy(probs, unit_targets))
            loss.append(_unit_mean(nll, unit_targets, ignore_index))
            unc.append(_unit_mean(u, unit_targets, None))
            up.append(probs.flatten(2).mean(-1) if probs.dim() > 2 else probs)
            conf.append(confusion_counts(class_argmax(probs, 1), unit_targets, num_classes, ignore_index))
        shape = (batch, part.num_units, num_models)
        rows = {
            "acc": torch.stack(acc, -1).reshape(shape),
            "loss": torch.stack(loss, -1).reshape(shape),
            "uncm": torch.stack(unc, -1).reshape(shape),
            "up": torch.stack(up, 1).reshape(*shape, num_classes),
            "conf": torch.stack(conf, 1).reshape(*shape, num_classes, num_classes),
            "probs": base.probs,
            "unc": base.uncertainty,
            "inputs": images,
        }
        if out is None:  # one decision for the whole table: in memory or on disk
            out = store.allocate(len(data), {k: (tuple(v.shape[1:]), v.dtype) for k, v in rows.items()})
        for key, value in rows.items():
            out[key][idx] = value.cpu()
        store.release()  # a spilled table: the rows just written leave this process's resident memory
    assert out is not None
    acct = pipeline.accountant
    unit_flops = torch.tensor([0, *acct.unit_flops[1:]], dtype=torch.float64)
    return UnitTable(
        base=BaseOutput(out["probs"], out["unc"], out["inputs"]),
        accuracy=out["acc"],
        loss=out["loss"],
        uncertainty=out["uncm"],
        unit_probs=out["up"],
        confusion=out["conf"],
        unit_flops=unit_flops,
        base_flops=float(acct.base_flops),
        state_flops=float(acct.estimator_flops(pipeline.estimator)),
        costs=pipeline.costs.detach().cpu().float(),
    )


@torch.no_grad()
def decide(router: Router, table: UnitTable) -> Tensor:
    """Greedy decisions ``[N, P]`` of any router on a replayed table (``Router.decide_table``)."""
    router.reset()
    return router.decide_table(table)


def routed_flops(pipeline: RoutedPipeline, router: Router, table: UnitTable, actions: Tensor) -> float:
    """Mean FLOPs per input of ``router``'s ``actions`` on ``table``, counted as `RoutedPipeline` counts them.

    ``f_0``'s passes as the router needs them, its policy network, and the models run on the units
    (every stage up to the chosen one for a cascade, plus its stop decisions). fvcore convention:
    one multiply-add = one flop.
    """
    policy = 0.0
    if router.flops_module() is not None:
        policy = float(pipeline.policy_flops(router, table.base.select(slice(0, 1))))
    return table.flops(
        actions,
        cascade=router.is_cascade,
        base_flops=pipeline.base_flops(router),
        policy_flops=policy,
        decision_flops=router.decision_flops(),
    )
