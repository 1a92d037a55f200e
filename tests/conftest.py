"""Shared tiny fixtures: a two-model segmentation zoo and a tiny segmentation DataBundle."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from routerkit.data import DataBundle, Split
from routerkit.models import ToySegmenter, Zoo

# The models under test are tiny: one intra-op thread is faster than several and keeps
# the suite's runtime stable on busy 2-core machines (OpenMP spin-waiting dominates otherwise).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _routerkit_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs trained by the tests are recorded in a throw-away trust store (``$ROUTERKIT_HOME``), never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTERKIT_HOME", str(tmp_path_factory.mktemp("routerkit_home")))
        yield


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_zoo() -> Zoo:
    """f_0 with dropout (for MC dropout) and a wider f_1; 1 input channel, 2 classes."""
    torch.manual_seed(1)
    f0 = ToySegmenter(in_channels=1, num_classes=2, width=2, dropout=0.3)
    return Zoo([f0, ToySegmenter(in_channels=1, num_classes=2, width=8)]).eval()


def _split(n: int, seed: int) -> Split:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=gen)
    targets = (images[:, 0] > 0.5).long()
    return Split(images, targets)


@pytest.fixture
def tiny_seg_bundle() -> DataBundle:
    """8 x 8 one-channel images, 2 classes (pixel > 0.5), 12/4/4 samples."""
    return DataBundle(_split(12, 0), _split(4, 1), _split(4, 2), class_names=["background", "foreground"])
