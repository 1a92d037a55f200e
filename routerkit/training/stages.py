"""The three training stages of PaSeR's Algorithm 1, as resumable epoch-by-epoch stages.

1. `LargeModelPretraining`: each costlier model ``f_1..f_m`` on units of D_PT (cross-entropy).
2. `BaseModelPretraining`: ``f_0`` on whole inputs of D_PT, cross-entropy plus
   ``beta`` x MSE distillation to the largest model's logits (Eq. 1).
3. `PolicyTraining`: REINFORCE on D_RL. Task models are frozen, so their per-unit
   accuracies are computed once and *replayed*; an epoch then costs only the policy.
4. `JointFineTuning`: large models and policy together on D_FT.

Each stage implements ``run_epoch(epoch) -> dict of logged scalars``; callers use
``train_epoch(epoch)``, which first sets the epoch's learning rate (``lr_schedule``) and then runs
it. ``state_dict()`` / ``load_state_dict()`` (modules + optimisers) let the runner checkpoint after
every epoch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerkit.data import Split
from routerkit.functional import explore_exploit_sample, linear_schedule, reinforce_loss, total_variation_distance
from routerkit.pipeline import RoutedPipeline
from routerkit.rewards import AccuracyTerm, Reward
from routerkit.routers.base import Router
from routerkit.routers.paser import PaSeRRouter
from routerkit.training.model_quality import Quality, model_quality, recompute_bn_statistics


def _augment(images: Tensor, targets: Tensor, generator: torch.Generator, *extra: Tensor) -> tuple[Tensor, ...]:
    """Random flips of a batch.

    Segmentation (``[N, H, W]`` targets): horizontal / vertical flips of images, masks and
    ``extra`` (same flip per batch). Image classification (``[N]`` labels): the standard CIFAR
    augmentation, a per-sample horizontal flip and a random crop after zero-padding by 1/8 of
    the side; labels and ``extra`` are unchanged.
    """
    out = (images, targets, *extra)
    if images.dim() == 4 and targets.dim() == 1:
        return (_flip_and_crop(images, generator), targets, *extra)
    if images.dim() != 4 or targets.dim() != 3:
        return out
    if bool(torch.rand((), generator=generator) < 0.5):
        out = tuple(t.flip(-1) for t in out)
    if bool(torch.rand((), generator=generator) < 0.5):
        out = tuple(t.flip(-2) for t in out)
    return out


def _flip_and_crop(images: Tensor, generator: torch.Generator) -> Tensor:
    n, _, h, w = images.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    pad = max(h, w) // 8
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # [N, h, 1]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # [N, 1, w]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # one gather for the whole batch


def _ce(logits: Tensor, targets: Tensor, ignore_index: int | None) -> Tensor:
    """Cross-entropy; zero (still in the graph) when every target is ignored, instead of NaN."""
    if ignore_index is not None and not bool((targets != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=-100 if ignore_index is None else ignore_index)


@dataclass
class StageSettings:
    """Common optimisation settings of a stage."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    #: ``"constant"`` or ``"cosine"`` (each optimiser's rate annealed from its initial value to 0
    #: over the stage's epochs, set at the start of every epoch).
    lr_schedule: str = "constant"


@dataclass
class PretrainChecks:
    """What a pre-training stage does after every epoch, per model it trains.

    Attributes:
        validation: Split scored after every epoch (``None``: no validation, no best epoch).
        num_classes: Classes K of the task.
        precise_bn: Recompute exact batch-norm statistics on the stage's training data before
            scoring (see `routerkit.training.model_quality`); without it the running averages of a
            short training can leave a model far worse in eval mode than in training.
        bn_batches: At most this many training batches for those statistics (``None``: all).
        keep_best: At the stage's end, each model takes the weights of its best validation epoch.
        batch_size: Inputs per batch when scoring.
        warn_gap: Warn when a model's eval-mode validation accuracy is more than this far below its
            accuracy with batch statistics.
    """

    validation: Split | None = None
    num_classes: int = 0
    precise_bn: bool = True
    bn_batches: int | None = None
    keep_best: bool = True
    batch_size: int = 16
    warn_gap: float = 0.05


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the initial learning rate during ``epoch`` (0-based) of ``epochs``."""
    if schedule == "constant" or epochs <= 1:
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES} but got {schedule!r}.")


def global_rng_state() -> dict[str, Tensor]:
    """torch's global generator states: the CPU one and, where CUDA is initialised, the current device's.

    Dropout (stage 1, MC-dropout states) draws from them; the runner checkpoints them so that a
    resumed run continues with the same draws.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_global_rng_state(state: dict[str, Tensor]) -> None:
    """Restore states saved by `global_rng_state`."""
    torch.set_rng_state(state["cpu"].cpu().to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8))


class Stage:
    """Base of the resumable stages: named optimisers and modules, epoch loop hooks."""

    name: str = "stage"

    def __init__(self, settings: StageSettings, seed: int) -> None:
        if settings.epochs < 0 or settings.batch_size < 1 or settings.lr <= 0:
            raise ValueError(f"Expected epochs >= 0, batch_size >= 1 and lr > 0 for stage {self.name!r} but got {settings}.")
        if settings.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES} for stage {self.name!r} but got {settings.lr_schedule!r}.")
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.modules: dict[str, nn.Module] = {}
        self._initial_lrs: dict[str, list[float]] = {}
        #: Messages for the user (a model far worse in eval mode, below f_0, ...); the runner prints them.
        self.warnings: list[str] = []

    def run_epoch(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Set the epoch's learning rates from ``settings.lr_schedule``, then `run_epoch`."""
        self._record_initial_lrs()
        factor = lr_factor(self.settings.lr_schedule, epoch, self.settings.epochs)
        for key, optimizer in self.optimizers.items():
            for group, initial in zip(optimizer.param_groups, self._initial_lrs[key], strict=True):
                group["lr"] = initial * factor
        return self.run_epoch(epoch)

    def _record_initial_lrs(self) -> None:
        """Remember each optimiser's rates as built (before a resume overwrites them with scheduled ones)."""
        for key, optimizer in self.optimizers.items():
            self._initial_lrs.setdefault(key, [float(g["lr"]) for g in optimizer.param_groups])

    def num_steps(self) -> int:
        """Optimisation steps per epoch (for progress bars)."""
        return 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._record_initial_lrs()
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.generator.set_state(state["generator"].to(torch.uint8))


class _CheckedPretraining(Stage):
    """A pre-training stage with per-epoch batch-norm recalibration, validation and best-epoch selection.

    Subclasses call `check_models` at the end of `run_epoch` with, per trained model, its key, its
    forward on whole inputs and the training batches its batch-norm statistics come from.
    The best weights (by validation mean IoU; accuracy for classification) are part of the stage's
    state, so a resumed stage selects the same epoch.
    """

    checks: PretrainChecks

    def _init_checks(self, checks: PretrainChecks | None) -> None:
        self.checks = checks or PretrainChecks()
        if self.checks.validation is not None and self.checks.num_classes < 2:
            raise ValueError(f"Expected num_classes >= 2 with a validation split but got {self.checks.num_classes}.")
        self.best: dict[str, dict[str, Any]] = {}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["best"] = self.best
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = {k: dict(v) for k, v in state.get("best", {}).items()}

    def _score(self, quality: Quality) -> float:
        assert self.checks.validation is not None
        return quality.accuracy if self.checks.validation.targets.dim() == 1 else quality.mean_iou

    def check_models(
        self,
        epoch: int,
        models: list[tuple[str, nn.Module, Callable[[Tensor], Tensor], Callable[[], Iterable[Tensor]]]],
    ) -> dict[str, float]:
        """Recalibrate, validate and (at the last epoch) restore the best weights of each model."""
        c, logs = self.checks, {}
        last = epoch == self.settings.epochs - 1
        for key, model, forward, bn_inputs in models:
            if c.precise_bn:
                recompute_bn_statistics(model, bn_inputs(), c.bn_batches)
            if c.validation is None:
                continue
            q = model_quality(forward, model, c.validation, c.num_classes, self.ignore_index, c.batch_size)
            score = self._score(q)
            logs[f"val/miou_{key}"], logs[f"val/acc_{key}"] = q.mean_iou, q.accuracy
            best = self.best.get(key)
            if c.keep_best and (best is None or score > float(best["score"])):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                self.best[key] = {"score": score, "epoch": epoch, "state": state}
            if not last:
                continue
            if c.keep_best and key in self.best and int(self.best[key]["epoch"]) != epoch:
                model.load_state_dict(self.best[key]["state"])
                q = model_quality(forward, model, c.validation, c.num_classes, self.ignore_index, c.batch_size)
            if c.keep_best and key in self.best:
                logs[f"val/best_epoch_{key}"] = float(self.best[key]["epoch"])
            batch_stats = model_quality(forward, model, c.validation, c.num_classes, self.ignore_index, c.batch_size, True)
            if batch_stats.accuracy - q.accuracy > c.warn_gap:
                self.warnings.append(
                    f"model {key!r}: validation accuracy {100 * q.accuracy:.1f}% in eval mode but "
                    f"{100 * batch_stats.accuracy:.1f}% with batch statistics: its batch-norm running statistics do not "
                    "fit its weights" + ("" if c.precise_bn else " (set precise_bn: true to recompute them)") + "."
                )
        return logs

    ignore_index: int | None


class LargeModelPretraining(_CheckedPretraining):
    """Stage 1a: each costlier model on the units of D_PT with cross-entropy.

    Args:
        pipeline: The routed pipeline.
        data: D_PT.
        settings: Optimisation settings.
        seed: Random seed.
        ignore_index: Label ignored by the loss.
        augment: Random flips of segmentation batches.
        model_data: Per-model training data overriding ``data`` (``{model index: split}``), for
            zoos of specialists each trained on its own kind of input.
        checks: Per-epoch batch-norm recalibration, validation and best-epoch selection.
    """

    name = "pretrain_large"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        data: Split,
        settings: StageSettings,
        seed: int,
        ignore_index: int | None = None,
        augment: bool = True,
        model_data: dict[int, Split] | None = None,
        checks: PretrainChecks | None = None,
    ) -> None:
        super().__init__(settings, seed)
        self._init_checks(checks)
        self.pipeline, self.data, self.ignore_index, self.augment = pipeline, data, ignore_index, augment
        self.model_data = dict(model_data or {})
        for i, part in self.model_data.items():
            if len(part) == 0:
                raise ValueError(f"Expected training data for model {pipeline.zoo.names[i]!r} but its subset is empty.")
        for i in range(1, len(pipeline.zoo)):
            key = pipeline.zoo.names[i]
            self.modules[key] = pipeline.zoo[i]
            self.optimizers[key] = torch.optim.Adam(
                pipeline.zoo[i].parameters(), lr=settings.lr, weight_decay=settings.weight_decay
            )

    def num_steps(self) -> int:
        sizes = [len(self.model_data.get(i, self.data)) for i in range(1, len(self.pipeline.zoo))]
        return sum(-(-n // self.settings.batch_size) for n in sizes)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        part = self.pipeline.partitioner
        logs: dict[str, float] = {}
        for i in range(1, len(self.pipeline.zoo)):
            model, key = self.pipeline.zoo[i], self.pipeline.zoo.names[i]
            model.train()
            total, count = 0.0, 0
            data = self.model_data.get(i, self.data)
            for images, targets in data.batches(self.settings.batch_size, shuffle=True, generator=self.generator):
                if self.augment:
                    images, targets = _augment(images, targets, self.generator)[:2]
                units, unit_targets = part.split(images), part.split(targets)
                loss = _ce(model(units), unit_targets, self.ignore_index)
                self.optimizers[key].zero_grad(set_to_none=True)
                loss.backward()
                self.optimizers[key].step()
                total, count = total + float(loss.detach()) * len(images), count + len(images)
            logs[f"losses/ce_{key}"] = total / max(count, 1)
        logs.update(self.check_models(epoch, [self._checked(i) for i in range(1, len(self.pipeline.zoo))]))
        return logs

    def _checked(self, i: int) -> tuple[str, nn.Module, Callable[[Tensor], Tensor], Callable[[], Iterable[Tensor]]]:
        part, model = self.pipeline.partitioner, self.pipeline.zoo[i]
        data = self.model_data.get(i, self.data)

        def forward(images: Tensor) -> Tensor:
            return part.stitch(model(part.split(images)), images.shape[0])

        def bn_inputs() -> Iterable[Tensor]:
            return (part.split(images) for images, _ in data.batches(self.settings.batch_size))

        return self.pipeline.zoo.names[i], model, forward, bn_inputs


class BaseModelPretraining(_CheckedPretraining):
    """Stage 1b: ``f_0`` on whole inputs, CE + ``beta`` x MSE to the largest model's logits."""

    name = "pretrain_base"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        data: Split,
        settings: StageSettings,
        seed: int,
        beta: float = 0.01,
        ignore_index: int | None = None,
        augment: bool = True,
        teacher_batch: int = 16,
        checks: PretrainChecks | None = None,
    ) -> None:
        super().__init__(settings, seed)
        self._init_checks(checks)
        if beta < 0:
            raise ValueError(f"Expected beta >= 0 but got {beta}.")
        self.pipeline, self.data, self.beta, self.ignore_index, self.augment = pipeline, data, beta, ignore_index, augment
        self.teacher_batch = teacher_batch
        self.modules["f0"] = pipeline.zoo.base
        self.optimizers["f0"] = torch.optim.Adam(
            pipeline.zoo.base.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        self._teacher: Tensor | None = None

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    @torch.no_grad()
    def teacher_logits(self) -> Tensor:
        """Logits of the largest model ``f_m`` on D_PT (run on its units, stitched), computed once."""
        if self._teacher is None:
            part, teacher = self.pipeline.partitioner, self.pipeline.zoo[len(self.pipeline.zoo) - 1]
            teacher.eval()
            chunks = []
            for images, _ in self.data.batches(self.teacher_batch):
                chunks.append(part.stitch(teacher(part.split(images)), images.shape[0]))
            self._teacher = torch.cat(chunks)
        return self._teacher

    def run_epoch(self, epoch: int) -> dict[str, float]:
        model = self.pipeline.zoo.base
        teacher = self.teacher_logits() if self.beta > 0 else None
        model.train()
        totals = {"ce": 0.0, "kd": 0.0}
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.settings.batch_size):
            idx = order[start : start + self.settings.batch_size]
            images, targets = self.data.images[idx], self.data.targets[idx]
            extra: tuple[Tensor, ...] = (teacher[idx],) if teacher is not None else ()
            if self.augment:
                images, targets, *rest = _augment(images, targets, self.generator, *extra)
                extra = tuple(rest)
            logits = model(images)
            ce = _ce(logits, targets, self.ignore_index)
            kd = F.mse_loss(logits, extra[0]) if extra else logits.new_zeros(())
            loss = ce + self.beta * kd
            self.optimizers["f0"].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers["f0"].step()
            totals["ce"] += float(ce.detach()) * len(idx)
            totals["kd"] += float(kd.detach()) * len(idx)
        logs = {"losses/ce_f0": totals["ce"] / n, "losses/kd_f0": totals["kd"] / n}
        bn_inputs = lambda: (images for images, _ in self.data.batches(self.settings.batch_size))  # noqa: E731
        logs.update(self.check_models(epoch, [("f0", model, model, bn_inputs)]))
        if epoch == self.settings.epochs - 1 and self.checks.validation is not None:
            self._compare_with_costlier(logs.get("val/miou_f0"), logs.get("val/acc_f0"))
        return logs

    def _compare_with_costlier(self, miou: float | None, acc: float | None) -> None:
        """Warn about costlier models that score below ``f_0`` on validation: nothing to route to."""
        c, part, zoo = self.checks, self.pipeline.partitioner, self.pipeline.zoo
        if miou is None or acc is None or c.validation is None:
            return
        base = acc if c.validation.targets.dim() == 1 else miou
        metric = "accuracy" if c.validation.targets.dim() == 1 else "mean IoU"
        for i in range(1, len(zoo)):
            model = zoo[i]

            def forward(images: Tensor, model: nn.Module = model) -> Tensor:
                return part.stitch(model(part.split(images)), images.shape[0])

            score = self._score(model_quality(forward, model, c.validation, c.num_classes, self.ignore_index, c.batch_size))
            if score < base:
                self.warnings.append(
                    f"model {zoo.names[i]!r} (costlier) scores a validation {metric} of {score:.4f}, below the base model "
                    f"{zoo.names[0]!r} ({base:.4f}): a router gains nothing by sending units to it. Train it longer or "
                    "check its settings."
                )


def _baseline(kind: str, rewards: Tensor, expected: Tensor | None) -> Tensor:
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "expected" and expected is not None:
        return expected
    return rewards.mean().expand_as(rewards)


def importance_weights(logits: Tensor, actions: Tensor, alpha: float) -> Tensor:
    """``pi(a) / mu(a)`` for actions drawn by the explore/exploit rule ``mu = alpha * pi + (1 - alpha) / A``.

    Without this correction the uniformly explored actions bias the policy gradient: a bad
    explored action pushes probability *towards the current greedy action*, which locks the
    policy into whatever it prefers early (see docs/concepts.md).
    """
    probs = torch.softmax(logits.detach().float(), -1)
    chosen = probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return chosen / (alpha * chosen + (1.0 - alpha) / logits.shape[-1])


def _policy_step(
    router: PaSeRRouter,
    logits: Tensor,
    actions: Tensor,
    rewards: Tensor,
    baseline: Tensor,
    credit: str,
    entropy_coef: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """REINFORCE loss for per-unit actions (cleanrl-style named quantities)."""
    log_probs_all = torch.log_softmax(logits, dim=-1)
    log_probs = log_probs_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B, P]
    advantages = rewards - baseline
    if credit == "input":  # the paper's form: every unit's log-prob weighted by the input's total reward
        advantages = advantages.sum(1, keepdim=True).expand_as(advantages)
    if weights is not None:
        advantages = advantages * weights
    pg_loss = reinforce_loss(log_probs, advantages)
    entropy_bonus = -(log_probs_all.exp() * log_probs_all).sum(-1).mean()
    loss = pg_loss - entropy_coef * entropy_bonus
    return loss, {"losses/pg_loss": float(pg_loss.detach()), "losses/entropy": float(entropy_bonus.detach())}


class PolicyTraining(Stage):
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
        cache: An already built ``(probs, uncertainty, accuracy)`` replay cache of ``data`` (e.g.
            from a `UnitTable`); built on first use when ``None``.
    """

    name = "policy"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: Split,
        settings: StageSettings,
        seed: int,
        alpha_start: float = 0.7,
        alpha_end: float = 0.95,
        baseline: str = "expected",
        credit: str = "unit",
        entropy_coef: float = 0.0,
        cache_batch: int = 16,
        importance_weighting: bool = True,
        estimator: str = "reinforce",
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(settings, seed)
        if baseline not in ("none", "mean", "expected"):
            raise ValueError(f"Expected baseline 'none', 'mean' or 'expected' but got {baseline!r}.")
        if credit not in ("unit", "input"):
            raise ValueError(f"Expected credit 'unit' or 'input' but got {credit!r}.")
        if estimator not in ("reinforce", "all_actions"):
            raise ValueError(f"Expected estimator 'reinforce' or 'all_actions' but got {estimator!r}.")
        self.importance_weighting, self.estimator = importance_weighting, estimator
        self.pipeline, self.router, self.reward, self.accuracy, self.data = pipeline, router, reward, accuracy, data
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.baseline, self.credit, self.entropy_coef, self.cache_batch = baseline, credit, entropy_coef, cache_batch
        self.modules["router"] = router
        self.optimizers["router"] = torch.optim.Adam(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = cache
        #: Global generator states the cache was built from (so a resumed stage rebuilds the same one).
        self._cache_rng: dict[str, Tensor] | None = None

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    @torch.no_grad()
    def build_cache(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(probs [N, K, ...], uncertainty [N, ...], accuracy [N, P, m + 1])`` of D_RL, computed once.

        The MC-dropout state draws from the global generators. Their state before the first build
        is kept in `state_dict`; a stage restored from it rebuilds the identical cache, without
        disturbing the generators' current state.
        """
        if self._cache is not None:
            return self._cache
        if self._cache_rng is None:
            self._cache_rng = global_rng_state()
            self._cache = replay_cache(self.pipeline, self.accuracy, self.data, self.cache_batch)
        else:
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

    def run_epoch(self, epoch: int) -> dict[str, float]:
        probs, _, _ = self.build_cache()
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

    def update(self, idx: Tensor, alpha: float, lam: float | None = None) -> dict[str, float]:
        """One policy-gradient step on the replayed inputs ``idx`` (``lam`` overrides the reward's lambda)."""
        from routerkit.uncertainty import BaseOutput

        probs, unc, acc = self.build_cache()
        costs = self.pipeline.costs.to(acc.device)
        self.router.train()
        logits = self.router.logits(BaseOutput(probs[idx], unc[idx]))
        actions = explore_exploit_sample(logits, alpha, self.generator)
        table = acc[idx]  # [B, P, A]
        all_rewards = self.reward(table, table[..., :1].expand_as(table), costs.expand_as(table), lam)
        rewards = all_rewards.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        expected = (torch.softmax(logits.detach(), -1) * all_rewards).sum(-1)
        if self.estimator == "all_actions":
            log_probs_all = torch.log_softmax(logits, -1)
            pg_loss = -(log_probs_all.exp() * torch.nan_to_num(all_rewards, nan=0.0)).sum(-1).mean()
            entropy_bonus = -(log_probs_all.exp() * log_probs_all).sum(-1).mean()
            loss = pg_loss - self.entropy_coef * entropy_bonus
            logs = {"losses/pg_loss": float(pg_loss.detach()), "losses/entropy": float(entropy_bonus.detach())}
        else:
            weights = importance_weights(logits, actions, alpha) if self.importance_weighting else None
            loss, logs = _policy_step(
                self.router,
                logits,
                actions,
                rewards,
                _baseline(self.baseline, rewards, expected),
                self.credit,
                self.entropy_coef,
                weights,
            )
        self.optimizers["router"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["router"].step()
        logs["charts/mean_reward"] = float(rewards.mean())
        return logs


@torch.no_grad()
def policy_probs(router: PaSeRRouter, probs: Tensor, uncertainty: Tensor, batch_size: int = 256) -> Tensor:
    """The policy's action distribution ``[N, P, A]`` on replayed base states (eval mode)."""
    from routerkit.uncertainty import BaseOutput

    was_training = router.training
    router.eval()
    out = [
        torch.softmax(router.logits(BaseOutput(probs[i : i + batch_size], uncertainty[i : i + batch_size])).float(), -1)
        for i in range(0, probs.shape[0], batch_size)
    ]
    router.train(was_training)
    return torch.cat(out)


def total_variation(p: Tensor, q: Tensor) -> float:
    """Mean over units of ``0.5 * sum_a |p(a) - q(a)|`` for action distributions ``[..., A]``.

    For deterministic policies this is the share of units whose model changed.
    """
    if p.shape != q.shape:
        raise ValueError(f"Expected action distributions of the same shape but got {tuple(p.shape)} and {tuple(q.shape)}.")
    return float(total_variation_distance(p, q).mean())


class PolicyFineTuning(PolicyTraining):
    """Stage 3, policy only: lambda rises linearly and training stops at a TVD threshold (PaSeR, noisy MNIST).

    The policy pre-trained with ``lambda = reward.lam`` (0 in the paper: the optimal assignment
    without regard for cost) is fine-tuned on replayed D_FT while ``lambda`` increases linearly
    from ``reward.lam`` to ``lam_end`` over all steps of the stage. After every step the total
    variation distance between the current and the starting policy (mean over the units of
    D_FT, `total_variation`) is measured; the first step that takes it above ``tvd_threshold``
    is undone and the stage stops, so the result is the cheapest policy found within the
    threshold. Task models stay frozen.

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
        cache: Prebuilt replay cache of ``data``.
    """

    name = "finetune"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: Split,
        settings: StageSettings,
        seed: int,
        tvd_threshold: float,
        lam_end: float,
        alpha_start: float = 0.95,
        alpha_end: float = 1.0,
        baseline: str = "expected",
        credit: str = "unit",
        entropy_coef: float = 0.0,
        importance_weighting: bool = True,
        cache: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(
            pipeline,
            router,
            reward,
            accuracy,
            data,
            settings,
            seed,
            alpha_start,
            alpha_end,
            baseline,
            credit,
            entropy_coef,
            importance_weighting=importance_weighting,
            cache=cache,
        )
        lam_start = float(getattr(reward, "lam", 0.0))
        if not 0.0 <= tvd_threshold <= 1.0:
            raise ValueError(f"Expected tvd_threshold in [0, 1] but got {tvd_threshold}.")
        if not lam_start <= lam_end <= 1.0:
            raise ValueError(f"Expected lam_end in [reward.lam={lam_start}, 1] but got {lam_end}.")
        self.tvd_threshold, self.lam_start, self.lam_end = tvd_threshold, lam_start, lam_end
        self.reference: Tensor | None = None
        self.stopped, self.step, self.lam, self.tvd = False, 0, lam_start, 0.0

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

    def run_epoch(self, epoch: int) -> dict[str, float]:
        probs, unc, _ = self.build_cache()
        n = probs.shape[0]
        if self.reference is None:
            self.reference = policy_probs(self.router, probs, unc)
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
            tvd = total_variation(policy_probs(self.router, probs, unc), self.reference)
            if tvd > self.tvd_threshold:
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
def replay_cache(
    pipeline: RoutedPipeline, accuracy: AccuracyTerm, data: Split, batch_size: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """Base state and per-unit accuracy of every model on ``data``, for replayed policy training.

    The three tensors of `routerkit.replay.build_unit_table` that the policy needs, on the data's device.

    Returns:
        ``(probs [N, K, ...], uncertainty [N, ...], accuracy [N, P, m + 1])``.
    """
    from routerkit.replay import build_unit_table

    device = data.images.device
    table = build_unit_table(pipeline, accuracy, data, accuracy.num_classes, batch_size, accuracy.ignore_index, device)
    return table.base.probs.to(device), table.base.uncertainty.to(device), table.accuracy.to(device)


class JointFineTuning(Stage):
    """Stage 3: large models and policy together on D_FT (alpha ``alpha_start -> alpha_end``).

    Per batch: ``f_0`` (frozen) gives the state, the policy samples a model per unit with the
    explore/exploit rule, the executor runs each large model on its units *with gradients*;
    each large model takes a cross-entropy step on the units routed to it (or on all units
    with ``large_on="all"``), and the policy a REINFORCE step on the realised rewards.
    Batch-norm layers of the large models keep their running statistics (``freeze_bn``): the
    units routed to one model are few and skewed, and would corrupt them.
    """

    name = "finetune"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        router: PaSeRRouter,
        reward: Reward,
        accuracy: AccuracyTerm,
        data: Split,
        settings: StageSettings,
        seed: int,
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
    ) -> None:
        super().__init__(settings, seed)
        if large_on not in ("routed", "all"):
            raise ValueError(f"Expected large_on 'routed' or 'all' but got {large_on!r}.")
        if baseline not in ("none", "mean", "expected"):
            raise ValueError(f"Expected baseline 'none', 'mean' or 'expected' but got {baseline!r}.")
        self.pipeline, self.router, self.reward, self.accuracy, self.data = pipeline, router, reward, accuracy, data
        self.alpha_start, self.alpha_end, self.baseline, self.credit = alpha_start, alpha_end, baseline, credit
        self.entropy_coef, self.large_on, self.ignore_index = entropy_coef, large_on, ignore_index
        self.freeze_bn, self.importance_weighting = freeze_bn, importance_weighting
        self.modules["router"] = router
        self.optimizers["router"] = torch.optim.Adam(router.parameters(), lr=settings.lr)
        for i in range(1, len(pipeline.zoo)):
            key = pipeline.zoo.names[i]
            self.modules[key] = pipeline.zoo[i]
            self.optimizers[key] = torch.optim.Adam(pipeline.zoo[i].parameters(), lr=large_lr or settings.lr)

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        part, zoo = self.pipeline.partitioner, self.pipeline.zoo
        costs = self.pipeline.costs.to(next(zoo.base.parameters()).device)
        alpha = linear_schedule(self.alpha_start, self.alpha_end, epoch, self.settings.epochs)
        zoo.base.eval()
        sums: dict[str, float] = {}
        n = len(self.data)
        for images, targets in self.data.batches(self.settings.batch_size, shuffle=True, generator=self.generator):
            base = self.pipeline.estimator(zoo.base, images)
            self.router.train()
            logits = self.router.logits(base)
            actions = explore_exploit_sample(logits, alpha, self.generator)
            for i in range(1, len(zoo)):
                zoo[i].train()
                if self.freeze_bn:  # routed subsets are small and skewed: keep the running statistics
                    for m in zoo[i].modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
            units, unit_targets = part.split(images), part.split(targets)
            execution = self.pipeline.executor.run(units, actions, part.split(base.probs))
            # Large models: cross-entropy on their units.
            logs: dict[str, float] = {}
            for i, (idx, z) in execution.logits.items():
                key = zoo.names[i]
                if self.large_on == "all":
                    z = zoo[i](units)
                    idx = torch.arange(units.shape[0])
                loss_i = _ce(z, unit_targets[idx], self.ignore_index)
                self.optimizers[key].zero_grad(set_to_none=True)
                loss_i.backward()
                self.optimizers[key].step()
                logs[f"losses/ce_{key}"] = float(loss_i.detach())
            # Policy: REINFORCE on realised per-unit rewards.
            with torch.no_grad():
                acc_chosen = self.accuracy(execution.unit_probs, unit_targets).reshape(actions.shape)
                acc_base = self.accuracy(part.split(base.probs), unit_targets).reshape(actions.shape)
                rewards = self.reward(acc_chosen, acc_base, costs[actions])
            weights = importance_weights(logits, actions, alpha) if self.importance_weighting else None
            loss, pg_logs = _policy_step(
                self.router,
                logits,
                actions,
                rewards,
                _baseline(self.baseline, rewards, None),
                self.credit,
                self.entropy_coef,
                weights,
            )
            self.optimizers["router"].zero_grad(set_to_none=True)
            loss.backward()
            self.optimizers["router"].step()
            logs.update(pg_logs)
            logs["charts/mean_reward"] = float(rewards.mean())
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * images.shape[0]
        out = {k: v / n for k, v in sums.items()}
        out["charts/alpha"] = alpha
        if not self.freeze_bn:  # the running averages saw only the skewed routed subsets: recompute them on D_FT
            for i in range(1, len(zoo)):
                recompute_bn_statistics(zoo[i], (part.split(x) for x, _ in self.data.batches(self.settings.batch_size)))
        return out


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
        num_classes: Classes K.
        settings: ``epochs`` (0 skips the fit), ``lr`` and ``batch_size`` of the stop policies.
        seed: Random seed.
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
        data: Split,
        num_classes: int,
        settings: StageSettings,
        seed: int,
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
        if method not in ("grid", "iou_match"):
            raise ValueError(f"Expected method 'grid' or 'iou_match' but got {method!r}.")
        if method == "iou_match" and iou_target is None:
            raise ValueError("method 'iou_match' needs an iou_target.")
        self.pipeline, self.router, self.accuracy, self.data = pipeline, router, accuracy, data
        self.num_classes, self.lam, self.method, self.iou_target = num_classes, lam, method, iou_target
        self.grid_steps, self.alpha, self.policy_epochs, self.loss = grid_steps, alpha, policy_epochs, loss
        self.ignore_index = ignore_index
        self.modules["router"] = router

    def run_epoch(self, epoch: int) -> dict[str, float]:
        from routerkit.replay import build_unit_table
        from routerkit.routers import IDKCascade, OptimalStoppingCascade

        device = next(iter(self.pipeline.zoo.parameters())).device
        table = build_unit_table(
            self.pipeline, self.accuracy, self.data, self.num_classes, self.settings.batch_size, self.ignore_index, device
        )
        self.router.cpu()
        if isinstance(self.router, IDKCascade):
            if self.method == "grid":
                out = self.router.fit_grid(table, self.lam, self.grid_steps)
            else:
                assert self.iou_target is not None
                out = self.router.fit_iou(table, self.iou_target)
        elif isinstance(self.router, OptimalStoppingCascade):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            out = self.router.fit(table, self.alpha, self.policy_epochs, self.settings.lr, 512, self.loss, seed)
        else:
            raise ValueError(f"No fitting procedure for {type(self.router).__name__}.")
        self.router.to(device)
        actions = self.router.decide_table(table)
        out["iou"] = table.mean_iou(actions)
        out["gflops"] = table.flops(actions, cascade=True) / 1e9
        return {f"fit/{k}": float(v) for k, v in out.items()}
