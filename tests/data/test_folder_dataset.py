"""The built-in ``folder`` data factory: a user's own scans from YAML alone, trained, evaluated and resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from routerkit.cli import app
from routerkit.data import DATASETS, DataBundle, DatasetSplit, Split
from routerkit.data.folder import FolderDataset, load_folder_split
from routerkit.data.folder_dataset import fit_size, folder_dataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from battery_plugin.synthetic import generate_battery  # noqa: E402

VALUE_MAP = {0: 0, 128: 1, 255: 2}
CLASSES = ["pore", "carbon", "nickel"]


def write_scans(root: Path, sizes: dict[str, int], height: int = 36, width: int = 52) -> None:
    """16-bit PNG scans in a narrow band of the range (as a tomogram), masks 0 / 128 / 255."""
    for offset, (split, n) in enumerate(sizes.items()):
        x, y, _ = generate_battery(n, height, width, seed=offset)
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            raw = (20000 + 3000 * x[i, 0].numpy()).round().astype(np.uint16)
            Image.fromarray(raw).save(root / split / "images" / f"s{i:03d}.png")
            mask = np.array([0, 128, 255], dtype=np.uint8)[y[i].numpy()]
            Image.fromarray(mask).save(root / split / "masks" / f"s{i:03d}.png")


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    write_scans(root, {"train": 12, "val": 4, "test": 4})
    return root


def test_folder_is_a_registered_data_factory(scans: Path) -> None:
    assert DATASETS.get("folder") is folder_dataset
    bundle = folder_dataset(str(scans), VALUE_MAP, CLASSES, size=[32, 48])
    assert bundle.input_shape == (1, 32, 48) and bundle.class_names == CLASSES
    assert len(bundle.train) == 12 and len(bundle.val) == 4 and len(bundle.test) == 4
    assert set(bundle.train.targets.unique().tolist()) <= {0, 1, 2}
    # 16-bit values read into [0, 1]: a narrow band around 20000 / 65535.
    assert float(bundle.train.images.min()) > 0.29 and float(bundle.train.images.max()) < 0.37
    standard = folder_dataset(str(scans), VALUE_MAP, CLASSES, standardize=True)
    assert abs(float(standard.train.images.mean())) < 1e-4 and abs(float(standard.train.images.std()) - 1) < 1e-3


def test_root_with_environment_variable(scans: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SCANS", str(scans.parent))
    bundle = folder_dataset(f"$MY_SCANS/{scans.name}", VALUE_MAP, CLASSES)
    assert len(bundle.train) == 12


def test_class_ids_outside_the_class_names_are_refused(scans: Path) -> None:
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\).*\[3\]"):
        folder_dataset(str(scans), {0: 0, 128: 1, 255: 3}, CLASSES)
    with pytest.raises(ValueError, match="ignore_index"):
        folder_dataset(str(scans), VALUE_MAP, CLASSES, size=[40, 52])  # padding needs an ignore_index
    with pytest.raises(FileNotFoundError, match=r"data\.params\.root"):
        folder_dataset(str(scans / "nope"), VALUE_MAP, CLASSES)


def test_fit_size_crops_around_the_centre_and_pads_with_the_ignore_index() -> None:
    images = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6)
    split = Split(images, torch.ones(2, 5, 6, dtype=torch.long))
    cropped = fit_size(split, [3, 4], None)
    assert torch.equal(cropped.images, images[:, :, 1:4, 1:5])
    padded = fit_size(split, [7, 6], 255)
    assert padded.images.shape == (2, 1, 7, 6) and float(padded.images[:, :, 0].abs().sum()) == 0
    assert (padded.targets[:, 0] == 255).all() and (padded.targets[:, -1] == 255).all() and (padded.targets[:, 1:6] == 1).all()


def test_own_scans_from_yaml_alone_train_evaluate_and_resume(scans: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "examples" / "battery.yaml").read_text())
    raw["data"] = {
        "factory": "folder",
        "params": {"root": str(scans), "value_map": VALUE_MAP, "class_names": CLASSES, "size": [32, 48]},
    }
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["uncertainty"]["params"]["num_passes"] = 2
    for stage in ("pretrain_large", "pretrain_base", "policy", "finetune"):
        raw["training"][stage]["epochs"] = 1
    config = tmp_path / "scans.yaml"
    config.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    assert runner.invoke(app, ["validate", str(config)]).exit_code == 0
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "battery"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["params"]["value_map"] == VALUE_MAP  # int keys, as given
    table = json.loads((run_dir / "metrics" / "test.json").read_text())
    log = [json.loads(line) for line in (run_dir / "metrics" / "train_log.jsonl").read_text().splitlines()]
    assert any("val/miou_f2_large" in row for row in log) and any("val/miou_f0" in row for row in log)
    for command in (["evaluate", str(run_dir)], ["train", "--resume", str(run_dir)]):
        again = runner.invoke(app, command)
        assert again.exit_code == 0, again.output
        assert json.loads((run_dir / "metrics" / "test.json").read_text()) == table


def test_a_bundle_refuses_targets_outside_its_classes() -> None:
    from routerkit.data import DataBundle

    ok = Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    bad = Split(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 3))
    with pytest.raises(ValueError, match=r"val split's targets to be class ids in \[0, 3\).*\[3\]"):
        DataBundle(ok, bad, ok, CLASSES)
    ignored = Split(torch.zeros(2, 1, 4, 4), torch.full((2, 4, 4), 255))
    DataBundle(ok, ignored, ok, CLASSES, ignore_index=255)  # the ignore index is fine


# --- lazy splits (FolderDataset) -------------------------------------------------------------------------------------


def _assert_same_splits(eager: DataBundle, lazy: DataBundle) -> None:
    for name, split in lazy.splits().items():
        assert isinstance(split, DatasetSplit) and len(split) == len(eager.splits()[name])
        read, expected = split.materialize(), eager.splits()[name].materialize()
        assert torch.equal(read.images, expected.images) and torch.equal(read.targets, expected.targets), name


@pytest.mark.parametrize("params", [{}, {"size": [32, 48]}, {"size": [32, 56], "ignore_index": 255, "num_workers": 2}])
def test_lazy_folder_bundle_reads_the_eager_tensors(scans: Path, params: dict[str, Any]) -> None:
    eager = folder_dataset(str(scans), VALUE_MAP, CLASSES, **{k: v for k, v in params.items() if k != "num_workers"})
    lazy = folder_dataset(str(scans), VALUE_MAP, CLASSES, lazy=True, **params)
    assert lazy.input_shape == eager.input_shape and lazy.file_format == eager.file_format
    _assert_same_splits(eager, lazy)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lazy_standardize_streams_the_training_statistics(scans: Path, num_workers: int) -> None:
    size, ignore = [32, 56], 255  # crop the height, pad the width
    eager = folder_dataset(str(scans), VALUE_MAP, CLASSES, standardize=True, size=size, ignore_index=ignore)
    lazy = folder_dataset(
        str(scans), VALUE_MAP, CLASSES, standardize=True, size=size, ignore_index=ignore, lazy=True, num_workers=num_workers
    )
    mean, std = lazy.file_format.mean, lazy.file_format.std
    assert mean is not None and std is not None and eager.file_format.mean is not None and eager.file_format.std is not None
    # One float64 pass over the files gives the in-memory float32 statistics to within rounding.
    np.testing.assert_allclose(mean, eager.file_format.mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(std, eager.file_format.std, rtol=0, atol=1e-5)
    # With those statistics, each sample is exactly the eager path's: standardised first, then cropped / padded.
    raw = folder_dataset(str(scans), VALUE_MAP, CLASSES)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    for name, split in raw.splits().items():
        assert isinstance(split, Split)
        expected = fit_size(Split((split.images - m) / s, split.targets), size, ignore)
        read = lazy.splits()[name].materialize()
        assert torch.equal(read.images, expected.images) and torch.equal(read.targets, expected.targets), name
        torch.testing.assert_close(read.images, eager.splits()[name].materialize().images, rtol=0, atol=1e-4)
    padded = lazy.train.materialize()  # 52 -> 56 columns: two on each side, zeros after standardising, ignored
    assert (padded.targets[..., [0, 1, -2, -1]] == ignore).all() and not (padded.targets[..., 2:-2] == ignore).any()
    assert float(padded.images[..., [0, 1, -2, -1]].abs().max()) == 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_file_of_a_lazy_split_raises_the_eager_error_when_read(tmp_path: Path, workers: int) -> None:
    write_scans(tmp_path, {"train": 3, "val": 3, "test": 3}, height=20, width=24)
    (tmp_path / "val" / "images" / "s001.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((18, 24), dtype=np.uint8)).save(tmp_path / "test" / "images" / "s002.png")
    lazy = folder_dataset(str(tmp_path), VALUE_MAP, CLASSES, lazy=True, num_workers=workers)  # reads the first items
    assert isinstance(lazy.val, DatasetSplit) and isinstance(lazy.test, DatasetSplit)
    unreadable = r"Could not read image file .*s001\.png"
    with pytest.raises(ValueError, match=unreadable):
        lazy.val.materialize()
    with pytest.raises(ValueError, match=unreadable):
        folder_dataset(str(tmp_path), VALUE_MAP, CLASSES)  # the eager path names the same file
    shape = r"shape \(C, H, W\) = \(1, 20, 24\) of 's000\.png' but .*s002\.png has \(1, 18, 24\)"
    with pytest.raises(ValueError, match=shape):
        list(lazy.test.batches(2))
    with pytest.raises(ValueError, match=shape):
        load_folder_split(tmp_path / "test" / "images", tmp_path / "test" / "masks", VALUE_MAP)
    # Read alone (e.g. by a worker that never saw the first item), an item is still checked against the first image.
    alone = FolderDataset(tmp_path / "test" / "images", tmp_path / "test" / "masks", VALUE_MAP)
    with pytest.raises(ValueError, match=shape):
        alone[2]
    image, mask = alone[1]
    assert image.shape == (1, 20, 24) and mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_the_folder_factory_refuses_a_bad_num_workers(scans: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"data\.params\.num_workers to be an int >= 0"):
        folder_dataset(str(scans), VALUE_MAP, CLASSES, lazy=True, num_workers=bad)
    with pytest.raises(ValueError, match=r"data\.params\.lazy"):
        folder_dataset(str(scans), VALUE_MAP, CLASSES, lazy="yes")  # type: ignore[arg-type]
