"""`routerkit.load` and `RoutedModel.predict`: a trained run routes new inputs of any size, without its data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_battery
from PIL import Image
from typer.testing import CliRunner

import routerkit
from routerkit.cli import app
from routerkit.config import ConfigError
from routerkit.data import DataSpec, FileFormat
from routerkit.deploy import RoutedModel, Tiling
from routerkit.deploy.inputs import as_inputs, pad_value, read_file
from routerkit.metrics import seeded_rng

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("deploy") / "run"
    args = [x for item in (*tiny_battery(), "run.threads=1") for x in ("-s", item)]
    result = CliRunner().invoke(app, ["train", str(ROOT / "examples" / "battery.yaml"), "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def model(run: Path) -> RoutedModel:
    return routerkit.load(run)


# --- tiling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(8, 8), (20, 10), (3, 5), (17, 16), (8, 25)])
def test_tiling_round_trips_any_size(size: tuple[int, int]) -> None:
    image = torch.rand(2, *size)
    tiles = Tiling.plan((2, 8, 8), (2, *size))
    windows = tiles.split(image, pad_value=torch.tensor([-1.0, -2.0]))
    assert windows.shape == (tiles.num_windows, 2, 8, 8)
    assert tiles.num_windows == -(-size[0] // 8) * -(-size[1] // 8)
    assert torch.equal(tiles.stitch(windows), image)
    padded = tiles.stitch(windows)  # the crop drops exactly the padding
    assert padded.shape == image.shape


def test_tiling_pads_with_the_pad_value_and_stitches_coarser_maps() -> None:
    tiles = Tiling.plan((1, 4, 4), (1, 6, 4))
    windows = tiles.split(torch.zeros(1, 6, 4), pad_value=torch.tensor([7.0]))
    assert windows.shape == (2, 1, 4, 4)
    assert bool((windows[1, :, 2:] == 7).all()) and bool((windows[1, :, :2] == 0).all())
    unit_map = torch.tensor([[[[0, 1], [2, 3]]], [[[4, 5], [6, 7]]]]).float()  # 2 x 2 units per window
    assert tiles.stitch(unit_map)[0].tolist() == [[0, 1], [2, 3], [4, 5]]  # 6 rows of pixels: 3 unit rows


def test_tiling_refuses_other_channels() -> None:
    with pytest.raises(ValueError, match="Expected an image with 1 channel"):
        Tiling.plan((1, 4, 4), (3, 8, 8))


# --- reading inputs ---------------------------------------------------------------------------------


def _spec(channels: int = 1, **fmt: object) -> DataSpec:
    return DataSpec((channels, 8, 8), ["a", "b"], None, "segmentation", FileFormat(**fmt))  # type: ignore[arg-type]


def test_files_are_scaled_and_standardised_as_the_run_was(tmp_path: Path) -> None:
    pixels8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels8).save(tmp_path / "a.png")
    pixels16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(pixels16).save(tmp_path / "b.png")
    np.save(tmp_path / "c.npy", pixels8)
    np.save(tmp_path / "d.npy", np.full((8, 8), 0.25, dtype=np.float32))
    spec = _spec(mean=(0.5,), std=(0.25,))
    a = read_file(tmp_path / "a.png", spec)
    assert a.shape == (1, 8, 8)
    torch.testing.assert_close(a[0], (torch.from_numpy(pixels8).float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(
        read_file(tmp_path / "b.png", spec)[0], (torch.from_numpy(pixels16.astype(np.float32)) / 65535 - 0.5) / 0.25
    )
    torch.testing.assert_close(read_file(tmp_path / "c.npy", spec), a)  # integer arrays are pixels
    torch.testing.assert_close(read_file(tmp_path / "d.npy", spec), torch.full((1, 8, 8), 0.25))  # floats: model inputs
    torch.testing.assert_close(pad_value(spec), torch.tensor([-2.0]))  # a zero pixel


def test_a_grayscale_scan_saved_as_rgb_is_read_as_grayscale_and_colour_is_refused(tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "gray.png")
    torch.testing.assert_close(read_file(tmp_path / "gray.png", _spec())[0], torch.from_numpy(gray).float() / 255)
    colour = np.random.default_rng(1).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png: expected 1 channel\(s\)"):
        read_file(tmp_path / "colour.png", _spec())


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.png", None, "no such file"),
        ("broken.png", b"not a png", "Could not read image file"),
        ("notes.txt", b"hello", "unsupported file type '.txt'"),
        ("pickled.npy", b"\x93NUMPY garbage", "could not read it as a .npy array"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_file(tmp_path / name, _spec())
    assert name in str(info.value)


def test_inputs_of_every_kind_become_named_model_inputs(tmp_path: Path) -> None:
    spec = _spec()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "z.png")
    items = as_inputs(
        [
            torch.rand(2, 1, 8, 8),
            torch.rand(1, 8, 8),
            np.zeros((8, 8), dtype=np.uint8),
            Image.new("L", (8, 8)),
            str(tmp_path / "z.png"),
        ],
        spec,
    )
    assert [i.name for i in items][:5] == ["input 0", "input 1", "input 2", "input 3", "input 4"]
    assert items[-1].name.endswith("z.png") and all(i.tensor.shape == (1, 8, 8) for i in items)
    with pytest.raises(TypeError, match="expected a tensor, a numpy array, a PIL image or a file path but got dict"):
        as_inputs([{}], spec)
    with pytest.raises(ValueError, match="expected a floating-point tensor"):
        as_inputs(torch.zeros(1, 8, 8, dtype=torch.long), spec)


# --- load and predict -------------------------------------------------------------------------------


def test_the_run_saves_its_data_spec(run: Path) -> None:
    spec = DataSpec.from_dict(json.loads((run / "data_spec.json").read_text()))
    assert spec.input_shape == (1, 32, 32) and spec.class_names == ["pore", "carbon", "nickel"]
    assert spec.task == "segmentation" and spec.file_format.mask_values == {0: 0, 1: 255, 2: 128}


def test_load_needs_no_data(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import routerkit.training.run_dir as run_dir_module

    def no_data(*_: object) -> None:
        raise AssertionError("load built the training data")

    monkeypatch.setattr(run_dir_module, "build_data", no_data)
    model = routerkit.load(run)
    assert not model.training and model.model_names == ["f0_small", "f1_medium", "f2_large"]
    assert model.train().training is False  # a routed model stays in eval mode


def test_predict_on_trained_size_matches_the_pipeline(run: Path, model: RoutedModel) -> None:
    x = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    out = model.predict(x, batch_size=5, probs=True)
    with seeded_rng(0, "cpu"):  # the same MC-dropout masks as predict's first batch
        ref = model.pipeline.route(x, model.router)
    assert torch.equal(out.actions, ref.actions)
    torch.testing.assert_close(out.probs, ref.probs.float())
    assert torch.equal(out.pred, ref.probs.argmax(1))
    torch.testing.assert_close(out.gflops, ref.flops.double() / 1e9)
    assert out.windows == [1] * 5 and out.routing_map is not None
    assert torch.equal(out.routing_map.reshape(5, -1), out.actions)
    torch.testing.assert_close(out.usage().sum(1), torch.ones(5, dtype=torch.float64))
    again = model.predict(x, batch_size=5)
    assert torch.equal(again.actions, out.actions)  # the seeded state: the same call, the same answer


def test_predict_matches_an_unfolded_pipeline(run: Path) -> None:
    """The inference copy (batch norms folded) routes like the trained models."""
    folded, plain = routerkit.load(run), RoutedModel(*_parts(run), fold_bn=False)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    a, b = folded.predict(x, probs=True), plain.predict(x, probs=True)
    assert torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-4, rtol=0)


def _parts(run: Path) -> tuple:
    from routerkit.training.run_dir import load_routing

    parts = load_routing(run)
    return parts.pipeline, parts.router, parts.spec


def test_larger_inputs_are_tiled_and_stitched(model: RoutedModel) -> None:
    tiles = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    big = torch.cat([torch.cat([tiles[0], tiles[1]], 2), torch.cat([tiles[2], tiles[3]], 2)], 1)  # 64 x 64
    whole = model.predict(big, batch_size=4, probs=True)
    parts = model.predict(tiles, batch_size=4, probs=True)  # the same windows in the same batch
    assert whole.windows == [4] and isinstance(whole.pred, list) and whole.pred[0].shape == (64, 64)
    assert torch.equal(whole.pred[0][:32, 32:], parts.pred[1]) and torch.equal(whole.pred[0][32:, :32], parts.pred[2])
    assert isinstance(whole.routing_map, list) and whole.routing_map[0].shape == (8, 8)
    assert torch.equal(whole.routing_map[0][4:, 4:], parts.routing_map[3])  # type: ignore[index]
    torch.testing.assert_close(whole.gflops[0], parts.gflops.sum())


def test_odd_sizes_are_padded_and_cropped_back(model: RoutedModel) -> None:
    out = model.predict([torch.rand(1, 20, 45), torch.rand(1, 32, 32)], probs=True)
    assert out.windows == [2, 1]
    assert isinstance(out.pred, list) and out.pred[0].shape == (20, 45) and out.pred[1].shape == (32, 32)
    assert isinstance(out.probs, list) and out.probs[0].shape == (3, 20, 45)
    assert isinstance(out.routing_map, list) and out.routing_map[0].shape == (3, 6)  # ceil(20 / 8), ceil(45 / 8)
    assert out.actions[0].shape == (32,)  # 2 windows x 16 units


def test_predict_reads_files(tmp_path: Path, model: RoutedModel) -> None:
    pixels = np.random.default_rng(2).integers(0, 65535, (32, 32), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    from_file = model.predict(str(tmp_path / "scan.png"), probs=True)
    from_tensor = model.predict(torch.from_numpy(pixels.astype(np.float32) / 65535)[None], probs=True)
    assert from_file.names == [str(tmp_path / "scan.png")]
    assert torch.equal(from_file.actions, from_tensor.actions)
    torch.testing.assert_close(from_file.probs, from_tensor.probs)


def test_bad_inputs_and_runs_give_clear_errors(tmp_path: Path, run: Path, model: RoutedModel) -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        model.predict(torch.rand(1, 32, 32), batch_size=0)
    with pytest.raises(ValueError, match="Expected an image with 1 channel"):
        model.predict(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="Expected finite images"):
        model.predict(torch.full((1, 32, 32), float("nan")))
    with pytest.raises(ConfigError, match="not a run directory"):
        routerkit.load(tmp_path)
    with pytest.raises(ConfigError, match="has no checkpoint 'nope'"):
        routerkit.load(run, checkpoint="nope")


def test_a_run_without_a_data_spec_rebuilds_it_from_its_data(run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "old_run"
    shutil.copytree(run, copy)
    (copy / "data_spec.json").unlink()
    from routerkit.training.run_dir import load_routing

    assert load_routing(copy, trust_remote_code=True).spec.input_shape == (1, 32, 32)


def test_a_corrupt_data_spec_is_named(run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bad_spec"
    shutil.copytree(run, copy)
    (copy / "data_spec.json").write_text('{"input_shape": [1, 32, 32]}')
    with pytest.raises(ConfigError, match=r"data_spec\.json: expected the fields input_shape and class_names"):
        routerkit.load(copy, trust_remote_code=True)
