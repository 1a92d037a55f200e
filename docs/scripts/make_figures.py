"""Generate the figures of the documentation.

Run from the repository root::

    python docs/scripts/make_figures.py

Writes ``docs/assets/battery_samples.png``: four synthetic battery scans from
``examples/battery_plugin`` (rows: degraded input, phase labels, fineness map).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, "examples")

from battery_plugin.synthetic import CLASS_NAMES, generate_battery  # noqa: E402

OUT = ROOT / "docs" / "assets" / "battery_samples.png"
NUM_SAMPLES = 4
# pore black, carbon green, nickel blue (the colours of the PaSeR paper's figures)
LABEL_COLOURS = ["#000000", "#2ca02c", "#1f4fd6"]


def main() -> Path:
    images, labels, fineness = generate_battery(NUM_SAMPLES, 112, 128, seed=0)
    label_cmap = ListedColormap(LABEL_COLOURS)
    fig = plt.figure(figsize=(2.3 * NUM_SAMPLES + 1.6, 6.4))
    grid = fig.add_gridspec(3, NUM_SAMPLES + 1, width_ratios=[1.0] * NUM_SAMPLES + [0.55], wspace=0.06, hspace=0.12)
    rows = ("input scan", "phase labels", "fineness")
    fine_im = None
    for j in range(NUM_SAMPLES):
        ax_in, ax_lab, ax_fine = (fig.add_subplot(grid[i, j]) for i in range(3))
        ax_in.imshow(images[j, 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        ax_lab.imshow(labels[j].numpy(), cmap=label_cmap, vmin=-0.5, vmax=len(LABEL_COLOURS) - 0.5, interpolation="nearest")
        fine_im = ax_fine.imshow(fineness[j].numpy(), cmap="magma", vmin=0.0, vmax=1.0)
        ax_in.set_title(f"sample {j}")
        for i, ax in enumerate((ax_in, ax_lab, ax_fine)):
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(rows[i])
    legend_ax = fig.add_subplot(grid[1, NUM_SAMPLES])
    legend_ax.axis("off")
    handles = [Patch(color=c, label=n) for c, n in zip(LABEL_COLOURS, CLASS_NAMES, strict=True)]
    legend_ax.legend(handles=handles, loc="center left", frameon=False)
    bar_ax = fig.add_subplot(grid[2, NUM_SAMPLES])
    bar_ax.axis("off")
    cax = bar_ax.inset_axes((0.05, 0.05, 0.15, 0.9))
    fig.colorbar(fine_im, cax=cax, label="1 = finely interspersed")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(f"wrote {main()}")
