"""Evaluation of a router on a split: mean IoU, accuracy, GFLOPs, IoU/GigaFlop, model usage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from routerkit.data import BaseSplit
from routerkit.flops import FLOP_CONVENTION
from routerkit.frontier import Frontier
from routerkit.functional import confusion_counts, iou_from_confusion
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router


@dataclass
class EvalResult:
    """Quality and cost of one strategy on one split.

    ``mean_iou`` is the macro mean over classes of the IoU computed from the confusion matrix
    accumulated over the whole split; ``gflops`` is per input and counts everything that ran
    (fvcore convention: one multiply-add = one flop), of which ``state_gflops`` is ``f_0``'s
    state; ``usage`` is the share of units sent to each model. The ``hull_*`` fields place the
    strategy against the single-model frontier (`against`).
    """

    name: str
    mean_iou: float
    accuracy: float
    gflops: float
    iou_per_gflop: float
    usage: list[float]
    per_class_iou: list[float]
    num_inputs: int
    flop_convention: str = FLOP_CONVENTION
    #: GFLOPs per input of ``f_0`` for the router's state (every MC pass, or one trunk + N heads), part of ``gflops``.
    state_gflops: float = 0.0
    #: The single-model frontier's mean IoU at this strategy's GFLOPs (`routerkit.frontier`); None until compared.
    hull_quality: float | None = None
    #: ``mean_iou - hull_quality``: positive when the strategy beats not routing at its cost.
    hull_gain: float | None = None
    #: GFLOPs the frontier needs to reach this strategy's mean IoU (inf: it cannot).
    hull_gflops: float | None = None
    #: ``1 - gflops / hull_gflops``: the share of the frontier's cost saved at equal quality (NaN: beyond it).
    hull_saving: float | None = None

    def against(self, frontier: Frontier) -> EvalResult:
        """This result with its ``hull_*`` fields filled in from ``frontier`` (GFLOPs, mean IoU)."""
        s = frontier.summary(self.gflops, self.mean_iou)
        self.hull_quality, self.hull_gain = s["hull_quality"], s["hull_gain"]
        self.hull_gflops, self.hull_saving = s["hull_cost"], s["hull_saving"]
        return self

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary."""
        return asdict(self)


@contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's global generators (CPU, and ``device``'s if CUDA) seeded with ``seed``,
    and restore their previous states afterwards.

    Evaluation draws MC-dropout masks from the global generator; seeding it here makes a split's
    numbers independent of whatever ran before (training, another strategy), so ``routerkit
    evaluate`` repeats the table printed at the end of training.
    """
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate_router(
    pipeline: RoutedPipeline,
    router: Router,
    split: BaseSplit,
    num_classes: int,
    name: str = "router",
    batch_size: int = 16,
    ignore_index: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> EvalResult:
    """Route every input of ``split`` greedily and score the stitched predictions.

    The MC-dropout masks come from torch's global generator seeded with ``seed`` for the call
    (`seeded_rng`), so the same router on the same split always gets the same numbers.

    Args:
        pipeline: The routed pipeline (zoo, partitioner, estimator, costs).
        router: The strategy to evaluate.
        split: The data.
        num_classes: Number of classes K.
        name: Label of the result.
        batch_size: Inputs per batch.
        ignore_index: Target value to skip.
        device: Where to run.
        seed: Seed of the global generators during the evaluation.

    Returns:
        The strategy's `EvalResult`.
    """
    if len(split) == 0:
        raise ValueError("Cannot evaluate on an empty split.")
    pipeline.zoo.eval()
    router.eval()
    router.reset()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    usage = torch.zeros(pipeline.num_actions, dtype=torch.float64)
    flops = 0.0
    with seeded_rng(seed, device):
        for images, targets in split.batches(batch_size):
            out = pipeline.route(images.to(device), router, greedy=True, targets=targets.to(device))
            pred, labels = out.pred.cpu().unsqueeze(0), targets.cpu().unsqueeze(0)
            confusion += confusion_counts(pred, labels, num_classes, ignore_index)[0]
            usage += torch.bincount(out.actions.reshape(-1).cpu(), minlength=pipeline.num_actions).double()
            flops += float(out.flops.sum())
    per_class = iou_from_confusion(confusion)
    mean_iou = float(torch.nanmean(per_class))
    accuracy = float(confusion.diagonal().sum() / confusion.sum().clamp_min(1))
    gflops = flops / len(split) / 1e9
    return EvalResult(
        state_gflops=pipeline.base_flops(router) / 1e9,
        name=name,
        mean_iou=mean_iou,
        accuracy=accuracy,
        gflops=gflops,
        iou_per_gflop=mean_iou / gflops if gflops > 0 else float("inf"),
        usage=(usage / usage.sum()).tolist(),
        per_class_iou=[float(v) for v in per_class],
        num_inputs=len(split),
    )
