"""The routing figure: input with the routing, f_0's uncertainty map with each unit's model, labels, prediction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from routerkit import PatchGrid, RoutedPipeline, Zoo, create_router
from routerkit.data import Split
from routerkit.models import ToySegmenter, UNet
from routerkit.plots import routing_overlay

pytest.importorskip("matplotlib")


def _pipe() -> RoutedPipeline:
    torch.manual_seed(0)
    zoo = Zoo({"f0": UNet(1, 3, 2, 1, dropout=0.2), "f1": ToySegmenter(1, 3), "f2": ToySegmenter(1, 3)})
    return RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 16, 16))


def _split() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.rand(3, 1, 16, 16, generator=g), torch.randint(0, 3, (3, 16, 16), generator=g))


@pytest.mark.parametrize("router", ["paser", "random"])
def test_the_figure_has_four_rows_one_per_view(tmp_path: Path, router: str) -> None:
    from PIL import Image

    pipe = _pipe()
    r = create_router(router, router_spec=pipe.router_spec(3, spatial=True))
    path = routing_overlay(pipe, r, _split(), tmp_path / "fig" / "routing.png", ["f0", "f1", "f2"], num_classes=3)
    with Image.open(path) as img:
        width, height = img.size
    assert height > width  # 4 rows of 3 samples: taller than wide (3 rows were 7.2 / 7.8)


def test_the_uncertainty_row_shows_the_state_the_router_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    shown: list[torch.Tensor] = []
    original = matplotlib.axes.Axes.imshow

    def spy(self: matplotlib.axes.Axes, data: object, *args: object, **kwargs: object) -> object:
        if kwargs.get("cmap") == "magma":
            shown.append(torch.as_tensor(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    pipe = _pipe()
    r = create_router("paser", router_spec=pipe.router_spec(3, spatial=True))
    split = _split()
    routing_overlay(pipe, r, split, tmp_path / "routing.png", ["f0", "f1", "f2"], num_samples=2, num_classes=3)
    assert len(shown) == 2 and shown[0].shape == (16, 16)
    assert float(shown[0].min()) >= 0.0 and float(shown[0].max()) > 0.0  # entropies of f_0's MC mean
