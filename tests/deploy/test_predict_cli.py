"""`routerkit predict` end to end on a tiny battery run: file kinds, tiling, failures, overwrite, names."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _tiny import tiny_battery
from PIL import Image
from typer.testing import CliRunner

import routerkit
from routerkit.cli import app
from routerkit.data.spec import DataSpec, FileFormat
from routerkit.deploy import Prediction
from routerkit.deploy.inputs import as_inputs
from routerkit.deploy.writers import (
    CSV_NAME,
    GFLOPS_COLUMN,
    TINT_ALPHA,
    collect_inputs,
    mask_pixels,
    output_stems,
    predict_files,
    routing_overlay_pixels,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from battery_plugin.export_scans import main as export_scans  # noqa: E402

BATTERY = ROOT / "examples" / "battery.yaml"
MASK_VALUES = {0, 255, 128}  # pore, carbon, nickel: examples/battery_plugin FILE_FORMAT
runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import routerkit.cli

    monkeypatch.setattr(routerkit.cli, "console", Console(width=200))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A battery run on 32 x 32 scans (4 x 4 units of 8 x 8 px, 3 models), trained in seconds."""
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    smaller = ["data.params.num_train=6", "data.params.num_val=2", "data.params.num_test=2", "evaluation.baselines=[]"]
    args = [arg for item in (*tiny_battery(), *smaller) for arg in ("-s", item)]
    result = runner.invoke(app, ["train", str(BATTERY), "--run-dir", str(run_dir), *args])
    assert result.exit_code == 0, result.output
    return run_dir


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of every kind of input: 8 and 16-bit PNG, TIFF, .npy of the trained size, larger and
    smaller PNGs, a corrupt PNG, a text file (not an image suffix) and ground-truth masks in masks/."""
    folder = tmp_path_factory.mktemp("scans")
    export_scans([str(folder), "--count", "2", "--height", "32", "--width", "32", "--seed", "7"])
    extra = folder / "extra"
    export_scans([str(extra), "--count", "1", "--height", "32", "--width", "32", "--bits", "16", "--seed", "8"])
    shutil.move(extra / "scan_000.png", folder / "scan16.png")
    export_scans([str(extra), "--count", "1", "--height", "50", "--width", "70", "--bits", "16", "--seed", "9"])
    shutil.move(extra / "scan_000.png", folder / "large.png")
    shutil.rmtree(extra)
    pixels = np.asarray(Image.open(folder / "scan_001.png"))
    Image.fromarray(pixels).save(folder / "scan_tif.tif")
    np.save(folder / "scan_npy.npy", pixels)
    Image.fromarray(pixels[:20, :25]).save(folder / "small.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    (folder / "notes.txt").write_text("not an image")
    return folder


GOOD = {
    "scan_000.png": 1,
    "scan_001.png": 1,
    "scan16.png": 1,
    "scan_tif.tif": 1,
    "scan_npy.npy": 1,
    "large.png": 6,
    "small.png": 1,
}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _mapped(pred: torch.Tensor, run: Path) -> np.ndarray:
    spec = routerkit.load(run).spec
    return np.vectorize(spec.file_format.mask_value)(pred.numpy())


def test_predict_a_folder_writes_every_good_file_and_names_the_corrupt_one(tiny_run: Path, scans: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(tiny_run), str(scans), "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "corrupt.png" in result.output and "1 of 8 file(s)" in result.output
    assert "6 window(s)" in result.output
    rows = _rows(out / CSV_NAME)
    assert {Path(r["file"]).name: int(r["windows"]) for r in rows} == GOOD  # no masks/, no notes.txt, no corrupt.png
    names = routerkit.load(tiny_run).model_names
    for row in rows:
        assert sum(float(row[f"share_{n}"]) for n in names) == pytest.approx(1.0, abs=1e-4)
        assert float(row[GFLOPS_COLUMN]) > 0
        source = Path(row["file"])
        mask = Image.open(out / row["mask"])
        assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= MASK_VALUES
        assert (mask.height, mask.width) == (int(row["height"]), int(row["width"]))
        overlay = Image.open(out / row["routing"])
        assert overlay.mode == "RGB" and min(overlay.size) >= 256
        assert row["mask"] == f"{source.stem}_mask.png"
    large = next(r for r in rows if r["file"].endswith("large.png"))
    assert (large["height"], large["width"]) == ("50", "70")
    one = next(r for r in rows if r["file"].endswith("scan_000.png"))
    assert float(large[GFLOPS_COLUMN]) > float(one[GFLOPS_COLUMN])  # six windows cost more than one
    assert "fvcore" in GFLOPS_COLUMN
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_masks_agree_with_the_python_api(tiny_run: Path, scans: Path, tmp_path: Path) -> None:
    files = [scans / "large.png", scans / "scan16.png", scans / "small.png"]
    result = runner.invoke(app, ["predict", str(tiny_run), *map(str, files), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    model = routerkit.load(tiny_run)
    for file in files:
        pred = model.predict(file).pred[0]
        written = np.asarray(Image.open(tmp_path / f"{file.stem}_mask.png"))
        np.testing.assert_array_equal(written, _mapped(pred, tiny_run))


def test_refuses_to_overwrite_unless_asked(tiny_run: Path, scans: Path, tmp_path: Path) -> None:
    args = ["predict", str(tiny_run), str(scans / "scan_000.png"), str(scans / "large.png")]
    first = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / CSV_NAME).write_text("earlier\n")
    again = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output and "error:" in again.output
    assert (tmp_path / CSV_NAME).read_text() == "earlier\n"  # refused before writing anything
    forced = runner.invoke(app, [*args, "--out", str(tmp_path), "--overwrite"])
    assert forced.exit_code == 0, forced.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # same predictions again


def test_default_out_globs_duplicates_and_colliding_stems(tiny_run: Path, scans: Path, tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(scans / "scan_000.png", tmp_path / sub / "x.png")
    glob = str(tmp_path / "*" / "x.png")
    result = runner.invoke(app, ["predict", str(tiny_run), glob, str(tmp_path / "a" / "x.png")])
    assert result.exit_code == 0, result.output
    out = tiny_run / "predictions"
    rows = _rows(out / CSV_NAME)
    assert [r["file"] for r in rows] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]  # sorted, once each
    assert [r["mask"] for r in rows] == ["x_mask.png", "x_2_mask.png"]
    assert "x_2_mask.png" in result.output  # the renaming is reported
    shutil.rmtree(out)


def test_bad_inputs_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    assert "--overwrite" in runner.invoke(app, ["predict", "--help"]).output
    nothing = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "*.png")])
    assert nothing.exit_code == 2 and "*.png" in nothing.output and "matched nothing" in nothing.output
    empty = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path)])
    assert empty.exit_code == 2 and str(tmp_path) in empty.output and "Traceback" not in empty.output
    missing = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "nope.png")])
    assert missing.exit_code == 2 and "nope.png" in missing.output and "does not exist" in missing.output
    (tmp_path / "x.png").write_bytes(b"")
    copy = tmp_path / "copied_run"
    shutil.copytree(tiny_run, copy)  # not created here: its plugin code is not trusted
    untrusted = runner.invoke(app, ["predict", str(copy), str(tmp_path / "x.png")])
    assert untrusted.exit_code == 2 and "--trust-remote-code" in untrusted.output and "Traceback" not in untrusted.output


def test_collect_inputs_and_output_stems(tmp_path: Path) -> None:
    for name in ("b.png", "a.TIF", ".hidden.png", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in collect_inputs([tmp_path, tmp_path / "b.png"])] == ["a.TIF", "b.png"]
    assert output_stems([Path("a/x.png"), Path("b/X.tif"), Path("x_2.png"), Path("c/x.npy")]) == ["x", "X_3", "x_2", "x_4"]
    with pytest.raises(ValueError, match="matched nothing"):
        collect_inputs([str(tmp_path / "*.jpg")])


def test_mask_pixels_are_16_bit_when_values_need_it() -> None:
    spec = DataSpec((1, 8, 8), ["a", "b", "c"], file_format=FileFormat(mask_values={1: 1000, 2: 65535}))
    pixels = mask_pixels(torch.tensor([[0, 1], [2, 0]]), spec)
    assert pixels.dtype == np.uint16 and pixels.tolist() == [[0, 1000], [65535, 0]]
    assert mask_pixels(torch.tensor([[0, 2]]), DataSpec((1, 8, 8), ["a", "b", "c"])).dtype == np.uint8


class _Classifier:
    """A stand-in classification `RoutedModel`: label 1 and model f_1 for every input."""

    def __init__(self) -> None:
        self.spec = DataSpec((1, 4, 4), ["cat", "dog"], task="classification")
        self.model_names = ["f_0", "f_1"]
        self.pipeline = SimpleNamespace(partitioner=SimpleNamespace(grid_shape=(1, 1)))

    def predict(self, inputs: Any, batch_size: int = 32) -> Prediction:
        x = as_inputs(inputs, self.spec)[0]
        if tuple(x.tensor.shape) != self.spec.input_shape:
            raise ValueError(f"{x.name}: expected an input of the trained shape but got {list(x.tensor.shape)}.")
        return Prediction(
            [x.name], torch.tensor([1]), torch.tensor([[1]]), torch.tensor([0.5]), [1], self.model_names, ["cat", "dog"]
        )


def test_classification_writes_only_the_table(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "one.png")
    Image.fromarray(np.zeros((5, 4), dtype=np.uint8)).save(tmp_path / "other_size.png")
    report = predict_files(_Classifier(), [tmp_path], tmp_path / "out")  # type: ignore[arg-type]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CSV_NAME]
    assert [(path.name, "trained shape" in why) for path, why in report.failed] == [("other_size.png", True)]
    rows = _rows(tmp_path / "out" / CSV_NAME)
    assert rows == [{"file": str(tmp_path / "one.png"), "label": "1", "class": "dog", "model": "f_1", GFLOPS_COLUMN: "0.5"}]


def test_overlay_tints_each_unit_with_its_model_colour() -> None:
    from routerkit.plots import model_colours

    names = ["f_0", "f_1", "f_2"]
    routing = torch.tensor([[0, 1], [2, 0]])
    pixels = routing_overlay_pixels(torch.zeros(1, 4, 6), routing, (2, 4), names, legend=False)
    assert pixels.shape == (256, 384, 3)  # 4 x 6 enlarged 64 times, nearest neighbour
    colours = np.asarray(model_colours(3))
    for (row, col), k in {(0, 0): 0, (0, 300): 1, (200, 0): 2, (200, 300): 0}.items():
        np.testing.assert_allclose(pixels[row, col], np.round(255 * TINT_ALPHA * colours[k]), atol=1)
    assert routing_overlay_pixels(torch.zeros(1, 4, 6), routing, (2, 4), names).shape[0] > 256  # the legend below


def test_an_interrupted_prediction_keeps_the_table_of_the_files_done(tmp_path: Path) -> None:
    class Interrupted(_Classifier):
        def predict(self, inputs: Any, batch_size: int = 32) -> Prediction:
            if str(inputs).endswith("b.png"):
                raise KeyboardInterrupt
            return super().predict(inputs, batch_size)

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / name)
    with pytest.raises(KeyboardInterrupt):
        predict_files(Interrupted(), [tmp_path], tmp_path / "out")  # type: ignore[arg-type]
    assert [Path(r["file"]).name for r in _rows(tmp_path / "out" / CSV_NAME)] == ["a.png"]
