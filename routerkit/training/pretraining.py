"""Stage 1 of PaSeR's Algorithm 1: the task models, before any routing.

- `LargeModelPretraining`: each costlier model ``f_1..f_m`` on units of D_PT (cross-entropy);
  frozen models (``zoo.models[].train: false``) are left as they are.
- `BaseModelPretraining`: ``f_0`` on whole inputs of D_PT, cross-entropy plus ``beta`` x MSE
  distillation to the largest model's logits (Eq. 1).

After every epoch both recompute exact batch-norm statistics, score the models on the
validation split and, at the end, keep each model's best epoch (`PretrainChecks`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routerkit.data import BaseSplit
from routerkit.pipeline import RoutedPipeline
from routerkit.training.augment import _augment
from routerkit.training.base import Stage
from routerkit.training.model_quality import Quality, model_quality, recompute_bn_statistics
from routerkit.training.schedules import StageSettings, make_optimizer

if TYPE_CHECKING:
    from routerkit.config.schema import PretrainBaseConfig, PretrainLargeConfig

__all__ = ["BaseModelPretraining", "LargeModelPretraining", "PretrainChecks", "frozen_indices"]


def _ce(logits: Tensor, targets: Tensor, ignore_index: int | None) -> Tensor:
    """Cross-entropy; zero (still in the graph) when every target is ignored, instead of NaN."""
    if ignore_index is not None and not bool((targets != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=-100 if ignore_index is None else ignore_index)


def _autocast(settings: StageSettings, like: Tensor) -> torch.autocast:
    """bfloat16 autocast of a training forward when ``settings.precision`` is ``"bf16"`` (disabled otherwise)."""
    return torch.autocast(like.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")


def _memory_format(settings: StageSettings, images: Tensor) -> Tensor:
    """A 4-D batch in channels-last memory when ``settings.channels_last`` (unchanged otherwise)."""
    if settings.channels_last and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def _prepare_model(settings: StageSettings, model: nn.Module) -> None:
    """Move a model's 4-D weights to channels-last memory when ``settings.channels_last``."""
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)


@dataclass
class PretrainChecks:
    """What a pre-training stage does after every epoch, per model it trains.

    Attributes:
        validation: BaseSplit scored after every epoch (``None``: no validation, no best epoch).
        num_classes: Classes K of the task.
        precise_bn: Recompute exact batch-norm statistics on the stage's training data before
            scoring (see `routerkit.training.model_quality`); without it the running averages of a
            short training can leave a model far worse in eval mode than in training.
        bn_batches: At most this many training batches for those statistics (``None``: all; the
            default 4 batches of 16 inputs hold about a million pixels per channel of a patch model).
        keep_best: At the stage's end, each model takes the weights of its best validation epoch.
        batch_size: Inputs per batch when scoring.
        warn_gap: Warn when a model's eval-mode validation accuracy is more than this far below its
            accuracy with batch statistics.
    """

    validation: BaseSplit | None = None
    #: Per-model validation split by model key (specialists trained with ``train_on``: the matching inputs).
    model_validation: dict[str, BaseSplit] = field(default_factory=dict)
    num_classes: int = 0
    precise_bn: bool = True
    bn_batches: int | None = 4
    keep_best: bool = True
    batch_size: int = 16
    warn_gap: float = 0.05

    @classmethod
    def from_config(
        cls, section: PretrainLargeConfig | PretrainBaseConfig, validation: BaseSplit | None, num_classes: int, batch_size: int
    ) -> PretrainChecks:
        """The checks a ``training.pretrain_*`` section asks for (``precise_bn``, ``bn_batches``, ``keep_best``).

        Args:
            section: The stage's config section.
            validation: The split scored after every epoch.
            num_classes: Classes K of the task.
            batch_size: Inputs per batch when scoring (``evaluation.batch_size``).
        """
        return cls(
            validation=validation,
            num_classes=num_classes,
            precise_bn=section.precise_bn,
            bn_batches=section.bn_batches,
            keep_best=section.keep_best,
            batch_size=batch_size,
        )


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
        return quality.accuracy if self.checks.validation.is_classification else quality.mean_iou

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
            val = c.model_validation.get(key, c.validation)
            if val is None:
                continue
            q = model_quality(forward, model, val, c.num_classes, self.ignore_index, c.batch_size)
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
                q = model_quality(forward, model, val, c.num_classes, self.ignore_index, c.batch_size)
                # the logged figures describe the weights the model ends the stage with
                logs[f"val/miou_{key}"], logs[f"val/acc_{key}"] = q.mean_iou, q.accuracy
            if c.keep_best and key in self.best:
                logs[f"val/best_epoch_{key}"] = float(self.best[key]["epoch"])
            batch_stats = model_quality(forward, model, val, c.num_classes, self.ignore_index, c.batch_size, True)
            if batch_stats.accuracy - q.accuracy > c.warn_gap:
                self.warnings.append(
                    f"model {key!r}: validation accuracy {100 * q.accuracy:.1f}% in eval mode but "
                    f"{100 * batch_stats.accuracy:.1f}% with batch statistics: its batch-norm running statistics do not "
                    "fit its weights" + ("" if c.precise_bn else " (set precise_bn: true to recompute them)") + "."
                )
        return logs

    ignore_index: int | None


def frozen_indices(frozen: Collection[int] | None, num_models: int) -> frozenset[int]:
    """The zoo indices of the frozen models, checked against the zoo's size.

    Raises:
        ValueError: An index outside ``0..num_models - 1``.
    """
    indices = frozenset(frozen or ())
    wrong = sorted(i for i in indices if not (isinstance(i, int) and 0 <= i < num_models))
    if wrong:
        raise ValueError(f"Expected frozen model indices in 0..{num_models - 1} but got {wrong}.")
    return indices


class LargeModelPretraining(_CheckedPretraining):
    """Stage 1a: each costlier model on the units of D_PT with cross-entropy.

    A frozen model (``frozen``) gets no optimiser, no gradient (``requires_grad`` off), no
    batch-norm recalibration and no validation: its weights end the stage bit-identical.

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
        frozen: Zoo indices of the models left as they are (``zoo.models[i].train: false``).
    """

    name = "pretrain_large"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
        ignore_index: int | None = None,
        augment: bool = True,
        model_data: dict[int, BaseSplit] | None = None,
        checks: PretrainChecks | None = None,
        frozen: Collection[int] | None = None,
    ) -> None:
        super().__init__(settings, seed)
        self._init_checks(checks)
        self.pipeline, self.data, self.ignore_index, self.augment = pipeline, data, ignore_index, augment
        self.frozen = frozen_indices(frozen, len(pipeline.zoo))
        #: Zoo indices of the models this stage trains (``1..m`` less the frozen ones).
        self.trained = [i for i in range(1, len(pipeline.zoo)) if i not in self.frozen]
        self.model_data = {i: part for i, part in (model_data or {}).items() if i not in self.frozen}
        for i, part in self.model_data.items():
            if len(part) == 0:
                raise ValueError(f"Expected training data for model {pipeline.zoo.names[i]!r} but its subset is empty.")
        for i in sorted(self.frozen):
            pipeline.zoo[i].requires_grad_(False)
        for i in self.trained:
            key = pipeline.zoo.names[i]
            _prepare_model(settings, pipeline.zoo[i])
            self.modules[key] = pipeline.zoo[i]
            self.optimizers[key] = make_optimizer(pipeline.zoo[i].parameters(), settings)

    @classmethod
    def from_config(
        cls,
        config: PretrainLargeConfig,
        *,
        pipeline: RoutedPipeline,
        data: BaseSplit,
        seed: int,
        ignore_index: int | None = None,
        model_data: dict[int, BaseSplit] | None = None,
        checks: PretrainChecks | None = None,
        epochs: int | None = None,
        frozen: Collection[int] | None = None,
    ) -> LargeModelPretraining:
        """The stage of a ``training.pretrain_large`` section (its optimisation settings and ``augment``).

        Args:
            config: The section.
            pipeline: The routed pipeline.
            data: D_PT.
            seed: Random seed.
            ignore_index: Label ignored by the loss.
            model_data: Per-model training data (``{model index: split}``).
            checks: Per-epoch checks (`PretrainChecks.from_config`).
            epochs: Overrides ``config.epochs``.
            frozen: Zoo indices of the models left as they are.
        """
        return cls(
            pipeline,
            data,
            StageSettings.from_config(config, epochs),
            seed,
            ignore_index=ignore_index,
            augment=config.augment,
            model_data=model_data,
            checks=checks,
            frozen=frozen,
        )

    def num_steps(self) -> int:
        sizes = [len(self.model_data.get(i, self.data)) for i in self.trained]
        return sum(-(-n // self.settings.batch_size) for n in sizes)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        part = self.pipeline.partitioner
        logs: dict[str, float] = {}
        for i in self.trained:
            model, key = self.pipeline.zoo[i], self.pipeline.zoo.names[i]
            model.train()
            total, count = 0.0, 0
            data = self.model_data.get(i, self.data)
            n, bs = len(data), self.settings.batch_size
            steps = -(-n // bs)
            step_model = self.trainable(key, model)  # DDP under torch.distributed
            batches = data.batches(bs, shuffle=True, generator=self.generator, shard=self.dist.part)
            for step, (images, targets) in enumerate(batches):
                if self.augment:
                    images, targets = _augment(images, targets, self.draws)[:2]
                units, unit_targets = _memory_format(self.settings, part.split_inputs(images)), part.split(targets)
                self.step_lr(key, epoch, step, steps)
                with _autocast(self.settings, units):
                    logits = part.crop(step_model(units))
                loss = _ce(logits.float(), unit_targets, self.ignore_index)
                self.optimizers[key].zero_grad(set_to_none=True)
                (loss * self.valid_share(unit_targets, self.ignore_index, min(bs, n - step * bs))).backward()
                self.optimizers[key].step()
                local = self.dist.local_count(min(bs, n - step * bs))
                total, count = total + float(loss.detach()) * local, count + local
            logs[f"losses/ce_{key}"] = self.dist.all_sum(total) / max(self.dist.all_sum(count), 1)
        logs.update(self.check_models(epoch, [self._checked(i) for i in self.trained]))
        return logs

    def _checked(self, i: int) -> tuple[str, nn.Module, Callable[[Tensor], Tensor], Callable[[], Iterable[Tensor]]]:
        part, model = self.pipeline.partitioner, self.pipeline.zoo[i]
        data = self.model_data.get(i, self.data)

        def forward(images: Tensor) -> Tensor:
            return part.stitch(part.crop(model(part.split_inputs(images))), images.shape[0])

        def bn_inputs() -> Iterable[Tensor]:
            return (part.split_inputs(images) for images, _ in data.batches(self.settings.batch_size))

        return self.pipeline.zoo.names[i], model, forward, bn_inputs


class BaseModelPretraining(_CheckedPretraining):
    """Stage 1b: ``f_0`` on whole inputs, CE + ``beta`` x MSE to the largest model's logits."""

    name = "pretrain_base"

    def __init__(
        self,
        pipeline: RoutedPipeline,
        data: BaseSplit,
        settings: StageSettings,
        seed: int,
        *,
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
        _prepare_model(settings, pipeline.zoo.base)
        self.modules["f0"] = pipeline.zoo.base
        self.optimizers["f0"] = make_optimizer(pipeline.zoo.base.parameters(), settings)
        self._teacher: Tensor | None = None

    @classmethod
    def from_config(
        cls,
        config: PretrainBaseConfig,
        *,
        pipeline: RoutedPipeline,
        data: BaseSplit,
        seed: int,
        ignore_index: int | None = None,
        checks: PretrainChecks | None = None,
    ) -> BaseModelPretraining:
        """The stage of a ``training.pretrain_base`` section (optimisation settings, ``beta``, ``augment``).

        Args:
            config: The section.
            pipeline: The routed pipeline.
            data: D_PT (or the part ``zoo.models[0].train_on`` selects).
            seed: Random seed.
            ignore_index: Label ignored by the loss.
            checks: Per-epoch checks (`PretrainChecks.from_config`).
        """
        return cls(
            pipeline,
            data,
            StageSettings.from_config(config),
            seed,
            beta=config.beta,
            ignore_index=ignore_index,
            augment=config.augment,
            teacher_batch=config.teacher_batch,
            checks=checks,
        )

    def num_steps(self) -> int:
        return -(-len(self.data) // self.settings.batch_size)

    @torch.no_grad()
    def teacher_logits(self) -> Tensor:
        """Logits of the largest model ``f_m`` on D_PT (run on its units, stitched), computed once.

        Kept on the CPU in the pipeline's `~routerkit._storage.RowStore`: in memory, or memory-mapped on
        disk when they exceed its budget (one ``[K, H, W]`` row per image of D_PT).
        """
        if self._teacher is None:
            part, teacher = self.pipeline.partitioner, self.pipeline.zoo[len(self.pipeline.zoo) - 1]
            teacher.eval()
            out: Tensor | None = None
            for idx, images, _ in self.data.index_batches(self.teacher_batch):
                logits = part.stitch(part.crop(teacher(part.split_inputs(images))), images.shape[0])
                if out is None:
                    out = self.pipeline.row_store.allocate(len(self.data), {"t": (tuple(logits.shape[1:]), logits.dtype)})["t"]
                out[idx] = logits.cpu()
                self.pipeline.row_store.release()  # spilled: the rows just written leave resident memory
            assert out is not None
            self._teacher = out
        return self._teacher

    def run_epoch(self, epoch: int) -> dict[str, float]:
        model = self.pipeline.zoo.base
        teacher = self.teacher_logits() if self.beta > 0 else None
        model.train()
        totals = {"ce": 0.0, "kd": 0.0}
        n, bs = len(self.data), self.settings.batch_size
        steps = -(-n // bs)
        step_model = self.trainable("f0", model)  # DDP under torch.distributed
        batches = self.data.index_batches(bs, shuffle=True, generator=self.generator, shard=self.dist.part)
        for step, (idx, images, targets) in enumerate(batches):
            extra: tuple[Tensor, ...] = (teacher[idx].to(images.device),) if teacher is not None else ()
            self.pipeline.row_store.release()  # spilled targets: the rows just read leave resident memory
            if self.augment:
                images, targets, *rest = _augment(images, targets, self.draws, *extra)
                extra = tuple(rest)
            images = _memory_format(self.settings, images)
            self.step_lr("f0", epoch, step, steps)
            with _autocast(self.settings, images):
                logits = step_model(images)
            logits = logits.float()
            ce = _ce(logits, targets, self.ignore_index)
            kd = F.mse_loss(logits, extra[0]) if extra else logits.new_zeros(())
            self.optimizers["f0"].zero_grad(set_to_none=True)
            total = min(bs, n - step * bs)  # the CE over the global batch's valid pixels, the distillation over its inputs
            loss = ce * self.valid_share(targets, self.ignore_index, total) + self.beta * kd * self.dist.loss_scale(total)
            loss.backward()
            self.optimizers["f0"].step()
            local = self.dist.local_count(min(bs, n - step * bs))
            totals["ce"] += float(ce.detach()) * local
            totals["kd"] += float(kd.detach()) * local
        logs = {"losses/ce_f0": self.dist.all_sum(totals["ce"]) / n, "losses/kd_f0": self.dist.all_sum(totals["kd"]) / n}
        bn_inputs = lambda: (images for images, _ in self.data.batches(self.settings.batch_size))  # noqa: E731
        logs.update(self.check_models(epoch, [("f0", model, model, bn_inputs)]))
        if epoch == self.settings.epochs - 1 and self.checks.validation is not None:
            self._compare_with_costlier()
        return logs

    def _compare_with_costlier(self) -> None:
        """Warn about costlier models that score below ``f_0`` (its final weights) on validation: nothing to route to.

        A specialist (``train_on``) is compared with ``f_0`` on its own part of the validation split.
        """
        c, part, zoo = self.checks, self.pipeline.partitioner, self.pipeline.zoo
        if c.validation is None:
            return
        metric = "accuracy" if c.validation.is_classification else "mean IoU"
        base_model = zoo.base
        for i in range(1, len(zoo)):
            model = zoo[i]
            val = c.model_validation.get(zoo.names[i], c.validation)

            def forward(images: Tensor, model: nn.Module = model) -> Tensor:
                return part.stitch(part.crop(model(part.split_inputs(images))), images.shape[0])

            score = self._score(model_quality(forward, model, val, c.num_classes, self.ignore_index, c.batch_size))
            base = self._score(model_quality(base_model, base_model, val, c.num_classes, self.ignore_index, c.batch_size))
            if score < base:
                self.warnings.append(
                    f"model {zoo.names[i]!r} (costlier) scores a validation {metric} of {score:.4f}, below the base model "
                    f"{zoo.names[0]!r} ({base:.4f}): a router gains nothing by sending units to it. Train it longer or "
                    "check its settings."
                )
