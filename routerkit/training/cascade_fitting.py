"""Fitting a cascade router after pre-training: on replayed outputs of the frozen zoo, then optionally jointly.

`CascadeFitting` builds the `UnitTable` of its split and hands it to the cascade's own fitting
procedure: IDK's threshold search, or optimal stopping's REINFORCE stop policies.
`JointCascadeTraining` (``training.cascade.joint``) then trains an optimal-stopping cascade's
stop policies and the classifiers ``f_1..f_m`` together, live, as Guan et al. (2018) do.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from routerkit.data import BaseSplit
from routerkit.functional import entropy, paid_cost, reinforce_loss, unit_mean, unit_mean_probs
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm
from routerkit.routers.base import Router
from routerkit.routers.cascades import OptimalStoppingCascade
from routerkit.training.base import Stage, check_choice
from routerkit.training.pretraining import frozen_indices
from routerkit.training.reinforce import reward_baseline
from routerkit.training.schedules import StageSettings

if TYPE_CHECKING:
    from routerkit.config.schema import CascadeFitConfig

__all__ = ["JOINT_LOSSES", "CascadeFitting", "JointCascadeTraining"]

#: Per-unit losses of the joint stage: ``"ce"`` (log loss, exact gradient) or ``"acc"`` (sampled prediction, REINFORCE).
JOINT_LOSSES = ("ce", "acc")


class CascadeFitting(Stage):
    """Fit a cascade on replayed outputs of the frozen zoo (one epoch).

    - `IDKCascade`: grid search of the thresholds on ``data`` (the validation split) for
      ``CE + lam * C`` (``method="grid"``), or one offset tuned until the cascade's IoU matches
      ``iou_target`` (``method="iou_match"``).
    - `OptimalStoppingCascade`: REINFORCE on ``data`` (D_RL) with reward ``-loss - alpha * cost``.

    Args:
        pipeline: The routed pipeline (zoo frozen).
        router: The cascade to fit.
        accuracy: Per-unit accuracy term.
        data: The split the cascade is fitted on.
        settings: ``epochs`` (0 skips the fit), ``lr`` and ``batch_size`` of the stop policies.
        seed: Random seed.
        num_classes: Classes K.
        lam: IDK cost weight ``lambda_IDK``.
        method: ``"grid"`` or ``"iou_match"`` (IDK).
        iou_target: Target IoU of ``"iou_match"``.
        grid_steps: Grid points per stage (IDK).
        alpha: Cost weight of the optimal-stopping reward.
        policy_epochs: REINFORCE epochs of the stop policies.
        loss: ``"ce"`` or ``"acc"`` (optimal stopping).
        ignore_index: Label ignored.
    """

    name = "fit_cascade"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
        num_classes: int,
        lam: float = 0.1,
        method: str = "grid",
        iou_target: float | None = None,
        grid_steps: int = 21,
        alpha: float = 0.1,
        policy_epochs: int = 60,
        loss: str = "ce",
        ignore_index: int | None = None,
    ) -> None:
        from routerkit.routers import CascadeRouter

        super().__init__(settings, seed)
        if not isinstance(router, CascadeRouter):
            raise ValueError(f"CascadeFitting needs a cascade router but got {type(router).__name__}.")
        check_choice("method", method, ("grid", "iou_match"))
        if method == "iou_match" and iou_target is None:
            raise ValueError("method 'iou_match' needs an iou_target.")
        self.pipeline, self.router, self.accuracy, self.data = pipeline, router, accuracy, data
        self.num_classes, self.lam, self.method, self.iou_target = num_classes, lam, method, iou_target
        self.grid_steps, self.alpha, self.policy_epochs, self.loss = grid_steps, alpha, policy_epochs, loss
        self.ignore_index = ignore_index
        self.modules["router"] = router

    @classmethod
    def from_config(
        cls,
        config: CascadeFitConfig,
        *,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        num_classes: int,
        seed: int,
        ignore_index: int | None = None,
    ) -> CascadeFitting:
        """The stage of a ``training.cascade`` section.

        Args:
            config: The section (``method``, ``lam``, ``grid_steps``, ``alpha``, ``policy_epochs``...).
            pipeline: The routed pipeline (zoo frozen).
            router: The cascade to fit.
            accuracy: Per-unit accuracy term.
            data: The split ``config.split`` names (validation or D_RL).
            num_classes: Classes K.
            seed: Random seed.
            ignore_index: Label ignored.
        """
        return cls(
            pipeline,
            router,
            accuracy,
            data,
            StageSettings.from_config(config),
            seed,
            num_classes=num_classes,
            lam=config.lam,
            method=config.method,
            iou_target=config.iou_target,
            grid_steps=config.grid_steps,
            alpha=config.alpha,
            policy_epochs=config.policy_epochs,
            loss=config.loss,
            ignore_index=ignore_index,
        )

    def run_epoch(self, epoch: int) -> dict[str, float]:
        from routerkit.replay import build_unit_table
        from routerkit.training.fitters import cascade_fitter

        device = next(iter(self.pipeline.zoo.parameters())).device
        self.same_global_rng()  # under torch.distributed every rank fits the same cascade on the same table
        table = build_unit_table(
            self.pipeline, self.accuracy, self.data, self.num_classes, self.settings.batch_size, self.ignore_index, device
        )
        fit = cascade_fitter(self.router)  # type: ignore[arg-type]
        settings = SimpleNamespace(
            method=self.method,
            lam=self.lam,
            grid_steps=self.grid_steps,
            iou_target=self.iou_target,
            alpha=self.alpha,
            policy_epochs=self.policy_epochs,
            lr=self.settings.lr,
            loss=self.loss,
        )
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        self.router.cpu()
        out = fit(self.router, table, settings, seed)  # type: ignore[arg-type]
        actions = self.router.decide_table(table)  # on the CPU, where the table is
        self.router.to(device)
        out["iou"] = table.mean_iou(actions)
        # charged as live routing charges it: every stage reached and its stop decisions
        out["gflops"] = table.flops(actions, cascade=True, decision_flops=self.router.decision_flops()) / 1e9
        return {f"fit/{k}": float(v) for k, v in out.items()}


def _unit_masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``x [U, ...]`` over each unit's valid pixels (``valid`` of the same shape); 0 for a unit with none."""
    if x.dim() == 1:
        return x * valid.to(x.dtype)
    v = valid.to(x.dtype).flatten(1)
    return (x.flatten(1) * v).sum(1) / v.sum(1).clamp_min(1.0)


def _sample_classes(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One class per pixel drawn from ``probs [U, K, ...]`` with ``generator`` (on the CPU); ``[U, ...]`` long."""
    k = probs.shape[1]
    flat = probs.detach().float().movedim(1, -1).reshape(-1, k)
    u = torch.rand(flat.shape[0], 1, generator=generator).to(flat.device)
    drawn = (flat.cumsum(-1) < u).sum(-1).clamp_max(k - 1)
    return drawn.reshape(probs.shape[:1] + probs.shape[2:])


class JointCascadeTraining(Stage):
    """Guan et al.'s joint training: an optimal-stopping cascade's stop policies and ``f_1..f_m`` together.

    The slides' objective, per unit: ``max E_{k ~ Pi(.|x), y_hat ~ C_k(.|x)} [-L(y_hat, y) - alpha * cost_k]``
    with ``Pi(k|x) = pi_k(s_k) prod_{t<k} (1 - pi_t(s_t))`` and ``cost_k`` the normalised costs of
    the stages ``f_0..f_k`` the unit paid. Per batch the cascade runs live: ``f_0`` gives the state,
    a stop is *sampled* after each stage from ``pi_t`` (the stage's generator), the units that go on
    are run by the next model with gradients, and the last model answers whatever reaches it.
    The gradient of the per-unit objective (mean over the batch's units, the baseline ``b`` the
    batch-mean reward) is, by ``loss``:

    - ``"ce"`` (``L`` the unit's mean cross-entropy ``-log C_k(y|x)``, a log loss of the classifier's
      distribution, so no ``y_hat`` is drawn): ``(R - b) * grad[sum_{t<k} log(1 - pi_t) + log pi_k]
      + grad log C_k(y|x)``. The last term is the exact gradient of ``R = log C_k(y|x) - alpha * cost_k``
      with respect to ``C_k`` for the sampled stop ``k``: cross-entropy on the units that stopped at
      ``f_k``. It stands for the slides' sampled term ``log C_k(y_hat|x) * (R - b)``, whose expectation
      over ``y_hat`` is ``grad E[-L(y_hat, y)]`` (for the 0/1 loss ``grad C_k(y|x) = C_k(y|x) grad log C_k(y|x)``),
      with the log loss in place of the 0/1 loss: no draw, no variance.
    - ``"acc"`` (``L = 1 - accuracy term`` of a prediction ``y_hat`` drawn pixel by pixel from ``C_k``):
      the slides' estimator itself, ``(R - b) * grad[sum_{t<k} log(1 - pi_t) + log pi_k + log C_k(y_hat|x)]``
      with ``log C_k(y_hat|x)`` summed over the unit's valid pixels (high variance on large patches).

    The features ``s_t`` of ``f_t``'s output are not detached: the ``pi_t`` terms reach ``f_t`` as well,
    as in the slides' ``pi_t(s_t(x; theta); theta)``. ``f_0`` is not trained (it computes the router
    state, MC dropout, on whole inputs; its gradient would need differentiable MC passes of every
    input) and neither are frozen models (``frozen``, ``zoo.models[i].train: false``): they run in
    eval mode without gradients and end the stage bit-identical. The trained models run in train
    mode (dropout) with their batch-norm statistics fixed: the units reaching a stage are few and skewed.

    Args:
        pipeline: The routed pipeline; its ``f_1..f_m`` (less ``frozen``) are trained in place.
        router: The optimal-stopping cascade (its stop policies, e.g. from `CascadeFitting`).
        accuracy: Per-unit accuracy term (``loss="acc"``; logged in both modes).
        data: The split it trains on.
        settings: ``epochs``, ``lr`` of the stop policies, ``batch_size`` (inputs), ``weight_decay``.
        seed: Seed of the stage's generator (shuffling, sampled stops and predictions).
        alpha: Cost weight of the reward.
        loss: ``"ce"`` or ``"acc"`` (see above).
        classifier_lr: Adam learning rate of ``f_1..f_m``.
        ignore_index: Label ignored by the loss and the accuracy term.
        frozen: Zoo indices of the models left as they are.
        score_split: After the last epoch, replay the split once through the trained zoo and log the
            greedy cascade's ``fit/iou`` and ``fit/gflops`` (a pass of every model over every unit).

    Raises:
        ValueError: ``router`` is not an `OptimalStoppingCascade`, ``loss`` or ``alpha`` is invalid.
    """

    name = "fit_cascade_joint"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
        alpha: float = 0.1,
        loss: str = "ce",
        classifier_lr: float = 1e-4,
        ignore_index: int | None = None,
        frozen: Collection[int] | None = None,
        score_split: bool = True,
    ) -> None:
        super().__init__(settings, seed)
        if not isinstance(router, OptimalStoppingCascade):
            raise ValueError(f"JointCascadeTraining needs an OptimalStoppingCascade but got {type(router).__name__}.")
        check_choice("loss", loss, JOINT_LOSSES)
        if alpha < 0 or classifier_lr <= 0:
            raise ValueError(f"Expected alpha >= 0 and classifier_lr > 0 but got {alpha} and {classifier_lr}.")
        self.pipeline, self.accuracy, self.data = pipeline, accuracy, data
        self.router: OptimalStoppingCascade = router
        self.alpha, self.loss, self.ignore_index, self.score_split = alpha, loss, ignore_index, score_split
        #: Whether this rank's share of the current batch counts (0: it only repeats an input; see `shard_of`).
        self._share = 1.0
        zoo = pipeline.zoo
        self.frozen = frozen_indices(frozen, len(zoo))
        #: Zoo indices of the classifiers this stage trains (``1..m`` less the frozen ones).
        self.trained = [i for i in range(1, len(zoo)) if i not in self.frozen]
        for i in sorted(self.frozen):
            zoo[i].requires_grad_(False)
        self.modules["router"] = router
        self.optimizers["router"] = torch.optim.Adam(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        for i in self.trained:
            key = self.model_key(i)
            self.modules[key] = zoo[i]
            self.optimizers[key] = torch.optim.Adam(zoo[i].parameters(), lr=classifier_lr, weight_decay=settings.weight_decay)

    @classmethod
    def from_config(
        cls,
        config: CascadeFitConfig,
        *,
        pipeline: RoutedPipeline,
        router: Router,
        accuracy: AccuracyTerm,
        data: BaseSplit,
        seed: int,
        ignore_index: int | None = None,
        frozen: Collection[int] | None = None,
        epochs: int | None = None,
        score_split: bool = True,
    ) -> JointCascadeTraining:
        """The joint stage of a ``training.cascade`` section with ``joint: true``.

        Args:
            config: The section (``joint_epochs``, ``lr``, ``joint_lr``, ``batch_size``, ``alpha``, ``loss``).
            pipeline: The routed pipeline.
            router: The optimal-stopping cascade.
            accuracy: Per-unit accuracy term.
            data: The split ``config.split`` names.
            seed: Random seed.
            ignore_index: Label ignored.
            frozen: Zoo indices of the models left as they are (``zoo.models[i].train: false``).
            epochs: Overrides ``config.joint_epochs`` (``compare.stop_joint_epochs``).
            score_split: Log the greedy cascade's scores on ``data`` after the last epoch.
        """
        settings = StageSettings(
            config.joint_epochs if epochs is None else epochs, config.lr, config.batch_size, config.weight_decay
        )
        return cls(
            pipeline,
            router,
            accuracy,
            data,
            settings,
            seed,
            alpha=config.alpha,
            loss=config.loss,
            classifier_lr=config.joint_lr,
            ignore_index=ignore_index,
            frozen=frozen,
            score_split=score_split,
        )

    def model_key(self, index: int) -> str:
        """The key of zoo model ``index`` among the stage's modules and optimisers (``"model:<name>"``)."""
        return f"model:{self.pipeline.zoo.names[index]}"

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    def _set_modes(self) -> None:
        zoo = self.pipeline.zoo
        zoo.base.eval()
        self.router.train()
        for i in sorted(self.frozen):
            zoo[i].eval()  # no dropout draws, no batch-norm statistics updated
        for i in self.trained:
            zoo[i].train()
            for m in zoo[i].modules():  # the units reaching a stage are few and skewed: keep the running statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def batch_objective(self, images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The surrogate loss of one batch (its gradient is the estimator of the class docstring) and its scalars.

        Args:
            images: ``[B, ...]`` inputs on the zoo's device.
            targets: ``[B, ...]`` labels.

        Returns:
            The loss to minimise and the batch's scalars (mean reward, loss, accuracy, stop shares).
        """
        zoo, part, router = self.pipeline.zoo, self.pipeline.partitioner, self.router
        num_models, device = len(zoo), images.device
        costs = self.pipeline.costs.detach().to(device).float()
        with torch.no_grad():
            base = self.pipeline.base_output(images, router)  # f_0 as live routing runs it (MC dropout)
        units, unit_targets = part.split_inputs(images), part.split(targets)
        valid = torch.ones_like(unit_targets, dtype=torch.bool)
        if self.ignore_index is not None:
            valid = unit_targets != self.ignore_index
        safe = unit_targets.masked_fill(~valid, 0)
        n = units.shape[0]
        log_pi = torch.zeros(n, device=device)  # sum_{t<k} log(1 - pi_t) + log pi_k of the sampled path
        log_c = torch.zeros(n, device=device)  # "acc": log C_k(y_hat|x) of the sampled prediction
        unit_loss = torch.zeros(n, device=device)  # L of the model that answered (with gradients)
        unit_acc = torch.zeros(n, device=device)
        final = torch.full((n,), num_models - 1, dtype=torch.long, device=device)
        reached = torch.arange(n, device=device)
        for t in range(num_models):
            if t == 0:
                probs = part.split(base.probs).float()
                log_probs = probs.clamp_min(1e-12).log()
                uncertainty = part.split(base.uncertainty.unsqueeze(1)).squeeze(1).float()
            else:
                log_probs = torch.log_softmax(self.pipeline.executor.forward(zoo[t], units[reached]).float(), 1)
                probs = log_probs.exp()
                uncertainty = entropy(probs)
            if t < num_models - 1:
                logits = router.stop_logits(t, unit_mean_probs(probs), unit_mean(uncertainty))
                stop = torch.rand(logits.shape, generator=self.draws).to(device) < torch.sigmoid(logits.detach())
                chosen = torch.where(stop, nn.functional.logsigmoid(logits), nn.functional.logsigmoid(-logits))
                log_pi = log_pi.index_add(0, reached, chosen)
            else:
                stop = torch.ones(reached.shape[0], dtype=torch.bool, device=device)
            idx = reached[stop]
            if idx.numel():
                final[idx] = t
                lp, tg, vd = log_probs[stop], safe[idx], valid[idx]
                nll = -lp.gather(1, tg.unsqueeze(1)).squeeze(1)
                unit_loss = unit_loss.index_add(0, idx, _unit_masked_mean(nll, vd))
                if self.loss == "acc":
                    drawn = _sample_classes(lp.exp(), self.draws)
                    picked = lp.gather(1, drawn.unsqueeze(1)).squeeze(1) * vd.to(lp.dtype)
                    log_c = log_c.index_add(0, idx, picked.flatten(1).sum(1) if picked.dim() > 1 else picked)
                    onehot = nn.functional.one_hot(drawn, lp.shape[1]).movedim(-1, 1).float()
                    acc = self.accuracy(onehot, unit_targets[idx])
                else:
                    acc = self.accuracy(lp.detach().exp(), unit_targets[idx])
                unit_acc[idx] = torch.nan_to_num(acc.float().to(device), nan=0.0)  # an all-ignored unit counts 0
            reached = reached[~stop]
            if reached.numel() == 0:
                break
        paid = paid_cost(final, costs, cascade=True)
        per_unit_loss = unit_loss.detach() if self.loss == "ce" else 1.0 - unit_acc
        reward = -per_unit_loss - self.alpha * paid
        advantage = reward - reward_baseline("mean", reward, mean=partial(self.dist.mean, weight=self._share))
        if self.loss == "ce":
            objective = reinforce_loss(log_pi, advantage) + unit_loss.mean()
        else:
            objective = reinforce_loss(log_pi + log_c, advantage)
        logs = {
            "charts/mean_reward": float(reward.mean()),
            "losses/ce": float(unit_loss.detach().mean()),
            "charts/accuracy": float(unit_acc.mean()),
            "charts/cost": float(paid.mean()),
        }
        counts = torch.bincount(final, minlength=num_models).float() / n
        logs.update({f"charts/stop_at_{name}": float(c) for name, c in zip(zoo.names, counts, strict=True)})
        return objective, logs

    def run_epoch(self, epoch: int) -> dict[str, float]:
        zoo = self.pipeline.zoo
        device = next(iter(zoo.parameters())).device
        sums: dict[str, float] = {}
        n, bs = len(self.data), self.settings.batch_size
        batches = self.data.batches(bs, shuffle=True, generator=self.generator, shard=self.dist.part)
        for step, (images, targets) in enumerate(batches):
            images, targets = images.to(device), targets.to(device)
            total = min(bs, n - step * bs)
            self._share = self.dist.counts(total)  # 0: this rank only repeats an input
            self._set_modes()
            objective, logs = self.batch_objective(images, targets)
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            # Which units reach a classifier depends on the sampled stops, so a rank may run one on none:
            # gradients are all-reduced by hand (summed), each rank's mean weighted by its share of the batch.
            (objective * (self.dist.local_count(total) / total)).backward()  # 1 in one process
            for optimizer in self.optimizers.values():
                self.dist.sync_gradients(p for group in optimizer.param_groups for p in group["params"])
                optimizer.step()
            logs["losses/objective"] = float(objective.detach())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * self.dist.local_count(total)
        zoo.eval()
        self.router.eval()
        out = {k: v / len(self.data) for k, v in self.dist.sum_by_key(sums).items()}  # every rank's inputs
        if self.score_split and epoch == self.settings.epochs - 1:  # the greedy cascade, as CascadeFitting reports it
            out.update(self._greedy_scores(device))
        return out

    @torch.no_grad()
    def _greedy_scores(self, device: torch.device) -> dict[str, float]:
        from routerkit.replay import build_unit_table

        self.same_global_rng()
        table = build_unit_table(
            self.pipeline,
            self.accuracy,
            self.data,
            self.router.num_classes,
            self.settings.batch_size,
            self.ignore_index,
            device,
        )
        self.router.cpu()
        actions = self.router.decide_table(table)
        self.router.to(device)
        flops = table.flops(actions, cascade=True, decision_flops=self.router.decision_flops())
        return {"fit/iou": table.mean_iou(actions), "fit/gflops": flops / 1e9}
