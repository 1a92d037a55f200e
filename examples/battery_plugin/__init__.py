"""Battery phase segmentation plugin: synthetic electrode scans or the PaSeR folder layout.

This is what a user writes to plug their own data into routerkit: a function returning a
`routerkit.data.DataBundle`, referenced from the YAML as
``data.factory: battery_plugin:build_data``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from battery_plugin.synthetic import CLASS_NAMES, generate_battery
from routerkit.data import DataBundle, FileFormat, Split

__all__ = ["FILE_FORMAT", "build_data", "generate_battery"]

#: Scans are 8 or 16-bit grayscale files scaled into [0, 1]; predicted masks are written with the PaSeR
#: data set's values (0 = pore, 255 = carbon, 128 = nickel).
FILE_FORMAT = FileFormat(mask_values={0: 0, 1: 255, 2: 128})


def build_data(
    source: str = "synthetic",
    root: str | None = None,
    num_train: int = 300,
    num_val: int = 20,
    num_test: int = 40,
    height: int = 112,
    width: int = 128,
    seed: int = 0,
    generator: dict[str, Any] | None = None,
) -> DataBundle:
    """Build the battery data set.

    Args:
        source: ``"synthetic"`` (generated, deterministic, no files) or ``"paser_folder"`` (the
            PaSeR battery layout under ``root``: ``train_images/``, ``train_label/``,
            ``validation_images/``, ...; masks 0 = pore, 255 = carbon, other = nickel).
        root: Folder of the real data set (``"paser_folder"``); ``$ROUTERKIT_DATA/battery`` if unset.
        num_train: Synthetic training images.
        num_val: Synthetic validation images.
        num_test: Synthetic test images.
        height: Synthetic image height.
        width: Synthetic image width.
        seed: Seed of the synthetic data (train, val and test use seed, seed + 1, seed + 2).
        generator: Extra keyword arguments of `generate_battery` (difficulty knobs).

    Returns:
        The train / val / test bundle with classes ``pore, carbon, nickel``.
    """
    if source == "synthetic":
        kw = dict(generator or {})
        splits = []
        for offset, n in enumerate((num_train, num_val, num_test)):
            x, y, fineness = generate_battery(n, height, width, seed=seed + offset, **kw)
            splits.append(Split(x, y, {"fineness": fineness}))
        return DataBundle(splits[0], splits[1], splits[2], list(CLASS_NAMES), file_format=FILE_FORMAT)
    if source == "paser_folder":
        from routerkit.data.folder import PASER_BATTERY_CLASSES, load_paser_battery

        if root is None:
            env = os.environ.get("ROUTERKIT_DATA")
            if not env:
                raise ValueError("data.params.root is required for source 'paser_folder' (or set ROUTERKIT_DATA).")
            root = str(Path(env) / "battery")
        loaded = load_paser_battery(root)
        return DataBundle(
            loaded["train"], loaded["validation"], loaded["test"], list(PASER_BATTERY_CLASSES), file_format=FILE_FORMAT
        )
    raise ValueError(f"data.params.source must be 'synthetic' or 'paser_folder', got {source!r}.")
