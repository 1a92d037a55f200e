"""Figures of a run (matplotlib, imported lazily): routing overlays on sample inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from routerkit.data import BaseSplit
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router

#: Matplotlib colour map of model indices: unit ``k`` of every routing figure is tinted ``MODEL_CMAP(k)``.
MODEL_CMAP = "tab10"


def model_colours(count: int) -> list[tuple[float, float, float]]:
    """RGB colours in [0, 1] of model indices ``0..count-1``, as every routing figure tints units.

    Shared by `routing_overlay` and ``routerkit predict``'s overlays, so a model has one colour everywhere.
    """
    from matplotlib import colormaps

    cmap = colormaps[MODEL_CMAP]
    colours = []
    for k in range(count):
        red, green, blue, _ = cmap(k)
        colours.append((float(red), float(green), float(blue)))
    return colours


@torch.no_grad()
def routing_overlay(
    pipeline: RoutedPipeline,
    router: Router,
    split: BaseSplit,
    path: Path,
    model_names: list[str],
    num_samples: int = 4,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> Path:
    """Save a PNG: per sample, the input with each unit tinted by the model chosen for it, ``f_0``'s
    uncertainty map (the router's state, as PaSeR's Fig. 7) with each unit's choice written on it,
    the labels and the routed prediction.

    Args:
        pipeline: The routed pipeline.
        router: The router to show.
        split: Samples are its first ``num_samples`` inputs (spatial, single- or three-channel).
        path: Output PNG file.
        model_names: Names of the zoo's models (legend).
        num_samples: How many inputs to show.
        num_classes: Classes K (fixes the colour scale of labels and predictions; default: from the labels).
        ignore_index: Label value drawn blank.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = min(num_samples, len(split))
    device = next(pipeline.zoo.base.parameters()).device
    first = split.take(n)
    images, targets = first.images, first.targets
    if num_classes is None:
        valid = targets[targets != ignore_index] if ignore_index is not None else targets
        num_classes = int(valid.max()) + 1 if valid.numel() else 2
    router.reset()
    out = pipeline.route(images.to(device), router, greedy=True)
    rows, cols = pipeline.partitioner.grid_shape
    actions = out.actions.reshape(n, rows, cols).cpu()
    colours = plt.get_cmap(MODEL_CMAP)
    uncertainty = out.base.uncertainty.cpu().float()
    has_map = uncertainty.dim() == 3 and bool(uncertainty.abs().sum() > 0)  # a router that reads no state shows none
    vmax = float(uncertainty.max()) if has_map else 1.0
    fig, axes = plt.subplots(4, n, figsize=(2.6 * n, 9.4), squeeze=False)
    height, width = images.shape[-2:]
    for i in range(n):
        img = images[i].cpu().float()
        img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-8)  # normalised inputs, shown in [0, 1]
        shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        ax = axes[0, i]
        ax.imshow(shown.numpy(), cmap="gray")
        tint = colours(actions[i].numpy()).copy()  # [rows, cols, 4] RGBA of each unit's model
        tint[..., 3] = 0.35
        ax.imshow(tint, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        ax = axes[1, i]
        if has_map:
            shown_map = ax.imshow(uncertainty[i].numpy(), cmap="magma", vmin=0.0, vmax=max(vmax, 1e-8), interpolation="nearest")
            uh, uw = height / rows, width / cols
            for r in range(rows):
                for c in range(cols):
                    ax.text(
                        (c + 0.5) * uw - 0.5,
                        (r + 0.5) * uh - 0.5,
                        str(int(actions[i, r, c])),
                        color="white",
                        ha="center",
                        va="center",
                        fontsize=8,
                        bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.0, "linewidth": 0},
                    )
            for r in range(1, rows):
                ax.axhline(r * uh - 0.5, color="white", lw=0.4)
            for c in range(1, cols):
                ax.axvline(c * uw - 0.5, color="white", lw=0.4)
        else:
            ax.text(0.5, 0.5, "no f_0 state", ha="center", va="center", transform=ax.transAxes)
        mask = targets[i].cpu().float()
        if ignore_index is not None:
            mask = mask.masked_fill(targets[i].cpu() == ignore_index, float("nan"))  # ignored pixels left blank
        kw = {"cmap": "viridis", "interpolation": "nearest", "vmin": 0, "vmax": max(num_classes - 1, 1)}
        axes[2, i].imshow(mask.numpy(), **kw)
        axes[3, i].imshow(out.pred[i].cpu().numpy(), **kw)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    row_labels = ("input + routing", "f_0 uncertainty\n(model per unit)", "labels", "routed prediction")
    for ax, label in zip(axes[:, 0], row_labels, strict=True):
        ax.set_ylabel(label)
    handles = [Patch(color=colours(k), alpha=0.6, label=name) for k, name in enumerate(model_names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(model_names), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 0.92 if has_map else 1, 1))
    if has_map:  # in the right margin left free, level with the uncertainty row
        box = axes[1, -1].get_position()
        fig.colorbar(shown_map, cax=fig.add_axes((0.93, box.y0, 0.012, box.height)), label="nats")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
