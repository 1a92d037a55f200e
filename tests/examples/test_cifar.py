"""The CIFAR-10 plugin: every source layout on tiny fixtures, auto-detection, the offline error, the real copy."""

from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_training

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import cifar_plugin.data as cifar_data  # noqa: E402
from cifar_plugin import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, balanced_order, build_data, detect_source  # noqa: E402

K = len(CLASS_NAMES)


# ---------------------------------------------------------------- fixtures in each layout


def _images(labels: np.ndarray, start: int = 0) -> np.ndarray:
    """``uint8 [N, 32, 32, 3]``: channel 0 = (start + i) mod 256, channel 1 = 20 * label, channel 2 = 7."""
    n = labels.shape[0]
    x = np.empty((n, 32, 32, 3), np.uint8)
    x[..., 0] = ((start + np.arange(n)) % 256)[:, None, None]
    x[..., 1] = (20 * labels)[:, None, None]
    x[..., 2] = 7
    return x


def _labels(n: int) -> np.ndarray:
    return (np.arange(n) * 7 % K).astype(np.int64)  # every class, interleaved


def write_pickle(root: Path, per_batch: int = 12, num_test: int = 20) -> Path:
    """``root/cifar-10-batches-py/`` with 5 training batches of ``per_batch`` images and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{i + 1}", per_batch, i * per_batch) for i in range(5)] + [("test_batch", num_test, 1000)]
    for name, n, start in batches:
        y = _labels(n)
        data = _images(y, start).transpose(0, 3, 1, 2).reshape(n, 3072)  # official CHW rows
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": y.tolist(), b"batch_label": name.encode()}, handle)
    return root


def write_lossless(root: Path, n: int = 30) -> Path:
    folder = root / "lossless_subset"
    folder.mkdir(parents=True)
    for batch, start in (("data_batch_1", 0), ("test_batch", 100)):
        y = _labels(n)
        np.savez(folder / f"cifar10_{batch}_first1017.npz", x=_images(y, start), y=y, labels_all=y)
    return root


def _jpeg_bytes(label: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (20 * label, 255 - 20 * label, 100), np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_jpeg(root: Path, per_class: dict[str, int], extracted: bool = False) -> Path:
    """The yoongikim layout: ``.tar.gz`` archives (or the extracted folder) of solid-colour JPEGs per class."""
    sub = root / "jpeg_yoongikim"
    sub.mkdir(parents=True, exist_ok=True)
    for split, n in per_class.items():
        if extracted:
            for c, name in enumerate(CLASS_NAMES):
                folder = root / "CIFAR-10-images" / split / name
                folder.mkdir(parents=True)
                for i in range(n):
                    (folder / f"{i:04d}.jpg").write_bytes(_jpeg_bytes(c))
            continue
        with tarfile.open(sub / f"cifar10_jpeg_{split}.tar.gz", "w:gz") as tar:
            for c, name in reversed(list(enumerate(CLASS_NAMES))):  # archive order need not be class order
                for i in range(n):
                    blob = _jpeg_bytes(c)
                    info = tarfile.TarInfo(f"CIFAR-10-images/{split}/{name}/{i:04d}.jpg")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return root


def _raw(split: torch.Tensor) -> np.ndarray:
    """Undo ``normalize=False``'s scaling: uint8-valued pixels."""
    return np.rint(split.numpy() * 255.0).astype(np.int64)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may reach the network or the user's cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("ROUTERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROUTERKIT_DATA", raising=False)


# ---------------------------------------------------------------- sources


def test_pickle_source(tmp_path: Path) -> None:
    root = write_pickle(tmp_path)
    bundle = build_data("pickle", str(root), num_train=30, num_val=20, num_test=10, normalize=False)
    assert bundle.class_names == list(CLASS_NAMES)
    assert bundle.train.images.shape == (30, 3, 32, 32) and bundle.train.images.dtype == torch.float32
    assert bundle.val.images.shape == (20, 3, 32, 32) and bundle.test.images.shape == (10, 3, 32, 32)
    assert bundle.train.targets.dtype == torch.int64 and bundle.train.targets.shape == (30,)
    for split in bundle.splits().values():
        raw = _raw(split.images)
        assert raw.min() >= 0 and raw.max() <= 255
        assert (raw[:, 1, 0, 0] == 20 * split.targets.numpy()).all()  # labels travel with their images
        assert (raw[:, 2] == 7).all()
    # The pixel index tag matches the meta index (batches concatenated in order).
    assert (_raw(bundle.train.images)[:, 0, 0, 0] == bundle.train.meta["index"].numpy() % 256).all()
    assert (_raw(bundle.test.images)[:, 0, 0, 0] == (1000 + bundle.test.meta["index"].numpy()) % 256).all()
    # Class-balanced selections.
    assert torch.bincount(bundle.train.targets, minlength=K).tolist() == [3] * K
    assert torch.bincount(bundle.val.targets, minlength=K).tolist() == [2] * K
    assert torch.bincount(bundle.test.targets, minlength=K).tolist() == [1] * K
    # Train and validation are disjoint.
    assert not set(bundle.train.meta["index"].tolist()) & set(bundle.val.meta["index"].tolist())
    # None: everything not in validation, and the whole test set.
    full = build_data("pickle", str(root), num_val=20, normalize=False)
    assert len(full.train) == 40 and len(full.test) == 20
    assert set(full.train.meta["index"].tolist()) | set(full.val.meta["index"].tolist()) == set(range(60))


class _RunsShell:
    """Unpickling this calls ``os.system``: what a booby-trapped batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    root = write_pickle(tmp_path)
    marker = tmp_path / "ran"
    target = root / "cifar-10-batches-py" / "data_batch_3"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        target.write_bytes(pickle.dumps({b"data": _RunsShell(marker), b"labels": [0]}, protocol=protocol))
        with pytest.raises(cifar_data.UnsafePickleError, match=r"data_batch_3.*system") as err:
            build_data("pickle", str(root), num_train=30, num_val=20, num_test=10)
        assert isinstance(err.value, ValueError)  # routerkit reports it as a data.params problem, no traceback
        assert not marker.exists(), "the pickle's os.system call ran"
    # Not only os.system: any other global (here a builtin that is no container) is refused too.
    target.write_bytes(pickle.dumps({b"data": print, b"labels": [0]}, protocol=2))
    with pytest.raises(cifar_data.UnsafePickleError, match=r"builtin_*\.print"):
        cifar_data.load_pickle(root)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickled_numpy_batches_still_load(tmp_path: Path, protocol: int) -> None:
    """Official batches are Python 2 protocol-2 pickles of numpy arrays; numpy pickles of any protocol load too."""
    labels = _labels(6)
    data = _images(labels).transpose(0, 3, 1, 2).reshape(6, 3072)
    batch = {b"data": data, b"labels": labels, b"batch_label": b"x", b"mean": np.float32(0.5), b"filenames": [b"a.png"]}
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    with path.open("rb") as handle:
        back = cifar_data._BatchUnpickler(handle, path).load()  # the restricted unpickler the plugin reads with
    assert np.array_equal(back[b"data"], data) and np.array_equal(back[b"labels"], labels) and back[b"mean"] == 0.5
    images, targets = cifar_data._read_batch(path)
    assert images.dtype == torch.uint8 and torch.equal(images, torch.from_numpy(data.reshape(6, 3, 32, 32)))
    assert targets.tolist() == labels.tolist()


def test_official_batches_meta_unpickles() -> None:
    """The official ``batches.meta`` (Python 2 cPickle) goes through the restricted unpickler."""
    meta_file = ROOT.parent / "shared" / "data" / "cifar10" / "lossless_subset" / "batches.meta"
    if not meta_file.is_file():
        pytest.skip(f"no official batches.meta at {meta_file}")
    with meta_file.open("rb") as handle:
        meta = cifar_data._BatchUnpickler(handle, meta_file).load()
    assert [name.decode() for name in meta[b"label_names"]] == list(CLASS_NAMES)
    assert meta[b"num_vis"] == 3 * 32 * 32


def test_determinism_and_seed(tmp_path: Path) -> None:
    root = str(write_pickle(tmp_path))
    a = build_data("pickle", root, num_train=20, num_val=10, num_test=10, seed=3)
    b = build_data("pickle", root, num_train=20, num_val=10, num_test=10, seed=3)
    c = build_data("pickle", root, num_train=20, num_val=10, num_test=10, seed=4)
    for name in ("train", "val", "test"):
        sa, sb = a.splits()[name], b.splits()[name]
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.targets, sb.targets)
    assert not torch.equal(a.train.meta["index"], c.train.meta["index"])
    # A longer training set extends the shorter one (same ordering of the pool).
    longer = build_data("pickle", root, num_train=30, num_val=10, num_test=10, seed=3)
    assert torch.equal(longer.train.meta["index"][:20], a.train.meta["index"])
    assert torch.equal(longer.val.meta["index"], a.val.meta["index"])


def test_normalisation(tmp_path: Path) -> None:
    root = str(write_pickle(tmp_path))
    raw = build_data("pickle", root, num_train=10, num_val=10, num_test=10, normalize=False)
    norm = build_data("pickle", root, num_train=10, num_val=10, num_test=10)
    assert float(raw.train.images.min()) >= 0.0 and float(raw.train.images.max()) <= 1.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(norm.train.images, (raw.train.images - mean) / std, atol=1e-6)
    assert torch.equal(norm.train.targets, raw.train.targets)


def test_jpeg_archives_decode_only_the_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_jpeg(tmp_path, {"train": 6, "test": 3})
    decoded: list[int] = []
    original = cifar_data._decode_jpegs

    def counting(blobs: list[bytes]) -> torch.Tensor:
        decoded.append(len(blobs))
        return original(blobs)

    monkeypatch.setattr(cifar_data, "_decode_jpegs", counting)
    bundle = build_data("jpeg", str(root), num_train=20, num_val=10, num_test=10, normalize=False)
    assert sum(decoded) == 40  # 60 + 30 images in the archives, only the 40 selected decoded
    assert bundle.train.images.shape == (20, 3, 32, 32) and bundle.test.images.shape == (10, 3, 32, 32)
    assert torch.bincount(bundle.train.targets, minlength=K).tolist() == [2] * K
    for split in bundle.splits().values():
        raw = _raw(split.images)
        expected = 20 * split.targets.numpy()
        assert np.abs(raw[:, 0].mean((1, 2)) - expected).max() < 4  # solid colours survive JPEG
        assert np.abs(raw[:, 1].mean((1, 2)) - (255 - expected)).max() < 4
    assert not set(bundle.train.meta["index"].tolist()) & set(bundle.val.meta["index"].tolist())
    again = build_data("jpeg", str(root), num_train=20, num_val=10, num_test=10, normalize=False)
    assert torch.equal(again.train.images, bundle.train.images) and torch.equal(again.val.targets, bundle.val.targets)


def test_jpeg_extracted_folder(tmp_path: Path) -> None:
    root = write_jpeg(tmp_path, {"train": 3, "test": 2}, extracted=True)
    assert detect_source(root) == "jpeg"
    bundle = build_data(root=str(root), num_val=10, normalize=False)
    assert len(bundle.train) == 20 and len(bundle.test) == 20
    raw = _raw(bundle.test.images)
    assert np.abs(raw[:, 0].mean((1, 2)) - 20 * bundle.test.targets.numpy()).max() < 4


def test_lossless_source(tmp_path: Path) -> None:
    root = write_lossless(tmp_path, n=30)
    bundle = build_data("lossless", str(root), num_val=10, normalize=False)
    assert len(bundle.train) == 20 and len(bundle.val) == 10 and len(bundle.test) == 30
    assert (_raw(bundle.test.images)[:, 0, 0, 0] == 100 + bundle.test.meta["index"].numpy()).all()  # exact pixels
    assert (_raw(bundle.train.images)[:, 1, 0, 0] == 20 * bundle.train.targets.numpy()).all()
    assert sorted(bundle.train.meta["index"].tolist() + bundle.val.meta["index"].tolist()) == list(range(30))
    with pytest.raises(ValueError, match=r"data\.params\.num_val \+ num_train <= 30"):
        build_data("lossless", str(root))  # the default num_val (1000) exceeds the subset


# ---------------------------------------------------------------- auto-detection, download, errors


def test_auto_detection_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cifar10"
    root.mkdir()
    assert detect_source(root) == "download" and detect_source(None) == "download"
    write_lossless(root)
    assert detect_source(root) == "lossless"
    write_jpeg(root, {"train": 1, "test": 1})
    assert detect_source(root) == "jpeg"
    write_pickle(root)
    assert detect_source(root) == "pickle"
    # root defaults to $ROUTERKIT_DATA/cifar10.
    monkeypatch.setenv("ROUTERKIT_DATA", str(tmp_path))
    bundle = build_data(num_train=10, num_val=10, num_test=5)
    assert len(bundle.train) == 10 and len(bundle.test) == 5
    assert len(build_data(num_val=10).test) == 20  # the pickle copy's whole test batch


def test_no_network_gives_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        build_data(root=str(empty))
    message = str(info.value)
    assert "No local copy of CIFAR-10" in message and str(empty) in message
    assert "data.params.root" in message and "ROUTERKIT_DATA" in message and "network disabled" in message
    with pytest.raises(FileNotFoundError, match="ROUTERKIT_DATA are unset"):
        build_data(source="download")


def test_download_uses_the_cache_and_extracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = write_pickle(tmp_path / "staging")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    payload = archive.getvalue()
    calls: list[tuple[str, float]] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append((url, timeout))
        return io.BytesIO(payload)

    import hashlib

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setattr(cifar_data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    bundle = build_data(source="download", num_train=10, num_val=10, num_test=5)
    assert len(bundle.train) == 10 and len(calls) == 1 and calls[0][0] == cifar_data.CIFAR10_URL and calls[0][1] <= 30
    assert (Path(os.environ["ROUTERKIT_CACHE"]) / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    build_data(source="download", num_train=10, num_val=10, num_test=5)
    assert len(calls) == 1  # the cached copy is reused
    # A corrupt download is refused.
    monkeypatch.setenv("ROUTERKIT_CACHE", str(tmp_path / "other_cache"))
    monkeypatch.setattr(cifar_data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(FileNotFoundError, match="md5"):
        build_data(source="download")


def test_parameter_errors(tmp_path: Path) -> None:
    root = str(write_pickle(tmp_path))
    with pytest.raises(ValueError, match=r"data\.params\.source"):
        build_data(source="hdf5", root=root)
    with pytest.raises(ValueError, match=r"data\.params\.root is required"):
        build_data(source="pickle")
    with pytest.raises(FileNotFoundError, match=r"data\.params\.root"):
        build_data(source="jpeg", root=root)
    with pytest.raises(FileNotFoundError, match=r"data\.params\.root"):
        build_data(source="pickle", root=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"data\.params\.num_val"):
        build_data(source="pickle", root=root, num_val=0)
    with pytest.raises(ValueError, match=r"data\.params\.num_train"):
        build_data(source="pickle", root=root, num_train=0)
    with pytest.raises(ValueError, match=r"num_val \+ num_train <= 60"):
        build_data(source="pickle", root=root, num_train=55, num_val=10)
    with pytest.raises(ValueError, match=r"data\.params\.num_test <= 20"):
        build_data(source="pickle", root=root, num_val=10, num_test=21)


def test_balanced_order_prefixes() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    order = balanced_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(20))
    assert torch.bincount(labels[order[:6]], minlength=3).tolist() == [2, 2, 2]
    counts = torch.bincount(labels[order[:12]], minlength=3).tolist()
    assert counts[1] == 3 and sorted(counts[::2]) == [4, 5]  # class 1 ran out at 3, the others go on alternating
    assert torch.equal(order, balanced_order(labels, seed=0))


# ---------------------------------------------------------------- the real copy, and the YAML fixture


def _real_root() -> Path | None:
    env = os.environ.get("ROUTERKIT_DATA")
    if not env or not (Path(env) / "cifar10").is_dir():
        return None
    return Path(env) / "cifar10"


REAL = _real_root()


@pytest.mark.skipif(REAL is None, reason="set ROUTERKIT_DATA to a folder with cifar10/ to read the real copy")
@pytest.mark.parametrize("source", ["auto", "lossless"])
def test_real_copy(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert REAL is not None
    bundle = build_data(source, str(REAL), num_train=200, num_val=100, num_test=100)
    assert bundle.train.images.shape == (200, 3, 32, 32) and bundle.test.images.shape == (100, 3, 32, 32)
    assert torch.bincount(bundle.train.targets, minlength=K).tolist() == [20] * K
    # Normalised with the data set's own statistics: roughly zero mean and unit spread.
    assert bundle.train.images.mean().abs() < 0.3 and 0.7 < float(bundle.train.images.std()) < 1.3
    assert not set(bundle.train.meta["index"].tolist()) & set(bundle.val.meta["index"].tolist())


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Write a small pickle-layout CIFAR-10 under ``tmp_path`` and return ``-s`` overrides for examples/cifar*.yaml.

    60 training images (40 train + 20 validation are drawn from them) and 20 test images; one epoch per
    stage, 2 MC-dropout passes, one CPU thread. The zoo is kept (cifar_paper.yaml's ResNet-110 included).
    """
    root = write_pickle(tmp_path / "cifar10", per_batch=12, num_test=20)
    return [
        f"data.params.root={root}",
        "data.params.source=pickle",
        "data.params.num_train=40",
        "data.params.num_val=20",
        "data.params.num_test=20",
        "run.device=cpu",
        "run.threads=1",
        *tiny_training(batch_size=10, policy_epochs=2),
    ]


def test_tiny_overrides_fixture(tmp_path: Path) -> None:
    items = [item for item in tiny_overrides(tmp_path) if item.startswith("data.params.")]
    params = dict(item.removeprefix("data.params.").split("=", 1) for item in items)
    bundle = build_data(
        params["source"], params["root"], int(params["num_train"]), int(params["num_val"]), int(params["num_test"])
    )
    assert len(bundle.train) == 40 and len(bundle.val) == 20 and len(bundle.test) == 20


# ---------------------------------------------------------------- the shipped zoo (examples/cifar_plugin/weights)

WEIGHTS = Path(__file__).resolve().parents[2] / "examples" / "cifar_plugin" / "weights"


def test_shipped_zoo_files_match_their_index_and_load_into_the_models_of_cifar_yaml() -> None:
    import hashlib
    import json

    from routerkit.config import load_config
    from routerkit.config.build import build_zoo

    index = json.loads((WEIGHTS / "zoo.json").read_text())
    for entry in index["models"]:
        assert hashlib.sha256((WEIGHTS / entry["file"]).read_bytes()).hexdigest() == entry["sha256"], entry["file"]
    cfg = load_config(WEIGHTS.parents[1] / "cifar.yaml")
    assert [m.name for m in cfg.zoo.models] == [e["name"] for e in index["models"]]
    zoo = build_zoo(cfg, in_channels=3, num_classes=K)  # loads every file (an error names a mismatch)
    assert [sum(p.numel() for p in m.parameters()) for m in zoo] == [e["num_parameters"] for e in index["models"]]


@pytest.mark.skipif(REAL is None, reason="set ROUTERKIT_DATA to a folder with cifar10/ to read the real copy")
def test_shipped_zoo_is_a_ladder_on_held_out_test_images() -> None:
    import json

    from routerkit.config import load_config
    from routerkit.config.build import build_zoo

    assert REAL is not None
    bundle = build_data("auto", str(REAL), num_train=10, num_val=10, num_test=1000)
    zoo = build_zoo(load_config(WEIGHTS.parents[1] / "cifar.yaml"), in_channels=3, num_classes=K).eval()
    with torch.inference_mode():
        accuracy = [float((m(bundle.test.images).argmax(1) == bundle.test.targets).double().mean()) for m in zoo]
    recorded = [e["test"]["accuracy"] for e in json.loads((WEIGHTS / "zoo.json").read_text())["models"]]
    # 1,000 of the 10,000 test images the index scored: within sampling noise (3 standard errors) of it
    for got, full in zip(accuracy, recorded, strict=True):
        assert abs(got - full) < 3 * (full * (1 - full) / 1000) ** 0.5 + 1e-3, (accuracy, recorded)
    assert accuracy[0] + 0.03 < accuracy[1] and accuracy[0] + 0.03 < accuracy[2]  # ResNet-8 well below the others
