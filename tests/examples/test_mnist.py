"""The noisy-MNIST plugin: IDX reading, noise types, the data bundle and the download path."""

from __future__ import annotations

import gzip
import os
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_training

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import mnist_plugin.data as mnist_data  # noqa: E402
from mnist_plugin import apply_noise, build_data, read_idx, write_idx  # noqa: E402


def _digits(n: int, seed: int) -> np.ndarray:
    """Blocky fake digits: a bright bar and a ring at random places."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    yy, xx = np.mgrid[:28, :28]
    for i in range(n):
        cy, cx, r = rng.integers(9, 19), rng.integers(9, 19), rng.integers(4, 8)
        ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.5
        out[i][ring] = 255
        x0 = rng.integers(4, 22)
        out[i, 4:24, x0 : x0 + 2] = 200
    return out


def write_fixture(folder: Path, n_train: int = 60, n_test: int = 24, gz: bool = True) -> Path:
    """Tiny MNIST in the IDX layout."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{ext}", _digits(n_train, 0))
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", np.arange(n_train, dtype=np.uint8) % 10)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", _digits(n_test, 1))
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test, dtype=np.uint8) % 10)
    return folder


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Fixture + overrides running examples/mnist.yaml at a tiny budget."""
    root = write_fixture(tmp_path / "mnist")
    return [
        f"data.params.root={root}",
        "data.params.num_train=30",
        "data.params.num_val=6",
        "data.params.num_test=9",
        "uncertainty.params.num_passes=2",
        *tiny_training(policy_epochs=2, finetune_epochs=2),
        "compare.sweep_lambdas=[0.0, 0.5]",
        "compare.sweep_policy_epochs=1",
        "compare.stop_epochs=1",
        "compare.stop_alphas=[0.1]",
        "compare.idk_offsets=[0.0]",
        "compare.idk_grid_steps=3",
    ]


def test_idx_round_trip_gz_and_raw(tmp_path: Path) -> None:
    a = _digits(5, 3)
    for name in ("x.idx", "x.idx.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, a)), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")
    raw = gzip.decompress((tmp_path / "x.idx.gz").read_bytes())
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(tmp_path / "short")


def test_noise_types_blur_differently() -> None:
    x = torch.zeros(3, 1, 32, 32)
    x[:, :, 16, 16] = 1.0  # an impulse: the output is each filter
    out = apply_noise(x, torch.tensor([0, 1, 2]))
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(3), atol=1e-4)  # mass-preserving filters
    peaks = out.amax((1, 2, 3))
    assert peaks[0] > peaks[1]  # radius 2 spreads more than radius 1
    assert torch.allclose(out[2, 0, 14:19, 14:19], torch.full((5, 5), 1 / 25))  # the fixed box
    assert float(out[2, 0, 13, 16]) == 0.0
    with pytest.raises(ValueError, match="noise"):
        apply_noise(x, torch.tensor([0, 1]))


def test_build_data_from_idx_fixture(tmp_path: Path) -> None:
    root = write_fixture(tmp_path / "m", gz=False)
    b = build_data(root=str(root), num_train=30, num_val=9, num_test=12)
    assert b.train.images.shape == (30, 1, 32, 32) and b.test.images.shape == (12, 1, 32, 32)
    assert b.class_names == ["background", "digit"] and set(b.train.targets.unique().tolist()) == {0, 1}
    for split in b.splits().values():  # equal shares of the three noise types
        assert torch.bincount(split.meta["noise"], minlength=3).tolist() == [len(split) // 3] * 3
    again = build_data(root=str(root), num_train=30, num_val=9, num_test=12)
    assert torch.equal(again.train.images, b.train.images)
    # Targets are the clean digit: blurring never changes them.
    x = b.train.images[:, 0]
    assert float(x[b.train.targets == 0].mean()) < float(x[b.train.targets == 1].mean())


def test_build_data_errors(tmp_path: Path) -> None:
    root = write_fixture(tmp_path / "m")
    with pytest.raises(ValueError, match="num_train"):
        build_data(root=str(root), num_train=2)
    with pytest.raises(ValueError, match="num_train \\+ num_val"):
        build_data(root=str(root), num_train=50, num_val=20)
    with pytest.raises(FileNotFoundError, match=r"data\.params\.root"):
        build_data(root=str(tmp_path / "nothing"))


def test_no_local_copy_and_no_network_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROUTERKIT_DATA", raising=False)
    monkeypatch.setenv("ROUTERKIT_CACHE", str(tmp_path / "cache"))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"No local MNIST copy.*ROUTERKIT_DATA"):
        build_data()
    with pytest.raises(FileNotFoundError, match="No MNIST copy"):
        build_data(download=False)


def test_env_var_and_cache_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fixture(tmp_path / "data" / "mnist")
    monkeypatch.setenv("ROUTERKIT_DATA", str(tmp_path / "data"))
    assert len(build_data(num_train=30, num_val=6, num_test=9).train) == 30
    monkeypatch.delenv("ROUTERKIT_DATA")
    monkeypatch.setenv("ROUTERKIT_CACHE", str(tmp_path / "cache"))
    write_fixture(tmp_path / "cache" / "mnist")
    assert len(build_data(num_train=30, num_val=6, num_test=9, download=False).test) == 9


REAL = os.environ.get("ROUTERKIT_DATA")


@pytest.mark.skipif(not REAL or not (Path(REAL) / "mnist").is_dir(), reason="needs ROUTERKIT_DATA with mnist/")
def test_reads_the_real_mnist() -> None:
    b = build_data(num_train=300, num_val=30, num_test=300)
    assert b.test.images.shape == (300, 1, 32, 32)
    assert 0.06 < float(b.test.targets.float().mean()) < 0.15  # strokes above half intensity: ~9% of 32 x 32
