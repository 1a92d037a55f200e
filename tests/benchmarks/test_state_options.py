"""benchmarks/state_options.py on a tiny trained battery run: one row per option, finite numbers, the run untouched."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType

import pytest
from _bench import digest, load_script
from _tiny import tiny_battery
from typer.testing import CliRunner

from routerkit.cli import app

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "state_options.py"
BATTERY = ROOT / "examples" / "battery.yaml"


def _script() -> ModuleType:
    return load_script("state_options")


def _digest(folder: Path) -> dict[str, str]:
    return digest(folder)


def test_state_options_on_a_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    run_dir = tmp_path / "run"
    args = ["train", str(BATTERY), "--run-dir", str(run_dir), "-s", "run.device=cpu"]
    for item in tiny_battery():
        args += ["-s", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    before = _digest(run_dir)
    capsys.readouterr()

    options = ["mc_dropout", "softmax_entropy"]
    rows = script.main([str(run_dir), "--epochs", "1", "--seeds", "1", "--repeats", "1", "--options", *options])
    out = capsys.readouterr().out

    assert [r.option for r in rows] == options
    for r in rows:
        assert r.unavailable is None
        for value in (r.mean_iou, r.std_iou, r.gflops, r.state_gflops, r.hull_gain, r.state_seconds):
            assert math.isfinite(value), (r.option, value)
        assert 0.0 < r.state_gflops < r.gflops
        assert sum(r.usage) == pytest.approx(1.0)
    mc, single = rows
    assert mc.state_gflops == pytest.approx(2 * single.state_gflops, rel=1e-6)  # 2 full passes vs 1
    assert "machine:" in out and "threads" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| option")]
    assert [line.split("|")[1].strip() for line in table] == options
    assert "n/a" not in "".join(table)
    assert "cheapest option within noise of mc_dropout" in out
    assert _digest(run_dir) == before, "the script must not write to the run directory"


def test_state_options_refuses_what_is_not_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    with pytest.raises(SystemExit) as exc:
        script.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("run: {}\n")
    with pytest.raises(SystemExit):
        script.main([str(tmp_path)])
    assert "not a finished run (no checkpoints/final.json)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main([str(tmp_path), "--options", "margin:2"])
    assert "no pass count" in capsys.readouterr().err
