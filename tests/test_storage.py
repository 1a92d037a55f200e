"""RowStore: tables in memory under the budget, memory-mapped on disk above it, with the same values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from routerkit import PatchGrid, RoutedPipeline, Zoo
from routerkit._storage import RowStore, available_memory_bytes
from routerkit.data import DatasetSplit, Split
from routerkit.models import ToySegmenter
from routerkit.replay import build_unit_table
from routerkit.rewards import Correctness
from routerkit.training.pretraining import BaseModelPretraining
from routerkit.training.schedules import StageSettings


def test_a_table_goes_to_disk_only_above_the_budget_and_leaves_no_file(tmp_path: Path) -> None:
    shapes = {"a": ((4, 5), torch.float32), "b": ((), torch.int64)}
    small = RowStore(memory_gb=1.0, directory=tmp_path).allocate(10, shapes)
    store = RowStore(memory_gb=1.0, directory=tmp_path)
    store.allocate(10, shapes)
    assert not store.spilled and not small["a"].is_shared()
    disk = RowStore(memory_gb=0, directory=tmp_path / "spill")
    rows = disk.allocate(10, shapes)
    assert disk.spilled and rows["a"].shape == (10, 4, 5) and rows["b"].dtype == torch.int64
    rows["a"][3] = 7.0
    rows["b"][torch.tensor([1, 9])] = torch.tensor([5, 6])
    assert float(rows["a"][3].sum()) == 140.0 and rows["b"][[1, 9]].tolist() == [5, 6]
    assert rows["a"].is_shared()  # a file mapping: the kernel pages it in and out
    assert list((tmp_path / "spill").iterdir()) == []  # unlinked as soon as mapped
    table_bytes = 10 * 20 * 4 + 10 * 8  # 10 rows of [4, 5] float32 and of one int64
    exact, tight = RowStore(memory_gb=table_bytes / 2**30), RowStore(memory_gb=(table_bytes - 1) / 2**30)
    exact.allocate(10, shapes)
    tight.allocate(10, shapes)
    assert not exact.spilled and tight.spilled
    assert available_memory_bytes() > 0 and RowStore().budget_bytes() > 0


def test_bad_budgets_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_gb"):
        RowStore(memory_gb=-1)
    with pytest.raises(ValueError, match="memory_gb"):
        RowStore(memory_gb=True)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        RowStore(directory=tmp_path / "file")


def _pipe() -> tuple[RoutedPipeline, Split]:
    torch.manual_seed(0)
    zoo = Zoo([ToySegmenter(1, 3, width=2, dropout=0.2), ToySegmenter(1, 3, width=4), ToySegmenter(1, 3, width=6)]).eval()
    pipe = RoutedPipeline(zoo, PatchGrid(2, 2), "mc_dropout", "flops", (1, 8, 8))
    g = torch.Generator().manual_seed(1)
    return pipe, Split(torch.rand(9, 1, 8, 8, generator=g), torch.randint(0, 3, (9, 8, 8), generator=g))


def test_a_spilled_replay_table_equals_the_in_memory_one_also_from_a_lazy_split() -> None:
    pipe, split = _pipe()
    torch.manual_seed(5)
    memory = build_unit_table(pipe, Correctness(3), split, 3, batch_size=4)
    torch.manual_seed(5)
    pipe.row_store = RowStore(memory_gb=0)
    lazy = DatasetSplit([(split.images[i], split.targets[i]) for i in range(len(split))])  # type: ignore[arg-type]
    disk = build_unit_table(pipe, Correctness(3), lazy, 3, batch_size=4)
    assert pipe.row_store.spilled and disk.confusion.is_shared() and not memory.confusion.is_shared()
    for name in ("accuracy", "loss", "uncertainty", "unit_probs", "confusion"):
        assert torch.equal(getattr(memory, name), getattr(disk, name)), name
    assert torch.equal(memory.base.probs, disk.base.probs) and torch.equal(memory.base.uncertainty, disk.base.uncertainty)
    assert memory.base.inputs is not None and disk.base.inputs is not None
    assert torch.equal(memory.base.inputs, disk.base.inputs)
    sub = disk.subset(torch.tensor([2, 0]))  # rows read back into memory
    assert torch.equal(sub.accuracy, memory.accuracy[[2, 0]]) and not sub.accuracy.is_shared()


def test_spilled_distillation_targets_train_f0_as_in_memory_ones() -> None:
    weights = []
    for budget in (None, 0.0):
        pipe, split = _pipe()
        pipe.row_store = RowStore(memory_gb=budget)
        stage = BaseModelPretraining(pipe, split, StageSettings(2, 0.05, 4), seed=0, beta=0.5)
        torch.manual_seed(3)
        for epoch in range(2):
            stage.train_epoch(epoch)
        assert stage.teacher_logits().is_shared() == (budget == 0.0)
        weights.append({k: v.clone() for k, v in pipe.zoo.base.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _file_backed_kib() -> int:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = rest.split()[0] if rest.split() else "0"
    return int(fields.get("RssFile", 0)) + int(fields.get("RssShmem", 0))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_release_drops_the_resident_pages_of_a_spilled_table_and_keeps_its_values() -> None:
    store = RowStore(memory_gb=0)
    rows = store.allocate(16, {"a": ((1024, 1024), torch.float32)})["a"]  # 64 MiB on disk
    before = _file_backed_kib()
    rows[:] = 2.0
    written = _file_backed_kib()
    store.release()
    released = _file_backed_kib()
    assert written - before > 48 * 1024 and written - released > 48 * 1024
    assert float(rows[7].mean()) == 2.0 and float(rows.sum()) == 2.0 * rows.numel()  # read back from the file
    RowStore(memory_gb=None).release()  # nothing mapped: a no-op


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_a_spill_folder_on_tmpfs_is_warned_about_once() -> None:
    import routerkit._storage as storage

    if storage._file_system(Path("/dev/shm")) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    storage._WARNED_TMPFS.discard(Path("/dev/shm"))
    with pytest.warns(UserWarning, match="tmpfs: its files live in memory"):
        RowStore(memory_gb=0, directory="/dev/shm").allocate(2, {"a": ((4,), torch.float32)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RowStore(memory_gb=0, directory="/dev/shm").allocate(2, {"a": ((4,), torch.float32)})


def test_holds_tells_the_stores_mapped_tables() -> None:
    disk, memory = RowStore(memory_gb=0), RowStore(memory_gb=1.0)
    mapped = disk.allocate(3, {"a": ((2,), torch.float32)})["a"]
    plain = memory.allocate(3, {"a": ((2,), torch.float32)})["a"]
    assert disk.holds(mapped) and disk.holds(mapped[1:]) and not disk.holds(plain) and not memory.holds(plain)
    assert not disk.holds(mapped[[0, 2]])  # an indexed copy is in memory
