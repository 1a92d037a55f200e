"""Write synthetic battery scans as image files, with their ground-truth masks, to route with ``routerkit predict``.

Scans are 8 or 16-bit grayscale PNGs (``scan_000.png``, ...; pixels in [0, 1] scaled to the full
range, as a trained run reads them back); their masks, of the same names, go to ``masks/`` with the
PaSeR data set's values (0 = pore, 255 = carbon, 128 = nickel). Run from ``examples/`` (or with
``PYTHONPATH=examples``)::

    cd examples && python -m battery_plugin.export_scans /tmp/scans --count 4 --height 112 --width 128
    routerkit predict runs/battery /tmp/scans

Scans of another size than the run was trained on are tiled (larger) or padded (smaller) by
``routerkit predict``. The default seed differs from the seeds of the training data (0, 1, 2 in
examples/battery.yaml).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from battery_plugin import FILE_FORMAT
from battery_plugin.synthetic import CLASS_NAMES, generate_battery

__all__ = ["export_scans", "main"]


def export_scans(
    out_dir: str | Path, count: int = 4, height: int = 112, width: int = 128, bits: int = 8, seed: int = 100
) -> list[Path]:
    """Write ``count`` synthetic scans to ``out_dir`` and their masks to ``out_dir/masks``.

    Args:
        out_dir: Output folder (created).
        count: Number of scans.
        height: Scan height (at least 8).
        width: Scan width (at least 8).
        bits: 8 or 16-bit scans (masks are always 8-bit).
        seed: Seed of `generate_battery`.

    Returns:
        The scan files written.

    Raises:
        ValueError: ``bits`` is not 8 or 16, ``count < 1``, or a size `generate_battery` refuses.
    """
    if bits not in (8, 16):
        raise ValueError(f"Expected bits to be 8 or 16 but got {bits}.")
    if count < 1:
        raise ValueError(f"Expected count >= 1 but got {count}.")
    images, labels, _ = generate_battery(count, height, width, seed=seed)
    folder = Path(out_dir)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    top, dtype = (255, np.uint8) if bits == 8 else (65535, np.uint16)
    values = np.asarray([FILE_FORMAT.mask_value(k) for k in range(len(CLASS_NAMES))], dtype=np.uint8)
    written = []
    for i in range(count):
        name = f"scan_{i:03d}.png"
        pixels = np.round(images[i, 0].numpy().astype(np.float64) * top).astype(dtype)
        Image.fromarray(pixels).save(folder / name)
        Image.fromarray(values[labels[i].numpy()]).save(folder / "masks" / name)
        written.append(folder / name)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line: ``python -m battery_plugin.export_scans OUT_DIR [--count N] [--height H] [--width W] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m battery_plugin.export_scans",
        description="Write synthetic battery scans (PNG) and their masks (OUT_DIR/masks: 0 pore, 255 carbon, 128 nickel).",
    )
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument("--count", type=int, default=4, help="number of scans")
    parser.add_argument("--height", type=int, default=112, help="scan height (examples/battery.yaml trains on 112)")
    parser.add_argument("--width", type=int, default=128, help="scan width (examples/battery.yaml trains on 128)")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8, help="bits per pixel of the scans")
    parser.add_argument("--seed", type=int, default=100, help="random seed")
    args = parser.parse_args(argv)
    try:
        files = export_scans(args.out_dir, args.count, args.height, args.width, args.bits, args.seed)
    except ValueError as err:
        parser.error(str(err))
    masks = args.out_dir / "masks"
    print(f"Wrote {len(files)} {args.bits}-bit scans ({args.height} x {args.width}) to {args.out_dir} and their masks to {masks}")
    return files


if __name__ == "__main__":
    main()
