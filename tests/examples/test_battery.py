"""The battery plugin: synthetic data properties, and every examples/*.yaml through the CLI at a tiny budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from battery_plugin import build_data  # noqa: E402
from battery_plugin.synthetic import generate_battery  # noqa: E402

from routerkit.partitioners import PatchGrid  # noqa: E402


def test_generator_is_deterministic_and_seed_dependent() -> None:
    a = generate_battery(3, 32, 48, seed=5)
    b = generate_battery(3, 32, 48, seed=5)
    c = generate_battery(3, 32, 48, seed=6)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_generator_phases_and_degradation() -> None:
    images, labels, fineness = generate_battery(8, 64, 64, seed=0)
    assert images.shape == (8, 1, 64, 64) and labels.shape == (8, 64, 64) and fineness.shape == (8, 64, 64)
    share = torch.bincount(labels.flatten(), minlength=3).float() / labels.numel()
    assert share.argmax() == 2, "nickel must be the majority phase"
    assert 0.5 < float(share[2]) < 0.75 and float(share[0]) > 0.05 and float(share[1]) > 0.05
    # Interspersed regions are pore- and binder-rich, segregated ones dense nickel.
    fine, coarse = fineness > 0.25, fineness <= 0.25
    assert float((labels[fine] < 2).float().mean()) > 2 * float((labels[coarse] < 2).float().mean())
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    # Spatially varying difficulty in three tiers: segregated, agglomerates, finely interspersed.
    assert float((fineness > 0.75).float().mean()) == pytest.approx(0.2, abs=0.1)
    assert float(((fineness > 0.25) & (fineness <= 0.75)).float().mean()) == pytest.approx(0.3, abs=0.12)
    # The input is degraded: a per-pixel threshold of intensities does not recover the labels.
    thresh = (images[:, 0] > 0.33).long() + (images[:, 0] > 0.55).long()
    assert float((thresh == labels).float().mean()) < 0.9


def test_interspersed_patches_have_more_boundaries() -> None:
    _, labels, fineness = generate_battery(6, 64, 64, seed=1)
    grid = PatchGrid(4, 4)
    unit_labels, unit_fine = grid.split(labels), grid.split(fineness).mean((1, 2))
    edges = (unit_labels[:, 1:, :] != unit_labels[:, :-1, :]).float().mean((1, 2))
    fine, coarse = edges[unit_fine > 0.7], edges[unit_fine < 0.3]
    assert fine.numel() and coarse.numel()
    assert float(fine.mean()) > 2 * float(coarse.mean())


def test_build_data_errors() -> None:
    with pytest.raises(ValueError, match="source"):
        build_data(source="nope")
    with pytest.raises(ValueError, match="divisible"):
        build_data(num_train=3, num_val=1, num_test=1, height=31, width=32, generator={"downsample": 2})


def test_paser_folder_source_reads_the_layout(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    for split, n in (("train", 3), ("validation", 1), ("test", 1)):
        (tmp_path / f"{split}_images").mkdir()
        (tmp_path / f"{split}_label").mkdir()
        for i in range(n):
            Image.fromarray(np.full((16, 16), 100 + i, np.uint8)).save(tmp_path / f"{split}_images" / f"{i}.png")
            mask = np.zeros((16, 16), np.uint8)
            mask[:, 8:] = 255
            mask[:4] = 128
            Image.fromarray(mask).save(tmp_path / f"{split}_label" / f"{i}.png")
    bundle = build_data(source="paser_folder", root=str(tmp_path))
    assert len(bundle.train) == 3 and bundle.class_names == ["pore", "carbon", "nickel"]
    assert set(bundle.train.targets.unique().tolist()) == {0, 1, 2}
