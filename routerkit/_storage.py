"""Row stores: ``[N, ...]`` tensors kept in memory, or memory-mapped on disk when they would not fit.

The replay cache (`routerkit.unit_table.UnitTable`) and the distillation targets of ``f_0`` hold one
row per input of a split; for large inputs (Cityscapes at 512 x 1024: ``f_0``'s probabilities alone
are 40 MB per image) they outgrow memory long before the data do. A `RowStore` allocates them
through one decision per table: in memory while the whole table fits the budget, else in files
mapped into memory (``torch.from_file(..., shared=True)``), which the operating system pages in
and out. A mapped file is unlinked as soon as it is mapped: it takes disk space only while the
tensor lives and leaves nothing behind, even after a crash. Values are bit-identical either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import sys
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["RowStore", "available_memory_bytes"]


#: Spill folders already warned about being a tmpfs.
_WARNED_TMPFS: set[Path] = set()


def _file_system(folder: Path) -> str | None:
    """The file-system type of the mount holding ``folder`` (``/proc/mounts``), if known."""
    try:
        target = folder.resolve()
        best, kind = "", None
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            inside = len(parts) >= 3 and (str(target) == parts[1] or str(target).startswith(parts[1].rstrip("/") + "/"))
            if inside and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return None


#: ``madvise`` advice dropping a range's pages from the process (for a shared file mapping they stay in the file).
_MADV_DONTNEED = 4


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _own_cgroup_v2() -> Path:
    """This process's cgroup v2 folder (``/proc/self/cgroup``'s ``0::/path``), else the root one."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidate = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
                if (candidate / "memory.max").exists():
                    return candidate
    except OSError:
        pass
    return Path("/sys/fs/cgroup")


def _inactive_file(stat_file: Path, key: str) -> int:
    """Reclaimable page cache the cgroup's usage counts (``inactive_file`` of ``memory.stat``), 0 if unknown."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom() -> int | None:
    """What the process's cgroup (a container's memory limit) still allows, if it sets one.

    Usage less the reclaimable page cache it counts (the spill files' own pages, cached data files).
    """
    v2 = _own_cgroup_v2()
    v1 = Path("/sys/fs/cgroup/memory")
    for limit_file, usage_file, stat_file, key in (
        (v2 / "memory.max", v2 / "memory.current", v2 / "memory.stat", "inactive_file"),
        (v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat", "total_inactive_file"),
    ):
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1's "no limit"
            return None
        return max(limit - max(usage - _inactive_file(stat_file, key), 0), 0)
    return None


def available_memory_bytes() -> int:
    """Memory available now: the system's ``MemAvailable``, capped by a container's limit; 4 GiB if unknown."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            available = 4 << 30
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


class RowStore:
    """Allocates the ``[N, ...]`` tensors of one table, in memory or on disk.

    Args:
        memory_gb: Budget of a table in memory, GiB; a table larger than this goes to disk.
            ``None``: half the memory available when the table is allocated, shared by the processes
            of a distributed run on this machine (``LOCAL_WORLD_SIZE``). ``0``: always on disk.
        directory: Folder of the mapped files (default: the system's temporary folder).

    Attributes:
        spilled: Whether the last table allocated went to disk.
    """

    def __init__(self, memory_gb: float | None = None, directory: str | Path | None = None) -> None:
        if memory_gb is not None and (not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool) or memory_gb < 0):
            raise ValueError(f"Expected memory_gb to be a number >= 0 or None but got {memory_gb!r}.")
        self.memory_gb = memory_gb
        self.directory = None if directory is None else Path(os.path.expandvars(os.path.expanduser(str(directory))))
        if self.directory is not None and self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"Expected the spill directory {self.directory} to be a folder but it is a file.")
        self.spilled = False
        #: Each mapped table tensor with the address and length of its mapping when it was made.
        self._mapped_tensors: list[tuple[weakref.ref[Tensor], int, int]] = []

    def release(self) -> None:
        """Drop this process's resident pages of the store's memory-mapped tables (Linux; a no-op elsewhere).

        Their contents stay in the file (and the kernel's page cache); the next read maps them in
        again. Called after each batch is written or read, it keeps the process's resident memory
        at a batch's worth of a spilled table however large the table is.
        """
        if not self._mapped_tensors or not sys.platform.startswith("linux"):
            return
        self._mapped_tensors = [entry for entry in self._mapped_tensors if entry[0]() is not None]
        for ref, address, length in self._mapped_tensors:
            tensor = ref()
            # only the mapping made for it: a tensor given other storage since (set_, .data =) is left alone
            if tensor is None or tensor.untyped_storage().data_ptr() != address:
                continue
            with contextlib.suppress(OSError, AttributeError):
                _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED)

    def holds(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is (a view of) one of this store's memory-mapped tables."""
        address = tensor.untyped_storage().data_ptr()
        return any(ref() is not None and start == address for ref, start, _ in self._mapped_tensors)

    def budget_bytes(self) -> int:
        """The in-memory budget of one table, bytes."""
        if self.memory_gb is None:  # every local rank of a distributed run builds its own tables
            return available_memory_bytes() // 2 // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        return int(self.memory_gb * (1 << 30))

    def allocate(self, rows: int, shapes: dict[str, tuple[Sequence[int], torch.dtype]]) -> dict[str, Tensor]:
        """Uninitialised ``[rows, *shape]`` tensors, one per name, all in memory or all on disk.

        Args:
            rows: N, the first dimension of every tensor.
            shapes: Name -> (shape of one row, dtype).

        Returns:
            Name -> tensor; ``spilled`` says where they live.
        """
        sizes = {k: (rows, *[int(d) for d in shape]) for k, (shape, _) in shapes.items()}
        total = sum(math.prod(sizes[k]) * torch.empty((), dtype=dt).element_size() for k, (_, dt) in shapes.items())
        self.spilled = total > self.budget_bytes()
        if not self.spilled:
            return {k: torch.empty(sizes[k], dtype=dt) for k, (_, dt) in shapes.items()}
        return {k: self._mapped(sizes[k], dt) for k, (_, dt) in shapes.items()}

    def _mapped(self, size: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        directory = self.directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        folder = directory or Path(tempfile.gettempdir())
        if _file_system(folder) == "tmpfs" and folder not in _WARNED_TMPFS:
            _WARNED_TMPFS.add(folder)
            warnings.warn(
                f"Spilling a table to {folder}, a tmpfs: its files live in memory, not on disk. Set run.cache_dir to a "
                "folder on a disk.",
                stacklevel=3,
            )
        numel = math.prod(size)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="routerkit-rows-", suffix=".bin", dir=directory)
        try:
            if numel == 0:
                return torch.empty(size, dtype=dtype)
            # Reserve the blocks now: a full disk is this clear error, not a SIGBUS when a page is first written.
            if hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError as err:  # a file system without it: map the file unreserved
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(size)
            length = -(-tensor.untyped_storage().nbytes() // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mapped_tensors.append((weakref.ref(tensor), tensor.untyped_storage().data_ptr(), length))
        except (OSError, RuntimeError) as err:
            raise OSError(
                f"Could not map a {nbytes / 2**30:.2f} GiB spill file in {directory or tempfile.gettempdir()}: {err}. "
                "Free disk space there or set run.cache_dir to a folder on a disk with room."
            ) from err
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping stays valid; the disk space is freed when the tensor is
        return tensor
