"""Robustness to unseen input noise (PaSeR paper R3).

The test inputs get salt-and-pepper noise; the large models ``f_1..f_m`` are swapped for
variants trained on clean + noisy data, while ``f_0`` and the policy stay as trained (they have
never seen noise). A policy that reads ``f_0``'s uncertainty should send more of the now
unfamiliar units to the large models and lose little quality; a random policy cannot.
`noise_robustness` measures exactly that: IoU degradation of PaSeR and of the random policy,
and the change in the share of units routed to large models.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from routerkit._io import atomic_write_bytes, atomic_write_json
from routerkit.config.build import Experiment
from routerkit.data import Split
from routerkit.flops import FLOP_CONVENTION
from routerkit.metrics import EvalResult, evaluate_router
from routerkit.pipeline import RoutedPipeline
from routerkit.routers import RandomRouter, Router

__all__ = ["RobustnessReport", "noise_robustness", "salt_and_pepper", "write_robustness"]


def salt_and_pepper(
    images: Tensor, amount: float, generator: torch.Generator | None = None, low: float | None = None, high: float | None = None
) -> Tensor:
    """Set a share ``amount`` of the pixels to ``low`` or ``high`` (half each, all channels of a pixel).

    Args:
        images: ``[N, C, H, W]`` inputs.
        amount: Share of pixels replaced, in [0, 1] (the paper: 0.01).
        generator: Random generator (for reproducible noise).
        low: Pepper value (default: the batch minimum).
        high: Salt value (default: the batch maximum).

    Returns:
        A noisy copy of ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"Expected images [N, C, H, W] but got {tuple(images.shape)}.")
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"Expected amount in [0, 1] but got {amount}.")
    lo = float(images.min()) if low is None else low
    hi = float(images.max()) if high is None else high
    n, _, h, w = images.shape
    u = torch.rand(n, 1, h, w, generator=generator).to(images.device)
    salt = torch.rand(n, 1, h, w, generator=generator).to(images.device) < 0.5
    hit = u < amount
    out = images.clone()
    out = torch.where(hit & salt, torch.full_like(out, hi), out)
    return torch.where(hit & ~salt, torch.full_like(out, lo), out)


@dataclass
class RobustnessReport:
    """Clean and noisy results of PaSeR and the random policy.

    Attributes:
        amount: Share of pixels hit by the noise.
        init: How the swapped large models were trained (``"scratch"`` or ``"continue"``).
        epochs: Their training epochs on clean + noisy D_PT.
        results: ``{"clean": [...], "noisy": [...], "noisy_original_models": [...]}`` evaluation results.
    """

    amount: float
    init: str
    epochs: int
    results: dict[str, list[EvalResult]] = field(default_factory=dict)

    def row(self, setting: str, name: str) -> EvalResult:
        """The result of strategy ``name`` in ``setting``."""
        return next(r for r in self.results[setting] if r.name == name)

    def summary(self) -> list[dict[str, float | str]]:
        """Per strategy: clean and noisy IoU, relative degradation, share of units sent to large models."""
        out: list[dict[str, float | str]] = []
        for r in self.results["clean"]:
            noisy = self.row("noisy", r.name)
            out.append(
                {
                    "strategy": r.name,
                    "iou_clean": r.mean_iou,
                    "iou_noisy": noisy.mean_iou,
                    "degradation": (r.mean_iou - noisy.mean_iou) / r.mean_iou if r.mean_iou > 0 else float("nan"),
                    "large_share_clean": 1.0 - r.usage[0],
                    "large_share_noisy": 1.0 - noisy.usage[0],
                    "gflops_clean": r.gflops,
                    "gflops_noisy": noisy.gflops,
                }
            )
        return out


def _reset(module: torch.nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def noisy_variants(
    exp: Experiment, amount: float, epochs: int, init: str = "scratch", seed: int = 0, console: Console | None = None
) -> RoutedPipeline:
    """A copy of the pipeline whose large models are trained on clean + noisy D_PT (``f_0`` untouched)."""
    from routerkit.training.pretraining import LargeModelPretraining

    if init not in ("scratch", "continue"):
        raise ValueError(f"Expected init 'scratch' or 'continue' but got {init!r}.")
    if epochs < 0:
        raise ValueError(f"Expected epochs >= 0 but got {epochs}.")
    pipeline = copy.deepcopy(exp.pipeline)
    if init == "scratch":
        torch.manual_seed(seed)
        for i in range(1, len(pipeline.zoo)):
            _reset(pipeline.zoo[i])
    pt = exp.parts["pt"].materialize()  # clean + noisy copies of D_PT, in memory
    g = torch.Generator().manual_seed(seed)
    noisy = salt_and_pepper(pt.images.cpu(), amount, g).to(pt.images.device)
    data = Split(torch.cat([pt.images, noisy]), torch.cat([pt.targets, pt.targets]))
    p = exp.config.training.pretrain_large
    stage = LargeModelPretraining.from_config(
        p, pipeline=pipeline, data=data, seed=seed, ignore_index=exp.data.ignore_index, epochs=epochs
    )
    for epoch in range(epochs):
        logs = stage.train_epoch(epoch)
        if console is not None:
            console.print(
                f"  noisy-aware large models, epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k}={v:.4f}" for k, v in logs.items())
            )
    pipeline.zoo.eval()
    return pipeline


def noise_robustness(
    exp: Experiment,
    amount: float = 0.01,
    epochs: int | None = None,
    init: str = "scratch",
    seed: int = 0,
    console: Console | None = None,
) -> RobustnessReport:
    """PaSeR R3 on a trained run: salt-and-pepper test inputs, large models swapped for noise-aware variants.

    Args:
        exp: A trained experiment (its router is the policy under test).
        amount: Share of test pixels hit by salt-and-pepper noise.
        epochs: Training epochs of the swapped large models (default ``training.pretrain_large.epochs``).
        init: ``"scratch"`` (retrain from a fresh initialisation) or ``"continue"`` (from the run's weights).
        seed: Seed of the noise and of the retraining.
        console: Progress output.

    Returns:
        The report; ``results["noisy_original_models"]`` shows the same noisy test with the run's
        own large models, to separate the policy's reaction from the swapped models' robustness.
    """
    console = console or Console()
    cfg, data = exp.config, exp.data
    split = data.splits()[cfg.evaluation.split].materialize()
    epochs = cfg.training.pretrain_large.epochs if epochs is None else epochs
    grid = exp.pipeline.partitioner.grid_shape
    strategies: list[tuple[str, Router]] = [
        ("PaSeR", exp.router),
        ("PaSeR-RandPol", RandomRouter(len(exp.zoo), grid_shape=grid, seed=cfg.evaluation.random_seed)),
    ]
    noisy_split = Split(
        salt_and_pepper(split.images.cpu(), amount, torch.Generator().manual_seed(seed + 1)).to(split.images.device),
        split.targets,
        split.meta,
    )

    def evaluate(pipeline: RoutedPipeline, part: Split) -> list[EvalResult]:
        out = []
        for name, router in strategies:
            router.to(cfg.run.device)
            out.append(
                evaluate_router(
                    pipeline,
                    router,
                    part,
                    data.num_classes,
                    name,
                    cfg.evaluation.batch_size,
                    data.ignore_index,
                    cfg.run.device,
                    seed=cfg.run.seed,
                )
            )
        return out

    report = RobustnessReport(amount, init, epochs)
    console.print(f"Evaluating on the clean {cfg.evaluation.split} split ...")
    report.results["clean"] = evaluate(exp.pipeline, split)
    report.results["noisy_original_models"] = evaluate(exp.pipeline, noisy_split)
    console.print(
        f"Training noise-aware large models on clean + {100 * amount:g}% salt-and-pepper D_PT ({init}, {epochs} epochs) ..."
    )
    swapped = noisy_variants(exp, amount, epochs, init, seed, console)
    report.results["noisy"] = evaluate(swapped, noisy_split)
    return report


def robustness_markdown(report: RobustnessReport) -> str:
    """The R3 table as markdown."""
    lines = [
        f"Salt-and-pepper noise on {100 * report.amount:g}% of the test pixels; large models swapped for variants trained on "
        f"clean + noisy D_PT ({report.init}, {report.epochs} epochs); f_0 and the policy unchanged. GFLOPs per input, "
        f"{FLOP_CONVENTION}.",
        "",
        "| strategy | IoU clean | IoU noisy | degradation | units to large models, clean | noisy | change "
        "| GFLOPs clean | noisy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.summary():
        lines.append(
            f"| {s['strategy']} | {s['iou_clean']:.4f} | {s['iou_noisy']:.4f} | {100 * float(s['degradation']):.1f}% | "
            f"{100 * float(s['large_share_clean']):.1f}% | {100 * float(s['large_share_noisy']):.1f}% | "
            f"{100 * (float(s['large_share_noisy']) - float(s['large_share_clean'])):+.1f} pp | "
            f"{float(s['gflops_clean']):.4f} | {float(s['gflops_noisy']):.4f} |"
        )
    lines += ["", "Same noisy inputs with the run's own (clean-trained) large models:", ""]
    lines += ["| strategy | IoU | units to large models |", "|---|---|---|"]
    for r in report.results["noisy_original_models"]:
        lines.append(f"| {r.name} | {r.mean_iou:.4f} | {100 * (1 - r.usage[0]):.1f}% |")
    return "\n".join(lines) + "\n"


def write_robustness(report: RobustnessReport, folder: Path) -> list[Path]:
    """``robustness.md`` and ``robustness.json`` in ``folder`` (atomic)."""
    folder = Path(folder)
    atomic_write_bytes(folder / "robustness.md", robustness_markdown(report).encode())
    payload: dict[str, Any] = {
        **{k: v for k, v in asdict(report).items() if k != "results"},
        "flop_convention": FLOP_CONVENTION,
        "summary": report.summary(),
        "results": {k: [r.to_dict() for r in v] for k, v in report.results.items()},
    }
    atomic_write_json(folder / "robustness.json", payload)
    return [folder / "robustness.md", folder / "robustness.json"]
