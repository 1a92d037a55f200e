"""Stages 2 and 3 of PaSeR's Algorithm 1 on replayed outputs: the policy alone, task models frozen.

- `PolicyTraining`: REINFORCE on D_RL. The frozen models' per-unit accuracies are computed once
  (`replay_cache`) and *replayed*; an epoch then costs only the policy.
- `PolicyFineTuning`: policy-only fine-tuning on D_FT, lambda rising linearly, stopped at a TVD
  threshold from the starting policy (PaSeR, noisy MNIST).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from routerkit.data import BaseSplit, shard_of
from routerkit.functional import explore_exploit_sample
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward
from routerkit.routers.paser import PaSeRRouter
from routerkit.training.base import Stage, check_choice
from routerkit.training.distributed import Method
from routerkit.training.reinforce import (
    BASELINES,
    CREDITS,
    ESTIMATORS,
    expected_reward_loss,
    importance_weights,
    policy_gradient_loss,
    policy_probs,
    reward_baseline,
    total_variation,
)
from routerkit.training.schedules import StageSettings, global_rng_state, linear_schedule, set_global_rng_state
from routerkit.unit_table import UnitTable

if TYPE_CHECKING:
    from routerkit.config.schema import FinetuneConfig, PolicyConfig
    from routerkit.uncertainty import BaseOutput

__all__ = ["PolicyFineTuning", "PolicyTraining", "replay_cache"]


class _ReplayedPolicy(Stage):
    """A PaSeR policy trained on replayed outputs of the frozen zoo: the replay cache and one policy-gradient step.

    The arguments are those of `PolicyTraining`.
    """

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
        alpha_start: float = 0.7,
        alpha_end: float = 0.95,
        baseline: str = "expected",
        credit: str = "unit",
        entropy_coef: float = 0.0,
        cache_batch: int = 16,
        importance_weighting: bool = True,
        estimator: str = "reinforce",
        cache: UnitTable | None = None,
    ) -> None:
        super().__init__(settings, seed)
        check_choice("baseline", baseline, BASELINES)
        check_choice("credit", credit, CREDITS)
        check_choice("estimator", estimator, ESTIMATORS)
        self.importance_weighting, self.estimator = importance_weighting, estimator
        self.pipeline, self.router, self.reward, self.accuracy, self.data = pipeline, router, reward, accuracy, data
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.baseline, self.credit, self.entropy_coef, self.cache_batch = baseline, credit, entropy_coef, cache_batch
        self.modules["router"] = router
        self.optimizers["router"] = torch.optim.Adam(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self._cache: UnitTable | None = cache
        #: Global generator states the cache was built from (so a resumed stage rebuilds the same one).
        self._cache_rng: dict[str, Tensor] | None = None

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    @torch.no_grad()
    def build_cache(self) -> UnitTable:
        """The replayed `UnitTable` of the stage's data (on the data's device), computed once.

        The MC-dropout state draws from the global generators. Their state before the first build
        is kept in `state_dict`; a stage restored from it rebuilds the identical cache, without
        disturbing the generators' current state.
        """
        if self._cache is not None:
            return self._cache
        if self._cache_rng is None and not self.dist.enabled:
            self._cache_rng = global_rng_state()
            self._cache = replay_cache(self.pipeline, self.accuracy, self.data, self.cache_batch)
        else:
            if self._cache_rng is None:  # every rank builds the same table, from rank 0's generators
                self._cache_rng = self.dist.broadcast(global_rng_state())
            assert self._cache_rng is not None
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if "cuda" in self._cache_rng else []):
                set_global_rng_state(self._cache_rng)
                self._cache = replay_cache(self.pipeline, self.accuracy, self.data, self.cache_batch)
        return self._cache

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._cache_rng is not None:
            state["cache_rng"] = self._cache_rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "cache_rng" in state:
            self._cache_rng = dict(state["cache_rng"])
            self._cache = None

    def update(self, idx: Tensor, alpha: float, lam: float | None = None) -> dict[str, float]:
        """One policy-gradient step on the replayed inputs ``idx`` (``lam`` overrides the reward's lambda)."""
        cache = self.build_cache()
        acc = cache.accuracy
        device = next(self.router.parameters()).device  # where the table is, unless it is spilled to disk
        costs = self.pipeline.costs.to(device)
        total = int(idx.shape[0])
        idx = shard_of(idx, self.dist.part)  # this rank's share of the global batch
        self.router.train()
        logits = self.trainable("router", Method(self.router, "logits"))(cache.base.select(idx).to(device))
        actions = explore_exploit_sample(logits, alpha, self.draws)
        table = acc[idx].to(device)  # [B, P, A]
        self.pipeline.row_store.release()  # a spilled table: the rows just read leave resident memory
        all_rewards = self.reward(table, table[..., :1].expand_as(table), costs.expand_as(table), lam)
        rewards = all_rewards.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        expected = (torch.softmax(logits.detach(), -1) * all_rewards).sum(-1)
        if self.estimator == "all_actions":
            loss, logs = expected_reward_loss(logits, all_rewards, self.entropy_coef)
        else:
            weights = importance_weights(logits, actions, alpha) if self.importance_weighting else None
            mean = partial(self.dist.mean, weight=self.dist.counts(total))
            baseline = reward_baseline(self.baseline, rewards, expected, mean=mean)
            loss, logs = policy_gradient_loss(logits, actions, rewards, baseline, self.credit, self.entropy_coef, weights)
        self.optimizers["router"].zero_grad(set_to_none=True)
        (loss * self.dist.loss_scale(total)).backward()
        self.optimizers["router"].step()
        logs["charts/mean_reward"] = float(rewards.mean())
        return logs


class PolicyTraining(_ReplayedPolicy):
    """Stage 2: REINFORCE on D_RL with replayed task-model outputs.

    The frozen models' per-unit accuracies ``[N, P, m + 1]`` and the base state are computed
    once in `build_cache`; each epoch samples actions with PaSeR's explore/exploit rule
    (``alpha`` linear from ``alpha_start`` to ``alpha_end`` over the epochs), looks rewards up
    and updates the policy.

    Args:
        pipeline: The routed pipeline.
        router: The PaSeR router to train.
        reward: Reward function.
        accuracy: Per-unit accuracy term.
        data: D_RL.
        settings: Optimisation settings.
        seed: Random seed.
        alpha_start: Explore/exploit alpha at the first epoch (PaSeR: 0.7).
        alpha_end: Alpha at the last epoch (PaSeR: 0.95).
        baseline: ``"none"``, ``"mean"`` (batch mean reward) or ``"expected"`` (the policy's exact
            expected reward per unit, available because all outputs are replayed).
        credit: ``"unit"`` (each unit's log-prob times its own reward) or ``"input"`` (times the
            input's summed reward, as written in the paper).
        entropy_coef: Weight of the entropy bonus.
        cache_batch: Inputs per batch when building the replay cache.
        importance_weighting: Correct the explore/exploit sampling with ``pi(a) / mu(a)``.
        estimator: ``"reinforce"`` (sampled actions) or ``"all_actions"``: the exact gradient of the
            expected reward ``sum_a pi(a|s) r(s, a)``, possible because every model's output is
            replayed (no sampling, no baseline needed).
        cache: An already built replay `UnitTable` of ``data`` (e.g.
            from a `UnitTable`); built on first use when ``None``.
    """

    name = "policy"

    @classmethod
    def from_config(
        cls,
        config: PolicyConfig,
        *,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        seed: int,
        epochs: int | None = None,
        cache: UnitTable | None = None,
    ) -> PolicyTraining:
        """The stage of a ``training.policy`` section.

        Args:
            config: The section (optimisation settings, alpha schedule, baseline, credit, estimator...).
            pipeline: The routed pipeline.
            router: The PaSeR router to train.
            reward: Reward function.
            accuracy: Per-unit accuracy term.
            data: D_RL.
            seed: Random seed.
            epochs: Overrides ``config.epochs`` (e.g. the shorter policies of a sweep).
            cache: A prebuilt replay cache of ``data``.
        """
        return cls(
            pipeline,
            router,
            reward,
            accuracy,
            data,
            StageSettings.from_config(config, epochs),
            seed,
            alpha_start=config.alpha_start,
            alpha_end=config.alpha_end,
            baseline=config.baseline,
            credit=config.credit,
            entropy_coef=config.entropy_coef,
            importance_weighting=config.importance_weighting,
            estimator=config.estimator,
            cache_batch=config.cache_batch,
            cache=cache,
        )

    def run_epoch(self, epoch: int) -> dict[str, float]:
        probs = self.build_cache().base.probs
        alpha = linear_schedule(self.alpha_start, self.alpha_end, epoch, self.settings.epochs)
        n = probs.shape[0]
        order = torch.randperm(n, generator=self.generator)
        sums: dict[str, float] = {}
        for start in range(0, n, self.settings.batch_size):
            idx = order[start : start + self.settings.batch_size]
            logs = self.update(idx, alpha)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
        out = {k: v / n for k, v in sums.items()}
        out["charts/alpha"] = alpha
        return out


class PolicyFineTuning(_ReplayedPolicy):
    """Stage 3, policy only: lambda rises linearly and training stops at a TVD threshold (PaSeR, noisy MNIST).

    The policy pre-trained with ``lambda = reward.lam`` (0 in the paper: the optimal assignment
    without regard for cost) is fine-tuned on replayed D_FT while ``lambda`` increases linearly
    from ``reward.lam`` to ``lam_end`` over all steps of the stage. After every step the total
    variation distance between the current and the starting policy (mean over the units of
    D_FT, `total_variation`) is measured; the first step that takes it above ``tvd_threshold``
    is undone and the stage stops, so the result is the cheapest policy found within the
    threshold. Task models stay frozen.

    **What the TVD measures** (``tvd_on``). ``"probs"`` (default, the paper): the TVD between
    the action probabilities. ``"decisions"``: the TVD between the greedy decisions, i.e. the
    share of units whose model changed, which is what evaluation sees (a saturated policy can
    spend a probability budget softening its probabilities without moving a unit). The first
    steps on D_FT, at a lambda still near 0, go on improving a stage-2 policy that is not
    converged on D_FT, and can move units to a costlier model; the budget then left for lambda
    is what the sweep trades (docs/examples/mnist.md measures both).

    Args:
        pipeline: The routed pipeline.
        router: The pre-trained PaSeR router.
        reward: Reward (its ``lam`` is the schedule's start).
        accuracy: Per-unit accuracy term.
        data: D_FT.
        settings: Optimisation settings.
        seed: Random seed.
        tvd_threshold: Largest allowed TVD from the starting policy, in [0, 1].
        lam_end: Lambda at the last step.
        alpha_start: Explore/exploit alpha at the first epoch.
        alpha_end: Alpha at the last epoch.
        baseline: As in `PolicyTraining`.
        credit: As in `PolicyTraining`.
        entropy_coef: Entropy bonus.
        importance_weighting: Correct explore/exploit sampling.
        cache_batch: Inputs per batch when building the replay cache.
        cache: Prebuilt replay cache of ``data``.
        tvd_on: ``"decisions"`` or ``"probs"`` (see above).
    """

    name = "finetune_tvd"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
        tvd_threshold: float,
        lam_end: float,
        alpha_start: float = 0.95,
        alpha_end: float = 1.0,
        baseline: str = "expected",
        credit: str = "unit",
        entropy_coef: float = 0.0,
        importance_weighting: bool = True,
        cache_batch: int = 16,
        cache: UnitTable | None = None,
        tvd_on: str = "probs",
    ) -> None:
        super().__init__(
            pipeline,
            router,
            reward,
            accuracy,
            data,
            settings,
            seed,
            alpha_start=alpha_start,
            alpha_end=alpha_end,
            baseline=baseline,
            credit=credit,
            entropy_coef=entropy_coef,
            importance_weighting=importance_weighting,
            cache_batch=cache_batch,
            cache=cache,
        )
        if tvd_on not in ("decisions", "probs"):
            raise ValueError(f"Expected training.finetune.tvd_on 'decisions' or 'probs' but got {tvd_on!r}.")
        self.tvd_on = tvd_on
        lam_start = float(getattr(reward, "lam", 0.0))
        if not 0.0 <= tvd_threshold <= 1.0:
            raise ValueError(f"Expected tvd_threshold in [0, 1] but got {tvd_threshold}.")
        if not lam_start <= lam_end <= 1.0:
            raise ValueError(f"Expected lam_end in [reward.lam={lam_start}, 1] but got {lam_end}.")
        self.tvd_threshold, self.lam_start, self.lam_end = tvd_threshold, lam_start, lam_end
        self.reference: Tensor | None = None
        self.stopped, self.step, self.lam, self.tvd = False, 0, lam_start, 0.0

    @classmethod
    def from_config(
        cls,
        config: FinetuneConfig,
        *,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        seed: int,
        baseline: str,
        tvd_threshold: float | None = None,
        cache: UnitTable | None = None,
    ) -> PolicyFineTuning:
        """The stage of a ``training.finetune`` section with ``tvd_threshold`` and ``lam_end``.

        Args:
            config: The section (optimisation settings, ``lam_end``, alpha schedule, credit...).
            pipeline: The routed pipeline.
            router: The pre-trained PaSeR router.
            reward: Reward (its ``lam`` is the schedule's start).
            accuracy: Per-unit accuracy term.
            data: D_FT.
            seed: Random seed.
            baseline: The baseline of stage 2 (``training.policy.baseline``), whose policy this stage continues.
            tvd_threshold: Overrides ``config.tvd_threshold`` (e.g. a sweep of thresholds).
            cache: A prebuilt replay cache of ``data``.

        Raises:
            ValueError: When the section has no ``lam_end``, or no threshold is given.
        """
        threshold = config.tvd_threshold if tvd_threshold is None else tvd_threshold
        if threshold is None or config.lam_end is None:
            raise ValueError(
                f"Expected tvd_threshold and lam_end for TVD-threshold fine-tuning but got {threshold} and {config.lam_end}."
            )
        return cls(
            pipeline,
            router,
            reward,
            accuracy,
            data,
            StageSettings.from_config(config),
            seed,
            tvd_threshold=threshold,
            lam_end=config.lam_end,
            alpha_start=config.alpha_start,
            alpha_end=config.alpha_end,
            baseline=baseline,
            credit=config.credit,
            entropy_coef=config.entropy_coef,
            importance_weighting=config.importance_weighting,
            cache_batch=config.cache_batch,
            cache=cache,
            tvd_on=config.tvd_on,
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["tvd"] = {
            "reference": self.reference,
            "stopped": self.stopped,
            "step": self.step,
            "lam": self.lam,
            "tvd": self.tvd,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        t = state["tvd"]
        self.reference = t["reference"]
        self.stopped, self.step, self.lam, self.tvd = bool(t["stopped"]), int(t["step"]), float(t["lam"]), float(t["tvd"])

    def _policy(self, base: BaseOutput) -> Tensor:
        """The policy as the TVD compares it: greedy decisions one-hot (``tvd_on="decisions"``) or its probabilities."""
        device = next(self.router.parameters()).device
        if not self.pipeline.row_store.holds(base.probs):
            probs = policy_probs(self.router, base)
        else:  # a replay table spilled to disk: chunk by chunk on the router's device, each chunk released
            n, bs = base.probs.shape[0], self.cache_batch
            chunks = []
            for s in range(0, n, bs):
                chunks.append(policy_probs(self.router, base.select(slice(s, s + bs)).to(device)))
                self.pipeline.row_store.release()
            probs = torch.cat(chunks)
        if self.tvd_on == "probs":
            return probs
        return torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        cache = self.build_cache()
        n = cache.base.probs.shape[0]
        if self.reference is None:
            self.reference = self._policy(cache.base)
        steps_per_epoch = -(-n // self.settings.batch_size)
        total = max(self.settings.epochs * steps_per_epoch, 1)
        alpha = linear_schedule(self.alpha_start, self.alpha_end, epoch, self.settings.epochs)
        order = torch.randperm(n, generator=self.generator)
        updates = 0
        for start in range(0, n, self.settings.batch_size):
            if self.stopped or self.tvd_threshold <= 0.0:
                self.stopped = True
                break
            lam = linear_schedule(self.lam_start, self.lam_end, self.step, total)
            before = copy.deepcopy(self.router.state_dict()), copy.deepcopy(self.optimizers["router"].state_dict())
            self.update(order[start : start + self.settings.batch_size], alpha, lam)
            tvd = total_variation(self._policy(cache.base), self.reference)
            if self.dist.broadcast(tvd > self.tvd_threshold):  # every rank stops with rank 0
                self.router.load_state_dict(before[0])
                self.optimizers["router"].load_state_dict(before[1])
                self.stopped = True
                break
            self.step, self.lam, self.tvd, updates = self.step + 1, lam, tvd, updates + 1
        return {
            "routing/tvd": self.tvd,
            "charts/lambda": self.lam,
            "charts/alpha": alpha,
            "charts/updates": float(updates),
            "charts/stopped": float(self.stopped),
        }


@torch.no_grad()
def replay_cache(pipeline: RoutedPipeline, accuracy: AccuracyTerm, data: BaseSplit, batch_size: int = 16) -> UnitTable:
    """The replayed `UnitTable` of ``data`` for policy training, on the data's device.

    `routerkit.replay.build_unit_table` with the accuracy term's classes and ignore index.
    """
    from routerkit.replay import build_unit_table

    device = data.device
    table = build_unit_table(pipeline, accuracy, data, accuracy.num_classes, batch_size, accuracy.ignore_index, device)
    if pipeline.row_store.holds(table.base.probs):  # memory-mapped: stays on the CPU; each batch goes to the device
        return table
    return table.to(device)
