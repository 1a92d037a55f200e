"""A small synthetic Cityscapes stand-in, written in the official layout.

Each scene is a street seen from a car: sky above a horizon, road below it with a sidewalk strip,
buildings and trees standing on the horizon, poles with traffic signs or lights, cars on the
road, persons on the sidewalk and the ego vehicle's bonnet at the bottom. Pixels take their
class's official Cityscapes colour, jittered per object and per image, plus Gaussian noise, so a
small model learns the large classes quickly while thin poles, signs and persons need more capacity.
Label files hold Cityscapes label *ids* (not train ids), including ids outside the 19 classes:
1 (ego vehicle) along the bottom and scattered 0 (unlabeled) pixels, which the loader maps to
the ignore label 255.

Create one from the command line (run from ``examples/``, or with ``PYTHONPATH=examples``)::

    cd examples && python -m cityscapes_plugin.fixture /tmp/cityscapes_fixture

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cityscapes_plugin.labels import PALETTE

__all__ = ["DEFAULT_CITIES", "main", "make_fixture", "synthetic_scene"]

DEFAULT_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
}
"""Cities of each split (official city names; val holds the three official val cities)."""

# Cityscapes label ids (the values of *_gtFine_labelIds.png).
_UNLABELED, _EGO, _ROAD, _SIDEWALK, _BUILDING, _FENCE, _POLE = 0, 1, 7, 8, 11, 13, 17
_LIGHT, _SIGN, _VEGETATION, _TERRAIN, _SKY, _PERSON, _CAR, _TRUCK = 19, 20, 21, 22, 23, 24, 26, 27
_EGO_COLOUR = (35, 35, 40)  # the official colour of 'ego vehicle' is black, as 'unlabeled'; a bonnet is dark grey


def _box(
    ids: np.ndarray, colours: np.ndarray, top: int, bottom: int, left: int, right: int, label: int, colour: np.ndarray
) -> None:
    """Paint rows ``top:bottom`` and columns ``left:right`` with a label id and an RGB colour (clipped to the image)."""
    height, width = ids.shape
    top, bottom, left, right = max(top, 0), min(bottom, height), max(left, 0), min(right, width)
    if top < bottom and left < right:
        ids[top:bottom, left:right] = label
        colours[top:bottom, left:right] = colour


def synthetic_scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic street scene.

    Args:
        height: Image height (at least 16).
        width: Image width (at least 16).
        rng: Random generator.

    Returns:
        ``(rgb uint8 [H, W, 3], label ids uint8 [H, W])``.
    """
    if height < 16 or width < 16:
        raise ValueError(f"Expected a fixture image of at least 16 x 16 but got height {height} and width {width}.")
    ids = np.zeros((height, width), dtype=np.uint8)
    colours = np.zeros((height, width, 3), dtype=np.float32)

    def colour(label: int, jitter: float = 18.0) -> np.ndarray:
        base = np.asarray(_EGO_COLOUR if label == _EGO else PALETTE[label], dtype=np.float32)
        return base + rng.normal(0.0, jitter, 3).astype(np.float32)

    horizon = int(height * rng.uniform(0.38, 0.5))
    kerb = horizon + max(2, int(height * rng.uniform(0.06, 0.12)))
    bonnet = height - max(2, int(height * rng.uniform(0.06, 0.1)))
    _box(ids, colours, 0, horizon, 0, width, _SKY, colour(_SKY, 10.0))
    _box(ids, colours, horizon, kerb, 0, width, _SIDEWALK, colour(_SIDEWALK))
    _box(ids, colours, kerb, height, 0, width, _ROAD, colour(_ROAD, 10.0))
    if rng.random() < 0.5:  # a grass verge on one side of the sidewalk
        side = int(width * rng.uniform(0.15, 0.35))
        left = 0 if rng.random() < 0.5 else width - side
        _box(ids, colours, horizon, kerb, left, left + side, _TERRAIN, colour(_TERRAIN))
    for _ in range(int(rng.integers(2, 6))):  # buildings, with darker window rows
        top = int(height * rng.uniform(0.02, 0.3))
        left, span = int(rng.integers(0, width)), int(width * rng.uniform(0.12, 0.35))
        wall = colour(_BUILDING, 25.0)
        _box(ids, colours, top, horizon, left, left + span, _BUILDING, wall)
        for row in range(top + 2, horizon - 2, 4):
            colours[row, max(left, 0) : min(left + span, width)] = wall * 0.6
    for _ in range(int(rng.integers(1, 4))):  # trees
        top = int(height * rng.uniform(0.15, 0.35))
        left, span = int(rng.integers(0, width)), int(width * rng.uniform(0.06, 0.16))
        _box(ids, colours, top, horizon + 1, left, left + span, _VEGETATION, colour(_VEGETATION, 22.0))
    if rng.random() < 0.5:  # a fence along the sidewalk
        left, span = int(rng.integers(0, width)), int(width * rng.uniform(0.1, 0.3))
        _box(ids, colours, horizon - max(2, height // 20), horizon + 1, left, left + span, _FENCE, colour(_FENCE))
    for _ in range(int(rng.integers(1, 4))):  # poles carrying a sign or a light
        x, top = int(rng.integers(1, width - 1)), int(height * rng.uniform(0.15, 0.3))
        _box(ids, colours, top, kerb, x, x + max(1, width // 96), _POLE, colour(_POLE, 10.0))
        head = _SIGN if rng.random() < 0.6 else _LIGHT
        size = max(2, height // 24)
        _box(ids, colours, top - size, top + size, x - size, x + size + 1, head, colour(head))
    for _ in range(int(rng.integers(1, 4))):  # persons on the sidewalk
        x, tall = int(rng.integers(0, width)), max(4, int(height * rng.uniform(0.12, 0.22)))
        _box(ids, colours, kerb - tall, kerb, x, x + max(2, width // 48), _PERSON, colour(_PERSON, 25.0))
    for _ in range(int(rng.integers(1, 4))):  # cars (sometimes a truck) on the road
        label = _TRUCK if rng.random() < 0.2 else _CAR
        bottom = int(rng.integers(kerb + 3, bonnet + 1))
        scale = (bottom - horizon) / max(height - horizon, 1)  # nearer cars look bigger
        tall, span = max(3, int(height * 0.22 * scale)), max(4, int(width * 0.22 * scale))
        left = int(rng.integers(-span // 2, width - span // 2))
        _box(ids, colours, bottom - tall, bottom, left, left + span, label, colour(label, 20.0))
    _box(ids, colours, bonnet, height, 0, width, _EGO, colour(_EGO, 5.0))  # ego vehicle: ignored
    speckle = rng.random((height, width)) < 0.01  # unlabeled pixels: ignored
    ids[speckle] = _UNLABELED
    colours[speckle] = rng.uniform(0, 255, (int(speckle.sum()), 3))
    colours *= np.float32(rng.uniform(0.8, 1.2))  # lighting
    colours += rng.normal(0.0, 12.0, colours.shape).astype(np.float32)
    return np.clip(colours, 0, 255).round().astype(np.uint8), ids


def make_fixture(
    root: str | Path,
    cities: Mapping[str, Sequence[str]] | None = None,
    images_per_city: int = 8,
    height: int = 64,
    width: int = 128,
    seed: int = 0,
) -> Path:
    """Write a synthetic data set in the official Cityscapes layout.

    Files are ``root/leftImg8bit/{split}/{city}/{city}_{i:06d}_000019_leftImg8bit.png`` (RGB) and
    ``root/gtFine/{split}/{city}/{city}_{i:06d}_000019_gtFine_labelIds.png`` (label ids, 8-bit grey).
    Existing files of the same names are overwritten.

    Args:
        root: Output folder (created).
        cities: ``{split: [city, ...]}``; `DEFAULT_CITIES` (train and val, three cities each) when ``None``.
        images_per_city: Images written per city.
        height: Image height (the official data is 1024 x 2048; keep the 1 : 2 aspect ratio).
        width: Image width.
        seed: Seed of the scenes.

    Returns:
        ``root`` as a `Path`.
    """
    if images_per_city < 1:
        raise ValueError(f"Expected images_per_city >= 1 but got {images_per_city}.")
    cities = DEFAULT_CITIES if cities is None else cities
    root = Path(root)
    for split, names in cities.items():
        for city in names:
            image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_city):
                key = zlib.crc32(f"{split}/{city}/{i}".encode())
                rgb, ids = synthetic_scene(height, width, np.random.default_rng([seed, key]))
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(rgb).save(image_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(ids).save(label_dir / f"{stem}_gtFine_labelIds.png")
    return root


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m cityscapes_plugin.fixture OUT_DIR [--images-per-city N] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m cityscapes_plugin.fixture",
        description="Write a small synthetic Cityscapes stand-in (official layout, train + val) to OUT_DIR.",
    )
    parser.add_argument("out_dir", type=Path, help="output folder; point data.params.root (or ROUTERKIT_DATA/cityscapes) at it")
    parser.add_argument("--images-per-city", type=int, default=8, help="images per city (3 train and 3 val cities)")
    parser.add_argument("--height", type=int, default=64, help="image height")
    parser.add_argument("--width", type=int, default=128, help="image width")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    root = make_fixture(args.out_dir, images_per_city=args.images_per_city, height=args.height, width=args.width, seed=args.seed)
    count = sum(1 for _ in root.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    print(f"Wrote {count} synthetic Cityscapes images ({args.height} x {args.width}) to {root}")
    return root


if __name__ == "__main__":
    main()
