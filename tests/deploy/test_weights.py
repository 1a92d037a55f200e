"""`routerkit export --format safetensors`: a run's zoo as weight files another config loads with train: false."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import tiny_battery
from safetensors.torch import load_file
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.deploy.weights import export_weights
from routerkit.training.run_dir import load_routing

ROOT = Path(__file__).resolve().parents[2]
TINY = [x for item in (*tiny_battery(), "run.threads=1") for x in ("-s", item)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("weights") / "run"
    result = CliRunner().invoke(app, ["train", str(ROOT / "examples" / "battery.yaml"), "--run-dir", str(run_dir), *TINY])
    assert result.exit_code == 0, result.output
    return run_dir


def test_every_model_is_written_with_its_trained_weights_and_an_index(run: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "f2_large" in said and "train: false" in said
    parts = load_routing(run, device="cpu")
    index = json.loads((tmp_path / "w" / "zoo.json").read_text())
    assert [m["name"] for m in index["models"]] == list(parts.zoo.names)
    for i, entry in enumerate(index["models"]):
        saved = load_file(tmp_path / "w" / entry["file"])
        expected = parts.zoo[i].state_dict()
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[k], expected[k]) for k in saved)
        assert entry["model"] == parts.config.zoo.models[i].model and entry["params"] == parts.config.zoo.models[i].params
        assert entry["num_parameters"] == sum(p.numel() for p in parts.zoo[i].parameters())
        assert 0.0 <= entry["test"]["accuracy"] <= 1.0  # the run's own score of the model alone
        assert len(entry["sha256"]) == 64


def test_a_config_loading_the_exported_zoo_frozen_reproduces_its_models(run: Path, tmp_path: Path) -> None:
    export_weights(run, tmp_path / "w")
    frozen: list[str] = []
    for i, name in enumerate(load_routing(run, device="cpu").zoo.names):
        frozen += ["-s", f"zoo.models.{i}.weights={tmp_path / 'w' / name}.safetensors", "-s", f"zoo.models.{i}.train=false"]
    again = tmp_path / "again"
    result = CliRunner().invoke(app, ["train", str(ROOT / "examples" / "battery.yaml"), "--run-dir", str(again), *TINY, *frozen])
    assert result.exit_code == 0, result.output
    assert "stages skipped: pretrain_large, pretrain_base" in result.output
    first, second = load_routing(run, device="cpu"), load_routing(again, device="cpu")
    for i in range(len(first.zoo)):
        a, b = first.zoo[i].state_dict(), second.zoo[i].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_files_are_not_overwritten_unless_asked(run: Path, tmp_path: Path) -> None:
    export_weights(run, tmp_path / "w")
    before = (tmp_path / "w" / "zoo.json").read_bytes()
    result = CliRunner().invoke(app, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "w")])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "Refusing to overwrite" in said and "--overwrite" in said
    assert (tmp_path / "w" / "zoo.json").read_bytes() == before
    result = CliRunner().invoke(app, ["export", str(run), "--format", "safetensors", "--out", str(tmp_path / "w"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "w").glob(".*.tmp"))


def test_bad_format_and_not_a_run_are_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "tflite"])
    assert result.exit_code != 0 and "'onnx' or 'safetensors'" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--format", "safetensors"])
    assert result.exit_code != 0 and "is not a run directory" in " ".join(result.output.split())


def test_an_interrupted_overwrite_leaves_no_index_vouching_for_the_files(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import routerkit.deploy.weights as weights

    export_weights(run, tmp_path / "w")
    mode = (tmp_path / "w" / "zoo.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # shareable files, not mkstemp's 0600
    calls = {"n": 0}
    original = weights.atomic_write_bytes

    def crash_on_second(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(path, data)

    monkeypatch.setattr(weights, "atomic_write_bytes", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        export_weights(run, tmp_path / "w", overwrite=True)
    assert not (tmp_path / "w" / "zoo.json").exists()
    assert not list((tmp_path / "w").glob(".*.tmp"))
