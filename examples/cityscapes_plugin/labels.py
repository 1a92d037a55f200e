"""The official Cityscapes label definition and its ``labelIds -> trainIds`` lookup table.

Transcribed from ``cityscapesscripts/helpers/labels.py`` of the Cityscapes team
(https://github.com/mcordts/cityscapesScripts): the ``*_gtFine_labelIds.png`` files hold the
``id`` column (0 to 33); the 19 evaluated classes get train ids 0 to 18 and every other id
is mapped to 255, the ignore label (``DataBundle.ignore_index``). ``license plate`` has id -1
in the definition and never appears in the 8-bit label files.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["CLASS_NAMES", "IGNORE_INDEX", "LABELS", "LABEL_TO_TRAIN", "PALETTE", "Label", "label_ids_to_train_ids"]

IGNORE_INDEX = 255
"""Train id of every pixel that is not one of the 19 evaluated classes."""


class Label(NamedTuple):
    """One row of the official Cityscapes label table."""

    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, -1, (0, 0, 142)),
)
"""The official table: name, label id (the value in ``*_gtFine_labelIds.png``), train id, colour."""


def _lookup_table() -> np.ndarray:
    """``uint8[256]``: train id of every 8-bit label id; 255 for ids outside the 19 classes."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in LABELS:
        if 0 <= label.id < 256 and 0 <= label.train_id < IGNORE_INDEX:
            table[label.id] = label.train_id
    return table


LABEL_TO_TRAIN: np.ndarray = _lookup_table()
"""Lookup table ``uint8[256]`` from label id to train id (255 = ignore)."""

CLASS_NAMES: list[str] = [
    label.name for label in sorted(LABELS, key=lambda lab: lab.train_id) if 0 <= label.train_id < IGNORE_INDEX
]
"""The 19 evaluated classes in train-id order (``CLASS_NAMES[k]`` is train id ``k``)."""

PALETTE: dict[int, tuple[int, int, int]] = {label.id: label.color for label in LABELS if label.id >= 0}
"""Official colour of each label id (used by the synthetic fixture)."""


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an array of Cityscapes label ids to train ids (0-18, 255 = ignore).

    Args:
        label_ids: Integer array of label ids (any shape), e.g. a decoded ``*_gtFine_labelIds.png``.

    Returns:
        An int64 array of the same shape holding train ids.

    Raises:
        ValueError: A value is outside 0-255 (not an 8-bit label id).
    """
    ids = np.asarray(label_ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(f"Expected 8-bit Cityscapes label ids in [0, 255] but got values in [{ids.min()}, {ids.max()}].")
    return LABEL_TO_TRAIN[ids.astype(np.intp)].astype(np.int64)
