"""Shared helpers of the benchmark tests: a script of ``benchmarks/`` loaded as a module, a folder's digest."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` is not a package)."""
    if str(ROOT / "benchmarks") not in sys.path:  # as when the script runs: its folder first (benchmarks/_machine.py)
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (to show a script changed nothing)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
