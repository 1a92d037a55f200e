"""The training loop: every stage epoch by epoch, with progress, logging and checkpoints as callbacks.

`run_stages` owns the loop; a stage only fills in its epoch (`Stage.run_epoch`). What happens
around an epoch is a `Callback`, called in the order given:

- `TrainLog`: one JSON row per epoch (and per warning) in ``metrics/train_log.jsonl``;
- `Checkpoints`: an atomic checkpoint every ``checkpoint_every`` epochs and at the end of each stage;
- `ProgressBar`: a rich progress bar per stage and the stages' warnings on the console.

Put `TrainLog` before `Checkpoints`: a row logged but not checkpointed is dropped on resume
(`routerkit.training.run_dir.truncate_log`) and its epoch runs again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.progress import Progress, TaskID

from routerkit.config.build import Experiment
from routerkit.training.base import Stage
from routerkit.training.checkpoint import save_checkpoint
from routerkit.training.distributed import distributed
from routerkit.training.schedules import global_rng_state
from routerkit.training.weights import model_state

__all__ = ["Callback", "Checkpoints", "EpochEnd", "ProgressBar", "SyncRanks", "TrainLog", "run_stages"]


@dataclass(frozen=True)
class EpochEnd:
    """What a callback is told after an epoch.

    Attributes:
        index: The stage's position in the run.
        stage: The stage.
        epoch: The epoch that ran.
        logs: The scalars it returned.
        warnings: Messages the stage raised during the epoch (for the user).
    """

    index: int
    stage: Stage
    epoch: int
    logs: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether it was the stage's last epoch."""
        return self.epoch == self.stage.settings.epochs - 1


class Callback:
    """Hooks of `run_stages`; each does nothing by default."""

    def on_stage_done_before(self, index: int, stage: Stage) -> None:
        """Stage ``index`` finished before this (resumed) run started; it does not run again."""

    def on_stage_start(self, index: int, stage: Stage, first_epoch: int) -> None:
        """Stage ``index`` starts (or resumes) at ``first_epoch``."""

    def on_epoch_end(self, end: EpochEnd) -> None:
        """An epoch ran."""

    def on_stage_end(self, index: int, stage: Stage) -> None:
        """Stage ``index`` ran its last epoch (or had none)."""


def run_stages(stages: Sequence[Stage], callbacks: Sequence[Callback], start_stage: int = 0, done_epoch: int = -1) -> None:
    """Run ``stages`` in order, from epoch ``done_epoch + 1`` of stage ``start_stage`` on.

    Args:
        stages: The run's stages (`routerkit.training.recipe.build_stages`).
        callbacks: Called in this order around every stage and epoch.
        start_stage: The first stage to run; the ones before it finished before a resume.
        done_epoch: The last epoch of ``start_stage`` that finished before a resume (``-1``: none).
    """
    for index, stage in enumerate(stages):
        if index < start_stage:
            for callback in callbacks:
                callback.on_stage_done_before(index, stage)
            continue
        first = done_epoch + 1 if index == start_stage else 0
        for callback in callbacks:
            callback.on_stage_start(index, stage, first)
        for epoch in range(first, stage.settings.epochs):
            logs = stage.train_epoch(epoch)
            end = EpochEnd(index, stage, epoch, logs, list(stage.warnings))
            stage.warnings.clear()
            for callback in callbacks:
                callback.on_epoch_end(end)
        for callback in callbacks:
            callback.on_stage_end(index, stage)


class TrainLog(Callback):
    """Appends one JSON row per epoch, then one per warning, to ``path`` (``metrics/train_log.jsonl``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, end: EpochEnd) -> None:
        where = {"stage": end.stage.name, "stage_index": end.index, "epoch": end.epoch}
        with self.path.open("a") as fh:
            fh.write(json.dumps({**where, **end.logs}) + "\n")
        for message in end.warnings:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**where, "warning": message}) + "\n")


class Checkpoints(Callback):
    """Checkpoints the models, the stage and the RNG states into ``run_dir/checkpoints``.

    Under torch.distributed every rank runs it (the stage's state gathers every rank's generator of
    draws) and only the one made with ``write`` (rank 0) writes.

    After every ``every``-th epoch and the last epoch of each stage (``<index>-<stage>-e<epoch>``),
    and once for a stage of 0 epochs (``<index>-<stage>-skipped``); the metadata says where a
    resume continues.
    """

    def __init__(self, run_dir: Path, exp: Experiment, every: int, write: bool = True) -> None:
        self.run_dir, self.exp, self.every, self.write = Path(run_dir), exp, every, write

    def on_epoch_end(self, end: EpochEnd) -> None:
        if not end.complete and (end.epoch + 1) % self.every:
            return
        self._save(end.index, end.stage, f"e{end.epoch:04d}", end.epoch, end.complete)

    def on_stage_end(self, index: int, stage: Stage) -> None:
        if stage.settings.epochs == 0:
            self._save(index, stage, "skipped", -1, True)

    def _save(self, index: int, stage: Stage, suffix: str, epoch: int, complete: bool) -> None:
        stage_state = stage.state_dict()  # under torch.distributed every rank gathers; rank 0 writes
        if not self.write:
            return
        save_checkpoint(
            self.run_dir,
            f"{index}-{stage.name}-{suffix}",
            {"model": model_state(self.exp), "stage": stage_state, "rng": global_rng_state()},
            {"stage": stage.name, "stage_index": index, "epoch": epoch, "stage_complete": complete},
        )


class SyncRanks(Callback):
    """Under torch.distributed, every rank takes rank 0's models at the end of each stage.

    The ranks' parameters agree after every step (all-reduced gradients), but not necessarily what
    each rank decides alone: batch-norm running statistics of its own shards, the best validation
    epoch it restores, a cascade it fits. Rank 0's is what the checkpoint holds; the next stage
    starts from it everywhere. A no-op in one process.
    """

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def on_stage_end(self, index: int, stage: Stage) -> None:
        distributed().broadcast_state(self.exp.zoo, self.exp.router)


class ProgressBar(Callback):
    """A rich progress bar per stage (``<i>/<n> <stage>``) with the epoch's main scalars; prints the warnings."""

    def __init__(self, progress: Progress, num_stages: int) -> None:
        self.progress, self.num_stages = progress, num_stages
        self.tasks: dict[int, TaskID] = {}

    def _add(self, index: int, stage: Stage) -> TaskID:
        total = max(stage.settings.epochs, 1)
        task = self.progress.add_task(f"{index + 1}/{self.num_stages} {stage.name}", total=total, info="")
        self.tasks[index] = task
        return task

    def on_stage_done_before(self, index: int, stage: Stage) -> None:
        self.progress.update(self._add(index, stage), completed=max(stage.settings.epochs, 1), info="(done before resume)")

    def on_stage_start(self, index: int, stage: Stage, first_epoch: int) -> None:
        self.progress.update(self._add(index, stage), completed=first_epoch)

    def on_epoch_end(self, end: EpochEnd) -> None:
        for message in end.warnings:
            self.progress.console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", soft_wrap=True)
        self.progress.update(self.tasks[end.index], advance=1, info=_info(end.logs))

    def on_stage_end(self, index: int, stage: Stage) -> None:
        if stage.settings.epochs == 0:
            self.progress.update(self.tasks[index], completed=1, info="(0 epochs)")


def _info(logs: dict[str, float]) -> str:
    """The progress bar's text: every model's validation mean IoU, else the first few scalars (losses)."""
    keys = [k for k in logs if k.startswith("val/miou_")] or list(logs)[:4]
    return "  ".join(f"{k.split('/')[-1]}={logs[k]:.4f}" for k in keys)
