"""DatasetSplit: a Dataset read lazily gives the batches an in-memory Split gives, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from routerkit.data import DataBundle, DatasetSplit, Split, paser_split


class Pairs(Dataset[tuple[Any, Any]]):
    """Items of two tensors, counting reads (to show nothing is read ahead)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets, self.reads = images, targets, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        self.reads += 1
        return self.images[i], self.targets[i]


def _data(n: int = 10, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 2, 4, 6, generator=g), torch.randint(0, classes, (n, 4, 6), generator=g)


def test_same_batches_as_in_memory_split_in_the_same_order() -> None:
    images, targets = _data()
    eager, lazy = Split(images, targets), DatasetSplit(Pairs(images, targets))
    assert len(lazy) == 10 and lazy.input_shape == (2, 4, 6) and lazy.target_shape == (4, 6)
    assert not lazy.is_classification and eager.input_shape == lazy.input_shape
    for shuffle in (False, True):
        a = list(eager.index_batches(3, shuffle, torch.Generator().manual_seed(5)))
        b = list(lazy.index_batches(3, shuffle, torch.Generator().manual_seed(5)))
        assert len(a) == len(b) == 4
        for (ia, xa, ya), (ib, xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_reading_a_loader_does_not_touch_the_global_rng() -> None:
    images, targets = _data()
    lazy = DatasetSplit(Pairs(images, targets), num_workers=0)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    list(lazy.batches(4))
    assert torch.equal(torch.rand(1), expected)


def test_worker_processes_give_the_same_batches() -> None:
    images, targets = _data()
    one = list(DatasetSplit(Pairs(images, targets)).batches(4, True, torch.Generator().manual_seed(1)))
    two = list(DatasetSplit(Pairs(images, targets), num_workers=2).batches(4, True, torch.Generator().manual_seed(1)))
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_subset_take_materialize_and_paser_split_stay_lazy() -> None:
    images, targets = _data()
    ds = Pairs(images, targets)
    lazy = DatasetSplit(ds, meta={"group": torch.arange(10) % 2})
    reads = ds.reads
    sub = lazy.subset(torch.tensor([7, 2, 5]))
    assert isinstance(sub, DatasetSplit) and len(sub) == 3 and ds.reads == reads  # nothing read yet
    assert torch.equal(sub.meta["group"], torch.tensor([1, 0, 1]))
    mat = sub.materialize()
    assert torch.equal(mat.images, images[[7, 2, 5]]) and torch.equal(mat.targets, targets[[7, 2, 5]])
    assert torch.equal(lazy.take(2).images, images[:2])
    parts = paser_split(lazy, seed=0)
    eager_parts = paser_split(Split(images, targets), seed=0)
    for key in ("pt", "rl", "ft"):
        assert isinstance(parts[key], DatasetSplit)
        assert torch.equal(parts[key].materialize().images, eager_parts[key].images)


def test_bundle_checks_lazy_targets_as_they_are_read() -> None:
    images, targets = _data()
    targets[6, 0, 0] = 7
    bundle = DataBundle(
        DatasetSplit(Pairs(images, targets)), Split(images[:2], targets[:2]), Split(images[:2], targets[:2]), ["a", "b", "c"]
    )
    assert bundle.input_shape == (2, 4, 6) and bundle.spec.task == "segmentation"
    with pytest.raises(ValueError, match=r"train split's targets \(samples \[6\]\).*found \[7\]"):
        list(bundle.train.batches(4))
    with pytest.raises(ValueError, match="val split's targets"):
        DataBundle(
            Split(images[:2], targets[:2] * 0),
            Split(images[6:7], targets[6:7]),
            Split(images[:2], targets[:2] * 0),
            ["a", "b", "c"],
        )


def test_bad_items_and_shapes_get_clear_errors() -> None:
    images, targets = _data()
    with pytest.raises(TypeError, match=r"item 0 of the dataset split's Dataset to be \(image, target\) but got a tuple of 1"):
        DatasetSplit(torch.utils.data.TensorDataset(images))  # one tensor per item
    with pytest.raises(TypeError, match="integer target"):
        DatasetSplit(Pairs(images, targets.float()))
    with pytest.raises(ValueError, match="masks to have the images' spatial size"):
        DatasetSplit(Pairs(images, targets[:, :3]))
    ragged = Pairs(images, targets)
    ragged.images = [images[i] if i != 5 else images[i, :, :3] for i in range(10)]  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"sample 5 has \(2, 3, 6\)"):
        list(DatasetSplit(ragged, name="train").batches(4))
    with pytest.raises(ValueError, match="num_workers"):
        DatasetSplit(Pairs(images, targets), num_workers=-1)


def test_classification_items_with_python_labels() -> None:
    items = [(torch.rand(3), i % 2) for i in range(5)]
    lazy = DatasetSplit(items)  # type: ignore[arg-type]  (a list is a map-style dataset)
    assert lazy.is_classification and lazy.target_shape == ()
    x, y = next(lazy.batches(5))
    assert x.shape == (5, 3) and torch.equal(y, torch.tensor([0, 1, 0, 1, 0]))


def test_empty_datasets_are_refused_and_an_empty_selection_materializes_empty() -> None:
    with pytest.raises(ValueError, match="non-empty Dataset for the val split"):
        DatasetSplit([], name="val")
    images, targets = _data()
    lazy = DatasetSplit(Pairs(images, targets), meta={"g": torch.arange(10)})
    empty = lazy.subset(torch.zeros(0, dtype=torch.long)).materialize()
    assert empty.images.shape == (0, 2, 4, 6) and empty.targets.shape == (0, 4, 6) and empty.meta["g"].shape == (0,)
    assert len(lazy.take(0)) == 0


def test_pin_memory_follows_the_device_unless_given() -> None:
    images, targets = _data()
    auto, off = DatasetSplit(Pairs(images, targets)), DatasetSplit(Pairs(images, targets), pin_memory=False)
    assert not auto.pin_memory and auto.to("meta").pin_memory and not auto.to("meta").to("cpu").pin_memory
    assert not off.to("meta").pin_memory


def test_errors_name_the_sample_of_the_users_dataset_through_the_paser_parts() -> None:
    images, targets = _data()
    targets[6, 1, 1] = 9
    bundle = DataBundle(
        DatasetSplit(Pairs(images, targets)), Split(images[:2], targets[:2]), Split(images[:2], targets[:2]), ["a", "b", "c"]
    )
    parts = paser_split(bundle.train, seed=0)
    (holder,) = [p for p in parts.values() if 6 in p.dataset.indices]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"\(samples \[6\]\).*found \[9\]"):
        list(holder.batches(2))
