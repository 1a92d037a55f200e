"""One process at a time trains a run directory: an exclusive lock on ``run_dir/.lock``.

The lock is an OS file lock (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) held for
as long as the training runs. The operating system drops it when the process ends, however it
ends (a kill included), so a stale lock never blocks a later ``--resume``. The file records the
holder's PID and host for the error message of a second process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from routerkit.config import ConfigError

__all__ = ["RunLocked", "RunLock"]

LOCK_NAME = ".lock"


class RunLocked(ConfigError):
    """Another process holds the run directory's lock."""


class RunLock:
    """Context manager holding ``run_dir/.lock`` exclusively, without waiting.

    Example:
        >>> import tempfile
        >>> with RunLock(tempfile.mkdtemp()):
        ...     pass  # train here

    Raises:
        RunLocked: On entry, when another process trains the same run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            _lock(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(
                f"Run directory {self.path.parent} is being trained by {holder}: two processes must not train one run "
                "directory at once. Wait for it to finish (or stop it), then resume with --resume."
            ) from None
        handle.seek(0)
        handle.truncate()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        handle.write(json.dumps(info))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            try:
                self._handle.seek(0)
                self._handle.truncate()
                _unlock(self._handle)
            finally:
                self._handle.close()
                self._handle = None


def _lock(handle: IO[str]) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(handle: IO[str]) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
