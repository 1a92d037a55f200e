"""The machine line every benchmark prints above its table."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def machine_line() -> str:
    """CPU model, cores, torch version and intra-op threads, for the header."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {cpu} ({platform.machine()}) | {os.cpu_count()} cores | torch {torch.__version__} "
        f"| threads {torch.get_num_threads()}"
    )
