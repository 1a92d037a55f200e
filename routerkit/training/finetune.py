"""Stage 3 of PaSeR's Algorithm 1: the large models and the policy fine-tuned together on D_FT.

Unlike stage 2 nothing is replayed: the executor runs each large model on the units the policy
sends it, with gradients. (The policy-only fine-tuning stopped at a TVD threshold is
`routerkit.training.policy.PolicyFineTuning`.)
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from routerkit.data import BaseSplit
from routerkit.functional import explore_exploit_sample
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward
from routerkit.routers.paser import PaSeRRouter
from routerkit.training.base import Stage, check_choice, valid_count
from routerkit.training.distributed import Method
from routerkit.training.model_quality import recompute_bn_statistics
from routerkit.training.pretraining import _ce, frozen_indices
from routerkit.training.reinforce import BASELINES, importance_weights, policy_gradient_loss, reward_baseline
from routerkit.training.schedules import StageSettings, linear_schedule

if TYPE_CHECKING:
    from routerkit.config.schema import FinetuneConfig

__all__ = ["JointFineTuning"]


class JointFineTuning(Stage):
    """Stage 3: large models and policy together on D_FT (alpha ``alpha_start -> alpha_end``).

    Per batch: ``f_0`` (frozen) gives the state, the policy samples a model per unit with the
    explore/exploit rule, the executor runs each large model on its units *with gradients*;
    each large model takes a cross-entropy step on the units routed to it (or on all units
    with ``large_on="all"``), and the policy a REINFORCE step on the realised rewards.
    Batch-norm layers of the large models keep their running statistics (``freeze_bn``): the
    units routed to one model are few and skewed, and would corrupt them.

    A frozen large model (``frozen``, ``zoo.models[i].train: false``) still answers the units
    routed to it, in eval mode and without gradients (``requires_grad`` off), but gets no
    optimiser, no step and no batch-norm recomputation: its weights end the stage bit-identical.
    With every large model frozen only the policy trains.
    """

    name = "finetune"

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
        alpha_start: float = 0.95,
        alpha_end: float = 1.0,
        baseline: str = "mean",
        credit: str = "unit",
        entropy_coef: float = 0.0,
        large_lr: float | None = None,
        large_on: str = "routed",
        ignore_index: int | None = None,
        freeze_bn: bool = True,
        importance_weighting: bool = True,
        frozen: Collection[int] | None = None,
    ) -> None:
        super().__init__(settings, seed)
        check_choice("large_on", large_on, ("routed", "all"))
        check_choice("baseline", baseline, BASELINES)
        self.pipeline, self.router, self.reward, self.accuracy, self.data = pipeline, router, reward, accuracy, data
        self.alpha_start, self.alpha_end, self.baseline, self.credit = alpha_start, alpha_end, baseline, credit
        self.entropy_coef, self.large_on, self.ignore_index = entropy_coef, large_on, ignore_index
        self.freeze_bn, self.importance_weighting = freeze_bn, importance_weighting
        self.modules["router"] = router
        self.optimizers["router"] = torch.optim.Adam(router.parameters(), lr=settings.lr)
        self.frozen = frozen_indices(frozen, len(pipeline.zoo))
        #: Zoo indices of the large models this stage trains (``1..m`` less the frozen ones).
        self.trained = [i for i in range(1, len(pipeline.zoo)) if i not in self.frozen]
        for i in sorted(self.frozen):
            pipeline.zoo[i].requires_grad_(False)
        for i in self.trained:
            key = pipeline.zoo.names[i]
            self.modules[key] = pipeline.zoo[i]
            self.optimizers[key] = torch.optim.Adam(pipeline.zoo[i].parameters(), lr=large_lr or settings.lr)

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
        ignore_index: int | None = None,
        frozen: Collection[int] | None = None,
    ) -> JointFineTuning:
        """The stage of a ``training.finetune`` section (without ``tvd_threshold``).

        Args:
            config: The section (optimisation settings, alpha schedule, baseline, ``large_lr``, ``large_on``...).
            pipeline: The routed pipeline.
            router: The PaSeR router (trained by stage 2).
            reward: Reward function.
            accuracy: Per-unit accuracy term.
            data: D_FT.
            seed: Random seed.
            ignore_index: Label ignored by the large models' loss.
            frozen: Zoo indices of the models left as they are (``zoo.models[i].train: false``).
        """
        return cls(
            pipeline,
            router,
            reward,
            accuracy,
            data,
            StageSettings.from_config(config),
            seed,
            alpha_start=config.alpha_start,
            alpha_end=config.alpha_end,
            baseline=config.baseline,
            credit=config.credit,
            entropy_coef=config.entropy_coef,
            large_lr=config.large_lr,
            large_on=config.large_on,
            ignore_index=ignore_index,
            freeze_bn=config.freeze_bn,
            importance_weighting=config.importance_weighting,
            frozen=frozen,
        )

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        part, zoo = self.pipeline.partitioner, self.pipeline.zoo
        costs = self.pipeline.costs.to(next(zoo.base.parameters()).device)
        alpha = linear_schedule(self.alpha_start, self.alpha_end, epoch, self.settings.epochs)
        zoo.base.eval()
        sums: dict[str, float] = {}
        n, bs = len(self.data), self.settings.batch_size
        batches = self.data.batches(bs, shuffle=True, generator=self.generator, shard=self.dist.part)
        for step, (images, targets) in enumerate(batches):
            total = min(bs, n - step * bs)
            base = self.pipeline.estimator(zoo.base, images)
            self.router.train()
            logits = self.trainable("router", Method(self.router, "logits"))(base)
            actions = explore_exploit_sample(logits, alpha, self.draws)
            for i in sorted(self.frozen):
                zoo[i].eval()  # no dropout draws, no batch-norm statistics updated
            for i in self.trained:
                zoo[i].train()
                if self.freeze_bn:  # routed subsets are small and skewed: keep the running statistics
                    for m in zoo[i].modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
            units, unit_targets = part.split_inputs(images), part.split(targets)
            bf16 = torch.autocast(units.device.type, dtype=torch.bfloat16, enabled=self.settings.precision == "bf16")
            with bf16:  # the large models' forwards (settings.precision); the losses are float32
                execution = self.pipeline.executor.run(units, actions, part.split(base.probs))
            # Large models: cross-entropy on their units. Which units a model gets depends on the
            # sampled actions, so under torch.distributed a rank may have none: its gradients are
            # all-reduced by hand (DDP would wait for a forward that never comes), each rank's mean
            # weighted by its share of the units all ranks routed to the model.
            logs: dict[str, float] = {}
            weight = self.dist.counts(total)  # 0: this rank only repeats an input
            for i in self.trained:
                key = zoo.names[i]
                z: Tensor | None = None
                idx = torch.zeros(0, dtype=torch.long)
                answered = i in execution.logits  # the model answered units of this batch (on this rank)
                if self.dist.enabled and self.large_on == "all":  # on some rank: as one process decides per batch
                    answered = self.dist.all_sum(float(answered)) > 0
                if answered:
                    if self.large_on == "all":
                        with bf16:
                            z, idx = part.crop(zoo[i](units)), torch.arange(units.shape[0])
                    else:
                        idx, z = execution.logits[i]
                # each rank's mean loss weighted by its share of the (valid) pixels all ranks routed to the model
                count = valid_count(unit_targets[idx], self.ignore_index) * weight if self.dist.enabled else float(idx.numel())
                routed = self.dist.all_sum(count)
                if routed == 0:
                    continue
                self.optimizers[key].zero_grad(set_to_none=True)
                if z is not None and count:
                    loss_i = _ce(z.float(), unit_targets[idx], self.ignore_index)
                    (loss_i * (count / routed)).backward()  # 1 in one process
                    logs[f"losses/ce_{key}"] = float(loss_i.detach())
                self.dist.sync_gradients(zoo[i].parameters())
                self.optimizers[key].step()
            # Policy: REINFORCE on realised per-unit rewards.
            with torch.no_grad():
                acc_chosen = self.accuracy(execution.unit_probs, unit_targets).reshape(actions.shape)
                acc_base = self.accuracy(part.split(base.probs), unit_targets).reshape(actions.shape)
                rewards = self.reward(acc_chosen, acc_base, costs[actions])
            weights = importance_weights(logits, actions, alpha) if self.importance_weighting else None
            baseline = reward_baseline(self.baseline, rewards, None, mean=partial(self.dist.mean, weight=weight))
            loss, pg_logs = policy_gradient_loss(logits, actions, rewards, baseline, self.credit, self.entropy_coef, weights)
            self.optimizers["router"].zero_grad(set_to_none=True)
            (loss * self.dist.loss_scale(total)).backward()
            self.optimizers["router"].step()
            logs.update(pg_logs)
            logs["charts/mean_reward"] = float(rewards.mean())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * self.dist.local_count(total)
        out = {k: v / n for k, v in self.dist.sum_by_key(sums).items()}  # every rank's inputs
        out["charts/alpha"] = alpha
        if not self.freeze_bn:  # the running averages saw only the skewed routed subsets: recompute them on D_FT
            for i in self.trained:
                recompute_bn_statistics(zoo[i], (part.split_inputs(x) for x, _ in self.data.batches(self.settings.batch_size)))
        return out
