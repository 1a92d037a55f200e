"""Tests of routerkit.data.folder: image / mask folder data sets and the PaSeR battery layout."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from routerkit.data import Split
from routerkit.data.folder import (
    PASER_BATTERY_CLASSES,
    folder_pairs,
    load_folder_split,
    load_paser_battery,
)

BINARY = {0: 0, 255: 1}


def save(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 / uint16, [H, W] or [H, W, 3]) with Pillow; the suffix picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def gray8(h: int = 4, w: int = 5, offset: int = 0) -> np.ndarray:
    return ((np.arange(h * w).reshape(h, w) * 12 + offset) % 256).astype(np.uint8)


def mask01(h: int = 4, w: int = 5) -> np.ndarray:
    """A 0 / 255 mask."""
    return np.where(np.arange(h * w).reshape(h, w) % 3 == 0, 255, 0).astype(np.uint8)


def write_png_rgb16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def names(path: Path) -> str:
    return re.escape(str(path))


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", [".png", ".tif", ".tiff"])
def test_gray_8bit_round_trip(tmp_path: Path, ext: str) -> None:
    image = gray8()
    save(tmp_path / "img" / f"a{ext}", image)
    save(tmp_path / "msk" / f"a{ext}", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    assert isinstance(split, Split)
    assert split.images.dtype == torch.float32 and split.targets.dtype == torch.int64
    assert split.images.shape == (1, 1, 4, 5) and split.targets.shape == (1, 4, 5)
    np.testing.assert_allclose(split.images[0, 0].numpy(), image / np.float32(255), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(split.targets[0].numpy(), mask01() // 255)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_gray_16bit_round_trip_reads_real_16bit_values(tmp_path: Path, ext: str) -> None:
    image = (np.arange(20).reshape(4, 5) * 3000 + 7).astype(np.uint16)  # up to 57007, far above 255
    path = save(tmp_path / "img" / f"a{ext}", image)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")  # really stored as 16-bit
    save(tmp_path / "msk" / f"a{ext}", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    np.testing.assert_allclose(split.images[0, 0].numpy(), image / np.float32(65535), rtol=0, atol=1e-7)
    assert float(split.images.max()) <= 1.0
    raw = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    np.testing.assert_array_equal(raw.images[0, 0].numpy(), image.astype(np.float32))


def test_big_endian_16bit_tiff(tmp_path: Path) -> None:
    image = (np.arange(20).reshape(4, 5) * 3000).astype(np.uint16)
    (tmp_path / "img").mkdir()
    Image.frombytes("I;16B", (5, 4), image.astype(">u2").tobytes()).save(tmp_path / "img" / "a.tif")
    save(tmp_path / "msk" / "a.png", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    np.testing.assert_array_equal(split.images[0, 0].numpy(), image.astype(np.float32))


def test_normalize_none_keeps_8bit_values(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "msk" / "a.png", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    assert split.images.dtype == torch.float32
    np.testing.assert_array_equal(split.images[0, 0].numpy(), gray8().astype(np.float32))


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_rgb_images_give_three_channels_in_order(tmp_path: Path, ext: str) -> None:
    rgb = np.stack([gray8(), gray8(offset=1), gray8(offset=2)], axis=-1)
    save(tmp_path / "img" / f"a{ext}", rgb)
    save(tmp_path / "img" / f"b{ext}", rgb[..., ::-1].copy())
    save(tmp_path / "msk" / "a.png", mask01())
    save(tmp_path / "msk" / "b.png", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    assert split.images.shape == (2, 3, 4, 5)
    for c in range(3):
        np.testing.assert_allclose(split.images[0, c].numpy(), rgb[..., c] / np.float32(255), atol=1e-7)
        np.testing.assert_allclose(split.images[1, c].numpy(), rgb[..., 2 - c] / np.float32(255), atol=1e-7)


def test_rgba_image_drops_alpha(tmp_path: Path) -> None:
    rgba = np.stack([gray8(), gray8(offset=1), gray8(offset=2), np.full((4, 5), 9, np.uint8)], axis=-1)
    save(tmp_path / "img" / "a.png", rgba)
    save(tmp_path / "msk" / "a.png", mask01())
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    assert split.images.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(split.images[0, 2].numpy(), gray8(offset=2).astype(np.float32))


def test_16bit_rgb_is_refused_not_silently_truncated(tmp_path: Path) -> None:
    bad = write_png_rgb16(tmp_path / "img" / "a.png", (np.arange(60).reshape(4, 5, 3) * 1000).astype(np.uint16))
    save(tmp_path / "msk" / "a.png", mask01())
    with pytest.raises(ValueError, match=names(bad) + r".*16-bit"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_32bit_integer_tiff_needs_normalize_none(tmp_path: Path) -> None:
    image = (np.arange(20).reshape(4, 5) * 100_000).astype(np.int32)
    path = tmp_path / "img" / "a.tif"
    path.parent.mkdir()
    Image.fromarray(image).save(path)
    save(tmp_path / "msk" / "a.png", mask01())
    with pytest.raises(ValueError, match=names(path) + r".*normalize='none'"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    np.testing.assert_array_equal(split.images[0, 0].numpy(), image.astype(np.float32))


# ------------------------------------------------------------------------------------------------- masks


def test_value_map_with_default_class(tmp_path: Path) -> None:
    mask = np.array([[0, 10, 20], [30, 10, 0]], dtype=np.uint8)
    save(tmp_path / "img" / "a.png", gray8(2, 3))
    save(tmp_path / "msk" / "a.png", mask)
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", {10: 1, 20: 2}, default_class=5)
    np.testing.assert_array_equal(split.targets[0].numpy(), [[5, 1, 2], [5, 1, 5]])


def test_value_map_on_16bit_masks(tmp_path: Path) -> None:
    mask = np.array([[0, 1000], [60000, 1000]], dtype=np.uint16)
    save(tmp_path / "img" / "a.png", gray8(2, 2))
    save(tmp_path / "msk" / "a.tif", mask)
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", {0: 0, 1000: 1, 60000: 2})
    np.testing.assert_array_equal(split.targets[0].numpy(), [[0, 1], [2, 1]])


def test_unmapped_values_without_default_raise_naming_file_values_and_map(tmp_path: Path) -> None:
    mask = np.array([[0, 7, 255], [9, 7, 0]], dtype=np.uint8)
    save(tmp_path / "img" / "a.png", gray8(2, 3))
    bad = save(tmp_path / "msk" / "a.png", mask)
    with pytest.raises(ValueError, match=names(bad) + r".*\[7, 9\].*\{0: 0, 255: 1\}"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_many_unmapped_values_are_cut_short(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8(4, 10))
    save(tmp_path / "msk" / "a.png", np.arange(40, dtype=np.uint8).reshape(4, 10))
    with pytest.raises(ValueError, match=r"\[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\. \(39 in all\)\]"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", {0: 0})


def test_palette_and_one_bit_masks_use_stored_values(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8(2, 2))
    save(tmp_path / "img" / "b.png", gray8(2, 2))
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8)).convert("P").save(tmp_path / "msk" / "a.png")
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(tmp_path / "msk" / "b.png")
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", {0: 0, 1: 1, 2: 2})
    np.testing.assert_array_equal(split.targets.numpy(), [[[0, 1], [2, 1]], [[0, 1], [1, 0]]])


# ------------------------------------------------------------------------------------------------- PaSeR


def make_paser(root: Path, splits: dict[str, int]) -> None:
    for name, n in splits.items():
        for i in range(n):
            save(root / f"{name}_images" / f"{i:03d}.png", gray8(offset=i))
            mask = np.array([[0, 255, 128, 0, 1], [255, 255, 0, 77, 254]] * 2, dtype=np.uint8)
            save(root / f"{name}_label" / f"{i:03d}.png", mask)


def test_paser_battery_layout_and_classes(tmp_path: Path) -> None:
    make_paser(tmp_path, {"train": 3, "validation": 2, "test": 1})
    data = load_paser_battery(tmp_path)
    assert PASER_BATTERY_CLASSES == ["pore", "carbon", "nickel"]
    assert list(data) == ["train", "validation", "test"]
    assert [len(data[k]) for k in data] == [3, 2, 1]
    assert data["train"].images.shape == (3, 1, 4, 5)
    np.testing.assert_array_equal(data["test"].targets[0].numpy(), [[0, 1, 2, 0, 2], [1, 1, 0, 2, 2]] * 2)
    np.testing.assert_allclose(data["train"].images[2, 0].numpy(), gray8(offset=2) / np.float32(255), atol=1e-7)


def test_paser_battery_subset_of_splits(tmp_path: Path) -> None:
    make_paser(tmp_path, {"test": 2})
    assert list(load_paser_battery(tmp_path, splits=("test",))) == ["test"]


def test_paser_battery_missing_folders_are_named(tmp_path: Path) -> None:
    make_paser(tmp_path, {"train": 1, "test": 1})
    (tmp_path / "validation_images").mkdir()
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "validation_label") + r".*") as info:
        load_paser_battery(tmp_path)
    assert "root/<split>_images/" in str(info.value)
    assert str(tmp_path / "validation_images") not in str(info.value)
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "nowhere")):
        load_paser_battery(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- pairing and order


def test_pairing_by_stem_across_extensions(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8(offset=1))
    save(tmp_path / "img" / "b.TIFF", gray8(offset=2))
    save(tmp_path / "img" / "c.tif", gray8(offset=3))
    save(tmp_path / "msk" / "a.tif", mask01())
    save(tmp_path / "msk" / "b.PNG", np.zeros((4, 5), np.uint8))
    save(tmp_path / "msk" / "c.png", np.full((4, 5), 255, np.uint8))
    pairs = folder_pairs(tmp_path / "img", tmp_path / "msk")
    assert [(s, i.name, m.name) for s, i, m in pairs] == [
        ("a", "a.png", "a.tif"),
        ("b", "b.TIFF", "b.PNG"),
        ("c", "c.tif", "c.png"),
    ]
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    np.testing.assert_array_equal(split.images[:, 0, 0, 0].numpy(), [1, 2, 3])
    np.testing.assert_array_equal(split.targets.sum(dim=(1, 2)).numpy(), [mask01().sum() // 255, 0, 20])


def test_other_files_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "msk" / "a.png", mask01())
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    (tmp_path / "img" / "._a.png").write_bytes(b"resource fork")
    (tmp_path / "img" / "sub.png").mkdir()
    split = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    assert len(split) == 1
    save(tmp_path / "img2" / "a.tif", gray8())
    save(tmp_path / "msk2" / "a.tif", mask01())
    save(tmp_path / "msk2" / "z.png", mask01())  # not paired: .png is not asked for
    assert len(load_folder_split(tmp_path / "img2", tmp_path / "msk2", BINARY, extensions=("TIF",))) == 1


def test_order_is_sorted_by_stem_and_deterministic(tmp_path: Path) -> None:
    stems = ["m", "b", "z", "a10", "a2", "q"]
    for k, stem in enumerate(stems):
        save(tmp_path / "img" / f"{stem}.png", np.full((4, 5), k, np.uint8))
        save(tmp_path / "msk" / f"{stem}.png", mask01())
    first = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    second = load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="none")
    expected = [stems.index(s) for s in sorted(stems)]
    np.testing.assert_array_equal(first.images[:, 0, 0, 0].numpy(), expected)
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert [s for s, _, _ in folder_pairs(tmp_path / "img", tmp_path / "msk")] == sorted(stems)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_folders(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "msk")):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "nope")):
        load_folder_split(tmp_path / "nope", tmp_path / "img", BINARY)
    with pytest.raises(NotADirectoryError, match=names(tmp_path / "img" / "a.png")):
        load_folder_split(tmp_path / "img" / "a.png", tmp_path / "img", BINARY)


def test_empty_folder(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    (tmp_path / "msk").mkdir()
    (tmp_path / "msk" / "readme.txt").write_text("no masks yet")
    with pytest.raises(FileNotFoundError, match=names(tmp_path / "msk") + r" but found none"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_images_without_masks_and_masks_without_images_list_stems(tmp_path: Path) -> None:
    for stem in ["a", "b", "c"]:
        save(tmp_path / "img" / f"{stem}.png", gray8())
    for stem in ["a", "x"]:
        save(tmp_path / "msk" / f"{stem}.png", mask01())
    with pytest.raises(ValueError, match=r"without a mask .*\[b, c\].*without an image .*\[x\]") as info:
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)
    assert str(tmp_path / "img") in str(info.value) and str(tmp_path / "msk") in str(info.value)


def test_duplicate_stems_in_one_folder(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "img" / "a.tif", gray8())
    save(tmp_path / "msk" / "a.png", mask01())
    with pytest.raises(ValueError, match=r"'a\.png' and 'a\.tif' share the stem 'a'"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_image_and_mask_of_different_size_name_both(tmp_path: Path) -> None:
    image = save(tmp_path / "img" / "a.png", gray8(4, 5))
    mask = save(tmp_path / "msk" / "a.png", mask01(5, 4))
    pattern = names(image) + r".*\(4, 5\).*" + names(mask) + r".*\(5, 4\)"
    with pytest.raises(ValueError, match=pattern):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_images_of_differing_shapes_name_file_and_expected_shape(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8(4, 5))
    bad = save(tmp_path / "img" / "b.png", gray8(6, 5))
    save(tmp_path / "msk" / "a.png", mask01(4, 5))
    save(tmp_path / "msk" / "b.png", mask01(6, 5))
    with pytest.raises(ValueError, match=r"\(1, 4, 5\) of 'a\.png' but " + names(bad) + r" has \(1, 6, 5\)"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_images_of_differing_channel_counts(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    bad = save(tmp_path / "img" / "b.png", np.stack([gray8()] * 3, axis=-1))
    save(tmp_path / "msk" / "a.png", mask01())
    save(tmp_path / "msk" / "b.png", mask01())
    with pytest.raises(ValueError, match=r"\(1, 4, 5\).*" + names(bad) + r" has \(3, 4, 5\)"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_rgb_mask_is_not_single_channel(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    bad = save(tmp_path / "msk" / "a.png", np.stack([mask01()] * 3, axis=-1))
    with pytest.raises(ValueError, match=r"single-channel.*" + names(bad) + r".*'RGB'"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


@pytest.mark.parametrize("which", ["img", "msk"])
def test_unreadable_files_are_named(tmp_path: Path, which: str) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "msk" / "a.png", mask01())
    bad = tmp_path / which / "a.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"Could not read .*" + names(bad)):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_truncated_png_is_named(tmp_path: Path) -> None:
    bad = save(tmp_path / "img" / "a.png", (np.arange(400 * 300) % 251).astype(np.uint8).reshape(400, 300))
    bad.write_bytes(bad.read_bytes()[:200])
    save(tmp_path / "msk" / "a.png", np.zeros((400, 300), np.uint8))
    with pytest.raises(ValueError, match=names(bad)):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "img" / "a.tif"
    bad.parent.mkdir()
    pages = [Image.fromarray(gray8()), Image.fromarray(gray8(offset=5))]
    pages[0].save(bad, save_all=True, append_images=pages[1:])
    save(tmp_path / "msk" / "a.png", mask01())
    with pytest.raises(ValueError, match=names(bad) + r" has 2 pages"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY)


def test_bad_arguments(tmp_path: Path) -> None:
    save(tmp_path / "img" / "a.png", gray8())
    save(tmp_path / "msk" / "a.png", mask01())
    with pytest.raises(ValueError, match="normalize"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", BINARY, normalize="minmax")
    with pytest.raises(TypeError, match="value_map"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", {0.5: 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="value_map"):
        load_folder_split(tmp_path / "img", tmp_path / "msk", {})
    with pytest.raises(ValueError, match="split"):
        load_paser_battery(tmp_path, splits=())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_image_bytes_read_as_the_file_is_read_and_bad_bytes_are_named(tmp_path: Path, dtype: type) -> None:
    from routerkit.data.folder import read_image, read_image_bytes

    pixels = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (9, 7), dtype=dtype)
    path = tmp_path / "scan.png"
    Image.fromarray(pixels).save(path)
    assert np.array_equal(read_image_bytes(path.read_bytes(), "upload"), read_image(path))
    for data in (b"not an image", path.read_bytes()[:60]):
        with pytest.raises(ValueError, match=r"Could not read image file upload: ") as err:
            read_image_bytes(data, "upload")
        assert "BytesIO" not in str(err.value)
