"""Pure tensor maths shared by the classes: entropy, confusion counts, IoU, REINFORCE, TVD.

Everything here is batched: no Python loop over samples, units or pixels.

IoU convention (the one used everywhere in routerkit, matching PaSeR's "mean IoU"):
the IoU of class ``k`` is ``TP_k / (TP_k + FP_k + FN_k)`` and the mean IoU is the
*macro* mean over classes. Classes absent from both prediction and label of the
region being scored (union = 0) are left out of that mean. For a split, counts are
accumulated over all its pixels before dividing (as ``torchmetrics.JaccardIndex``
with ``average="macro"``); for a routing unit, counts are those of the unit's pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def class_argmax(scores: Tensor, dim: int = 1) -> Tensor:
    """The index of the largest score along ``dim`` (the class axis), as ``Tensor.argmax(dim)``.

    Computed as ``scores.max(dim).indices``: the same indices (the first maximum on ties, NaN as
    the maximum) by another CPU kernel; ``argmax`` over a dimension that is not the innermost one
    (the class axis of ``[B, K, H, W]`` masks) was the slowest op of assembling a prediction under
    a profiler (benchmarks/README.md, serve_load.py).
    """
    return scores.max(dim).indices


def entropy(probs: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """Shannon entropy (nats) of probabilities along ``dim``."""
    return -(probs * torch.log(probs.clamp_min(eps))).sum(dim=dim)


def confusion_counts(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Confusion matrices for a batch of regions, in one ``bincount``.

    Args:
        preds: Integer predictions ``[R, ...]`` (R regions, any spatial shape).
        target: Integer labels with the same shape as ``preds``.
        num_classes: Number of classes K.
        ignore_index: Label value whose pixels are not counted.

    Returns:
        ``[R, K, K]`` int64 counts with rows = label, columns = prediction.
    """
    if preds.shape != target.shape:
        raise ValueError(f"Expected preds and target of the same shape but got {tuple(preds.shape)} and {tuple(target.shape)}.")
    regions = preds.shape[0]
    p = preds.reshape(regions, -1).long()
    t = target.reshape(regions, -1).long()
    valid = torch.ones_like(t, dtype=torch.bool)
    if ignore_index is not None:
        valid = t != ignore_index
    if bool(((t < 0) | (t >= num_classes))[valid].any()):
        bad = t[valid & ((t < 0) | (t >= num_classes))][0].item()
        raise ValueError(f"Expected target labels in [0, {num_classes}) or ignore_index but found {bad}.")
    region = torch.arange(regions, device=p.device).unsqueeze(1).expand_as(p)
    flat = (region * num_classes + t) * num_classes + p.clamp(0, num_classes - 1)
    counts = torch.bincount(flat[valid], minlength=regions * num_classes * num_classes)
    return counts.reshape(regions, num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU ``[..., K]`` from confusion ``[..., K, K]``; NaN where the union is empty."""
    conf = confusion.to(torch.float64)
    tp = torch.diagonal(conf, dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    iou = tp / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan"))).to(torch.float32)


def mean_iou_from_confusion(confusion: Tensor) -> Tensor:
    """Macro mean IoU over classes present in label or prediction; NaN if none is."""
    return torch.nanmean(iou_from_confusion(confusion), dim=-1)


def per_region_iou(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Mean IoU of each region ``[R]`` (regions = leading dim of ``preds``/``target``)."""
    return mean_iou_from_confusion(confusion_counts(preds, target, num_classes, ignore_index))


def reinforce_loss(log_probs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE policy-gradient loss ``-E[log pi(a|s) * A]`` (advantages are detached)."""
    if log_probs.shape != advantages.shape:
        raise ValueError(
            f"Expected log_probs and advantages of the same shape but got {tuple(log_probs.shape)} and {tuple(advantages.shape)}."
        )
    return -(log_probs * advantages.detach()).mean()


def total_variation_distance(p: Tensor, q: Tensor, dim: int = -1) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|`` between distributions along ``dim``."""
    return 0.5 * (p - q).abs().sum(dim=dim)


def explore_exploit_sample(logits: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """PaSeR's Eq. 4: per unit, sample from the policy with probability ``alpha``, else uniformly.

    Args:
        logits: ``[..., A]`` action logits.
        alpha: Probability of following the policy (1.0 = pure policy sampling).
        generator: Optional random generator for reproducibility.

    Returns:
        Integer actions of shape ``logits.shape[:-1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected alpha in [0, 1] but got {alpha}.")
    device = generator.device if generator is not None else logits.device
    probs = torch.softmax(logits.detach().float(), dim=-1).to(device)
    flat = probs.reshape(-1, probs.shape[-1])
    policy_actions = torch.multinomial(flat, 1, generator=generator).squeeze(1)
    uniform_actions = torch.randint(0, probs.shape[-1], policy_actions.shape, generator=generator, device=device)
    follow = torch.rand(policy_actions.shape, generator=generator, device=device) < alpha
    return torch.where(follow, policy_actions, uniform_actions).reshape(probs.shape[:-1]).to(logits.device)


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """Linear interpolation from ``start`` (step 0) to ``end`` (step ``total - 1``)."""
    if total <= 1:
        return end
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start + (end - start) * frac


def paid_counts(actions: Tensor, num_actions: int, cascade: bool = False) -> Tensor:
    """What each unit paid: ``[..., A]`` int64, 1 for every model charged to the unit.

    The one charging rule of routerkit, used alike by live routing, the replay table, rewards,
    IDK's loss and optimal stopping's reward. A pick-first router pays the model it chose
    (a one-hot of ``actions``); a cascade pays every stage it reached: a unit that ended at
    model ``a`` ran ``f_0 .. f_a``. Column 0 (``f_0``) is 1 for every unit; whether ``f_0``'s
    whole-input pass is charged per unit or per input is the caller's convention.

    Args:
        actions: ``[...]`` final model index of each unit.
        num_actions: Models A = m + 1.
        cascade: Whether the unit also paid the stages before the one that answered.

    Example:
        >>> paid_counts(torch.tensor([0, 2]), 3, cascade=True).tolist()
        [[1, 0, 0], [1, 1, 1]]
    """
    onehot = torch.nn.functional.one_hot(actions, num_actions)
    return onehot.flip(-1).cumsum(-1).flip(-1) if cascade else onehot


def paid_cost(actions: Tensor, costs: Tensor, cascade: bool = False) -> Tensor:
    """Total normalised cost ``[...]`` each unit paid under `paid_counts` (``costs [A]`` per model)."""
    return (paid_counts(actions, costs.shape[-1], cascade).to(costs.dtype) * costs).sum(-1)


def unit_mean_probs(unit_probs: Tensor) -> Tensor:
    """Mean class probabilities of each unit, ``[U, K, ...] -> [U, K]`` (the features of a stop rule)."""
    return unit_probs.flatten(2).mean(-1) if unit_probs.dim() > 2 else unit_probs


def unit_mean(x: Tensor) -> Tensor:
    """Mean of a per-pixel map over each unit, ``[U, ...] -> [U]``."""
    return x.flatten(1).mean(1) if x.dim() > 1 else x
