"""Loading a task model's weights from a file (``zoo.models[].weights``): round trips and every refusal, by message."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from routerkit.config import ConfigError, load_config, parse_config
from routerkit.config.build import build_zoo
from routerkit.models import ToySegmenter, UNet
from routerkit.models.weights_file import load_weights_file, read_state_dict

FIELD = "zoo.models.1.weights"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(in_channels=1, num_classes=2, base_channels=2, depth=1)


def _trained() -> nn.Module:
    """A model whose state differs from a fresh one's everywhere (batch-norm statistics included)."""
    model = _model(seed=1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
            else:
                tensor.add_(3)
    return model


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _load_error(path: Path, model: nn.Module | None = None) -> str:
    model = model if model is not None else _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        load_weights_file(model, path, FIELD)
    message = str(info.value)
    assert message.startswith(f"{FIELD} ({path}): Expected "), message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused file changed the model"
    return message


def test_safetensors_round_trip(tmp_path: Path) -> None:
    trained = _trained()
    save_file(trained.state_dict(), tmp_path / "f1.safetensors")
    model = _model()
    load_weights_file(model, tmp_path / "f1.safetensors", FIELD)
    _assert_same_state(model, trained)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_torch_file_round_trip_plain_or_wrapped(tmp_path: Path, wrapper: str | None) -> None:
    trained = _trained()
    state = trained.state_dict()
    content = state if wrapper is None else {wrapper: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    torch.save(content, tmp_path / "f1.pt")
    model = _model()
    load_weights_file(model, tmp_path / "f1.pt", FIELD)
    _assert_same_state(model, trained)


def test_a_missing_file_or_a_folder_is_named(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nope.safetensors")
    assert "Expected a state dict file (.safetensors or a torch file) but" in message and "does not exist" in message
    assert "is not a file" in _load_error(tmp_path)


@pytest.mark.parametrize("name", ["f1.safetensors", "f1.pt"])
def test_a_corrupt_file_is_refused(tmp_path: Path, name: str) -> None:
    good = tmp_path / ("good" + Path(name).suffix)
    if name.endswith(".safetensors"):
        save_file(_trained().state_dict(), good)
    else:
        torch.save(_trained().state_dict(), good)
    path = tmp_path / name
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    message = _load_error(path)
    reader = "safetensors" if name.endswith(".safetensors") else "torch.load"
    assert f"but got content {reader} cannot read" in message, message
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert "torch.load cannot read" in _load_error(tmp_path / "text.pt")


class _Payload:
    """An object whose unpickling would run code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_of_other_objects_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    message = _load_error(path)
    assert "Expected a torch file of tensors (a state dict) but got a pickle holding other objects" in message
    assert "could run code" in message and "torch.save(model.state_dict(), path)" in message
    assert not marker.exists(), "loading the file ran its code"
    with path.open("wb") as fh:  # a plain pickle (not torch's zip format) of a custom object
        pickle.dump(_Payload(str(marker)), fh, protocol=2)
    assert "torch.load cannot read" in _load_error(path) or "pickle holding other objects" in _load_error(path)
    assert not marker.exists()


def test_content_that_is_not_a_mapping_of_tensors_is_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    message = _load_error(tmp_path / "list.pt")
    assert "Expected a mapping of parameter names to tensors (a state dict, or a dict with a 'state_dict' or 'model'" in message
    assert message.endswith("but got a list.")
    torch.save({"weight": torch.zeros(2), "step": 3, "name": "f1"}, tmp_path / "mixed.pt")
    message = _load_error(tmp_path / "mixed.pt")
    assert "but got entries that are not named tensors: 'step' (int), 'name' (str) (2 in all)." in message
    torch.save({"optimizer": {"lr": torch.tensor(0.1)}, "epoch": 2}, tmp_path / "nested.pt")
    assert "'optimizer' (dict)" in _load_error(tmp_path / "nested.pt")


def test_missing_and_unexpected_keys_are_listed_with_their_count(tmp_path: Path) -> None:
    state = _trained().state_dict()
    keys = list(state)
    kept = {k: v for k, v in state.items() if k not in keys[:7]}
    kept.update({f"extra.{i}": torch.zeros(1) for i in range(2)})
    save_file(kept, tmp_path / "f1.safetensors")
    message = _load_error(tmp_path / "f1.safetensors")
    assert f"Expected the state dict of the model (UNet) ({len(state)} tensors) but got missing keys " in message
    assert ", ".join(repr(k) for k in keys[:5]) + ", ... (7 in all)" in message
    assert keys[5] not in message
    assert "unexpected keys 'extra.0', 'extra.1' (2 in all)." in message


def test_a_common_prefix_gets_a_hint(tmp_path: Path) -> None:
    save_file({f"module.{k}": v for k, v in _trained().state_dict().items()}, tmp_path / "f1.safetensors")
    message = _load_error(tmp_path / "f1.safetensors")
    assert "Every key of the file starts with 'module.': strip that prefix" in message


def test_shape_mismatches_name_key_expected_and_got(tmp_path: Path) -> None:
    wider = UNet(in_channels=1, num_classes=2, base_channels=3, depth=1)
    save_file(wider.state_dict(), tmp_path / "f1.safetensors")
    message = _load_error(tmp_path / "f1.safetensors")
    key = next(iter(_model().state_dict()))
    expected, got = list(_model().state_dict()[key].shape), list(wider.state_dict()[key].shape)
    assert (
        f"Expected tensors of the shapes of the model (UNet) but got other shapes for {key!r}: expected {expected} but got {got}"
        in message
    )
    assert "in all); were the weights saved from a model with other params" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    state = _trained().state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = bad
    torch.save(state, tmp_path / "f1.pt")
    message = _load_error(tmp_path / "f1.pt")
    assert f"Expected finite weights but got NaN or inf in {key!r} (1 in all)." in message


def test_read_state_dict_returns_cpu_tensors(tmp_path: Path) -> None:
    save_file({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(read_state_dict(tmp_path / "w.safetensors")["w"], torch.arange(3.0))


def _zoo_raw(weights: str | None, **extra: object) -> dict[str, object]:
    model: dict[str, object] = {"name": "f1", "model": "toy_segmenter", "params": {"width": 4}, **extra}
    if weights is not None:
        model["weights"] = weights
    return {
        "data": {"factory": "mypkg:data"},
        "uncertainty": {"name": "softmax_entropy"},
        "zoo": {"models": [{"name": "f0", "model": "toy_segmenter", "params": {"width": 2}}, model]},
    }


def test_build_zoo_loads_the_weights_and_names_the_field(tmp_path: Path) -> None:
    torch.manual_seed(5)
    trained = ToySegmenter(in_channels=1, num_classes=2, width=4)
    save_file(trained.state_dict(), tmp_path / "f1.safetensors")
    zoo = build_zoo(parse_config(_zoo_raw(str(tmp_path / "f1.safetensors"))), in_channels=1, num_classes=2)
    _assert_same_state(zoo[1], trained)
    unloaded = build_zoo(parse_config(_zoo_raw(str(tmp_path / "f1.safetensors"))), 1, 2, load_weights=False)
    fresh, saved = unloaded[1].state_dict(), trained.state_dict()
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)
    with pytest.raises(
        ConfigError,
        match=r"^zoo\.models\.1\.weights \(.*f1\.safetensors\): Expected tensors of the shapes of model 'f1' "
        r"\(ToySegmenter\) but got other shapes for 'net\.3\.weight': expected \[3, 4, 1, 1\] but got \[2, 4, 1, 1\]",
    ):
        build_zoo(parse_config(_zoo_raw(str(tmp_path / "f1.safetensors"))), in_channels=1, num_classes=3)
    with pytest.raises(ConfigError, match=r"^zoo\.models\.1\.weights \(.*gone\.pt\): Expected a state dict file.*does not exist"):
        build_zoo(parse_config(_zoo_raw(str(tmp_path / "gone.pt"))), in_channels=1, num_classes=2)


def test_relative_paths_resolve_against_the_config_folder_overrides_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "exp.yaml").write_text(yaml.safe_dump(_zoo_raw("weights/f1.pt")))
    monkeypatch.chdir(tmp_path)
    from_file = load_config(folder / "exp.yaml")
    assert from_file.zoo.models[1].weights == str(folder / "weights" / "f1.pt")
    # a path typed on the command line is relative to where it is typed
    typed = load_config(folder / "exp.yaml", ["zoo.models.1.weights=w/f1.pt"])
    assert typed.zoo.models[1].weights == str(tmp_path / "w" / "f1.pt")
    assert load_config(folder / "exp.yaml", ["zoo.models.1.weights=null"]).zoo.models[1].weights is None
    assert parse_config(_zoo_raw("weights/f1.pt")).zoo.models[1].weights == str(tmp_path / "weights" / "f1.pt")
    assert parse_config(_zoo_raw("/abs/f1.pt")).zoo.models[1].weights == "/abs/f1.pt"
    assert parse_config(_zoo_raw(None)).zoo.models[1].weights is None
    # the resolved (absolute) path is what a run's config.yaml records: it reads back unchanged from anywhere
    from routerkit.config import config_to_dict

    monkeypatch.chdir(folder)
    assert parse_config(config_to_dict(from_file)) == from_file
    with pytest.raises(ConfigError, match=r"zoo\.models\.1\.weights: Expected the path of a state dict file .* empty string"):
        parse_config(_zoo_raw(" "))
    with pytest.raises(ConfigError, match=r"zoo\.models\.1\.train: Expected a valid boolean"):
        parse_config(_zoo_raw(None, train="sometimes"))
