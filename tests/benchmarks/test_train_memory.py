"""benchmarks/train_memory.py at a tiny size: both kinds of splits train, every process is sampled, nothing is left behind."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from _bench import load_script


@pytest.mark.slow  # four trainings (~25 s on 2 cores): .ci/run runs it
def test_the_memory_table_has_a_row_per_size_and_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script("train_memory")
    keep = tmp_path / "work"
    argv = ["train_memory.py", "--sizes", "2", "3", "--eager", "--height", "64", "--width", "128", "--cache-gb", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--keep", str(keep)])
    script.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r.split("|")[1:3] for r in rows] == [
        [" 4 ", " lazy + spilled tables "],
        [" 4 ", " in memory "],
        [" 7 ", " lazy + spilled tables "],
        [" 7 ", " in memory "],
    ]
    for row in rows:
        hwm, anon, file_backed = (float(v) for v in row.split("|")[3:6])
        assert hwm > 50 and 0 < anon <= hwm and file_backed > 0  # a torch process, sampled while it ran
    assert "machine:" in out and "64 x 128" in out
    assert sorted(p.name for p in keep.iterdir()) == []  # fixtures and runs removed
