"""The comparison's figures: ``pareto.png``, ``expert_assignment.png`` and ``tvd.png`` (matplotlib, imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from routerkit.compare.results import (
    IDK,
    IDK_GRID,
    IDK_IOU_MATCH,
    OPTIMAL_STOPPING,
    ORACLE,
    PASER,
    RANDOM,
    CompareReport,
    ParetoPoint,
)
from routerkit.flops import FLOP_CONVENTION
from routerkit.frontier import Frontier

# Curve styles of the swept families; the other families (single models) are drawn as stars.
_PARETO_STYLES = {PASER: "o-", IDK: "s-", OPTIMAL_STOPPING: "^-", ORACLE: "k--"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def pareto_figure(report: CompareReport, path: Path) -> Path:
    """Cost/quality figure: one curve per swept family, single models as points, and the single-model frontier."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    families: dict[str, list[ParetoPoint]] = {}
    for p in report.pareto:
        families.setdefault(p.key, []).append(p)
    for key, pts in families.items():
        pts = sorted(pts, key=lambda q: q.gflops)
        xs, ys = [q.gflops for q in pts], [q.mean_iou for q in pts]
        if key in _PARETO_STYLES:
            ax.plot(xs, ys, _PARETO_STYLES[key], label=pts[0].family, markersize=4, linewidth=1.2)
        else:
            ax.plot(xs, ys, "*", markersize=11, label=pts[0].family)
    if report.frontier:  # what the single models and their input-level mixes reach: the line to beat
        frontier = Frontier.of([(float(c), float(q)) for c, q in report.frontier["frontier"]["points"]])
        left, right = frontier.points[0][0], max([p.gflops for p in report.pareto] + [frontier.points[-1][0]])
        # a mix is linear in GFLOPs, so on the log axis the frontier is a curve: sample it densely
        fx = torch.logspace(math.log10(left), math.log10(right), 200, dtype=torch.float64).tolist()
        ax.plot(fx, [frontier.quality_at(c) for c in fx], "--", color="0.35", linewidth=1.4, label="frontier (no router)")
    ax.set_xscale("log")
    ax.set_xlabel(f"GFLOPs per input (log; {FLOP_CONVENTION})")
    ax.set_ylabel("mean IoU")
    ax.set_title(f"Cost / quality on the {report.split} split (replayed outputs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def expert_figure(report: CompareReport, path: Path, keys: tuple[str, ...] = (PASER, IDK_GRID, IDK_IOU_MATCH, RANDOM)) -> Path:
    """Row-normalised assignment confusion matrices against the expert labels (PaSeR Fig. 4).

    Args:
        report: A report with expert labels (``report.expert_key``).
        path: The PNG to write.
        keys: The rows drawn, by `StrategyRow.key` (default: PaSeR, the IDK cascades and the random policy).
    """
    plt = _pyplot()
    rows = [r for r in report.rows if r.expert_assignment is not None and r.key in keys]
    names = report.model_names
    fig, axes = plt.subplots(1, len(rows), figsize=(3.3 * len(rows), 3.4), dpi=120, squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        counts = torch.tensor(row.expert_assignment, dtype=torch.float64)
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), vmin=0, vmax=1, cmap="Blues")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{100 * share[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("model chosen", fontsize=8)
        ax.set_title(f"{row.name}\naccuracy {100 * (row.expert_accuracy or 0):.1f}%", fontsize=8)
    axes[0][0].set_ylabel(f"expert ({report.expert_key})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def tvd_figure(report: CompareReport, path: Path) -> Path:
    """IoU/GigaFlop against the TVD threshold (PaSeR Fig. 12)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    xs = [100 * p.threshold for p in report.tvd]
    ax.plot(xs, [p.iou_per_gflop for p in report.tvd], "o-", color="tab:blue")
    for p, x in zip(report.tvd, xs, strict=True):
        ax.annotate(f"IoU {p.mean_iou:.3f}", (x, p.iou_per_gflop), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xlabel("TVD threshold from the lambda = 0 policy (%)")
    ax.set_ylabel("IoU / GigaFlop")
    ax.set_title(f"Fine-tuning stopped at a TVD threshold ({report.split} split)", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
