"""Figures of a run (matplotlib, imported lazily): routing overlays on sample inputs."""

from __future__ import annotations

from pathlib import Path

import torch

from routerkit.data import Split
from routerkit.pipeline import RoutedPipeline
from routerkit.routers.base import Router


@torch.no_grad()
def routing_overlay(
    pipeline: RoutedPipeline, router: Router, split: Split, path: Path, model_names: list[str], num_samples: int = 4
) -> Path:
    """Save a PNG: per sample, the input with each unit tinted by the model chosen for it, the
    labels and the routed prediction.

    Args:
        pipeline: The routed pipeline.
        router: The router to show.
        split: Samples are its first ``num_samples`` inputs (spatial, single- or three-channel).
        path: Output PNG file.
        model_names: Names of the zoo's models (legend).
        num_samples: How many inputs to show.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = min(num_samples, len(split))
    device = next(pipeline.zoo.base.parameters()).device
    images, targets = split.images[:n], split.targets[:n]
    out = pipeline.route(images.to(device), router, greedy=True)
    rows, cols = pipeline.partitioner.grid_shape
    actions = out.actions.reshape(n, rows, cols).cpu()
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 7.2), squeeze=False)
    height, width = images.shape[-2:]
    for i in range(n):
        img = images[i].cpu()
        shown = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
        ax = axes[0, i]
        ax.imshow(shown, cmap="gray")
        tint = colours(actions[i].numpy()).copy()  # [rows, cols, 4] RGBA of each unit's model
        tint[..., 3] = 0.35
        ax.imshow(tint, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        axes[1, i].imshow(targets[i].cpu(), cmap="viridis", interpolation="nearest")
        axes[2, i].imshow(out.pred[i].cpu(), cmap="viridis", interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, label in zip(axes[:, 0], ("input + routing", "labels", "routed prediction"), strict=True):
        ax.set_ylabel(label)
    handles = [Patch(color=colours(k), alpha=0.6, label=name) for k, name in enumerate(model_names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(model_names), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
