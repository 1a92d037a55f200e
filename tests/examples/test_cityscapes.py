"""The Cityscapes plugin: official layout loader, labelIds -> train ids, the fixture, and ignore_index=255 end to end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _tiny import tiny_training
from PIL import Image
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CONFIG = EXAMPLES / "cityscapes.yaml"
sys.path.insert(0, str(EXAMPLES))

import cityscapes_plugin  # noqa: E402
from cityscapes_plugin import (  # noqa: E402
    CLASS_NAMES,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LABEL_TO_TRAIN,
    build_data,
    find_pairs,
    label_ids_to_train_ids,
    make_fixture,
)
from cityscapes_plugin.fixture import main as fixture_main  # noqa: E402

from routerkit.config import load_config  # noqa: E402
from routerkit.data import DatasetSplit, Split  # noqa: E402
from routerkit.functional import confusion_counts, per_region_iou  # noqa: E402
from routerkit.metrics import evaluate_router  # noqa: E402
from routerkit.models import ToySegmenter, Zoo  # noqa: E402
from routerkit.partitioners import PatchGrid  # noqa: E402
from routerkit.pipeline import RoutedPipeline  # noqa: E402
from routerkit.rewards import PaSeRReward, create_accuracy  # noqa: E402
from routerkit.routers import create_router  # noqa: E402
from routerkit.training.pretraining import _ce  # noqa: E402

# Fixture size of the tests: 32 x 64 images, 2 cities x 2 images per split.
_H, _W = 32, 64
_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau")}


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Write a tiny fixture under ``tmp_path`` and return ``-s`` overrides running examples/cityscapes.yaml in seconds.

    9 train images (6 for D_PT / D_RL / D_FT after carving 3 out as validation) and 3 test images of
    64 x 128 (2 x 4 patches of 32 x 32), one epoch per stage, 2 MC-dropout passes. The zoo keeps its
    three members but ``f2`` uses the ``mit_b0`` encoder: SegFormer-B5 (82M parameters) alone costs about
    10 s to build and 4 s to count FLOPs on this CPU, too slow for a test.
    """
    root = make_fixture(tmp_path / "cityscapes", {"train": ("aachen", "bremen", "zurich"), "val": ("lindau",)}, 3, 64, 128)
    return [
        f"data.params.root={root}",
        "data.params.height=64",
        "data.params.width=128",
        "data.params.num_train=6",
        "data.params.num_val=3",
        "data.params.num_test=3",
        "run.device=cpu",
        "run.threads=1",
        "zoo.models.2.params.encoder_name=mit_b0",
        "uncertainty.params.num_passes=2",
        *tiny_training(batch_size=3),
    ]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-city train / val fixture of 32 x 64 images, written once for the module."""
    return make_fixture(tmp_path_factory.mktemp("cs") / "cityscapes", _CITIES, images_per_city=2, height=_H, width=_W)


def _raw_label(root: Path, split: str, stem: str) -> np.ndarray:
    city = stem.split("_")[0]
    return np.asarray(Image.open(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"))


# --- the official mapping ------------------------------------------------------------------------------------------


def test_label_ids_to_train_ids_is_the_official_mapping() -> None:
    official = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10}
    official |= {24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(256):
        assert int(LABEL_TO_TRAIN[label_id]) == official.get(label_id, IGNORE_INDEX), label_id
    assert CLASS_NAMES[:3] == ["road", "sidewalk", "building"] and CLASS_NAMES[-1] == "bicycle"
    assert CLASS_NAMES[10] == "sky" and CLASS_NAMES[13] == "car" and len(CLASS_NAMES) == 19
    ids = np.array([[0, 1, 7], [26, 34, 255]])
    np.testing.assert_array_equal(label_ids_to_train_ids(ids), [[255, 255, 0], [13, 255, 255]])
    with pytest.raises(ValueError, match="8-bit"):
        label_ids_to_train_ids(np.array([300]))


# --- loader on the fixture -----------------------------------------------------------------------------------------


def test_fixture_layout_and_ignored_label_ids(fixture_root: Path) -> None:
    pairs = find_pairs(fixture_root, "train")
    assert [p[0].name for p in pairs][:1] == ["aachen_000000_000019_leftImg8bit.png"]
    assert pairs[0][1] == fixture_root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    assert len(find_pairs(fixture_root, "val")) == 4
    raw = np.stack([np.asarray(Image.open(label)) for _, label in pairs])
    assert {0, 1}.issubset(set(np.unique(raw).tolist())), "the fixture must hold unlabeled (0) and ego vehicle (1) ids"
    assert ((raw[:, -1] == 1) | (raw[:, -1] == 0)).all(), "ego vehicle (or unlabeled speckle) along the bottom"


def test_build_data_shapes_mapping_and_split_carving(fixture_root: Path) -> None:
    bundle = build_data(str(fixture_root), height=_H, width=_W, num_val=1, patch_grid=(2, 4), normalize=False)
    assert bundle.ignore_index == 255 and bundle.class_names == CLASS_NAMES and bundle.num_classes == 19
    assert bundle.train.images.shape == (3, 3, _H, _W) and bundle.train.targets.shape == (3, _H, _W)
    assert len(bundle.val) == 1 and len(bundle.test) == 4  # val carved out of train; test = official val
    assert bundle.train.images.dtype == torch.float32 and bundle.train.targets.dtype == torch.int64
    assert float(bundle.train.images.min()) >= 0.0 and float(bundle.train.images.max()) <= 1.0
    # Same size as the files: no resizing, so the targets are exactly the mapped raw label ids.
    stems = [img.name.removesuffix("_leftImg8bit.png") for img, _ in find_pairs(fixture_root, "val")]
    expected = np.stack([LABEL_TO_TRAIN[_raw_label(fixture_root, "val", s)] for s in stems])
    np.testing.assert_array_equal(bundle.test.targets.numpy(), expected)
    assert (bundle.test.targets[:, -1] == 255).all()  # ego vehicle -> ignore
    values = set(bundle.train.targets.unique().tolist())
    assert 255 in values and values <= set(range(19)) | {255}
    # Train and carved-out validation images are disjoint.
    all_train = torch.cat([bundle.train.images, bundle.val.images]).flatten(1)
    assert torch.unique(all_train, dim=0).shape[0] == 4


def test_resize_and_normalize(fixture_root: Path) -> None:
    raw = build_data(str(fixture_root), height=_H, width=_W, num_val=1, normalize=False)
    norm = build_data(str(fixture_root), height=_H, width=_W, num_val=1, normalize=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm.test.images, (raw.test.images - mean) / std)
    big = build_data(str(fixture_root), height=64, width=128, num_val=1, num_test=2, normalize=False)
    assert big.test.images.shape == (2, 3, 64, 128) and big.test.targets.shape == (2, 64, 128)
    # Nearest-neighbour labels: only train ids and 255, every class of the small masks kept.
    assert set(big.test.targets.unique().tolist()) <= set(range(19)) | {255}


def test_build_data_is_deterministic(fixture_root: Path, tmp_path: Path) -> None:
    a = build_data(str(fixture_root), height=_H, width=_W, num_train=2, num_val=1, num_test=3, seed=1)
    b = build_data(str(fixture_root), height=_H, width=_W, num_train=2, num_val=1, num_test=3, seed=1)
    for name, split in a.splits().items():
        assert torch.equal(split.images, b.splits()[name].images) and torch.equal(split.targets, b.splits()[name].targets)
    again = make_fixture(tmp_path / "again", _CITIES, images_per_city=2, height=_H, width=_W)
    for image, label in find_pairs(fixture_root, "train"):
        relative_image, relative_label = image.relative_to(fixture_root), label.relative_to(fixture_root)
        assert (again / relative_image).read_bytes() == image.read_bytes()
        assert (again / relative_label).read_bytes() == label.read_bytes()
    other = make_fixture(tmp_path / "other", _CITIES, images_per_city=2, height=_H, width=_W, seed=1)
    first = find_pairs(fixture_root, "train")[0][0].relative_to(fixture_root)
    assert (other / first).read_bytes() != (fixture_root / first).read_bytes()


def test_fixture_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fixture_main([str(tmp_path / "cli"), "--images-per-city", "1", "--height", "16", "--width", "32"])
    assert "Wrote 6 synthetic Cityscapes images" in capsys.readouterr().out
    assert len(find_pairs(root, "train")) == 3 and len(find_pairs(root, "val")) == 3


def test_lazy_build_data_reads_the_eager_tensors_only_when_batches_are_requested(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"height": 64, "width": 128, "num_val": 1}  # resized from the 32 x 64 files: bilinear and nearest
    eager = build_data(str(fixture_root), **params)
    reads: list[Path] = []
    load_pair = cityscapes_plugin.load_pair

    def counted(image: Path, label: Path, *args: Any) -> tuple[np.ndarray, np.ndarray]:
        reads.append(image)
        return load_pair(image, label, *args)

    monkeypatch.setattr(cityscapes_plugin, "load_pair", counted)
    lazy = build_data(str(fixture_root), lazy=True, **params)
    assert all(isinstance(split, DatasetSplit) for split in lazy.splits().values())
    assert len(reads) <= 4  # the first item of each split (its shapes) and the first test label, nothing more
    built = len(reads)
    _, images, _ = next(lazy.test.index_batches(2))
    assert images.shape == (2, 3, 64, 128) and len(reads) == built + 2
    for name, split in lazy.splits().items():
        read, expected = split.materialize(), eager.splits()[name].materialize()
        assert torch.equal(read.images, expected.images) and torch.equal(read.targets, expected.targets), name
    assert len(reads) == built + 2 + len(lazy.train) + len(lazy.val) + len(lazy.test)
    two = build_data(str(fixture_root), lazy=True, num_workers=2, **params).train.materialize()
    assert torch.equal(two.images, eager.train.images) and torch.equal(two.targets, eager.train.targets)
    with pytest.raises(ValueError, match=r"data\.params\.num_workers"):
        build_data(str(fixture_root), lazy=True, num_workers=-1, **params)


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_root_explains_how_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTERKIT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="ROUTERKIT_DATA") as err:
        build_data()
    assert "registration" in str(err.value) and "never downloads" in str(err.value)
    assert "cityscapes_plugin.fixture" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"data\.params\.root"):
        build_data(str(tmp_path / "nowhere"))
    monkeypatch.setenv("ROUTERKIT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$ROUTERKIT_DATA/cityscapes"):
        build_data()
    (tmp_path / "cityscapes" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="gtFine"):
        build_data()


def test_root_from_environment(fixture_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROUTERKIT_DATA", str(fixture_root.parent))
    bundle = build_data(height=_H, width=_W, num_val=1)
    assert len(bundle.train) == 3


def test_missing_label_names_image_and_expected_path(tmp_path: Path) -> None:
    root = make_fixture(tmp_path / "cs", _CITIES, images_per_city=2, height=_H, width=_W)
    label = root / "gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(FileNotFoundError) as err:
        build_data(str(root), height=_H, width=_W)
    assert str(label) in str(err.value) and "bremen_000001_000019_leftImg8bit.png" in str(err.value)


def test_bad_parameters(fixture_root: Path) -> None:
    with pytest.raises(ValueError, match=r"data.params.patch_grid = \[2, 4\]"):
        build_data(str(fixture_root), height=31, width=64)
    with pytest.raises(ValueError, match=r"data\.params\.height divisible by 3"):
        build_data(str(fixture_root), height=_H, width=_W, patch_grid=[3, 4])
    build_data(str(fixture_root), height=30, width=62, num_val=1, patch_grid=None)  # check skipped
    with pytest.raises(ValueError, match=r"data\.params\.test_split"):
        build_data(str(fixture_root), test_split="train")
    with pytest.raises(ValueError, match=r"data\.params\.num_val"):
        build_data(str(fixture_root), height=_H, width=_W, num_val=4)
    with pytest.raises(ValueError, match=r"data\.params\.num_train"):
        build_data(str(fixture_root), height=_H, width=_W, num_val=1, num_train=9)
    with pytest.raises(FileNotFoundError, match="split 'test'"):  # the fixture has no test split
        build_data(str(fixture_root), height=_H, width=_W, test_split="test")


# --- ignore_index = 255 end to end ---------------------------------------------------------------------------------


def _ignored_batch(fixture_root: Path) -> tuple[Tensor, Tensor]:
    bundle = build_data(str(fixture_root), height=_H, width=_W, num_val=1)
    return bundle.test.images, bundle.test.targets


def test_iou_and_confusion_skip_ignored_pixels(fixture_root: Path) -> None:
    _, targets = _ignored_batch(fixture_root)
    ignored = targets == 255
    assert ignored.any()
    gen = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 19, targets.shape, generator=gen)
    other = torch.where(ignored, torch.randint(0, 19, targets.shape, generator=gen), preds)
    assert not torch.equal(preds, other)
    assert torch.equal(confusion_counts(preds, targets, 19, 255), confusion_counts(other, targets, 19, 255))
    assert int(confusion_counts(preds, targets, 19, 255).sum()) == int((~ignored).sum())
    torch.testing.assert_close(per_region_iou(preds, targets, 19, 255), per_region_iou(other, targets, 19, 255))
    with pytest.raises(ValueError, match="ignore_index"):  # without it, 255 is an invalid label
        confusion_counts(preds, targets, 19)


@pytest.mark.parametrize("term", ["iou", "correct", "neg_ce"])
def test_reward_accuracy_terms_skip_ignored_pixels(fixture_root: Path, term: str) -> None:
    _, targets = _ignored_batch(fixture_root)
    units = PatchGrid(2, 4).split(targets)
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(units.shape[0], 19, *units.shape[1:], generator=gen), 1)
    noise = torch.softmax(torch.randn(probs.shape, generator=gen), 1)
    other = torch.where((units == 255).unsqueeze(1), noise, probs)
    accuracy = create_accuracy(term, num_classes=19, ignore_index=255)
    torch.testing.assert_close(accuracy(probs, units), accuracy(other, units))
    # A unit with only ignored pixels has no accuracy (NaN), which the reward turns into a zero gain.
    empty = torch.full_like(units[:1], 255)
    score = accuracy(probs[:1], empty)
    assert torch.isnan(score).all()
    reward = PaSeRReward(lam=0.1)(score, torch.zeros_like(score), torch.zeros_like(score))
    assert float(reward) == 0.0


def test_training_loss_skips_ignored_pixels(fixture_root: Path) -> None:
    _, targets = _ignored_batch(fixture_root)
    ignored = (targets == 255).unsqueeze(1)
    logits = torch.randn(targets.shape[0], 19, *targets.shape[1:], requires_grad=True)
    loss = _ce(logits, targets, 255)
    loss.backward()
    assert logits.grad is not None
    assert float(logits.grad.masked_select(ignored.expand_as(logits)).abs().max()) == 0.0
    changed = torch.where(ignored, torch.randn_like(logits), logits.detach())
    torch.testing.assert_close(_ce(changed, targets, 255), loss.detach())


def test_evaluate_router_skips_ignored_pixels(fixture_root: Path) -> None:
    images, targets = _ignored_batch(fixture_root)
    torch.manual_seed(0)
    zoo = Zoo([ToySegmenter(3, 19, width=2, dropout=0.1), ToySegmenter(3, 19, width=4)]).eval()
    pipeline = RoutedPipeline(zoo, PatchGrid(2, 4), "softmax_entropy", "param_share", (3, _H, _W))
    router = create_router("single", num_actions=2, index=1, grid_shape=(2, 4))
    result = evaluate_router(pipeline, router, Split(images, targets), 19, batch_size=2, ignore_index=255)
    with torch.no_grad():
        preds = PatchGrid(2, 4).stitch(zoo[1](PatchGrid(2, 4).split(images)), images.shape[0]).argmax(1)
    valid = targets != 255
    assert result.accuracy == pytest.approx(float((preds == targets)[valid].float().mean()))
    expected = per_region_iou(preds.unsqueeze(0), targets.unsqueeze(0), 19, 255)
    assert result.mean_iou == pytest.approx(float(expected[0]))


# --- the example config --------------------------------------------------------------------------------------------


def test_tiny_overrides_validate(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, tiny_overrides(tmp_path))
    assert cfg.zoo.models[2].params["encoder_name"] == "mit_b0"
    assert cfg.reward.lam == pytest.approx(0.10)
    assert cfg.partitioner.params == {"rows": 2, "cols": 4} and cfg.data.params["patch_grid"] == [2, 4]
    assert Path(cfg.data.params["root"]).is_dir()
    bundle = build_data(**cfg.data.params)
    assert bundle.input_shape == (3, 64, 128) and (len(bundle.train), len(bundle.val), len(bundle.test)) == (6, 3, 3)
