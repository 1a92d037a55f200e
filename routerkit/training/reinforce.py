"""The REINFORCE maths of routerkit's policies, shared by PaSeR's stages and the cascade fitters.

Pure functions on logits, actions and rewards, named as in cleanrl's ``ppo.py``: ``pg_loss``,
``baseline``, ``entropy_bonus``; the scalars they return are logged under ``losses/``. The
distances between policies (`policy_probs`, `total_variation`) drive the TVD-threshold
fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from routerkit.functional import reinforce_loss, total_variation_distance

if TYPE_CHECKING:
    from routerkit.routers.paser import PaSeRRouter
    from routerkit.uncertainty import BaseOutput

__all__ = [
    "BASELINES",
    "CREDITS",
    "ESTIMATORS",
    "entropy_bonus",
    "expected_reward_loss",
    "importance_weights",
    "policy_gradient_loss",
    "policy_probs",
    "reward_baseline",
    "total_variation",
]

#: ``"none"``, ``"mean"`` (batch mean reward) or ``"expected"`` (the policy's exact expected reward
#: per unit, available when every model's output is replayed).
BASELINES = ("none", "mean", "expected")
#: ``"unit"`` (each unit's log-prob times its own reward) or ``"input"`` (times the input's summed reward).
CREDITS = ("unit", "input")
#: ``"reinforce"`` (sampled actions) or ``"all_actions"`` (the exact gradient of the expected reward).
ESTIMATORS = ("reinforce", "all_actions")


def reward_baseline(
    kind: str, rewards: Tensor, expected: Tensor | None = None, mean: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The baseline subtracted from ``rewards``: zeros, their batch mean, or ``expected`` (see `BASELINES`).

    ``"expected"`` without ``expected`` rewards falls back to the batch mean. ``mean`` computes
    that mean (default ``Tensor.mean``; under torch.distributed, the mean over every rank's share
    of the batch: `routerkit.training.distributed.Distributed.mean`).
    """
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "expected" and expected is not None:
        return expected
    return (rewards.mean() if mean is None else mean(rewards)).expand_as(rewards)


def importance_weights(logits: Tensor, actions: Tensor, alpha: float) -> Tensor:
    """``pi(a) / mu(a)`` for actions drawn by the explore/exploit rule ``mu = alpha * pi + (1 - alpha) / A``.

    Without this correction the uniformly explored actions bias the policy gradient: a bad
    explored action pushes probability *towards the current greedy action*, which locks the
    policy into whatever it prefers early (see docs/concepts.md).
    """
    probs = torch.softmax(logits.detach().float(), -1)
    chosen = probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return chosen / (alpha * chosen + (1.0 - alpha) / logits.shape[-1])


def entropy_bonus(log_probs_all: Tensor) -> Tensor:
    """Mean entropy of the action distributions given by their log-probabilities ``[..., A]``."""
    return -(log_probs_all.exp() * log_probs_all).sum(-1).mean()


def policy_gradient_loss(
    logits: Tensor,
    actions: Tensor,
    rewards: Tensor,
    baseline: Tensor,
    credit: str,
    entropy_coef: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE loss for per-unit actions ``[B, P]`` and the scalars to log.

    Args:
        logits: Action logits ``[B, P, A]`` (with gradients).
        actions: The sampled actions ``[B, P]``.
        rewards: Their rewards ``[B, P]``.
        baseline: Subtracted from ``rewards`` (`reward_baseline`).
        credit: ``"unit"`` or ``"input"`` (the paper's form: every unit's log-prob weighted by the input's total reward).
        entropy_coef: Weight of the entropy bonus.
        weights: Importance weights of the actions (`importance_weights`), or ``None``.

    Returns:
        ``(loss, {"losses/pg_loss": ..., "losses/entropy": ...})``.
    """
    log_probs_all = torch.log_softmax(logits, dim=-1)
    log_probs = log_probs_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B, P]
    advantages = rewards - baseline
    if credit == "input":
        advantages = advantages.sum(1, keepdim=True).expand_as(advantages)
    if weights is not None:
        advantages = advantages * weights
    pg_loss = reinforce_loss(log_probs, advantages)
    entropy = entropy_bonus(log_probs_all)
    loss = pg_loss - entropy_coef * entropy
    return loss, {"losses/pg_loss": float(pg_loss.detach()), "losses/entropy": float(entropy.detach())}


def expected_reward_loss(logits: Tensor, all_rewards: Tensor, entropy_coef: float) -> tuple[Tensor, dict[str, float]]:
    """Minus the exact expected reward ``sum_a pi(a|s) r(s, a)`` (every action's reward replayed), and the scalars to log.

    No sampling and no baseline; a NaN reward (an all-ignored unit) counts as 0.
    """
    log_probs_all = torch.log_softmax(logits, -1)
    pg_loss = -(log_probs_all.exp() * torch.nan_to_num(all_rewards, nan=0.0)).sum(-1).mean()
    entropy = entropy_bonus(log_probs_all)
    loss = pg_loss - entropy_coef * entropy
    return loss, {"losses/pg_loss": float(pg_loss.detach()), "losses/entropy": float(entropy.detach())}


@torch.no_grad()
def policy_probs(router: PaSeRRouter, base: BaseOutput, batch_size: int = 256) -> Tensor:
    """The policy's action distribution ``[N, P, A]`` on replayed base states (eval mode)."""
    was_training = router.training
    router.eval()
    n = base.probs.shape[0]
    out = [torch.softmax(router.logits(base.select(slice(i, i + batch_size))).float(), -1) for i in range(0, n, batch_size)]
    router.train(was_training)
    return torch.cat(out)


def total_variation(p: Tensor, q: Tensor) -> float:
    """Mean over units of ``0.5 * sum_a |p(a) - q(a)|`` for action distributions ``[..., A]``.

    For deterministic policies this is the share of units whose model changed.
    """
    if p.shape != q.shape:
        raise ValueError(f"Expected action distributions of the same shape but got {tuple(p.shape)} and {tuple(q.shape)}.")
    return float(total_variation_distance(p, q).mean())
