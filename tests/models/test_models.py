"""Tests of routerkit.models: UNet, paper presets, Zoo validation, SMPModel and the toy models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routerkit.models import PAPER_PRESETS, SMPModel, ToyClassifier, ToySegmenter, UNet, Zoo, create_model, list_models


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("height", "width"), [(28, 32), (30, 34), (17, 5), (8, 8), (1, 1)])
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_unet_any_size(height: int, width: int, depth: int) -> None:
    net = UNet(in_channels=2, num_classes=3, base_channels=2, depth=depth, dropout=0.1).eval()
    out = net(torch.randn(2, 2, height, width))
    assert out.shape == (2, 3, height, width)


def test_unet_validation() -> None:
    with pytest.raises(ValueError, match="depth >= 0"):
        UNet(depth=-1)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)


@pytest.mark.parametrize(("size", "paper"), [("small", 16_571), ("medium", 1_080_595), ("large", 17_275_459)])
def test_paper_presets_parameter_counts(size: str, paper: int) -> None:
    model = create_model(f"unet_paper_{size}")
    assert isinstance(model, UNet)
    assert model.depth == PAPER_PRESETS[size][1]
    assert abs(num_params(model) - paper) / paper < 0.05


def test_registry_lists_models() -> None:
    names = list_models()
    for name in ("unet", "unet_paper_small", "unet_paper_medium", "unet_paper_large", "smp", "toy_segmenter", "toy_classifier"):
        assert name in names
    assert list_models("unet_paper_*") == ["unet_paper_large", "unet_paper_medium", "unet_paper_small"]
    net = create_model("unet", in_channels=3, num_classes=4, base_channels=2, depth=1)
    assert net(torch.randn(1, 3, 6, 6)).shape == (1, 4, 6, 6)


def test_toy_models_shapes() -> None:
    seg = ToySegmenter(in_channels=3, num_classes=4, width=2)
    assert seg(torch.randn(2, 3, 5, 7)).shape == (2, 4, 5, 7)
    cls = ToyClassifier(in_features=6, num_classes=3, hidden=4)
    assert cls(torch.randn(5, 6)).shape == (5, 3)
    assert cls(torch.randn(5, 2, 3)).shape == (5, 3)  # flattened


def test_zoo_sequence_and_mapping() -> None:
    a, b, c = ToySegmenter(width=2), ToySegmenter(width=4), ToySegmenter(width=8)
    zoo = Zoo([a, b, c])
    assert zoo.names == ["f0", "f1", "f2"]
    assert len(zoo) == zoo.num_models == 3
    assert zoo.base is a and zoo[2] is c and list(zoo) == [a, b, c]
    assert zoo.num_parameters() == [num_params(a), num_params(b), num_params(c)]
    named = Zoo({"small": a, "big": b})
    assert named.names == ["small", "big"]
    assert named.base is a


@pytest.mark.parametrize("models", [[], [ToySegmenter()], {"only": ToySegmenter()}])
def test_zoo_needs_two_models(models: object) -> None:
    with pytest.raises(ValueError, match="at least 2 models"):
        Zoo(models)  # type: ignore[arg-type]


def test_zoo_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match=r"'f1' to be a torch\.nn\.Module but got function"):
        Zoo([ToySegmenter(), lambda x: x])  # type: ignore[list-item]


def test_zoo_rejects_duplicate_names() -> None:
    # A mapping cannot hold duplicate keys, so use a custom Mapping that yields one twice.
    from collections.abc import Mapping

    class Dup(Mapping):
        def __init__(self) -> None:
            self.items_ = [("a", ToySegmenter()), ("a", ToySegmenter())]

        def __getitem__(self, key: str) -> nn.Module:
            return dict(self.items_)[key]

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(k for k, _ in self.items_)

        def __len__(self) -> int:
            return len(self.items_)

        def keys(self):  # type: ignore[no-untyped-def]
            return [k for k, _ in self.items_]

        def values(self):  # type: ignore[no-untyped-def]
            return [v for _, v in self.items_]

    with pytest.raises(ValueError, match="unique model names"):
        Zoo(Dup())


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to fetch weights fail loudly."""
    import urllib.request

    import torch.hub

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected download attempt: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_smp_model_runs_with_padding(no_downloads: None) -> None:
    torch.manual_seed(0)
    model = SMPModel(arch="Unet", encoder_name="resnet18", in_channels=1, num_classes=3, encoder_weights=None).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 40, 48))
    assert out.shape == (1, 3, 40, 48)
    assert torch.isfinite(out).all()


def test_smp_model_refuses_hub_weights(no_downloads: None) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        SMPModel(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet")


def test_smp_model_loads_local_encoder_weights(tmp_path, no_downloads: None) -> None:
    torch.manual_seed(0)
    source = SMPModel(arch="Unet", encoder_name="resnet18", in_channels=1, num_classes=2)
    path = tmp_path / "encoder.pt"
    torch.save(source.model.encoder.state_dict(), path)
    torch.manual_seed(1)
    loaded = SMPModel(arch="Unet", encoder_name="resnet18", in_channels=1, num_classes=2, encoder_weights=str(path))
    expected, got = source.model.encoder.state_dict(), loaded.model.encoder.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
